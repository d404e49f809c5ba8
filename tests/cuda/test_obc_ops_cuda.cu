// GPU correctness of obc_ops_cuda.h against the CPU op and plain host references.
//   saliency     vs obc_saliency_host (the CPU op) and, for small shapes, a float64 reference:
//                max |gpu - ref| <= 1e-4 * max |ref| per KV head; also bit-identical on a rerun
//   compaction   vs a sequential host gather of the same bytes: identical
//   select_keep  vs obc_select_keep_host (the CPU implementation the engine uses): identical indices
// Usage: test_obc_ops_cuda [--quick]   (--quick: small shapes only)
// Prints "SKIP: no CUDA device" and exits 0 where there is no usable device.

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
#include <numeric>
#include <random>
#include <string>
#include <thread>
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

int g_failures = 0, g_checks = 0;

void report(bool ok, const std::string & what) {
    ++g_checks;
    if (!ok) {
        ++g_failures;
        printf("FAIL %s\n", what.c_str());
    }
}

struct dev_buf {
    void * p = nullptr;
    explicit dev_buf(size_t n) { CK(cudaMalloc(&p, std::max<size_t>(n, 1))); }
    ~dev_buf() { cudaFree(p); }
    dev_buf(const dev_buf &) = delete;
    dev_buf & operator=(const dev_buf &) = delete;
};

void upload(void * dst, const void * src, size_t n) { CK(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice)); }
void download(void * dst, const void * src, size_t n) { CK(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost)); }

// A ggml context that only holds tensor metadata; data pointers are set to device memory.
struct meta_ctx {
    ggml_context * ctx;
    meta_ctx() {
        ggml_init_params ip{};
        ip.mem_size = 64 * ggml_tensor_overhead();
        ip.no_alloc = true;
        ctx = ggml_init(ip);
    }
    ~meta_ctx() { ggml_free(ctx); }
};

float round_f16(float x) { return ggml_fp16_to_fp32(ggml_fp32_to_fp16(x)); }

// Host buffer of K/V elements in the tensor's type.
std::vector<uint8_t> encode(const std::vector<float> & x, bool f16) {
    std::vector<uint8_t> b(x.size() * (f16 ? 2 : 4));
    for (size_t i = 0; i < x.size(); ++i) {
        if (f16) {
            const ggml_fp16_t h = ggml_fp32_to_fp16(x[i]);
            memcpy(&b[2 * i], &h, 2);
        } else {
            memcpy(&b[4 * i], &x[i], 4);
        }
    }
    return b;
}

// ---------------------------------------------------------------------------------------------
// Saliency

struct sal_case {
    int D, G, Hkv, N, W;
    int score;
    float p;
    bool f16, vt, strided;
    int pool;
    float qmul;   // query scale: large values make attention peaked (the anchor path)
    int posmode;  // 0: positions 0..N-1; 1: increasing with gaps, differing per head; 2: as 1, and query 0 sees nothing
};

std::string describe(const sal_case & c) {
    static const char * kinds[] = {"attn", "v", "k", "vk", "vk-nocross"};
    static const char * pools[] = {"sum", "mean", "max"};
    char buf[256];
    snprintf(buf, sizeof(buf), "saliency D=%d G=%d Hkv=%d N=%d W=%d %s p=%g %s%s%s pool=%s qmul=%g pos=%d", c.D, c.G, c.Hkv,
             c.N, c.W, kinds[c.score], c.p, c.f16 ? "f16" : "f32", c.vt ? " v_trans" : "", c.strided ? " strided" : "",
             pools[c.pool], c.qmul, c.posmode);
    return buf;
}

