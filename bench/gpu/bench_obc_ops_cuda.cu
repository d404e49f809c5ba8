// Timings of the CUDA ops (obc_ops_cuda.h) for one layer of SmolLM2-135M and Qwen2.5-1.5B shapes,
// against the two ceilings: HBM bandwidth (H200: 4.8 TB/s) and the fp32 rate (H200 SXM: 66.9
// TFLOP/s without tensor cores). Bytes and FLOPs are counted as obc_ops_cuda.cu's header says.
// Usage: bench_obc_ops_cuda --out FILE.json [--date D] [--gpu NAME] [--checks TEXT] [--quick]
// (--checks: the correctness results of the same run, recorded with the figures)
// Writes one JSON object (the figures of bench/results/gpu_ops_h200.json) and prints a table.

#include "obc_ops.h"
#include "obc_ops_cuda.h"

#include <cuda_runtime.h>
#include <ggml.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#define CK(x)                                                                                            \
    do {                                                                                                 \
        const cudaError_t e_ = (x);                                                                      \
        if (e_ != cudaSuccess) {                                                                         \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));          \
            exit(2);                                                                                     \
        }                                                                                                \
    } while (0)

namespace {

constexpr double HBM_GBPS = 4800.0;
constexpr double FP32_TFLOPS = 66.9;

struct model_shape {
    const char * name;
    int head_dim, n_head, n_head_kv, n_layer;
};

struct ctx_holder {
    ggml_context * ctx;
    ctx_holder() {
        ggml_init_params ip{};
        ip.mem_size = 64 * ggml_tensor_overhead();
        ip.no_alloc = true;
        ctx = ggml_init(ip);
    }
    ~ctx_holder() { ggml_free(ctx); }
};

void * dalloc(size_t n) {
    void * p = nullptr;
    CK(cudaMalloc(&p, std::max<size_t>(n, 1)));
    return p;
}

// Fills device memory with values of about unit size in the given type (F16 / F32 / I32 positions).
void fill(void * d, size_t n, ggml_type t, std::mt19937 & rng) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<uint8_t> h(n * ggml_type_size(t));
    for (size_t i = 0; i < n; ++i) {
        const float x = nd(rng);
        if (t == GGML_TYPE_F16) {
            const ggml_fp16_t v = ggml_fp32_to_fp16(x);
            memcpy(&h[2 * i], &v, 2);
        } else {
            memcpy(&h[4 * i], &x, 4);
        }
    }
    CK(cudaMemcpy(d, h.data(), h.size(), cudaMemcpyHostToDevice));
}

// Mean milliseconds of one call over `reps` calls after `warm` untimed ones (cudaEvents).
template <class F>
double time_ms(F && call, int warm, int reps) {
    for (int i = 0; i < warm; ++i) call();
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    CK(cudaEventRecord(a));
    for (int i = 0; i < reps; ++i) call();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    return ms / reps;
}

void must(int rc, const char * what) {
    if (rc != 0) {
        fprintf(stderr, "%s: %s\n", what, obc_cuda_last_error());
        exit(3);
    }
}

std::string json_escape(const std::string & s) {
    std::string o;
    for (char c : s) {
        if (c == '"' || c == '\\') o += '\\';
        if ((unsigned char) c >= 0x20) o += c;
    }
    return o;
}

}  // namespace

