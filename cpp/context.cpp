#include "context.h"

#include "graph.h"

#include <ggml-cpu.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace obc {

Context::Context(const Model & model, const ContextParams & params) : model_(model), params_(params) {
    if (params_.n_ctx <= 0) throw std::invalid_argument("n_ctx must be positive, got " + std::to_string(params_.n_ctx));
    if (params_.n_batch <= 0) throw std::invalid_argument("n_batch must be positive, got " + std::to_string(params_.n_batch));
    // No micro-batch is longer than the context (llama.cpp clamps it too); a conversation saved
    // with n_ctx below the default n_batch failed to load before ("its cache sizes").
    params_.n_batch = std::min(params_.n_batch, params_.n_ctx);
    check_thread_params(params_.threads);
    // -1 (choose) resolves to the mul_mat + soft_max path here, unless V's type needs flash
    // attention; Session chooses per request. flash_attn=0 with such a V is refused by KVCache.
    flash_attn_ = params_.flash_attn == 1 || (params_.flash_attn < 0 && kv_type_needs_flash_attn(params_.type_v));
    const int32_t cap = params_.kv_capacity > 0 ? params_.kv_capacity : params_.n_ctx;
    // Backends of our own: a ggml backend keeps per-call compute state (the CPU backend its
    // work buffer and thread settings), so two contexts computing through the model's one
    // backend from two threads corrupted each other's results. The weights are read-only and
    // shared.
    backend_cpu_ = ggml_backend_cpu_init();
    if (!backend_cpu_) throw std::runtime_error("cannot initialise the ggml CPU backend");
    if (ggml_backend_dev_t dev = model_.gpu_device()) {
        backend_gpu_ = ggml_backend_dev_init(dev, nullptr);
        if (!backend_gpu_) {
            ggml_backend_free(backend_cpu_);
            throw std::runtime_error(std::string("cannot initialise the GPU backend ") + ggml_backend_dev_name(dev));
        }
    }
    try {
        // The cache lives with the attention that reads it: on the GPU when every layer is there.
        ggml_backend_t kv_backend = backend_gpu_ && model_.gpu_layers() == model_.hp.n_layer ? backend_gpu_ : backend_cpu_;
        kv_ = std::make_unique<KVCache>(model_.hp, cap, !flash_attn_, kv_backend, params_.kv_scores,
                                        params_.kv_per_query_head ? model_.hp.n_head : 0, params_.type_k, params_.type_v);

        // The scheduler runs each op on the first backend listed that holds its weights or supports it.
        std::vector<ggml_backend_t> backends;
        if (backend_gpu_) backends.push_back(backend_gpu_);
        backends.push_back(backend_cpu_);
        const size_t graph_size = 64 * (size_t) model_.hp.n_layer + 64;
        sched_ = ggml_backend_sched_new(backends.data(), nullptr, (int) backends.size(), graph_size, false, false);
        if (!sched_) throw std::runtime_error("cannot create the ggml backend scheduler");
        graph_meta_.resize(ggml_tensor_overhead() * graph_size * 2 + ggml_graph_overhead_custom(graph_size, false));
        threads_ = std::make_unique<CpuThreads>(params_.threads, backend_cpu_);
    } catch (...) {
        release();
        throw;
    }
}

Context::~Context() { release(); }

void Context::release() {
    if (graph_ctx_) ggml_free(graph_ctx_);
    graph_ctx_ = nullptr;
    graph_ready_ = false;
    if (sched_) ggml_backend_sched_free(sched_);
    sched_ = nullptr;
    threads_.reset();   // after the scheduler, before the backend it is attached to
    kv_.reset();   // its buffers belong to our backends' devices: free them first
    if (backend_gpu_) ggml_backend_free(backend_gpu_);
    if (backend_cpu_) ggml_backend_free(backend_cpu_);
    backend_gpu_ = backend_cpu_ = nullptr;
}

void Context::set_abort_callback(ggml_abort_callback fn, void * data) {
    abort_fn_ = fn;
    abort_data_ = data;
    ggml_backend_cpu_set_abort_callback(backend_cpu_, fn, data);
}

void Context::check_abort() const {
    if (abort_fn_ && abort_fn_(abort_data_)) throw Interrupted();
}