// Direct float64 evaluation of the definitions in obc_ops.h (tests/obc_reference.py).
std::vector<double> saliency_f64(const sal_case & c, const std::vector<float> & q, const std::vector<float> & k,
                                 const std::vector<float> & v, const std::vector<int32_t> & pq,
                                 const std::vector<int32_t> & pk, float scale) {
    const int D = c.D, W = c.W, N = c.N, G = c.G, Hkv = c.Hkv;
    std::vector<double> out((size_t) Hkv * N, 0.0), S(N), z(N), o(D);
    for (int h = 0; h < Hkv; ++h) {
        const float * K = &k[(size_t) h * N * D];
        const float * V = &v[(size_t) h * N * D];
        for (int gl = 0; gl < G; ++gl) {
            std::fill(S.begin(), S.end(), 0.0);
            for (int i = 0; i < W; ++i) {
                const float * Q = &q[((size_t) (h * G + gl) * W + i) * D];
                double m = -INFINITY;
                for (int j = 0; j < N; ++j) {
                    if (pk[(size_t) h * N + j] > pq[i]) {
                        z[j] = -INFINITY;
                        continue;
                    }
                    double s = 0;
                    for (int d = 0; d < D; ++d) s += (double) (scale * Q[d]) * K[(size_t) j * D + d];
                    z[j] = s;
                    m = std::max(m, s);
                }
                if (m == -INFINITY) continue;
                double l = 0;
                for (int j = 0; j < N; ++j) l += z[j] == -INFINITY ? 0.0 : std::exp(z[j] - m);
                std::fill(o.begin(), o.end(), 0.0);
                for (int j = 0; j < N; ++j) {
                    if (z[j] == -INFINITY) continue;
                    const double a = std::exp(z[j] - m) / l;
                    for (int d = 0; d < D; ++d) o[d] += a * V[(size_t) j * D + d];
                }
                for (int j = 0; j < N; ++j) {
                    if (z[j] == -INFINITY) continue;
                    const double a = std::exp(z[j] - m) / l, zz = z[j];
                    double v2 = 0, dvo = 0, q2 = 0;
                    for (int d = 0; d < D; ++d) {
                        const double x = V[(size_t) j * D + d], e = x - o[d], y = x + zz * e;
                        v2 += x * x;
                        dvo += e * e;
                        q2 += y * y;
                    }
                    double cc;
                    switch (c.score) {
                        case OBC_SCORE_ATTN: cc = a; break;
                        case OBC_SCORE_V: cc = std::pow(a, (double) c.p); break;
                        case OBC_SCORE_K: cc = a * a * zz * zz * dvo; break;
                        case OBC_SCORE_VK: cc = a * a * q2; break;
                        default: cc = a * a * (v2 + zz * zz * dvo); break;
                    }
                    S[j] += cc;
                }
            }
            for (int j = 0; j < N; ++j) {
                double x = S[j];
                if (c.score == OBC_SCORE_V) {
                    double vn = 0;
                    for (int d = 0; d < D; ++d) vn += std::pow(std::fabs((double) V[(size_t) j * D + d]), (double) c.p);
                    x *= vn;
                }
                double & acc = out[(size_t) h * N + j];
                if (gl == 0) {
                    acc = x;
                } else {
                    acc = c.pool == OBC_GROUP_MAX ? std::max(acc, x) : acc + x;
                }
            }
        }
        if (c.pool == OBC_GROUP_MEAN)
            for (int j = 0; j < N; ++j) out[(size_t) h * N + j] /= G;
    }
    return out;
}

template <class T>
bool close_per_head(const std::vector<float> & got, const std::vector<T> & ref, int N, int Hkv, double * worst) {
    bool ok = true;
    *worst = 0;
    for (int h = 0; h < Hkv; ++h) {
        double mx = 0, err = 0;
        for (int j = 0; j < N; ++j) {
            const double r = (double) ref[(size_t) h * N + j], g = got[(size_t) h * N + j];
            mx = std::max(mx, std::fabs(r));
            err = std::isfinite(g) ? std::max(err, std::fabs(g - r)) : INFINITY;
        }
        const double rel = mx > 0 ? err / mx : err;
        *worst = std::max(*worst, rel);
        ok = ok && rel <= 1e-4;
    }
    return ok;
}

