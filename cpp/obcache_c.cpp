// The C API over the C++ engine: exceptions become error codes plus obc_last_error(). Handles
// are checked against a registry of live ones, so that a freed or foreign pointer is an error
// rather than a use after free; see obcache.h for the ownership rules this enforces.
#include "obcache.h"

#include "generator.h"
#include "model.h"
#include "sampler.h"
#include "request.h"
#include "session.h"

#include <atomic>
#include <fstream>
#include <iterator>
#include <climits>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_set>

struct obc_model {
    std::unique_ptr<obc::Model> m;
    int32_t n_contexts = 0;   // live contexts; guarded by g_mu
    int32_t n_calls = 0;      // calls in flight on this model; guarded by g_mu
};

struct obc_context {
    obc_model * model;
    obc::ContextParams cp;        // the engine's copy of obc_context_params (no caller buffers kept)
    obc::KVConfig kv;
    std::unique_ptr<obc::Session> session;
    bool busy = false;            // a call is running on it; guarded by g_mu
    obc_abort_callback abort_cb = nullptr;
    void * abort_user = nullptr;
    obc_progress_callback progress_cb = nullptr;
    void * progress_user = nullptr;
    std::string finish_reason;
    obc::EvictionStats stats;     // what obc_kv_stats_get last reported (its kept_per_layer array)
};

struct obc_sampler {
    obc::Sampler sampler;
    bool busy = false;   // a call is running on it; guarded by g_mu
};