void Context::reset() {
    kv_->clear();
    n_logit_rows_ = 0;
    timings = Timings{};
}

void Context::decode(const int32_t * tokens, int32_t n, bool all_logits) {
    if (busy_.exchange(true)) throw std::logic_error("this context is already decoding in another thread (use one context per thread)");
    struct Release {
        std::atomic<bool> & b;
        ~Release() { b = false; }
    } release{busy_};
    if (n <= 0) throw std::invalid_argument("decode: no tokens");
    for (int32_t i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= model_.hp.n_vocab)
            throw std::invalid_argument("decode: token id " + std::to_string(tokens[i]) + " is outside the vocabulary (size " +
                                        std::to_string(model_.hp.n_vocab) + ")");
    if ((int64_t) kv_->n_past() + n > params_.n_ctx)
        throw std::length_error("the sequence would reach " + std::to_string((int64_t) kv_->n_past() + n) +
                                " tokens, more than the context size n_ctx=" + std::to_string(params_.n_ctx));
    const auto t0 = std::chrono::steady_clock::now();
    // Timings count what ran, also when an interrupt or an error ends the call early, so that
    // an interrupted prefill still reports its speed.
    int32_t done = 0;
    auto account = [&] {
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        if (n > 1) {
            timings.prompt_ms += ms;
            timings.prompt_tokens += done;
        } else {
            timings.gen_ms += ms;
            timings.gen_tokens += done;
        }
    };
    try {
        if (all_logits) logits_.assign((size_t) n * model_.hp.n_vocab, 0.0f);
        n_logit_rows_ = 0;
        for (int32_t begin = 0; begin < n; begin += params_.n_batch) {
            check_abort();
            const int32_t m = std::min(params_.n_batch, n - begin);
            const int32_t n_capture = observer_ ? std::min(observer_->before_ubatch(begin, m, n), m) : 0;
            if (kv_->n_used() + m > kv_->capacity())
                throw std::length_error("the KV cache holds " + std::to_string(kv_->n_used()) + " of " +
                                        std::to_string(kv_->capacity()) + " slots and cannot take " + std::to_string(m) +
                                        " more tokens");
            const bool last = begin + m == n;
            run_ubatch(tokens + begin, m, all_logits || last, all_logits, n_capture);
            done += m;
            if (progress_ && n > 1) progress_(done, n);
        }
        if (observer_) observer_->after_decode(n);
    } catch (...) {
        account();
        throw;
    }
    account();
}

// A decode step reads this many more slots than it uses, masked, so that consecutive tokens
// share one graph shape (llama.cpp pads its KV view the same way).
constexpr int32_t kDecodeKVPad = 256;