int main(int argc, char ** argv) {
    std::string out_path, date = "unknown", gpu, checks;
    bool quick = false;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--out" && i + 1 < argc) out_path = argv[++i];
        else if (a == "--date" && i + 1 < argc) date = argv[++i];
        else if (a == "--gpu" && i + 1 < argc) gpu = argv[++i];
        else if (a == "--checks" && i + 1 < argc) checks = argv[++i];
        else if (a == "--quick") quick = true;
        else {
            fprintf(stderr, "usage: %s --out FILE.json [--date D] [--gpu NAME] [--checks TEXT] [--quick]\n", argv[0]);
            return 1;
        }
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        printf("SKIP: no CUDA device\n");
        return 0;
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    if (gpu.empty()) gpu = prop.name;
    std::mt19937 rng(42);
    const int warm = 3, reps = quick ? 5 : 20;

    // the copy rate this device reaches, as a practical bandwidth ceiling (bytes read + written)
    double copy_gbps = 0;
    {
        const size_t n = (size_t) 1 << 30;
        void * a = dalloc(n);
        void * b = dalloc(n);
        const double ms = time_ms([&] { CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice)); }, 2, 10);
        copy_gbps = 2.0 * n / (ms * 1e6);
        CK(cudaFree(a));
        CK(cudaFree(b));
    }
    printf("%s, %d SMs; device-to-device copy %.0f GB/s (read + write)\n", prop.name, prop.multiProcessorCount, copy_gbps);

    const model_shape models[] = {{"SmolLM2-135M", 64, 9, 3, 30}, {"Qwen2.5-1.5B", 128, 12, 2, 28}};
    const int n_kvs[] = {8192, 32768, 131072};
    const int W = 16;
    static const char * kind_names[] = {"attn", "v", "k", "vk", "vk-nocross"};

    std::string js_sal, js_cmp, js_top;
    printf("\nsaliency, one layer, window %d, F16 K/V\n", W);
    printf("%-14s %7s %-10s %3s %9s %9s %6s %9s %6s\n", "model", "n_kv", "score", "vT", "ms", "GB/s", "HBM", "TFLOP/s", "fp32");
    for (const model_shape & m : models) {
        for (int N : n_kvs) {
            if (quick && N > 8192) continue;
            const int D = m.head_dim, H = m.n_head, Hkv = m.n_head_kv;
            ctx_holder ch;
            ggml_context * ctx = ch.ctx;
            ggml_tensor * q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, W, H);
            ggml_tensor * k = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, D, N, Hkv);
            ggml_tensor * v = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, D, N, Hkv);
            ggml_tensor * vt = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, N, D, Hkv);
            ggml_tensor * pq = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, W);
            ggml_tensor * pk = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, N, Hkv);
            ggml_tensor * out = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, N, Hkv);
            for (ggml_tensor * t : {q, k, v, vt, pq, pk, out}) t->data = dalloc(ggml_nbytes(t));
            fill(q->data, ggml_nelements(q), GGML_TYPE_F32, rng);
            fill(k->data, ggml_nelements(k), GGML_TYPE_F16, rng);
            fill(v->data, ggml_nelements(v), GGML_TYPE_F16, rng);
            fill(vt->data, ggml_nelements(vt), GGML_TYPE_F16, rng);
            {
                std::vector<int32_t> h((size_t) N * Hkv), hq(W);
                for (size_t i = 0; i < h.size(); ++i) h[i] = (int32_t) (i % N);
                for (int i = 0; i < W; ++i) hq[i] = N - W + i;  // the prompt's last W queries: causal masking
                CK(cudaMemcpy(pk->data, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
                CK(cudaMemcpy(pq->data, hq.data(), hq.size() * 4, cudaMemcpyHostToDevice));
            }
            struct variant {
                int score, v_trans;
            };
            const variant vars[] = {{OBC_SCORE_ATTN, 0}, {OBC_SCORE_V, 0}, {OBC_SCORE_K, 0},
                                    {OBC_SCORE_VK, 0},   {OBC_SCORE_VK_NOCROSS, 0}, {OBC_SCORE_VK, 1}};
            for (const variant & va : vars) {
                obc_saliency_params P{};
                P.score = va.score;
                P.p = 2.0f;
                P.scale = 1.0f / std::sqrt((float) D);
                P.group_pool = OBC_GROUP_MEAN;
                P.v_trans = va.v_trans;
                const size_t ws = obc_cuda_saliency_work_size(q, k, P);
                void * work = dalloc(ws);
                ggml_tensor * vv = va.v_trans ? vt : v;
                const double ms = time_ms(
                    [&] { must(obc_cuda_saliency(q, k, vv, pq, pk, P, out, work, ws, nullptr), "obc_cuda_saliency"); },
                    warm, reps);
                CK(cudaFree(work));
                const bool need_o = va.score == OBC_SCORE_K || va.score == OBC_SCORE_VK || va.score == OBC_SCORE_VK_NOCROSS;
                const double kvb = (double) N * D * Hkv * 2;  // one pass over K (or V), F16
                const double bytes = 2 * kvb + (need_o ? kvb : 0) + (va.score != OBC_SCORE_ATTN ? kvb : 0) + 12.0 * N * Hkv;
                const double flops = (need_o ? 9.0 : 4.0) * H * W * (double) N * D;
                const double gbps = bytes / (ms * 1e6), tflops = flops / (ms * 1e9);
                printf("%-14s %7d %-10s %3d %9.4f %9.1f %5.1f%% %9.2f %5.1f%%\n", m.name, N, kind_names[va.score], va.v_trans,
                       ms, gbps, 100 * gbps / HBM_GBPS, tflops, 100 * tflops / FP32_TFLOPS);
                char buf[640];
                snprintf(buf, sizeof(buf),
                         "%s\n    {\"model\": \"%s\", \"head_dim\": %d, \"n_head\": %d, \"n_head_kv\": %d, \"n_layer\": %d, "
                         "\"n_kv\": %d, \"n_win\": %d, \"kv_type\": \"f16\", \"v_trans\": %d, \"score\": \"%s\", "
                         "\"ms_per_layer\": %.5f, \"ms_all_layers\": %.4f, \"bytes\": %.0f, \"GBps\": %.1f, "
                         "\"hbm_fraction\": %.4f, \"flops\": %.0f, \"TFLOPs\": %.3f, \"fp32_fraction\": %.4f}",
                         js_sal.empty() ? "" : ",", m.name, D, H, Hkv, m.n_layer, N, W, va.v_trans, kind_names[va.score], ms,
                         ms * m.n_layer, bytes, gbps, gbps / HBM_GBPS, flops, tflops, tflops / FP32_TFLOPS);
                js_sal += buf;
            }

            // compaction of K (rows) and transposed V (elements) to the budget of 512 and to half
            // the cache; the same idx on the already-compacted cache moves the same bytes again
            for (int n_keep : {512, N / 2}) {
                ggml_tensor * idx = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_keep, Hkv);
                idx->data = dalloc(ggml_nbytes(idx));
                std::vector<int32_t> h((size_t) n_keep * Hkv);
                for (int hh = 0; hh < Hkv; ++hh) {
                    std::vector<int32_t> all(N);
                    for (int j = 0; j < N; ++j) all[j] = j;
                    std::shuffle(all.begin() + 4, all.end(), rng);
                    std::sort(all.begin(), all.begin() + n_keep);
                    std::copy(all.begin(), all.begin() + n_keep, h.begin() + (size_t) hh * n_keep);
                }
                CK(cudaMemcpy(idx->data, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
                for (int which = 0; which < 2; ++which) {
                    ggml_tensor * c = which == 0 ? k : vt;
                    const double ms =
                        time_ms([&] { must(obc_cuda_compact(c, idx, which == 0 ? 1 : 0, nullptr), "obc_cuda_compact"); },
                                warm, reps);
                    const double bytes = 2.0 * n_keep * D * 2 * Hkv + 4.0 * n_keep * Hkv;
                    const double gbps = bytes / (ms * 1e6);
                    printf("compact %-6s %-14s n_kv %7d keep %7d: %8.4f ms %8.1f GB/s (%.1f%% of HBM)\n",
                           which == 0 ? "K" : "V^T", m.name, N, n_keep, ms, gbps, 100 * gbps / HBM_GBPS);
                    char buf[400];
                    snprintf(buf, sizeof(buf),
                             "%s\n    {\"model\": \"%s\", \"tensor\": \"%s\", \"axis\": %d, \"n_kv\": %d, \"n_keep\": %d, "
                             "\"ms_per_layer\": %.5f, \"bytes\": %.0f, \"GBps\": %.1f, \"hbm_fraction\": %.4f}",
                             js_cmp.empty() ? "" : ",", m.name, which == 0 ? "K f16" : "V^T f16", which == 0 ? 1 : 0, N,
                             n_keep, ms, bytes, gbps, gbps / HBM_GBPS);
                    js_cmp += buf;
                }
                CK(cudaFree(idx->data));
            }

            // top-k: budget 512, 4 sinks, 32 recent, SnapKV's max pooling over 7
            {
                ggml_tensor * keep = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 512, Hkv);
                keep->data = dalloc(ggml_nbytes(keep));
                fill(out->data, ggml_nelements(out), GGML_TYPE_F32, rng);
                const size_t ws = obc_cuda_select_keep_work_size(N, Hkv);
                void * work = dalloc(ws);
                const double ms = time_ms(
                    [&] {
                        must(obc_cuda_select_keep(out, N, 512, 4, 32, OBC_POOL_MAX, 7, keep, work, ws, nullptr),
                             "obc_cuda_select_keep");
                    },
                    warm, reps);
                const double bytes = 4.0 * N * Hkv * 3 + 4.0 * 512 * Hkv;  // scores, keys written and read once, keep
                const double gbps = bytes / (ms * 1e6);
                printf("select_keep    %-14s n_kv %7d budget 512: %8.4f ms (%.1f GB/s on the minimal bytes)\n", m.name, N,
                       ms, gbps);
                char buf[400];
                snprintf(buf, sizeof(buf),
                         "%s\n    {\"model\": \"%s\", \"n_kv\": %d, \"n_head_kv\": %d, \"budget\": 512, \"n_sink\": 4, "
                         "\"n_recent\": 32, \"pooling\": \"max\", \"kernel\": 7, \"ms_per_layer\": %.5f, "
                         "\"bytes_min\": %.0f, \"GBps\": %.1f, \"hbm_fraction\": %.4f}",
                         js_top.empty() ? "" : ",", m.name, N, Hkv, ms, bytes, gbps, gbps / HBM_GBPS);
                js_top += buf;
                CK(cudaFree(work));
                CK(cudaFree(keep->data));
            }
            for (ggml_tensor * t : {q, k, v, vt, pq, pk, out}) CK(cudaFree(t->data));
        }
    }

    if (!out_path.empty()) {
        FILE * f = fopen(out_path.c_str(), "w");
        if (!f) {
            fprintf(stderr, "cannot write %s\n", out_path.c_str());
            return 1;
        }
        fprintf(f,
                "{\n  \"date\": \"%s\",\n  \"gpu\": \"%s\",\n  \"device\": \"%s\",\n  \"sm_count\": %d,\n"
                "  \"quick\": %s,\n  \"hbm_peak_GBps\": %.0f,\n  \"fp32_peak_TFLOPs\": %.1f,\n"
                "  \"copy_GBps_measured\": %.1f,\n  \"checks\": \"%s\",\n"
                "  \"note\": \"one call = one layer; bytes and FLOPs as counted in ggml-ext/obc_ops_cuda.cu; "
                "GBps = bytes / time\",\n"
                "  \"saliency\": [%s\n  ],\n  \"compact\": [%s\n  ],\n  \"select_keep\": [%s\n  ]\n}\n",
                json_escape(date).c_str(), json_escape(gpu).c_str(), json_escape(prop.name).c_str(),
                prop.multiProcessorCount, quick ? "true" : "false", HBM_GBPS, FP32_TFLOPS, copy_gbps,
                json_escape(checks).c_str(), js_sal.c_str(),
                js_cmp.c_str(), js_top.c_str());
        fclose(f);
        printf("\nwrote %s\n", out_path.c_str());
    }
    return 0;
}