namespace {

thread_local std::string g_last_error;

std::mutex g_mu;
std::unordered_set<const obc_model *> g_models;
std::unordered_set<const obc_context *> g_contexts;
std::unordered_set<const obc_sampler *> g_samplers;

template <typename F, typename R> R guard(R on_error, F && f) {
    try {
        g_last_error.clear();
        return f();
    } catch (const std::exception & e) {
        g_last_error = e.what();
    } catch (...) {
        g_last_error = "unknown error";
    }
    return on_error;
}

// Holds a live model for the duration of a call, so that obc_model_free in another thread
// cannot free it underneath.
class ModelPin {
public:
    explicit ModelPin(const obc_model * m) {
        std::lock_guard<std::mutex> lk(g_mu);
        if (!m) throw std::invalid_argument("model is NULL");
        if (!g_models.count(m)) throw std::invalid_argument("model is not a live obc_model (freed, or never loaded)");
        m_ = const_cast<obc_model *>(m);
        ++m_->n_calls;
    }
    ~ModelPin() {
        std::lock_guard<std::mutex> lk(g_mu);
        --m_->n_calls;
    }
    ModelPin(const ModelPin &) = delete;
    ModelPin & operator=(const ModelPin &) = delete;
    obc_model * get() const { return m_; }

private:
    obc_model * m_;
};

// Claims a live handle for one call. Handles are not reentrant: a second thread, or a free while
// the call runs, gets an error instead of a corrupted or freed object.
template <class T> class Claim {
public:
    Claim(const T * h, const std::unordered_set<const T *> & live, const char * what, const char * in_use) {
        std::lock_guard<std::mutex> lk(g_mu);
        if (!h) throw std::invalid_argument(std::string(what) + " is NULL");
        if (!live.count(h))
            throw std::invalid_argument(std::string(what) + " is not a live obc_" + what + " (freed, or never created)");
        if (h->busy) throw std::logic_error(in_use);
        h_ = const_cast<T *>(h);
        h_->busy = true;
    }
    ~Claim() {
        std::lock_guard<std::mutex> lk(g_mu);
        h_->busy = false;
    }
    Claim(const Claim &) = delete;
    Claim & operator=(const Claim &) = delete;
    T * get() const { return h_; }

private:
    T * h_;
};

struct ContextClaim : Claim<obc_context> {
    explicit ContextClaim(const obc_context * c)
        : Claim(c, g_contexts, "context", "the context is in use by another thread (use one context per thread)") {}
};

struct SamplerClaim : Claim<obc_sampler> {
    explicit SamplerClaim(const obc_sampler * s) : Claim(s, g_samplers, "sampler", "the sampler is in use in another thread") {}
};

bool abort_trampoline(void * data) {
    const obc_context * c = static_cast<const obc_context *>(data);
    return c->abort_cb && c->abort_cb(c->abort_user) != 0;
}

// c's session polls c's cancel callback and reports to its progress callback.
// The context's callbacks on a session's engine context: the context's own session by default,
// or a request's while it runs.
void attach_callbacks(obc_context * c, obc::Session * s = nullptr) {
    if (!s) s = c->session.get();
    if (!s) return;
    obc::Context & ctx = s->context();
    ctx.set_abort_callback(c->abort_cb ? &abort_trampoline : nullptr, c);
    if (c->progress_cb)
        ctx.set_progress_callback([c](int32_t done, int32_t total) { c->progress_cb(done, total, c->progress_user); });
    else
        ctx.set_progress_callback(nullptr);
}

// The sampling fields as the engine's parameters; the caller's chain, when given, is claimed by
// the caller of this (SamplerClaim) and set on gp.sampler there.
obc::GenerateParams generate_params(const obc_sampling_params & sp) {
    obc::GenerateParams gp;
    gp.max_new_tokens = sp.max_new_tokens;
    if (sp.sampler) return gp;
    gp.sampling.temperature = sp.temperature;
    gp.sampling.top_k = sp.top_k;
    gp.sampling.top_p = sp.top_p;
    gp.sampling.min_p = sp.min_p;
    gp.sampling.repeat_penalty = sp.repeat_penalty;
    gp.sampling.seed = sp.seed;
    return gp;   // checked by whoever runs it (check_generate_params)
}

// A generate call's parameters, with the caller's sampler chain claimed for the call when the
// params name one (so that a concurrent free or use of it is an error).
struct CallParams {
    std::optional<SamplerClaim> claim;
    obc::GenerateParams gp;
    explicit CallParams(const obc_sampling_params & sp) : gp(generate_params(sp)) {
        if (sp.sampler) {
            claim.emplace(sp.sampler);
            gp.sampler = &claim->get()->sampler;
        }
    }
};

// Streams a request to the callback, then finishes it: a single request hands back its session,
// a conversation's turn joins the conversation. A callback that stops it early makes the reason "stop".
int32_t run_generation(obc_context * c, obc::Request & req, obc_token_callback cb, void * user) {
    c->finish_reason.clear();
    std::string piece;
    while (req.next(piece)) {
        if (cb && !piece.empty() && cb(piece.data(), piece.size(), user) != 0) break;
    }
    const bool done = req.generator().done();
    auto session = req.finish();
    if (session) c->session = std::move(session);
    c->finish_reason = done ? req.finish_reason() : "stop";
    return (int32_t) req.generated().size();
}

// The context's conversation, started on first use (ending any single-request session).
obc::Session & conversation(obc_context * c) {
    if (!c->session || !c->session->is_conversation()) {
        c->session = std::make_unique<obc::Session>(*c->model->m, c->cp, c->kv, obc::Session::Conversation{});
        attach_callbacks(c);
    }
    return *c->session;
}

const obc::Vocab & vocab_with(const ModelPin & pin, int32_t token) {
    const obc::Vocab & v = pin.get()->m->vocab;
    if (token < 0 || token >= v.n_tokens()) throw std::invalid_argument("token id " + std::to_string(token) + " is outside the vocabulary");
    return v;
}

int32_t decode(obc_context * ctx, const int32_t * tokens, int32_t n_tokens, bool all_logits) {
    return guard<>((int32_t) -1, [&] {
        ContextClaim claim(ctx);
        if (n_tokens <= 0) throw std::invalid_argument("n_tokens must be positive, got " + std::to_string(n_tokens));
        if (!tokens) throw std::invalid_argument("tokens is NULL");
        obc::Session & s = conversation(claim.get());
        s.append(std::vector<int32_t>(tokens, tokens + n_tokens), true, all_logits);   // ids checked against the vocabulary
        return (int32_t) 0;
    });
}

obc_sampler * register_sampler(obc::Sampler chain) {
    auto s = std::unique_ptr<obc_sampler>(new obc_sampler{std::move(chain)});
    std::lock_guard<std::mutex> lk(g_mu);
    g_samplers.insert(s.get());
    return s.release();
}

template <class MakeStage> int32_t add_stage(obc_sampler * chain, MakeStage && make) {
    return guard<>((int32_t) -1, [&] {
        SamplerClaim claim(chain);
        claim.get()->sampler.add(make());   // the constructor checks its values first
        return (int32_t) 0;
    });
}

}  // namespace

