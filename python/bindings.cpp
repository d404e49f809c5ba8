// pyobcache._core: a thin nanobind layer over the engine. Defaults, docs and ergonomics live in
// the Python package; this file converts types and releases the GIL around model work.
#include "eviction.h"
#include "model.h"
#include "request.h"
#include "session.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <type_traits>

namespace nb = nanobind;
using namespace nb::literals;

void obc_bind_ops(nb::module_ & m);

namespace {

using FloatArray = nb::ndarray<nb::numpy, float>;

FloatArray to_numpy(std::vector<float> v, std::initializer_list<size_t> shape) {
    auto * heap = new std::vector<float>(std::move(v));
    nb::capsule owner(heap, [](void * p) noexcept { delete static_cast<std::vector<float> *>(p); });
    return FloatArray(heap->data(), shape.size(), shape.begin(), owner);
}

nb::bytes to_bytes(const std::string & s) { return nb::bytes(s.data(), s.size()); }

obc::GenerateParams generate_params(int32_t max_new_tokens, float temperature, int32_t top_k, float top_p, float min_p,
                                    float repeat_penalty, int32_t repeat_last_n, uint64_t seed,
                                    const std::vector<std::string> & stop, bool ignore_eos, int32_t n_logprobs) {
    obc::GenerateParams gp;
    gp.n_logprobs = n_logprobs;
    gp.max_new_tokens = max_new_tokens;
    gp.sampling.temperature = temperature;
    gp.sampling.top_k = top_k;
    gp.sampling.top_p = top_p;
    gp.sampling.min_p = min_p;
    gp.sampling.repeat_penalty = repeat_penalty;
    gp.sampling.repeat_last_n = repeat_last_n;
    gp.sampling.seed = seed;
    gp.stop = stop;
    gp.ignore_eos = ignore_eos;
    return gp;
}

// Lets Ctrl-C reach Python while the engine runs with the GIL released. The context's abort
// callback (polled by the engine between micro-batches and scoring graphs, and by ggml between
// graph nodes) takes the GIL at most every 20 ms and runs Python's signal handlers; when one
// raises (KeyboardInterrupt), the engine stops with obc::Interrupted and that Python exception
// is re-raised. Only the thread that made the call touches Python: ggml may poll from others.
class PyInterrupt {
public:
    explicit PyInterrupt(obc::Context & c) : ctx_(c), owner_(std::this_thread::get_id()) {
        ctx_.set_abort_callback(&PyInterrupt::poll, this);
    }
    ~PyInterrupt() { ctx_.set_abort_callback(nullptr, nullptr); }
    PyInterrupt(const PyInterrupt &) = delete;
    PyInterrupt & operator=(const PyInterrupt &) = delete;