void run_saliency(const sal_case & c, std::mt19937 & rng, int n_threads) {
    const int D = c.D, W = c.W, N = c.N, G = c.G, Hkv = c.Hkv, H = G * Hkv;
    const float scale = 1.0f / std::sqrt((float) D);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> q((size_t) H * W * D), k((size_t) Hkv * N * D), v((size_t) Hkv * N * D);
    for (float & x : q) x = c.qmul * nd(rng);
    for (float & x : k) x = c.f16 ? round_f16(nd(rng)) : nd(rng);
    for (float & x : v) x = c.f16 ? round_f16(nd(rng)) : nd(rng);

    std::vector<int32_t> pk((size_t) Hkv * N), pq(W);
    int32_t pmax = 0;
    for (int h = 0; h < Hkv; ++h) {
        int32_t pos = 0;
        for (int j = 0; j < N; ++j) {
            pk[(size_t) h * N + j] = pos;
            pos += c.posmode == 0 ? 1 : 1 + (int32_t) (rng() % 3);
        }
        pmax = std::max(pmax, pk[(size_t) h * N + N - 1]);
    }
    // window queries spread over the last tokens, so that the early ones do not see the latest keys
    for (int i = 0; i < W; ++i) pq[i] = pmax - (W - 1 - i) * 2;
    if (c.posmode == 2) pq[0] = -1;

    obc_saliency_params P{};
    P.score = c.score;
    P.p = c.p;
    P.scale = scale;
    P.group_pool = c.pool;
    P.v_trans = c.vt ? 1 : 0;

    // CPU op (v token-major, F32 holding the same values as the device's F16)
    std::vector<float> ref((size_t) Hkv * N);
    char err[256] = {0};
    obc_saliency_params Pc = P;
    Pc.v_trans = 0;
    if (obc_saliency_host(q.data(), k.data(), v.data(), pq.data(), pk.data(), D, W, H, N, Hkv, Pc, n_threads, ref.data(),
                          err, sizeof(err)) != 0) {
        report(false, describe(c) + ": CPU op failed: " + err);
        return;
    }

    // device tensors: K and V as views into a larger cache when strided, starting at slot `off`
    const int cap = c.strided ? N + 37 : N, off = c.strided ? 3 : 0;
    const size_t es = c.f16 ? 2 : 4;
    meta_ctx mc;
    ggml_context * ctx = mc.ctx;
    const ggml_type kvt = c.f16 ? GGML_TYPE_F16 : GGML_TYPE_F32;

    dev_buf dq(q.size() * 4), dk((size_t) Hkv * cap * D * es), dv((size_t) Hkv * cap * D * es);
    dev_buf dpq(W * 4), dpk((size_t) Hkv * cap * 4), dout((size_t) Hkv * (N + 11) * 4);
    upload(dq.p, q.data(), q.size() * 4);
    upload(dpq.p, pq.data(), W * 4);
    {
        std::vector<float> kc((size_t) Hkv * cap * D, 0.0f), vc((size_t) Hkv * cap * D, 0.0f);
        std::vector<int32_t> pkc((size_t) Hkv * cap, 0);
        for (int h = 0; h < Hkv; ++h)
            for (int j = 0; j < N; ++j) {
                pkc[(size_t) h * cap + off + j] = pk[(size_t) h * N + j];
                for (int d = 0; d < D; ++d) {
                    const float kx = k[((size_t) h * N + j) * D + d], vx = v[((size_t) h * N + j) * D + d];
                    kc[((size_t) h * cap + off + j) * D + d] = kx;
                    if (c.vt) {
                        vc[((size_t) h * D + d) * cap + off + j] = vx;
                    } else {
                        vc[((size_t) h * cap + off + j) * D + d] = vx;
                    }
                }
            }
        const std::vector<uint8_t> kb = encode(kc, c.f16), vb = encode(vc, c.f16);
        upload(dk.p, kb.data(), kb.size());
        upload(dv.p, vb.data(), vb.size());
        upload(dpk.p, pkc.data(), pkc.size() * 4);
    }

    ggml_tensor * tq = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, W, H);
    tq->data = dq.p;
    ggml_tensor * kfull = ggml_new_tensor_3d(ctx, kvt, D, cap, Hkv);
    kfull->data = dk.p;
    ggml_tensor * tk = ggml_view_3d(ctx, kfull, D, N, Hkv, kfull->nb[1], kfull->nb[2], off * kfull->nb[1]);
    ggml_tensor * tv;
    if (c.vt) {
        ggml_tensor * vfull = ggml_new_tensor_3d(ctx, kvt, cap, D, Hkv);
        vfull->data = dv.p;
        tv = ggml_view_3d(ctx, vfull, N, D, Hkv, vfull->nb[1], vfull->nb[2], off * vfull->nb[0]);
    } else {
        ggml_tensor * vfull = ggml_new_tensor_3d(ctx, kvt, D, cap, Hkv);
        vfull->data = dv.p;
        tv = ggml_view_3d(ctx, vfull, D, N, Hkv, vfull->nb[1], vfull->nb[2], off * vfull->nb[1]);
    }
    ggml_tensor * tpq = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, W);
    tpq->data = dpq.p;
    ggml_tensor * pkfull = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, cap, Hkv);
    pkfull->data = dpk.p;
    ggml_tensor * tpk = ggml_view_2d(ctx, pkfull, N, Hkv, pkfull->nb[1], off * 4);
    const int out_ld = c.strided ? N + 11 : N;
    ggml_tensor * ofull = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, out_ld, Hkv);
    ofull->data = dout.p;
    ggml_tensor * tout = ggml_view_2d(ctx, ofull, N, Hkv, ofull->nb[1], 0);

    const size_t ws = obc_cuda_saliency_work_size(tq, tk, P);
    dev_buf work(ws);
    std::vector<float> got((size_t) Hkv * N), again((size_t) Hkv * N);
    for (int run = 0; run < 2; ++run) {
        if (obc_cuda_saliency(tq, tk, tv, tpq, tpk, P, tout, work.p, ws, nullptr) != 0) {
            report(false, describe(c) + ": " + obc_cuda_last_error());
            return;
        }
        CK(cudaDeviceSynchronize());
        std::vector<float> & dst = run == 0 ? got : again;
        for (int h = 0; h < Hkv; ++h) download(&dst[(size_t) h * N], (char *) dout.p + (size_t) h * out_ld * 4, (size_t) N * 4);
    }

    double worst = 0;
    bool ok = close_per_head(got, ref, N, Hkv, &worst);
    char msg[64];
    snprintf(msg, sizeof(msg), ": vs CPU op %.2e", worst);
    report(ok, describe(c) + msg);
    report(memcmp(got.data(), again.data(), got.size() * 4) == 0, describe(c) + ": not deterministic");
    if ((double) H * W * N * D <= 2e7) {
        const std::vector<double> r64 = saliency_f64(c, q, k, v, pq, pk, scale);
        ok = close_per_head(got, r64, N, Hkv, &worst);
        snprintf(msg, sizeof(msg), ": vs float64 %.2e", worst);
        report(ok, describe(c) + msg);
    }
}