void Context::run_ubatch(const int32_t * tokens, int32_t n, bool want_logits, bool all_logits, int32_t n_capture) {
    const HParams & hp = model_.hp;
    const int32_t n_past = kv_->n_past();
    const int32_t n_used = kv_->n_used();

    GraphSpec spec;
    spec.n_tokens = n;
    spec.n_kv = n == 1 ? std::min(kv_->capacity(), (n_used + 1 + kDecodeKVPad - 1) / kDecodeKVPad * kDecodeKVPad) : n_used + n;
    spec.n_out = want_logits ? (all_logits ? n : 1) : 0;
    spec.flash_attn = flash_attn_;
    spec.capture_first = n - n_capture;
    spec.capture_count = n_capture;
    spec.head_masks = kv_->has_holes();
    spec.set_k_offsets = kv_->k_offsets_pending();
    spec.first_slot = n_used;
    if (!(graph_ready_ && n == 1 && spec == graph_spec_)) {
        graph_ready_ = false;
        if (graph_ctx_) ggml_free(graph_ctx_);
        ggml_init_params ip{};
        ip.mem_size = graph_meta_.size();
        ip.mem_buffer = graph_meta_.data();
        ip.no_alloc = true;
        graph_ctx_ = ggml_init(ip);
        graph_ = build_forward(graph_ctx_, model_, *kv_, spec);
        ggml_backend_sched_reset(sched_);
        if (!ggml_backend_sched_alloc_graph(sched_, graph_.gf))
            throw std::runtime_error("cannot allocate the compute graph (out of memory?)");
        graph_spec_ = spec;
        graph_ready_ = true;
        ++timings.graphs_built;
        timings.graph_nodes = ggml_graph_n_nodes(graph_.gf);
    }
    const ForwardGraph & g = graph_;

    ggml_backend_tensor_set(g.tokens, tokens, 0, (size_t) n * sizeof(int32_t));
    std::vector<int32_t> pos(n);
    for (int32_t i = 0; i < n; ++i) pos[i] = n_past + i;
    ggml_backend_tensor_set(g.positions, pos.data(), 0, pos.size() * sizeof(int32_t));
    std::vector<int64_t> slots(n);
    for (int32_t i = 0; i < n; ++i) slots[i] = n_used + i;
    ggml_backend_tensor_set(g.slots, slots.data(), 0, slots.size() * sizeof(int64_t));
    if (g.v_cells) {
        const int64_t hd = kv_->head_dim(), cap = kv_->capacity();
        std::vector<int64_t> cells(hd * kv_->n_head_kv());
        for (size_t r = 0; r < cells.size(); ++r) cells[r] = (int64_t) r * cap + n_used;   // r = h * hd + d
        ggml_backend_tensor_set(g.v_cells, cells.data(), 0, cells.size() * sizeof(int64_t));
    }

    // Every cached slot holds a past token; within the micro-batch attention is causal; the slots
    // read beyond the used ones are masked.
    const int32_t n_kv = spec.n_kv, n_live = n_used + n;
    std::vector<ggml_fp16_t> mask((size_t) n_kv * n);
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
    for (int32_t i = 0; i < n; ++i)
        for (int32_t j = 0; j < n_kv; ++j)
            mask[(size_t) i * n_kv + j] = (j < n_used || (j < n_live && j - n_used <= i)) ? zero : ninf;
    if (g.mask) {
        ggml_backend_tensor_set(g.mask, mask.data(), 0, mask.size() * sizeof(ggml_fp16_t));
    } else {
        // A cache with holes: the shared mask, with each head's holes masked for every query.
        const int32_t Hkv = kv_->n_head_kv();
        std::vector<ggml_fp16_t> hm((size_t) n_kv * n * Hkv);
        for (size_t il = 0; il < g.layer_masks.size(); ++il) {
            for (int32_t h = 0; h < Hkv; ++h) {
                ggml_fp16_t * dst = hm.data() + (size_t) h * n_kv * n;
                std::copy(mask.begin(), mask.end(), dst);
                const int32_t * p = kv_->pos((int) il, h);
                for (int32_t j = 0; j < n_used; ++j)
                    if (p[j] == KVCache::kHolePos)
                        for (int32_t i = 0; i < n; ++i) dst[(size_t) i * n_kv + j] = ninf;
            }
            ggml_backend_tensor_set(g.layer_masks[il], hm.data(), 0, hm.size() * sizeof(ggml_fp16_t));
        }
    }

    const ggml_status st = [&] {
        const CpuThreads::Use use(*threads_);
        return ggml_backend_sched_graph_compute(sched_, g.gf);
    }();
    if (st != GGML_STATUS_SUCCESS) {
        graph_ready_ = false;
        if (st == GGML_STATUS_ABORTED) throw Interrupted();
        throw std::runtime_error("graph compute failed (status " + std::to_string((int) st) + ")");
    }
    if (spec.set_k_offsets) kv_->k_offsets_written();
    kv_->commit(n);

    if (g.logits) {
        const size_t row = (size_t) hp.n_vocab;
        const int32_t rows = spec.n_out;
        if (!all_logits) logits_.resize(row);
        ggml_backend_tensor_get(g.logits, logits_.data() + (size_t) n_logit_rows_ * row * (all_logits ? 1 : 0), 0,
                                rows * row * sizeof(float));
        n_logit_rows_ = all_logits ? n_logit_rows_ + rows : 1;
    }
    std::vector<std::vector<float>> captured(g.captured_q.size());
    for (size_t il = 0; il < g.captured_q.size(); ++il) {
        captured[il].resize(ggml_nelements(g.captured_q[il]));
        ggml_backend_tensor_get(g.captured_q[il], captured[il].data(), 0, captured[il].size() * sizeof(float));
    }
    if (observer_) observer_->after_ubatch(captured, n_capture);
}

}  // namespace obc
