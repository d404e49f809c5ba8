// The C API over the C++ engine: exceptions become error codes plus obc_last_error().
#include "obcache.h"

#include "model.h"
#include "session.h"

#include <climits>
#include <cstring>
#include <stdexcept>
#include <memory>
#include <string>

struct obc_model {
    std::unique_ptr<obc::Model> m;
};

struct obc_context {
    obc_model * model;
    obc_context_params params;
    obc::KVConfig kv;
    std::unique_ptr<obc::Session> session;
};

namespace {

thread_local std::string g_last_error;

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

}  // namespace

extern "C" {

const char * obc_last_error(void) { return g_last_error.c_str(); }

obc_context_params obc_context_default_params(void) {
    obc_context_params p{};
    p.n_ctx = 4096;
    p.n_batch = 512;
    p.n_threads = 0;
    p.kv_method = nullptr;
    p.kv_budget = 0;
    p.kv_ratio = 0.0f;
    p.kv_n_recent = -1;
    p.kv_n_sink = -1;
    p.kv_evict = nullptr;
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
    p.max_new_tokens = 256;
    return p;
}

obc_model * obc_model_load(const char * path) {
    return guard<>((obc_model *) nullptr, [&] {
        if (!path) throw std::invalid_argument("path is NULL");
        auto * m = new obc_model;
        try {
            m->m = obc::Model::load(path);
        } catch (...) {
            delete m;
            throw;
        }
        return m;
    });
}

void obc_model_free(obc_model * model) { delete model; }

int32_t obc_model_n_vocab(const obc_model * model) { return model ? model->m->hp.n_vocab : -1; }

int32_t obc_tokenize(const obc_model * model, const char * text, int32_t add_special, int32_t * out, int32_t n_max) {
    return guard<>((int32_t) INT32_MIN, [&] {
        if (!model || !text) throw std::invalid_argument("model or text is NULL");
        const auto ids = model->m->vocab.tokenize(text, add_special != 0, false);
        if ((int32_t) ids.size() > n_max) return -(int32_t) ids.size();
        std::memcpy(out, ids.data(), ids.size() * sizeof(int32_t));
        return (int32_t) ids.size();
    });
}

int32_t obc_detokenize(const obc_model * model, const int32_t * ids, int32_t n_ids, char * out, int32_t n_max) {
    return guard<>((int32_t) -1, [&] {
        if (!model || (!ids && n_ids > 0)) throw std::invalid_argument("model or ids is NULL");
        const std::string s = model->m->vocab.detokenize(std::vector<int32_t>(ids, ids + n_ids));
        if (out && n_max > 0) std::memcpy(out, s.data(), std::min<size_t>(s.size(), (size_t) n_max));
        return (int32_t) s.size();
    });
}

obc_context * obc_context_new(obc_model * model, obc_context_params params) {
    return guard<>((obc_context *) nullptr, [&] {
        if (!model) throw std::invalid_argument("model is NULL");
        const std::string method = params.kv_method && *params.kv_method ? params.kv_method : "full";
        obc::KVConfig kv = obc::kv_config_for_method(method);
        kv.budget = params.kv_budget;
        kv.ratio = params.kv_ratio;
        if (params.kv_n_recent >= 0) kv.n_recent = params.kv_n_recent;
        if (params.kv_n_sink >= 0) kv.n_sink = params.kv_n_sink;
        kv.mode = obc::parse_evict_mode(params.kv_evict ? params.kv_evict : "prefill");
        auto * c = new obc_context{model, params, obc::finalize_kv_config(kv), nullptr};
        if (c->params.n_ctx <= 0) c->params.n_ctx = 4096;
        if (c->params.n_batch <= 0) c->params.n_batch = 512;
        return c;
    });
}

void obc_context_free(obc_context * ctx) { delete ctx; }

void obc_context_reset(obc_context * ctx) {
    if (ctx) ctx->session.reset();
}

int32_t obc_generate(obc_context * ctx, const char * prompt, obc_sampling_params sp, obc_token_callback cb, void * user) {
    return guard<>((int32_t) -1, [&] {
        if (!ctx || !prompt) throw std::invalid_argument("context or prompt is NULL");
        const auto ids = ctx->model->m->vocab.tokenize(prompt, true, false);
        obc::ContextParams cp;
        cp.n_ctx = ctx->params.n_ctx;
        cp.n_batch = ctx->params.n_batch;
        cp.n_threads = ctx->params.n_threads;
        obc::GenerateParams gp;
        gp.max_new_tokens = sp.max_new_tokens;
        gp.sampling.temperature = sp.temperature;
        gp.sampling.top_k = sp.top_k;
        gp.sampling.top_p = sp.top_p;
        gp.sampling.min_p = sp.min_p;
        gp.sampling.repeat_penalty = sp.repeat_penalty;
        gp.sampling.seed = sp.seed;
        ctx->session = std::make_unique<obc::Session>(*ctx->model->m, cp, ctx->kv, (int32_t) ids.size(), gp.max_new_tokens);
        auto gen = ctx->session->generate(ids, gp);
        std::string piece;
        while (gen->next(piece)) {
            if (cb && !piece.empty() && cb(piece.data(), piece.size(), user) != 0) break;
        }
        return (int32_t) gen->generated().size();
    });
}

size_t obc_kv_bytes_allocated(const obc_context * ctx) {
    return ctx && ctx->session ? ctx->session->stats().kv_bytes_allocated : 0;
}

size_t obc_kv_bytes_used(const obc_context * ctx) {
    return ctx && ctx->session ? ctx->session->stats().kv_bytes_used : 0;
}

}  // extern "C"