// ---------------------------------------------------------------------------------------------
// Compaction

std::vector<int32_t> make_idx(const std::string & pattern, int cap, int n_keep, int h, std::mt19937 & rng) {
    std::vector<int32_t> idx;
    if (pattern == "shift") {  // every kept slot is the next one: each write lands on a source just read
        for (int n = 0; n < n_keep; ++n) idx.push_back(n + 1);
        return idx;
    }
    if (pattern == "identity") {
        for (int n = 0; n < n_keep; ++n) idx.push_back(n);
        return idx;
    }
    const int fixed = pattern == "prefix" ? n_keep / 2 : 0;
    std::vector<int32_t> rest(cap - fixed);
    std::iota(rest.begin(), rest.end(), fixed);
    std::shuffle(rest.begin(), rest.end(), rng);
    for (int n = 0; n < fixed; ++n) idx.push_back(n);
    idx.insert(idx.end(), rest.begin(), rest.begin() + (n_keep - fixed));
    std::sort(idx.begin(), idx.end());
    if (pattern == "oob" && h == 0) idx.back() = cap + 3;  // skipped: that slot keeps its bytes
    return idx;
}

struct compact_case {
    const char * name;
    ggml_type type;
    int64_t ne0, ne1, ne2;  // the cache tensor
    int axis;
};