    // Runs f without the GIL (the caller holds it).
    template <class F> auto run(F && f) -> decltype(f()) {
        using R = decltype(f());
        try {
            if constexpr (std::is_void_v<R>) {
                {
                    nb::gil_scoped_release r;
                    f();
                }
                reraise();
            } else {
                R out = [&] {
                    nb::gil_scoped_release r;
                    return f();
                }();
                reraise();
                return out;
            }
        } catch (const obc::Interrupted &) {
            reraise();
            throw;
        }
    }

private:
    // A signal handler raised while the engine was finishing: raise it now (its error indicator
    // is set on this thread).
    void reraise() {
        if (raised_) throw nb::python_error();
    }
    static bool poll(void * data) {
        auto * self = static_cast<PyInterrupt *>(data);
        if (self->raised_) return true;
        if (std::this_thread::get_id() != self->owner_) return false;
        const auto now = std::chrono::steady_clock::now();
        if (now - self->last_ < std::chrono::milliseconds(20)) return false;
        self->last_ = now;
        PyGILState_STATE st = PyGILState_Ensure();
        self->raised_ = PyErr_CheckSignals() != 0;   // the error stays set for reraise()
        PyGILState_Release(st);
        return self->raised_;
    }
    obc::Context & ctx_;
    std::thread::id owner_;
    std::chrono::steady_clock::time_point last_{};
    bool raised_ = false;
};

// The engine's context parameters from what the Python side passes for a request or a conversation.
obc::ContextParams context_params(int32_t n_ctx, int32_t n_batch, const obc::ThreadParams & threads, int32_t flash_attn) {
    obc::ContextParams cp;
    cp.n_ctx = n_ctx;
    cp.n_batch = n_batch;
    cp.threads = threads;
    cp.flash_attn = flash_attn;
    return cp;
}

// The next piece of a Generator or a Request as bytes, None once it has finished; Ctrl-C reaches
// Python meanwhile (the first call runs the whole prefill).
template <class T> nb::object next_piece(T & x) {
    std::string piece;
    PyInterrupt guard(x.context());
    const bool more = guard.run([&] { return x.next(piece); });
    if (!more) return nb::none();
    return to_bytes(piece);
}

// A generation's log-probabilities: [(logprob, [(token, logprob), ...]), ...].
nb::list logprobs_list(const obc::Generator & g) {
    nb::list out;
    for (const auto & lp : g.logprobs()) {
        nb::list top;
        for (const auto & [id, v] : lp.top) top.append(nb::make_tuple(id, v));
        out.append(nb::make_tuple(lp.logprob, top));
    }
    return out;
}

nb::dict stats_dict(const obc::EvictionStats & s) {
    nb::dict d;
    d["tokens_seen"] = s.tokens_seen;
    d["evictions"] = s.evictions;
    d["tokens_evicted"] = s.tokens_evicted;
    d["score_ms"] = s.score_ms;
    d["compact_ms"] = s.compact_ms;
    d["budget"] = s.budget;
    d["kept_per_layer"] = s.kept_per_layer;
    d["kv_bytes_allocated"] = s.kv_bytes_allocated;
    d["kv_bytes_used"] = s.kv_bytes_used;
    d["kv_bytes_kept"] = s.kv_bytes_kept;
    d["kv_bytes_full"] = s.kv_bytes_full;
    return d;
}

}  // namespace