extern "C" {

const char * obc_last_error(void) { return g_last_error.c_str(); }

obc_context_params obc_context_default_params(void) {
    const obc::ContextParams d;
    obc_context_params p{};
    p.n_ctx = d.n_ctx;
    p.n_batch = d.n_batch;
    const obc::ThreadParams tp;
    p.n_threads = tp.n_threads;
    p.adaptive_threads = tp.adaptive;
    p.poll = tp.poll;
    p.prio = tp.prio;
    p.cpu_mask = nullptr;
    p.cpu_strict = tp.cpu_strict;
    p.kv_method = nullptr;
    p.kv_budget = 0;
    p.kv_ratio = 0.0f;
    p.kv_n_recent = -1;
    p.kv_n_sink = -1;
    p.kv_evict = nullptr;
    p.kv_spec = nullptr;
    p.type_k = nullptr;
    p.type_v = nullptr;
    p.flash_attn = d.flash_attn;
    return p;
}

obc_sampling_params obc_sampling_default_params(void) {
    obc::SamplerParams d;
    obc_sampling_params p{};
    p.temperature = d.temperature;
    p.top_k = d.top_k;
    p.top_p = d.top_p;
    p.min_p = d.min_p;
    p.repeat_penalty = d.repeat_penalty;
    p.seed = d.seed;
    p.max_new_tokens = obc::kDefaultMaxNewTokens;
    p.sampler = nullptr;
    return p;
}

obc_model_params obc_model_default_params(void) {
    obc_model_params p{};
    p.n_gpu_layers = obc::ModelParams{}.n_gpu_layers;
    return p;
}

obc_model * obc_model_load(const char * path) { return obc_model_load_from_file(path, obc_model_default_params()); }

obc_model * obc_model_load_from_file(const char * path, obc_model_params params) {
    return guard<>((obc_model *) nullptr, [&] {
        if (!path) throw std::invalid_argument("path is NULL");
        if (params.n_gpu_layers < 0)
            throw std::invalid_argument("n_gpu_layers must be >= 0, got " + std::to_string(params.n_gpu_layers));
        obc::ModelParams mp;
        mp.n_gpu_layers = params.n_gpu_layers;
        auto m = std::make_unique<obc_model>();
        m->m = obc::Model::load(path, mp);
        std::lock_guard<std::mutex> lk(g_mu);
        g_models.insert(m.get());
        return m.release();
    });
}

int32_t obc_model_free(obc_model * model) {
    return guard<>((int32_t) -1, [&] {
        if (!model) return (int32_t) 0;
        {
            std::lock_guard<std::mutex> lk(g_mu);
            if (!g_models.count(model)) throw std::invalid_argument("model is not a live obc_model (double free?)");
            if (model->n_contexts > 0)
                throw std::logic_error(std::to_string(model->n_contexts) +
                                       " context(s) of this model are alive: free them before the model");
            if (model->n_calls > 0) throw std::logic_error("the model is in use by another thread");
            g_models.erase(model);
        }
        delete model;
        return (int32_t) 0;
    });
}

int32_t obc_model_n_vocab(const obc_model * model) {
    return guard<>((int32_t) -1, [&] {
        ModelPin pin(model);
        return pin.get()->m->hp.n_vocab;
    });
}

int32_t obc_model_n_gpu_layers(const obc_model * model) {
    return guard<>((int32_t) -1, [&] {
        ModelPin pin(model);
        return pin.get()->m->gpu_layers();
    });
}

int32_t obc_model_meta(const obc_model * model, obc_model_meta_key key) {
    return guard<>((int32_t) -1, [&] {
        ModelPin pin(model);
        const obc::Model & m = *pin.get()->m;
        switch (key) {
            case OBC_META_N_CTX_TRAIN: return m.hp.n_ctx_train;
            case OBC_META_N_EMBD: return m.hp.n_embd;
            case OBC_META_N_LAYER: return m.hp.n_layer;
            case OBC_META_N_HEAD: return m.hp.n_head;
            case OBC_META_N_HEAD_KV: return m.hp.n_head_kv;
            case OBC_META_HEAD_DIM: return m.hp.head_dim;
            case OBC_META_N_VOCAB: return m.hp.n_vocab;
            case OBC_META_BOS: return m.vocab.bos();
            case OBC_META_EOS: return m.vocab.eos();
            case OBC_META_ADD_BOS: return (int32_t) m.vocab.add_bos();
            case OBC_META_EOT: return m.vocab.eot();
            case OBC_META_UNK: return m.vocab.unk();
            case OBC_META_PAD: return m.vocab.pad();
        }
        throw std::invalid_argument("unknown obc_model_meta_key " + std::to_string((int) key));
    });
}

int32_t obc_model_meta_str(const obc_model * model, const char * key, char * out, int32_t n_max) {
    return guard<>((int32_t) -1, [&] {
        ModelPin pin(model);
        if (!key) throw std::invalid_argument("key is NULL");
        if (n_max < 0 || (n_max > 0 && !out)) throw std::invalid_argument("out must hold n_max >= 0 bytes");
        std::string v;
        if (!pin.get()->m->meta_value(key, v))
            throw std::invalid_argument(std::string("no metadata value '") + key + "' (missing, or an array)");
        if (v.size() >= (size_t) INT32_MAX) throw std::length_error("the value is longer than 2^31 bytes");
        if (n_max > 0) {
            const size_t n = std::min(v.size(), (size_t) n_max - 1);
            std::memcpy(out, v.data(), n);
            out[n] = 0;
        }
        return (int32_t) v.size();
    });
}

int32_t obc_tokenize(const obc_model * model, const char * text, int32_t add_special, int32_t * out, int32_t n_max) {
    return guard<>((int32_t) INT32_MIN, [&] {
        ModelPin pin(model);
        if (!text) throw std::invalid_argument("text is NULL");
        if (n_max < 0) throw std::invalid_argument("n_max must be >= 0, got " + std::to_string(n_max));
        if (!out && n_max > 0) throw std::invalid_argument("out is NULL but n_max is " + std::to_string(n_max));
        const auto ids = pin.get()->m->vocab.tokenize(text, add_special != 0, false);
        if (ids.size() > (size_t) INT32_MAX) throw std::length_error("the text has more than 2^31 tokens");
        if ((int32_t) ids.size() > n_max) return -(int32_t) ids.size();
        if (!ids.empty()) std::memcpy(out, ids.data(), ids.size() * sizeof(int32_t));
        return (int32_t) ids.size();
    });
}

int32_t obc_detokenize(const obc_model * model, const int32_t * ids, int32_t n_ids, char * out, int32_t n_max) {
    return guard<>((int32_t) -1, [&] {
        ModelPin pin(model);
        if (n_ids < 0) throw std::invalid_argument("n_ids must be >= 0, got " + std::to_string(n_ids));
        if (n_max < 0) throw std::invalid_argument("n_max must be >= 0, got " + std::to_string(n_max));
        if (!ids && n_ids > 0) throw std::invalid_argument("ids is NULL but n_ids is " + std::to_string(n_ids));
        if (!out && n_max > 0) throw std::invalid_argument("out is NULL but n_max is " + std::to_string(n_max));
        const std::string s = pin.get()->m->vocab.detokenize(std::vector<int32_t>(ids, ids + n_ids));
        if (s.size() > (size_t) INT32_MAX) throw std::length_error("the text is longer than 2^31 bytes");
        if (n_max > 0) std::memcpy(out, s.data(), std::min<size_t>(s.size(), (size_t) n_max));
        return (int32_t) s.size();
    });
}

int32_t obc_token_to_piece(const obc_model * model, int32_t token, int32_t render_special, char * out, int32_t n_max) {
    return guard<>((int32_t) -1, [&] {
        ModelPin pin(model);
        if (n_max < 0 || (n_max > 0 && !out)) throw std::invalid_argument("out must hold n_max >= 0 bytes");
        const std::string piece = vocab_with(pin, token).token_to_piece(token, render_special != 0);
        if (n_max > 0) std::memcpy(out, piece.data(), std::min<size_t>(piece.size(), (size_t) n_max));
        return (int32_t) piece.size();
    });
}

int32_t obc_token_get_attr(const obc_model * model, int32_t token) {
    return guard<>((int32_t) -1, [&] {
        ModelPin pin(model);
        switch (vocab_with(pin, token).attr(token)) {
            case obc::TokenAttr::normal: return (int32_t) OBC_TOKEN_NORMAL;
            case obc::TokenAttr::control: return (int32_t) OBC_TOKEN_CONTROL;
            case obc::TokenAttr::user_defined: return (int32_t) OBC_TOKEN_USER_DEFINED;
            case obc::TokenAttr::unknown: return (int32_t) OBC_TOKEN_UNKNOWN;
            case obc::TokenAttr::byte: return (int32_t) OBC_TOKEN_BYTE;
            case obc::TokenAttr::unused: return (int32_t) OBC_TOKEN_UNUSED;
        }
        throw std::logic_error("a token attribute without a C name");
    });
}

obc_context * obc_context_new(obc_model * model, obc_context_params params) {
    return guard<>((obc_context *) nullptr, [&] {
        ModelPin pin(model);
        obc::ContextParams cp;
        if (params.n_ctx < 0)
            throw std::invalid_argument("n_ctx must be >= 0 (0: " + std::to_string(cp.n_ctx) + "), got " + std::to_string(params.n_ctx));
        if (params.n_batch < 0)
            throw std::invalid_argument("n_batch must be >= 0 (0: " + std::to_string(cp.n_batch) + "), got " + std::to_string(params.n_batch));
        if (params.flash_attn < -1 || params.flash_attn > 1)
            throw std::invalid_argument("flash_attn must be -1 (per request), 0 or 1, got " + std::to_string(params.flash_attn));
        if (params.n_ctx) cp.n_ctx = params.n_ctx;
        if (params.n_batch) cp.n_batch = params.n_batch;
        cp.flash_attn = params.flash_attn;
        cp.threads.n_threads = params.n_threads;
        cp.threads.adaptive = params.adaptive_threads;
        cp.threads.poll = params.poll;
        cp.threads.prio = params.prio;
        cp.threads.cpu_mask = params.cpu_mask ? params.cpu_mask : "";
        cp.threads.cpu_strict = params.cpu_strict;
        obc::check_thread_params(cp.threads);
        // One reader of the KV configuration for every door: a spec string, or the fields as its options.
        obc::KVOptions opts;
        if (params.kv_spec && *params.kv_spec) {
            if ((params.kv_method && *params.kv_method) || params.kv_budget || params.kv_ratio != 0.0f)
                throw std::invalid_argument("give kv_spec or the kv_method/kv_budget/kv_ratio fields, not both");
            opts = obc::parse_kv_spec(params.kv_spec);
        } else {
            opts.emplace_back("method", params.kv_method && *params.kv_method ? params.kv_method : "full");
            if (params.kv_budget != 0) opts.emplace_back("budget", std::to_string(params.kv_budget));
            if (params.kv_ratio != 0.0f) {
                char buf[32];
                std::snprintf(buf, sizeof buf, "%.9g", (double) params.kv_ratio);
                opts.emplace_back("ratio", buf);
            }
        }
        // The fields a spec does not conflict with apply after it. -1 keeps the method's default;
        // the other negatives are refused by the reader.
        if (params.kv_n_recent != -1) opts.emplace_back("n_recent", std::to_string(params.kv_n_recent));
        if (params.kv_n_sink != -1) opts.emplace_back("n_sink", std::to_string(params.kv_n_sink));
        if (params.kv_evict) opts.emplace_back("evict", params.kv_evict);
        if (params.type_k && *params.type_k) opts.emplace_back("type_k", params.type_k);
        if (params.type_v && *params.type_v) opts.emplace_back("type_v", params.type_v);
        const obc::KVConfig kv = obc::kv_config_from_options(opts);
        auto c = std::make_unique<obc_context>();
        c->model = pin.get();
        c->cp = cp;
        c->kv = kv;
        std::lock_guard<std::mutex> lk(g_mu);
        g_contexts.insert(c.get());
        ++pin.get()->n_contexts;
        return c.release();
    });
}

int32_t obc_context_free(obc_context * ctx) {
    return guard<>((int32_t) -1, [&] {
        if (!ctx) return (int32_t) 0;
        {
            std::lock_guard<std::mutex> lk(g_mu);
            if (!g_contexts.count(ctx)) throw std::invalid_argument("context is not a live obc_context (double free?)");
            if (ctx->busy) throw std::logic_error("the context is generating in another thread");
            g_contexts.erase(ctx);
            --ctx->model->n_contexts;
        }
        delete ctx;
        return (int32_t) 0;
    });
}

void obc_context_reset(obc_context * ctx) {
    guard<>(0, [&] {
        ContextClaim claim(ctx);
        claim.get()->session.reset();
        return 0;
    });
}

int32_t obc_context_set_abort_callback(obc_context * ctx, obc_abort_callback cb, void * user) {
    return guard<>((int32_t) -1, [&] {
        ContextClaim claim(ctx);
        claim.get()->abort_cb = cb;
        claim.get()->abort_user = user;
        attach_callbacks(claim.get());
        return (int32_t) 0;
    });
}

int32_t obc_context_set_progress_callback(obc_context * ctx, obc_progress_callback cb, void * user) {
    return guard<>((int32_t) -1, [&] {
        ContextClaim claim(ctx);
        claim.get()->progress_cb = cb;
        claim.get()->progress_user = user;
        attach_callbacks(claim.get());
        return (int32_t) 0;
    });
}

int32_t obc_generate(obc_context * ctx, const char * prompt, obc_sampling_params sp, obc_token_callback cb, void * user) {
    return guard<>((int32_t) -1, [&] {
        ContextClaim claim(ctx);
        obc_context * c = claim.get();
        if (!prompt) throw std::invalid_argument("prompt is NULL");
        const CallParams call(sp);
        c->session.reset();
        obc::Request req(*c->model->m, c->cp, c->kv, obc::Request::tokenize(*c->model->m, prompt), call.gp);
        // The request's session stays with the context after it (obc_kv_stats_get, the callbacks).
        attach_callbacks(c, &req.session());
        return run_generation(c, req, cb, user);
    });
}

int32_t obc_decode(obc_context * ctx, const int32_t * tokens, int32_t n_tokens) { return decode(ctx, tokens, n_tokens, false); }

int32_t obc_decode_all(obc_context * ctx, const int32_t * tokens, int32_t n_tokens) { return decode(ctx, tokens, n_tokens, true); }

const float * obc_get_logits(obc_context * ctx) { return obc_get_logits_ith(ctx, -1); }

const float * obc_get_logits_ith(obc_context * ctx, int32_t i) {
    return guard<>((const float *) nullptr, [&] {
        ContextClaim claim(ctx);
        obc_context * c = claim.get();
        // Only obc_decode and obc_decode_all leave logits after the sequence's last token: the
        // other calls keep their last token waiting (undecoded) for the next one.
        if (!c->session || !c->session->logits_follow_sequence())
            throw std::logic_error("no logits after the last token: call obc_decode or obc_decode_all first");
        const float * row = c->session->logits_of(i);
        if (!row)
            throw std::out_of_range("no logits kept for token " + std::to_string(i) +
                                    " of the last decode (obc_decode keeps the last one, obc_decode_all every one)");
        return row;
    });
}

int32_t obc_token_is_eog(const obc_model * model, int32_t token) {
    return guard<>((int32_t) -1, [&] {
        ModelPin pin(model);
        return (int32_t) vocab_with(pin, token).is_eog(token);
    });
}

obc_sampler * obc_sampler_new(obc_sampling_params params) {
    return guard<>((obc_sampler *) nullptr, [&] {
        if (params.sampler) throw std::invalid_argument("params.sampler is set: obc_sampler_new builds a chain from the fields");
        return register_sampler(obc::Sampler(generate_params(params).sampling));   // checks every value
    });
}

obc_sampler * obc_sampler_chain_new(void) {
    return guard<>((obc_sampler *) nullptr, [&] { return register_sampler(obc::Sampler()); });
}

int32_t obc_sampler_add_penalties(obc_sampler * chain, int32_t last_n, float repeat_penalty) {
    return add_stage(chain, [&] { return obc::stage_penalties(last_n, repeat_penalty); });
}
int32_t obc_sampler_add_top_k(obc_sampler * chain, int32_t k) {
    return add_stage(chain, [&] { return obc::stage_top_k(k); });
}
int32_t obc_sampler_add_top_p(obc_sampler * chain, float p) {
    return add_stage(chain, [&] { return obc::stage_top_p(p); });
}
int32_t obc_sampler_add_min_p(obc_sampler * chain, float p) {
    return add_stage(chain, [&] { return obc::stage_min_p(p); });
}
int32_t obc_sampler_add_temp(obc_sampler * chain, float t) {
    return add_stage(chain, [&] { return obc::stage_temp(t); });
}
int32_t obc_sampler_add_greedy(obc_sampler * chain) {
    return add_stage(chain, [] { return obc::stage_greedy(); });
}
int32_t obc_sampler_add_dist(obc_sampler * chain, uint64_t seed) {
    return add_stage(chain, [&] { return obc::stage_dist(seed); });
}

int32_t obc_sampler_reset(obc_sampler * sampler) {
    return guard<>((int32_t) -1, [&] {
        SamplerClaim claim(sampler);
        claim.get()->sampler.reset();
        return (int32_t) 0;
    });
}

int32_t obc_sampler_sample(obc_sampler * sampler, const float * logits, int32_t n_vocab) {
    return guard<>((int32_t) -1, [&] {
        SamplerClaim claim(sampler);
        if (!logits) throw std::invalid_argument("logits is NULL");
        if (n_vocab <= 0) throw std::invalid_argument("n_vocab must be positive, got " + std::to_string(n_vocab));
        return claim.get()->sampler.sample(logits, n_vocab);
    });
}

int32_t obc_sampler_accept(obc_sampler * sampler, int32_t token) {
    return guard<>((int32_t) -1, [&] {
        SamplerClaim claim(sampler);
        if (token < 0) throw std::invalid_argument("token must be >= 0, got " + std::to_string(token));
        claim.get()->sampler.accept(token);
        return (int32_t) 0;
    });
}

int32_t obc_sampler_free(obc_sampler * sampler) {
    return guard<>((int32_t) -1, [&] {
        if (!sampler) return (int32_t) 0;
        {
            std::lock_guard<std::mutex> lk(g_mu);
            if (!g_samplers.count(sampler)) throw std::invalid_argument("sampler is not a live obc_sampler (double free?)");
            if (sampler->busy) throw std::logic_error("the sampler is in use in another thread");
            g_samplers.erase(sampler);
        }
        delete sampler;
        return (int32_t) 0;
    });
}

int32_t obc_conversation_append(obc_context * ctx, const char * text, int32_t parse_special) {
    return guard<>((int32_t) -1, [&] {
        ContextClaim claim(ctx);
        obc_context * c = claim.get();
        if (!text) throw std::invalid_argument("text is NULL");
        obc::Session & s = conversation(c);
        s.append(c->model->m->vocab.tokenize(text, s.sequence_size() == 0, parse_special != 0));
        return (int32_t) s.sequence_size();
    });
}

int32_t obc_conversation_generate(obc_context * ctx, const char * text, int32_t parse_special, obc_sampling_params sp,
                                  obc_token_callback cb, void * user) {
    return guard<>((int32_t) -1, [&] {
        ContextClaim claim(ctx);
        obc_context * c = claim.get();
        if (!text) throw std::invalid_argument("text is NULL");
        const CallParams call(sp);
        obc::Session & s = conversation(c);
        const auto ids = *text ? c->model->m->vocab.tokenize(text, s.sequence_size() == 0, parse_special != 0)
                               : std::vector<int32_t>{};
        obc::Request turn(s, ids, call.gp);
        return run_generation(c, turn, cb, user);
    });
}

int32_t obc_conversation_n_past(const obc_context * ctx) {
    return guard<>((int32_t) -1, [&] {
        ContextClaim claim(ctx);
        const auto & s = claim.get()->session;
        return s && s->is_conversation() ? (int32_t) s->sequence_size() : (int32_t) 0;
    });
}

const char * obc_finish_reason(const obc_context * ctx) {
    return guard<>("", [&] {
        ContextClaim claim(ctx);
        return claim.get()->finish_reason.c_str();
    });
}

int32_t obc_conversation_save(obc_context * ctx, const char * path) {
    return guard<>((int32_t) -1, [&] {
        ContextClaim claim(ctx);
        if (!path) throw std::invalid_argument("path is NULL");
        const auto state = conversation(claim.get()).save_state();
        const std::string tmp = std::string(path) + ".tmp";
        {
            std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
            f.write(reinterpret_cast<const char *>(state.data()), (std::streamsize) state.size());
            if (!f) throw std::runtime_error("cannot write " + tmp);
        }
        if (std::rename(tmp.c_str(), path) != 0) throw std::runtime_error(std::string("cannot replace ") + path);
        return (int32_t) 0;
    });
}

int64_t obc_conversation_save_buffer(obc_context * ctx, uint8_t * out, size_t n_max) {
    return guard<>((int64_t) -1, [&] {
        ContextClaim claim(ctx);
        if (n_max > 0 && !out) throw std::invalid_argument("out is NULL with n_max > 0");
        const auto state = conversation(claim.get()).save_state();
        if (n_max >= state.size()) std::memcpy(out, state.data(), state.size());
        return (int64_t) state.size();
    });
}

namespace {

// Replaces c's conversation with the saved state (checked; the context's n_ctx bounds it).
void load_conversation(obc_context * c, const uint8_t * data, size_t size) {
    c->session = obc::Session::load_state(*c->model->m, c->cp, data, size, c->cp.n_ctx);
    attach_callbacks(c);
    c->finish_reason.clear();
}

}  // namespace

int32_t obc_conversation_load(obc_context * ctx, const char * path) {
    return guard<>((int32_t) -1, [&] {
        ContextClaim claim(ctx);
        if (!path) throw std::invalid_argument("path is NULL");
        std::ifstream f(path, std::ios::binary);
        if (!f) throw std::runtime_error(std::string("cannot open ") + path);
        const std::vector<uint8_t> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        load_conversation(claim.get(), data.data(), data.size());
        return (int32_t) 0;
    });
}

int32_t obc_conversation_load_buffer(obc_context * ctx, const uint8_t * data, size_t size) {
    return guard<>((int32_t) -1, [&] {
        ContextClaim claim(ctx);
        if (!data) throw std::invalid_argument("data is NULL");
        load_conversation(claim.get(), data, size);
        return (int32_t) 0;
    });
}

int32_t obc_kv_evict(obc_context * ctx, int32_t budget) {
    return guard<>((int32_t) -1, [&] {
        ContextClaim claim(ctx);
        obc_context * c = claim.get();
        if (!c->session) throw std::logic_error("nothing to evict: nothing decoded yet");
        obc::Evictor * ev = c->session->evictor();
        if (!ev) throw std::logic_error("this context keeps the full cache: give it a KV method and budget to evict");
        const int32_t b = budget > 0 ? budget : c->session->stats().budget;
        if (b <= 0) throw std::logic_error("no budget to evict to yet (a ratio's budget follows the prompt): pass one");
        ev->evict_to(b);
        return (int32_t) 0;
    });
}

size_t obc_kv_bytes_allocated(const obc_context * ctx) {
    return guard<>((size_t) 0, [&] {
        ContextClaim claim(ctx);
        return claim.get()->session ? claim.get()->session->stats().kv_bytes_allocated : (size_t) 0;
    });
}

size_t obc_kv_bytes_used(const obc_context * ctx) {
    return guard<>((size_t) 0, [&] {
        ContextClaim claim(ctx);
        return claim.get()->session ? claim.get()->session->stats().kv_bytes_used : (size_t) 0;
    });
}

int32_t obc_kv_stats_get(obc_context * ctx, obc_kv_stats * out) {
    return guard<>((int32_t) -1, [&] {
        ContextClaim claim(ctx);
        if (!out) throw std::invalid_argument("out is NULL");
        obc_context * c = claim.get();
        c->stats = c->session ? c->session->stats() : obc::EvictionStats{};
        const obc::EvictionStats & st = c->stats;
        *out = obc_kv_stats{};
        out->tokens_seen = st.tokens_seen;
        out->evictions = st.evictions;
        out->tokens_evicted = st.tokens_evicted;
        out->budget = st.budget;
        out->bytes_allocated = st.kv_bytes_allocated;
        out->bytes_used = st.kv_bytes_used;
        out->bytes_kept = st.kv_bytes_kept;
        out->bytes_full = st.kv_bytes_full;
        out->score_ms = st.score_ms;
        out->compact_ms = st.compact_ms;
        out->n_layer = (int32_t) st.kept_per_layer.size();
        out->kept_per_layer = st.kept_per_layer.empty() ? nullptr : st.kept_per_layer.data();
        return (int32_t) 0;
    });
}

}  // extern "C"
