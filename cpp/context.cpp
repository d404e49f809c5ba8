#include "context.h"

#include "graph.h"

#include <ggml-cpu.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>

namespace obc {

int32_t physical_core_count() {
    std::ifstream f("/proc/cpuinfo");
    std::set<std::pair<std::string, std::string>> cores;
    std::string line, phys = "0";
    while (std::getline(f, line)) {
        const auto colon = line.find(':');
        if (colon == std::string::npos) continue;
        std::string key = line.substr(0, colon);
        key.erase(key.find_last_not_of(" \t") + 1);
        const std::string val = colon + 2 <= line.size() ? line.substr(colon + 2) : "";
        if (key == "physical id") phys = val;
        if (key == "core id") cores.insert({phys, val});
    }
    if (!cores.empty()) return (int32_t) cores.size();
    const unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? (int32_t) n : 1;
}

Context::Context(const Model & model, const ContextParams & params) : model_(model), params_(params) {
    if (params_.n_ctx <= 0) throw std::invalid_argument("n_ctx must be positive");
    if (params_.n_batch <= 0) throw std::invalid_argument("n_batch must be positive");
    if (params_.n_threads < 0) throw std::invalid_argument("n_threads must be >= 0");
    // -1 (choose) resolves to the mul_mat + soft_max path here; Session chooses per request.
    flash_attn_ = params_.flash_attn == 1;
    const int32_t cap = params_.kv_capacity > 0 ? params_.kv_capacity : params_.n_ctx;
    // The cache lives with the attention that reads it: on the GPU when every layer is there.
    ggml_backend_t gpu = model_.backend_gpu();
    ggml_backend_t kv_backend = gpu && model_.gpu_layers() == model_.hp.n_layer ? gpu : model_.backend_cpu();
    kv_ = std::make_unique<KVCache>(model_.hp, cap, !flash_attn_, kv_backend, params_.kv_scores,
                                    params_.kv_per_query_head ? model_.hp.n_head : 0);

    // The scheduler runs each op on the first backend listed that holds its weights or supports it.
    std::vector<ggml_backend_t> backends;
    if (gpu) backends.push_back(gpu);
    backends.push_back(model_.backend_cpu());
    const size_t graph_size = 64 * (size_t) model_.hp.n_layer + 64;
    sched_ = ggml_backend_sched_new(backends.data(), nullptr, (int) backends.size(), graph_size, false, false);
    if (!sched_) throw std::runtime_error("cannot create the ggml backend scheduler");
    graph_meta_.resize(ggml_tensor_overhead() * graph_size * 2 + ggml_graph_overhead_custom(graph_size, false));
    set_n_threads(params_.n_threads > 0 ? params_.n_threads : physical_core_count());
}

Context::~Context() {
    if (sched_) ggml_backend_sched_free(sched_);
}

void Context::set_n_threads(int32_t n) {
    if (n <= 0) throw std::invalid_argument("n_threads must be positive");
    n_threads_ = n;
    ggml_backend_cpu_set_n_threads(model_.backend_cpu(), n);
}

void Context::reset() {
    kv_->clear();
    n_logit_rows_ = 0;
    timings = Timings{};
}

void Context::decode(const int32_t * tokens, int32_t n, bool all_logits) {
    if (n <= 0) throw std::invalid_argument("decode: no tokens");
    for (int32_t i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= model_.hp.n_vocab)
            throw std::invalid_argument("decode: token id " + std::to_string(tokens[i]) + " is outside the vocabulary (size " +
                                        std::to_string(model_.hp.n_vocab) + ")");
    if (kv_->n_past() + n > params_.n_ctx)
        throw std::length_error("the sequence would reach " + std::to_string(kv_->n_past() + n) +
                                " tokens, more than the context size n_ctx=" + std::to_string(params_.n_ctx));
    const auto t0 = std::chrono::steady_clock::now();
    if (all_logits) logits_.assign((size_t) n * model_.hp.n_vocab, 0.0f);
    n_logit_rows_ = 0;
    for (int32_t begin = 0; begin < n; begin += params_.n_batch) {
        const int32_t m = std::min(params_.n_batch, n - begin);
        const int32_t n_capture = observer_ ? std::min(observer_->before_ubatch(begin, m, n), m) : 0;
        if (kv_->n_used() + m > kv_->capacity())
            throw std::length_error("the KV cache holds " + std::to_string(kv_->n_used()) + " of " +
                                    std::to_string(kv_->capacity()) + " slots and cannot take " + std::to_string(m) +
                                    " more tokens");
        const bool last = begin + m == n;
        run_ubatch(tokens + begin, m, all_logits || last, all_logits, n_capture);
    }
    if (observer_) observer_->after_decode(n);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (n > 1) {
        timings.prompt_ms += ms;
        timings.prompt_tokens += n;
    } else {
        timings.gen_ms += ms;
        timings.gen_tokens += n;
    }
}

void Context::run_ubatch(const int32_t * tokens, int32_t n, bool want_logits, bool all_logits, int32_t n_capture) {
    const HParams & hp = model_.hp;
    ggml_init_params ip{};
    ip.mem_size = graph_meta_.size();
    ip.mem_buffer = graph_meta_.data();
    ip.no_alloc = true;
    ggml_context * ctx = ggml_init(ip);

    GraphSpec spec;
    spec.n_tokens = n;
    spec.n_kv = kv_->n_used() + n;
    spec.n_out = want_logits ? (all_logits ? n : 1) : 0;
    spec.flash_attn = flash_attn_;
    spec.capture_first = n - n_capture;
    spec.capture_count = n_capture;
    spec.head_masks = kv_->has_holes();
    ForwardGraph g = build_forward(ctx, model_, *kv_, spec);

    ggml_backend_sched_reset(sched_);
    if (!ggml_backend_sched_alloc_graph(sched_, g.gf)) {
        ggml_free(ctx);
        throw std::runtime_error("cannot allocate the compute graph (out of memory?)");
    }

    const int32_t n_past = kv_->n_past();
    const int32_t n_used = kv_->n_used();
    ggml_backend_tensor_set(g.tokens, tokens, 0, (size_t) n * sizeof(int32_t));
    std::vector<int32_t> pos(n);
    for (int32_t i = 0; i < n; ++i) pos[i] = n_past + i;
    ggml_backend_tensor_set(g.positions, pos.data(), 0, pos.size() * sizeof(int32_t));

    // Every cached slot holds a past token; within the micro-batch attention is causal.
    const int32_t n_kv = spec.n_kv;
    std::vector<ggml_fp16_t> mask((size_t) n_kv * n);
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
    for (int32_t i = 0; i < n; ++i)
        for (int32_t j = 0; j < n_kv; ++j) mask[(size_t) i * n_kv + j] = (j < n_used || j - n_used <= i) ? zero : ninf;
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

    const ggml_status st = ggml_backend_sched_graph_compute(sched_, g.gf);
    if (st != GGML_STATUS_SUCCESS) {
        ggml_free(ctx);
        throw std::runtime_error("graph compute failed (status " + std::to_string((int) st) + ")");
    }
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
    ggml_free(ctx);
    if (observer_) observer_->after_ubatch(captured, n_capture);
}

}  // namespace obc