void run_compact(const compact_case & cc, const char * pattern, std::mt19937 & rng) {
    meta_ctx mc;
    ggml_tensor * t = ggml_new_tensor_3d(mc.ctx, cc.type, cc.ne0, cc.ne1, cc.ne2);
    const bool head2 = cc.ne2 > 1;
    const int H = (int) (head2 ? cc.ne2 : cc.ne1);
    const int cap = (int) (cc.axis == 1 ? cc.ne1 : cc.ne0);
    const bool full = strcmp(pattern, "identity") == 0, shift = strcmp(pattern, "shift") == 0;
    const int n_keep = full ? cap : shift ? cap - 1 : std::max(1, cap * 3 / 8);

    std::vector<uint8_t> host(ggml_nbytes(t));
    for (uint8_t & b : host) b = (uint8_t) rng();
    std::vector<int32_t> idx((size_t) n_keep * H);
    for (int h = 0; h < H; ++h) {
        const std::vector<int32_t> ih = make_idx(pattern, cap, n_keep, h, rng);
        std::copy(ih.begin(), ih.end(), idx.begin() + (size_t) h * n_keep);
    }

    // reference: the sequential in-place gather, slot by slot
    std::vector<uint8_t> ref = host;
    const size_t row_bytes = ggml_row_size(cc.type, cc.ne0);
    for (int h = 0; h < H; ++h)
        for (int n = 0; n < n_keep; ++n) {
            const int64_t src = idx[(size_t) h * n_keep + n];
            if (src < 0 || src >= cap || src == n) continue;
            if (cc.axis == 1) {
                uint8_t * base = ref.data() + h * t->nb[2];
                memmove(base + n * t->nb[1], base + src * t->nb[1], row_bytes);
            } else {
                const int64_t rows = head2 ? cc.ne1 : 1;
                for (int64_t r = 0; r < rows; ++r) {
                    uint8_t * base = ref.data() + h * t->nb[head2 ? 2 : 1] + (head2 ? r * t->nb[1] : 0);
                    memmove(base + n * t->nb[0], base + src * t->nb[0], t->nb[0]);
                }
            }
        }

    dev_buf dc(host.size()), di(idx.size() * 4);
    upload(dc.p, host.data(), host.size());
    upload(di.p, idx.data(), idx.size() * 4);
    t->data = dc.p;
    ggml_tensor * ti = ggml_new_tensor_2d(mc.ctx, GGML_TYPE_I32, n_keep, H);
    ti->data = di.p;
    char what[160];
    snprintf(what, sizeof(what), "compact %s [%lld, %lld, %lld] axis %d %s n_keep=%d", cc.name, (long long) cc.ne0,
             (long long) cc.ne1, (long long) cc.ne2, cc.axis, pattern, n_keep);
    if (obc_cuda_compact(t, ti, cc.axis, nullptr) != 0) {
        report(false, std::string(what) + ": " + obc_cuda_last_error());
        return;
    }
    CK(cudaDeviceSynchronize());
    std::vector<uint8_t> got(host.size());
    download(got.data(), dc.p, got.size());
    report(got == ref, what);
}