NB_MODULE(_core, m) {
    m.doc() = "pyobcache native engine (use the pyobcache package, not this module directly)";

    nb::enum_<obc::ScoreKind>(m, "ScoreKind")
        .value("none", obc::ScoreKind::none).value("attn", obc::ScoreKind::attn).value("v", obc::ScoreKind::v)
        .value("k", obc::ScoreKind::k).value("vk", obc::ScoreKind::vk).value("vk_nocross", obc::ScoreKind::vk_nocross);
    nb::enum_<obc::Window>(m, "Window")
        .value("last", obc::Window::last).value("latest", obc::Window::latest).value("all", obc::Window::all);
    nb::enum_<obc::Pooling>(m, "Pooling")
        .value("none", obc::Pooling::none).value("max", obc::Pooling::max).value("avg", obc::Pooling::avg);
    nb::enum_<obc::EvictMode>(m, "EvictMode")
        .value("prefill", obc::EvictMode::prefill).value("chunked", obc::EvictMode::chunked)
        .value("decode", obc::EvictMode::decode);
    nb::enum_<obc_group_pool>(m, "GroupPool")
        .value("sum", OBC_GROUP_SUM).value("mean", OBC_GROUP_MEAN).value("max", OBC_GROUP_MAX)
        .value("norm_sum", OBC_GROUP_NORM_SUM).value("pre_mean", OBC_GROUP_PRE_MEAN);
    nb::enum_<obc::GqaMode>(m, "GqaMode").value("native", obc::GqaMode::native).value("expand", obc::GqaMode::expand);
    nb::enum_<obc::HeadBudget>(m, "HeadBudget")
        .value("uniform", obc::HeadBudget::uniform).value("adaptive", obc::HeadBudget::adaptive);
    m.def("parse_head_budget", &obc::parse_head_budget, "name"_a);
    m.def("parse_group_pool", &obc::parse_group_pool, "name"_a);
    m.def("parse_gqa_mode", &obc::parse_gqa_mode, "name"_a);

    nb::class_<obc::KVConfig>(m, "KVConfig")
        .def(nb::init<>())
        .def_rw("method", &obc::KVConfig::method)
        .def_rw("score", &obc::KVConfig::score)
        .def_rw("p", &obc::KVConfig::p)
        .def_rw("window", &obc::KVConfig::window)
        .def_rw("window_size", &obc::KVConfig::window_size)
        .def_rw("pooling", &obc::KVConfig::pooling)
        .def_rw("kernel", &obc::KVConfig::kernel)
        .def_rw("group_pool", &obc::KVConfig::group_pool)
        .def_rw("gqa", &obc::KVConfig::gqa)
        .def_rw("head_budget", &obc::KVConfig::head_budget)
        .def_rw("head_floor", &obc::KVConfig::head_floor)
        .def_rw("budget", &obc::KVConfig::budget)
        .def_rw("ratio", &obc::KVConfig::ratio)
        .def_rw("n_recent", &obc::KVConfig::n_recent)
        .def_rw("n_sink", &obc::KVConfig::n_sink)
        .def_rw("mode", &obc::KVConfig::mode)
        .def_rw("slack", &obc::KVConfig::slack)
        .def_prop_ro("type_k", [](const obc::KVConfig & c) { return std::string(ggml_type_name(c.type_k)); })
        .def_prop_ro("type_v", [](const obc::KVConfig & c) { return std::string(ggml_type_name(c.type_v)); })
        .def("__repr__", [](const obc::KVConfig & c) { return obc::describe(c); });
    m.def("kv_config_for_method", &obc::kv_config_for_method, "method"_a);
    m.def("finalize_kv_config", &obc::finalize_kv_config, "config"_a);
    m.def("kv_method_names", &obc::kv_method_names);
    m.attr("DEFAULT_KV_METHOD") = obc::kDefaultKVMethod;
    m.def("kv_budget_for", &obc::kv_budget_for, "config"_a, "n_prompt"_a);
    m.def("kv_config_from_options", &obc::kv_config_from_options, "options"_a);
    m.def("parse_kv_spec", &obc::parse_kv_spec, "spec"_a);
    m.def("kv_cache_types", [] {
        std::vector<std::string> names;
        for (ggml_type t : obc::kv_cache_types()) names.emplace_back(ggml_type_name(t));
        return names;
    }, "The types a KV cache stores K and V in (type_k / type_v), as llama.cpp's -ctk / -ctv name them.");
    m.def("kv_cache_type_name", [](int id) {
        for (ggml_type t : obc::kv_cache_types())
            if ((int) t == id) return std::string(ggml_type_name(t));
        throw std::invalid_argument("ggml type " + std::to_string(id) + " is not a KV cache type");
    }, "ggml_type"_a, "The name of a KV cache type given as its ggml_type id (llama_cpp's type_k=8 is q8_0).");
    m.def("kv_row_bytes", [](const std::string & type, int64_t n_values) {
        const ggml_type t = obc::parse_kv_cache_type("type", type);
        if (n_values <= 0 || n_values % ggml_blck_size(t) != 0)
            throw std::invalid_argument("a row of " + type + " holds a positive multiple of " + std::to_string(ggml_blck_size(t)) + " values");
        return ggml_row_size(t, n_values);
    }, "type"_a, "n_values"_a, "Bytes of one cache row of n_values values in a KV cache type (ggml_row_size).");
    m.def("select_keep", [](nb::ndarray<const float, nb::ndim<1>, nb::c_contig> s, int32_t budget, int32_t n_sink,
                            int32_t n_recent, obc::Pooling pooling, int32_t kernel) {
        // The engine calls select_keep with a finalized configuration; this door takes raw values.
        if (budget < 0 || n_sink < 0 || n_recent < 0)
            throw std::invalid_argument("budget, n_sink and n_recent must be >= 0");
        if (kernel < 1 || kernel % 2 == 0) throw std::invalid_argument("the pooling kernel must be odd and positive");
        return obc::select_keep(s.data(), (int32_t) s.shape(0), budget, n_sink, n_recent, pooling, kernel);
    }, "scores"_a, "budget"_a, "n_sink"_a, "n_recent"_a, "pooling"_a, "kernel"_a);
    m.attr("CLI_PROGRESS_MIN_TOKENS") = obc::kCliProgressMinTokens;
    {
        // The engine's defaults, which the Python signatures and the CLI take from here.
        const obc::ContextParams cp;
        const obc::SamplerParams sp;
        // Floats as their shortest decimal (0.8, not 0.800000011920929), as a signature shows them.
        auto tidy = [](float v) {
            char b[32];
            std::snprintf(b, sizeof b, "%.6g", (double) v);
            return std::strtod(b, nullptr);
        };
        nb::dict d;
        d["n_ctx"] = cp.n_ctx;
        d["n_batch"] = cp.n_batch;
        d["max_new_tokens"] = obc::kDefaultMaxNewTokens;
        d["temperature"] = tidy(sp.temperature);
        d["top_k"] = sp.top_k;
        d["top_p"] = tidy(sp.top_p);
        d["min_p"] = tidy(sp.min_p);
        d["repeat_penalty"] = tidy(sp.repeat_penalty);
        d["repeat_last_n"] = sp.repeat_last_n;
        m.attr("DEFAULTS") = d;
    }
    m.def("default_thread_count", &obc::default_thread_count);
    m.def("hardware_thread_count", &obc::hardware_thread_count);
    m.def("threads_in_use", &obc::threads_in_use);
    m.def("resolve_thread_count", &obc::resolve_thread_count, "params"_a);

    nb::class_<obc::ThreadParams>(m, "ThreadParams")
        .def("__init__", [](obc::ThreadParams * self, int32_t n_threads, bool adaptive, int32_t poll, int32_t prio,
                            const std::string & cpu_mask, bool cpu_strict) {
            obc::ThreadParams p;
            p.n_threads = n_threads;
            p.adaptive = adaptive;
            p.poll = poll;
            p.prio = prio;
            p.cpu_mask = cpu_mask;
            p.cpu_strict = cpu_strict;
            obc::check_thread_params(p);
            new (self) obc::ThreadParams(p);
        }, "n_threads"_a = obc::ThreadParams{}.n_threads, "adaptive"_a = obc::ThreadParams{}.adaptive,
           "poll"_a = obc::ThreadParams{}.poll, "prio"_a = obc::ThreadParams{}.prio,
           "cpu_mask"_a = obc::ThreadParams{}.cpu_mask, "cpu_strict"_a = obc::ThreadParams{}.cpu_strict)
        .def_ro("n_threads", &obc::ThreadParams::n_threads)
        .def_ro("adaptive", &obc::ThreadParams::adaptive)
        .def_ro("poll", &obc::ThreadParams::poll)
        .def_ro("prio", &obc::ThreadParams::prio)
        .def_ro("cpu_mask", &obc::ThreadParams::cpu_mask)
        .def_ro("cpu_strict", &obc::ThreadParams::cpu_strict);

    // A GGUF's tokenizer on its own (vocabulary-only files such as llama.cpp's test vocabularies).
    nb::class_<obc::Vocab>(m, "Vocab")
        .def_static("load", [](const std::string & path) {
            nb::gil_scoped_release r;
            return obc::Vocab::from_file(path);
        }, "path"_a)
        .def("tokenize", &obc::Vocab::tokenize, "text"_a, "add_special"_a, "parse_special"_a)
        .def("detokenize", [](const obc::Vocab & v, const std::vector<int32_t> & ids, bool render_special) {
            for (int32_t t : ids)
                if (t < 0 || t >= v.n_tokens()) throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary");
            return to_bytes(v.detokenize(ids, render_special));
        }, "ids"_a, "render_special"_a = false)
        .def_prop_ro("pre", &obc::Vocab::pre)
        .def_prop_ro("n_tokens", &obc::Vocab::n_tokens);

    nb::class_<obc::Model>(m, "Model")
        .def_static("load", [](const std::string & path, int32_t n_gpu_layers) {
            nb::gil_scoped_release r;
            obc::ModelParams mp;
            mp.n_gpu_layers = n_gpu_layers;
            return obc::Model::load(path, mp);
        }, "path"_a, "n_gpu_layers"_a = 0)
        .def("context_warning", &obc::Model::context_warning, "n_ctx"_a)
        .def_prop_ro("gpu_layers", &obc::Model::gpu_layers)
        .def_prop_ro("n_vocab", [](const obc::Model & md) { return md.hp.n_vocab; })
        .def_prop_ro("n_ctx_train", [](const obc::Model & md) { return md.hp.n_ctx_train; })
        .def_prop_ro("n_layer", [](const obc::Model & md) { return md.hp.n_layer; })
        .def_prop_ro("n_head", [](const obc::Model & md) { return md.hp.n_head; })
        .def_prop_ro("n_head_kv", [](const obc::Model & md) { return md.hp.n_head_kv; })
        .def_prop_ro("head_dim", [](const obc::Model & md) { return md.hp.head_dim; })
        .def_prop_ro("n_embd", [](const obc::Model & md) { return md.hp.n_embd; })
        .def_prop_ro("arch", [](const obc::Model & md) { return md.hp.arch_name; })
        .def_prop_ro("name", [](const obc::Model & md) { return md.name; })
        .def_prop_ro("path", [](const obc::Model & md) { return md.path; })
        .def_prop_ro("chat_template", [](const obc::Model & md) { return md.chat_template; })
        .def_prop_ro("bos", [](const obc::Model & md) { return md.vocab.bos(); })
        .def_prop_ro("eos", [](const obc::Model & md) { return md.vocab.eos(); })
        .def_prop_ro("add_bos", [](const obc::Model & md) { return md.vocab.add_bos(); })
        .def_prop_ro("tokenizer_pre", [](const obc::Model & md) { return md.vocab.pre(); })
        .def_prop_ro("weight_bytes", &obc::Model::weight_bytes)
        .def("describe", &obc::Model::describe)
        .def("tokenize", [](const obc::Model & md, const std::string & text, bool add_special, bool parse_special) {
            return md.vocab.tokenize(text, add_special, parse_special);
        }, "text"_a, "add_special"_a, "parse_special"_a)
        .def("token_to_piece", [](const obc::Model & md, int32_t id, bool render_special) {
            return to_bytes(md.vocab.token_to_piece(id, render_special));
        }, "id"_a, "render_special"_a = false)
        .def("token_text", [](const obc::Model & md, int32_t id) { return to_bytes(md.vocab.token_text(id)); }, "id"_a)
        .def("detokenize", [](const obc::Model & md, const std::vector<int32_t> & ids, bool render_special) {
            return to_bytes(md.vocab.detokenize(ids, render_special));
        }, "ids"_a, "render_special"_a = false)
        .def("is_eog", [](const obc::Model & md, int32_t id) { return md.vocab.is_eog(id); }, "id"_a);

    nb::class_<obc::Generator>(m, "Generator")
        .def("next", [](obc::Generator & g) { return next_piece(g); })
        .def_prop_ro("generated", &obc::Generator::generated)
        .def_prop_ro("finish_reason", &obc::Generator::finish_reason)
        .def_prop_ro("logprobs", &logprobs_list);

    // One generation request (obc::Request): Model.generate's and a conversation turn's path, as
    // the C API's and the CLI's.
    nb::class_<obc::Request>(m, "Request")
        .def("__init__", [](obc::Request * self, const obc::Model & md, int32_t n_ctx, int32_t n_batch,
                            const obc::ThreadParams & threads, int32_t flash_attn, const obc::KVConfig & kv,
                            const std::vector<int32_t> & ids, int32_t max_new_tokens, float temperature, int32_t top_k,
                            float top_p, float min_p, float repeat_penalty, int32_t repeat_last_n, uint64_t seed,
                            const std::vector<std::string> & stop, bool ignore_eos, int32_t n_logprobs) {
            new (self) obc::Request(md, context_params(n_ctx, n_batch, threads, flash_attn), kv, ids,
                                    generate_params(max_new_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
                                                    repeat_last_n, seed, stop, ignore_eos, n_logprobs));
        }, "model"_a, "n_ctx"_a, "n_batch"_a, "threads"_a, "flash_attn"_a, "kv"_a, "ids"_a, "max_new_tokens"_a,
           "temperature"_a, "top_k"_a, "top_p"_a, "min_p"_a, "repeat_penalty"_a, "repeat_last_n"_a, "seed"_a, "stop"_a,
           "ignore_eos"_a, "n_logprobs"_a = -1, nb::keep_alive<1, 2>())
        .def_static("turn", [](obc::Session & conversation, const std::vector<int32_t> & ids, int32_t max_new_tokens,
                               float temperature, int32_t top_k, float top_p, float min_p, float repeat_penalty,
                               int32_t repeat_last_n, uint64_t seed, const std::vector<std::string> & stop,
                               bool ignore_eos, int32_t n_logprobs) {
            return std::make_unique<obc::Request>(conversation, ids,
                                                  generate_params(max_new_tokens, temperature, top_k, top_p, min_p,
                                                                  repeat_penalty, repeat_last_n, seed, stop, ignore_eos,
                                                                  n_logprobs));
        }, "conversation"_a, "ids"_a, "max_new_tokens"_a, "temperature"_a, "top_k"_a, "top_p"_a, "min_p"_a,
           "repeat_penalty"_a, "repeat_last_n"_a, "seed"_a, "stop"_a, "ignore_eos"_a, "n_logprobs"_a = -1,
           nb::keep_alive<0, 1>(),
           "A turn of a conversation: ids join what it holds, then the reply (the report covers this turn).")
        .def("next", [](obc::Request & r) { return next_piece(r); })
        .def_prop_ro("session", [](obc::Request & r) -> obc::Session & { return r.session(); }, nb::rv_policy::reference_internal)
        .def_prop_ro("generated", &obc::Request::generated)
        .def_prop_ro("finish_reason", &obc::Request::finish_reason)
        .def_prop_ro("logprobs", [](obc::Request & r) { return logprobs_list(r.generator()); })
        .def("report", [](const obc::Request & r) {
            const obc::RequestReport rep = r.report();
            nb::dict d = stats_dict(rep.kv);
            d["prompt_tokens"] = rep.prompt_tokens;
            d["generated_tokens"] = rep.generated_tokens;
            d["prompt_ms"] = rep.prompt_ms;
            d["gen_ms"] = rep.gen_ms;
            d["finish_reason"] = rep.finish_reason;
            return d;
        });

    nb::class_<obc::Session>(m, "Session")
        .def("__init__", [](obc::Session * self, const obc::Model & md, int32_t n_ctx, int32_t n_batch,
                            const obc::ThreadParams & threads, int32_t flash_attn, const obc::KVConfig & kv, int32_t n_prompt,
                            int32_t max_new_tokens) {
            new (self) obc::Session(md, context_params(n_ctx, n_batch, threads, flash_attn), kv, n_prompt, max_new_tokens);
        }, "model"_a, "n_ctx"_a, "n_batch"_a, "threads"_a, "flash_attn"_a, "kv"_a, "n_prompt"_a, "max_new_tokens"_a,
           nb::keep_alive<1, 2>())
        .def("prefill", [](obc::Session & s, const std::vector<int32_t> & ids, bool all_logits) {
            PyInterrupt guard(s.context());
            guard.run([&] { s.prefill(ids, all_logits); });
        }, "ids"_a, "all_logits"_a = false)
        .def("decode", [](obc::Session & s, const std::vector<int32_t> & ids, bool all_logits) {
            if (s.is_conversation()) throw std::logic_error("decode: a conversation appends (append / continue_generation)");
            PyInterrupt guard(s.context());
            guard.run([&] { s.context().decode(ids.data(), (int32_t) ids.size(), all_logits); });
        }, "ids"_a, "all_logits"_a = false)
        .def("logits", [](obc::Session & s) {
            const obc::Context & c = s.context();
            const size_t rows = (size_t) c.n_logit_rows(), nv = (size_t) c.n_vocab();
            if (rows == 0) throw std::invalid_argument("no logits yet: run the model first");
            return to_numpy(std::vector<float>(c.logits(), c.logits() + rows * nv), {rows, nv});
        })
        .def("generate", [](obc::Session & s, const std::vector<int32_t> & ids, int32_t max_new_tokens, float temperature,
                            int32_t top_k, float top_p, float min_p, float repeat_penalty, int32_t repeat_last_n,
                            uint64_t seed, const std::vector<std::string> & stop, bool ignore_eos, int32_t n_logprobs) {
            return s.generate(ids, generate_params(max_new_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
                                                   repeat_last_n, seed, stop, ignore_eos, n_logprobs));
        }, "ids"_a, "max_new_tokens"_a, "temperature"_a, "top_k"_a, "top_p"_a, "min_p"_a, "repeat_penalty"_a,
           "repeat_last_n"_a, "seed"_a, "stop"_a, "ignore_eos"_a, "n_logprobs"_a = -1, nb::keep_alive<0, 1>())
        .def_static("conversation", [](const obc::Model & md, int32_t n_ctx, int32_t n_batch,
                                       const obc::ThreadParams & threads, int32_t flash_attn, const obc::KVConfig & kv) {
            return std::make_unique<obc::Session>(md, context_params(n_ctx, n_batch, threads, flash_attn), kv, obc::Session::Conversation{});
        }, "model"_a, "n_ctx"_a, "n_batch"_a, "threads"_a, "flash_attn"_a, "kv"_a, nb::keep_alive<0, 1>())
        .def_static("load_state", [](const obc::Model & md, const obc::ThreadParams & threads, nb::bytes data,
                                     int32_t max_n_ctx) {
            obc::ContextParams cp;
            cp.threads = threads;
            const auto * p = static_cast<const uint8_t *>(data.data());
            const size_t n = data.size();
            nb::gil_scoped_release r;
            return obc::Session::load_state(md, cp, p, n, max_n_ctx);
        }, "model"_a, "threads"_a, "data"_a, "max_n_ctx"_a, nb::keep_alive<0, 1>())
        .def("set_progress", [](obc::Session & s, nb::object cb) {
            // Called from the engine without the GIL; the reference is dropped with the GIL held.
            if (cb.is_none()) {
                s.context().set_progress_callback(nullptr);
                return;
            }
            auto ref = std::shared_ptr<nb::object>(new nb::object(cb), [](nb::object * o) {
                nb::gil_scoped_acquire g;
                delete o;
            });
            s.context().set_progress_callback([ref](int32_t done, int32_t total) {
                nb::gil_scoped_acquire g;
                try {
                    (*ref)(done, total);
                } catch (nb::python_error & e) {
                    if (e.matches(PyExc_KeyboardInterrupt)) {
                        // Ctrl-C landed in the callback: raise it again where the engine polls for it.
                        PyErr_SetInterrupt();
                        return;
                    }
                    e.discard_as_unraisable("pyobcache progress callback");   // a bar must not stop the prefill
                }
            });
        }, "callback"_a.none(), "A callable(done, total) called after each prompt micro-batch, or None.")
        .def("end_turn", &obc::Session::end_turn)
        .def("save_state", [](obc::Session & s) {
            std::vector<uint8_t> out;
            {
                nb::gil_scoped_release r;
                out = s.save_state();
            }
            return nb::bytes(reinterpret_cast<const char *>(out.data()), out.size());
        })
        .def("append", [](obc::Session & s, const std::vector<int32_t> & ids) {
            PyInterrupt guard(s.context());
            guard.run([&] { s.append(ids); });
        }, "ids"_a)
        .def_prop_ro("sequence", &obc::Session::sequence)
        .def_prop_ro("sequence_size", &obc::Session::sequence_size)
        .def_prop_ro("is_conversation", &obc::Session::is_conversation)
        .def_prop_ro("n_ctx", [](obc::Session & s) { return s.context().n_ctx(); })
        .def("stats", [](const obc::Session & s) { return stats_dict(s.stats()); })
        .def("timings", [](obc::Session & s) {
            const auto & t = s.context().timings;
            nb::dict d;
            d["prompt_ms"] = t.prompt_ms;
            d["prompt_tokens"] = t.prompt_tokens;
            d["gen_ms"] = t.gen_ms;
            d["gen_tokens"] = t.gen_tokens;
            d["graphs_built"] = t.graphs_built;
            d["graph_nodes"] = t.graph_nodes;
            return d;
        })
        .def_prop_ro("n_threads", [](obc::Session & s) { return s.context().n_threads(); })
        .def_prop_ro("n_threads_last", [](obc::Session & s) { return s.context().n_threads_last(); })
        .def_prop_ro("n_used", [](obc::Session & s) { return s.context().kv().n_used(); })
        .def_prop_ro("n_past", [](obc::Session & s) { return s.context().kv().n_past(); })
        .def_prop_ro("kv_capacity", [](obc::Session & s) { return s.context().kv().capacity(); })
        .def("positions", [](obc::Session & s, int32_t il, int32_t h) {
            const obc::KVCache & kv = s.context().kv();
            if (il < 0 || il >= kv.n_layer() || h < 0 || h >= kv.n_head_kv()) throw std::out_of_range("layer or head out of range");
            return std::vector<int32_t>(kv.pos(il, h), kv.pos(il, h) + kv.n_used());
        }, "layer"_a, "head"_a)
        .def("scores", [](obc::Session & s, int32_t il, int32_t h) {
            if (!s.evictor()) throw std::invalid_argument("no eviction configured: there are no scores");
            std::vector<float> v = s.evictor()->scores_of(il, h);
            const size_t n = v.size();
            return to_numpy(std::move(v), {n});
        }, "layer"_a, "head"_a)
        .def("prefill_snapshot", [](obc::Session & s, const std::vector<int32_t> & ids,
                                    const std::vector<obc::KVConfig> & methods) {
            PyInterrupt guard(s.context());
            guard.run([&] { s.prefill_snapshot(ids, methods); });
        }, "ids"_a, "methods"_a)
        .def("apply_snapshot", [](obc::Session & s, const obc::KVConfig & cfg) {
            nb::gil_scoped_release r;
            return s.apply_snapshot(cfg);
        }, "config"_a)
        .def("snapshot_scores", [](obc::Session & s, const obc::KVConfig & cfg, int32_t il, int32_t h) {
            if (!s.snapshot()) throw std::invalid_argument("no snapshot: call prefill_snapshot first");
            std::vector<float> v = s.snapshot()->scores(cfg, il, h);
            const size_t n = v.size();
            return to_numpy(std::move(v), {n});
        }, "config"_a, "layer"_a, "head"_a)
        .def("snapshot_score_ms", [](obc::Session & s) { return s.snapshot() ? s.snapshot()->score_ms() : 0.0; })
        .def("last_keep", [](obc::Session & s) {
            if (!s.evictor()) throw std::invalid_argument("no eviction configured");
            return s.evictor()->last_keep();
        })
        .def("set_debug_capture", [](obc::Session & s, bool on) {
            if (!s.evictor()) throw std::invalid_argument("no eviction configured");
            s.evictor()->debug_capture = on;
        }, "on"_a)
        .def("debug_capture", [](obc::Session & s) {
            obc::Evictor * ev = s.evictor();
            if (!ev) throw std::invalid_argument("no eviction configured");
            const obc::HParams & hp = s.context().model().hp;
            const size_t n_q = ev->captured_pos_q.size(), n_kv = (size_t) ev->captured_n_kv;
            nb::list q, k, v;
            for (const auto & x : ev->captured_q) q.append(to_numpy(x, {n_q, (size_t) hp.n_head, (size_t) hp.head_dim}));
            const size_t n_heads = (size_t) s.context().kv().n_head_kv();   // n_head with gqa=expand
            for (const auto & x : ev->captured_k) k.append(to_numpy(x, {n_heads, n_kv, (size_t) hp.head_dim}));
            for (const auto & x : ev->captured_v) v.append(to_numpy(x, {n_heads, n_kv, (size_t) hp.head_dim}));
            nb::list off;   // the offsets a quantized K is stored minus (KVCache::k_offsets), zeros for a float K
            const obc::KVCache & kvc = s.context().kv();
            for (int il = 0; il < kvc.n_layer(); ++il) {
                const float * c = kvc.k_offset_host(il);
                std::vector<float> x(n_heads * (size_t) hp.head_dim, 0.0f);
                if (c) std::copy(c, c + x.size(), x.begin());
                off.append(to_numpy(x, {n_heads, (size_t) hp.head_dim}));
            }
            nb::dict d;
            d["k_offset"] = off;
            d["q"] = q;
            d["k"] = k;
            d["v"] = v;
            d["pos_q"] = ev->captured_pos_q;
            return d;
        });

    obc_bind_ops(m);
}