// ---------------------------------------------------------------------------------------------
// Top-k: the CUDA selection against the CPU one (obc_select_keep_host), index for index

void run_topk(int n_used, int H, int budget, int n_sink, int n_recent, int pooling, int kernel, int dist,
              std::mt19937 & rng) {
    const int ld = n_used + 5, n_keep = std::min(budget, n_used), kld = n_keep + 3;
    std::vector<float> s((size_t) ld * H);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (float & x : s) {
        switch (dist) {
            case 0: x = nd(rng); break;                                    // distinct
            case 1: x = std::round(nd(rng) * 2.0f) / 4.0f; break;          // many ties, +0 and -0
            default: x = (rng() % 7 == 0) ? -INFINITY : (float) (rng() % 5); break;  // ties and -inf
        }
    }
    meta_ctx mc;
    dev_buf ds(s.size() * 4), dk((size_t) kld * H * 4);
    upload(ds.p, s.data(), s.size() * 4);
    ggml_tensor * ts = ggml_new_tensor_2d(mc.ctx, GGML_TYPE_F32, ld, H);
    ts->data = ds.p;
    ggml_tensor * tk = ggml_new_tensor_2d(mc.ctx, GGML_TYPE_I32, kld, H);
    tk->data = dk.p;
    const size_t ws = obc_cuda_select_keep_work_size(n_used, H);
    dev_buf work(ws);
    char what[160];
    snprintf(what, sizeof(what), "select_keep n_used=%d H=%d budget=%d sink=%d recent=%d pool=%d kernel=%d dist=%d", n_used,
             H, budget, n_sink, n_recent, pooling, kernel, dist);
    if (obc_cuda_select_keep(ts, n_used, budget, n_sink, n_recent, pooling, kernel, tk, work.p, ws, nullptr) != 0) {
        report(false, std::string(what) + ": " + obc_cuda_last_error());
        return;
    }
    CK(cudaDeviceSynchronize());
    std::vector<int32_t> got((size_t) kld * H);
    download(got.data(), dk.p, got.size() * 4);
    bool ok = true;
    for (int h = 0; h < H; ++h) {
        std::vector<int32_t> ref((size_t) n_keep);
        const int32_t n = obc_select_keep_host(&s[(size_t) h * ld], n_used, budget, n_sink, n_recent, pooling, kernel, ref.data());
        ok = ok && n == n_keep && std::equal(ref.begin(), ref.end(), got.begin() + (size_t) h * kld);
    }
    report(ok, what);
}

}  // namespace

int main(int argc, char ** argv) {
    bool quick = false;
    for (int i = 1; i < argc; ++i) quick = quick || strcmp(argv[i], "--quick") == 0;
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        printf("SKIP: no CUDA device\n");
        return 0;
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s (compute capability %d.%d)\n", prop.name, prop.major, prop.minor);
    const int n_threads = (int) std::max(1u, std::thread::hardware_concurrency());
    std::mt19937 rng(1234);

    // saliency: every score kind (and p) over shapes, with the layouts and pools cycling through
    const struct {
        int score;
        float p;
    } kinds[] = {{OBC_SCORE_ATTN, 2.0f}, {OBC_SCORE_V, 1.0f}, {OBC_SCORE_V, 2.0f}, {OBC_SCORE_V, 1.5f},
                 {OBC_SCORE_K, 2.0f},    {OBC_SCORE_VK, 2.0f}, {OBC_SCORE_VK_NOCROSS, 2.0f}};
    std::vector<sal_case> cases;
    int variant = 0;
    auto add = [&](int D, int G, int Hkv, int N, int W) {
        for (const auto & kd : kinds) {
            sal_case c{};
            c.D = D;
            c.G = G;
            c.Hkv = Hkv;
            c.N = N;
            c.W = W;
            c.score = kd.score;
            c.p = kd.p;
            c.f16 = variant % 2 == 0;
            c.vt = (variant / 2) % 2 == 1;
            c.strided = (variant / 4) % 2 == 1;
            c.pool = variant % 3;
            c.qmul = variant % 5 == 4 ? 6.0f : 1.0f;
            c.posmode = variant % 7 == 3 ? 2 : variant % 3 == 1 ? 1 : 0;
            ++variant;
            cases.push_back(c);
        }
    };
    if (quick) {
        add(64, 3, 2, 70, 5);
        add(64, 2, 2, 300, 1);
        add(40, 3, 1, 200, 40);
        add(128, 2, 1, 160, 16);
        add(256, 2, 1, 100, 3);
    } else {
        for (int D : {64, 128})
            for (int g : {3, 6})
                for (int W : {1, 16, 64})
                    for (int N : {257, 2048, 8192}) {
                        if (N == 8192 && W == 64) continue;
                        add(D, g, g == 3 ? 3 : 2, N, W);
                    }
        add(80, 4, 2, 1000, 16);    // head_dim padded inside the kernels
        add(256, 2, 2, 1500, 16);   // the largest head_dim
        add(128, 6, 2, 8192, 64);   // the longest window at the largest test length
    }
    for (const sal_case & c : cases) run_saliency(c, rng, n_threads);

    // compaction: K rows of several widths (16-, 4- and 2-byte units), quantized rows, transposed V,
    // scores and positions
    const compact_case ccs[] = {
        {"K f16", GGML_TYPE_F16, 64, 300, 3, 1},     {"K f16 odd", GGML_TYPE_F16, 66, 300, 2, 1},
        {"K f32", GGML_TYPE_F32, 128, 257, 2, 1},    {"K q8_0", GGML_TYPE_Q8_0, 64, 300, 2, 1},
        {"K f16 odd2", GGML_TYPE_F16, 3, 200, 2, 1}, {"V^T f16", GGML_TYPE_F16, 300, 64, 2, 0},
        {"V^T f32", GGML_TYPE_F32, 257, 16, 3, 0},   {"scores", GGML_TYPE_F32, 1000, 3, 1, 0},
        {"pos", GGML_TYPE_I32, 513, 2, 1, 0},
    };
    for (const compact_case & cc : ccs)
        for (const char * pat : {"random", "shift", "prefix", "identity", "oob"}) run_compact(cc, pat, rng);
    if (!quick) {
        run_compact({"K f16 long", GGML_TYPE_F16, 128, 131072, 2, 1}, "random", rng);
        run_compact({"V^T f16 long", GGML_TYPE_F16, 32768, 128, 2, 0}, "random", rng);
    }

    // top-k: budgets below and above n_used, sinks, recent windows wider than the budget, pooling
    struct tk {
        int n_used, budget, sink, recent, pooling, kernel;
    };
    std::vector<tk> tks = {{100, 200, 4, 16, 0, 1},  {100, 100, 4, 16, 1, 7},  {100, 40, 4, 16, 1, 7},
                           {100, 40, 0, 0, 2, 7},    {100, 40, 4, 60, 0, 1},   {1000, 64, 4, 16, 2, 8},
                           {1000, 1, 0, 0, 0, 1},    {1000, 64, 64, 16, 1, 5}, {5000, 512, 4, 32, 1, 7},
                           {5000, 4999, 0, 0, 2, 3}, {3000, 20, 30, 0, 0, 1}};
    if (!quick) {
        tks.push_back({70000, 512, 4, 32, 1, 7});
        tks.push_back({131072, 4096, 4, 64, 2, 7});
        tks.push_back({131072, 65536, 0, 0, 0, 1});
    }
    int dist = 0;
    for (const tk & t : tks) {
        run_topk(t.n_used, 3, t.budget, t.sink, t.recent, t.pooling, t.kernel, dist % 3, rng);
        ++dist;
    }

    printf("%d checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
