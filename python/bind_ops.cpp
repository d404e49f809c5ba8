// NumPy bindings of the ggml-ext ops (obc_ops.h), for tests and research tools.
// The main module (bindings.cpp) calls obc_bind_ops(m).
//
// Layout: NumPy arrays are C-contiguous (row-major), so a NumPy shape (a, b, c) is the ggml
// shape [c, b, a] over the same memory: q (n_head, n_win, head_dim) is ggml q [head_dim, n_win,
// n_head], and the result (n_head_kv, n_kv) is ggml [n_kv, n_head_kv].

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include "eviction.h"

#include <ggml-alloc.h>
#include <ggml-backend.h>
#include <ggml-cpu.h>
#include <ggml.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "obc_ops.h"

namespace nb = nanobind;

namespace {

using f32_in = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using i32_in = nb::ndarray<const int32_t, nb::c_contig, nb::device::cpu>;
using f32_out2 = nb::ndarray<nb::numpy, float, nb::ndim<2>>;
using f32_out = nb::ndarray<nb::numpy, float>;

int parse_score(const std::string & s) {
    if (s == "attn") return OBC_SCORE_ATTN;
    if (s == "v") return OBC_SCORE_V;
    if (s == "k") return OBC_SCORE_K;
    if (s == "vk") return OBC_SCORE_VK;
    if (s == "vk-nocross") return OBC_SCORE_VK_NOCROSS;
    throw std::invalid_argument("unknown score '" + s + "' (expected attn, v, k, vk or vk-nocross)");
}

int parse_pool(const std::string & s) { return obc::parse_group_pool(s); }

std::string shape_str(size_t ndim, const int64_t * shape) {
    std::string r = "(";
    for (size_t i = 0; i < ndim; ++i) r += (i ? ", " : "") + std::to_string(shape[i]);
    return r + (ndim == 1 ? ",)" : ")");
}

template <typename A>
std::string shape_of(const A & a) {
    std::vector<int64_t> s(a.ndim());
    for (size_t i = 0; i < a.ndim(); ++i) s[i] = (int64_t) a.shape(i);
    return shape_str(s.size(), s.data());
}

template <typename A>
void expect_shape(const char * name, const A & a, std::initializer_list<int64_t> want) {
    bool ok = a.ndim() == want.size();
    size_t i = 0;
    for (int64_t w : want) {
        if (ok && (int64_t) a.shape(i) != w) ok = false;
        ++i;
    }
    if (!ok) {
        std::vector<int64_t> w(want);
        throw std::invalid_argument(std::string(name) + " must have shape " + shape_str(w.size(), w.data()) +
                                    ", got " + shape_of(a));
    }
}

using host_fn = int (*)(const float *, const float *, const float *, const int32_t *, const int32_t *, int, int, int,
                        int, int, obc_saliency_params, int, float *, char *, size_t);

f32_out2 run_saliency(host_fn fn, const f32_in & q, const f32_in & k, const f32_in & v, const i32_in & pos_q,
                      const i32_in & pos_k, const std::string & score, float p, std::optional<float> scale,
                      const std::string & group_pool, int n_threads) {
    if (q.ndim() != 3) throw std::invalid_argument("q must be 3-D (n_head, n_win, head_dim), got " + shape_of(q));
    if (k.ndim() != 3) throw std::invalid_argument("k must be 3-D (n_head_kv, n_kv, head_dim), got " + shape_of(k));
    const int64_t H = q.shape(0), W = q.shape(1), D = q.shape(2);
    const int64_t Hkv = k.shape(0), N = k.shape(1);
    if (H <= 0 || W <= 0 || D <= 0 || Hkv <= 0 || N <= 0) throw std::invalid_argument("empty dimension");
    expect_shape("k", k, {Hkv, N, D});
    expect_shape("v", v, {Hkv, N, D});
    expect_shape("pos_q", pos_q, {W});
    expect_shape("pos_k", pos_k, {Hkv, N});
    if (H % Hkv != 0) throw std::invalid_argument("n_head must be a multiple of n_head_kv");
    if (N > INT32_MAX || H * W * D > INT32_MAX || Hkv * N * D > (int64_t) 1 << 40)
        throw std::invalid_argument("arrays too large");
    if (n_threads < 1) throw std::invalid_argument("n_threads must be >= 1");
    if (!(p > 0.0f) || !std::isfinite(p)) throw std::invalid_argument("p must be positive");

    obc_saliency_params prm{};
    prm.score = parse_score(score);
    prm.p = p;
    prm.scale = scale ? *scale : 1.0f / std::sqrt((float) D);
    prm.group_pool = parse_pool(group_pool);
    prm.v_trans = 0;
    if (!std::isfinite(prm.scale)) throw std::invalid_argument("scale must be finite");

    std::unique_ptr<float[]> out(new float[(size_t) Hkv * N]);
    char err[512] = {0};
    int rc;
    {
        nb::gil_scoped_release release;
        rc = fn(q.data(), k.data(), v.data(), pos_q.data(), pos_k.data(), (int) D, (int) W, (int) H, (int) N, (int) Hkv,
                prm, n_threads, out.get(), err, sizeof(err));
    }
    if (rc != 0) {
        if (rc == 1) throw std::invalid_argument(err);
        throw std::runtime_error(err);
    }
    float * data = out.release();
    nb::capsule owner(data, [](void * ptr) noexcept { delete[] static_cast<float *>(ptr); });
    return f32_out2(data, {(size_t) Hkv, (size_t) N}, owner);
}

// obc_saliency on K/V laid out as a ggml KV cache holds them: F16 or F32, V optionally transposed
// ([n_kv, head_dim, n_head_kv]), both as strided views into a larger cache whose unused slots
// (pad before and after the n_kv used ones) hold NaN, so that any read outside the view shows.
// Computed through the ggml CPU backend (ggml_backend_graph_compute), as the engine does.
f32_out2 saliency_cache(const f32_in & q, const f32_in & k, const f32_in & v, const i32_in & pos_q,
                        const i32_in & pos_k, const std::string & score, float p, std::optional<float> scale,
                        const std::string & group_pool, int n_threads, const std::string & kv_type, bool v_trans,
                        int pad) {
    if (q.ndim() != 3 || k.ndim() != 3) throw std::invalid_argument("q and k must be 3-D");
    const int64_t H = q.shape(0), W = q.shape(1), D = q.shape(2);
    const int64_t Hkv = k.shape(0), N = k.shape(1);
    expect_shape("k", k, {Hkv, N, D});
    expect_shape("v", v, {Hkv, N, D});
    expect_shape("pos_q", pos_q, {W});
    expect_shape("pos_k", pos_k, {Hkv, N});
    if (H <= 0 || W <= 0 || D <= 0 || Hkv <= 0 || N <= 0 || H % Hkv != 0) throw std::invalid_argument("bad dimensions");
    if (pad < 0) throw std::invalid_argument("pad must be >= 0");
    if (n_threads < 1) throw std::invalid_argument("n_threads must be >= 1");
    ggml_type type;
    if (kv_type == "f32") {
        type = GGML_TYPE_F32;
    } else if (kv_type == "f16") {
        type = GGML_TYPE_F16;
    } else {
        throw std::invalid_argument("kv_type must be 'f32' or 'f16'");
    }
    obc_saliency_params prm{};
    prm.score = parse_score(score);
    prm.p = p;
    prm.scale = scale ? *scale : 1.0f / std::sqrt((float) D);
    prm.group_pool = parse_pool(group_pool);
    prm.v_trans = v_trans ? 1 : 0;
    if (!(p > 0.0f)) throw std::invalid_argument("p must be positive");

    const int64_t cap = N + 2 * (int64_t) pad;
    const size_t es = ggml_type_size(type);
    // host images of the caches, NaN everywhere first
    std::vector<float> kimg((size_t) D * cap * Hkv, NAN), vimg((size_t) D * cap * Hkv, NAN);
    for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t j = 0; j < N; ++j)
            for (int64_t d = 0; d < D; ++d) {
                const size_t src = ((size_t) h * N + j) * D + d;
                kimg[((size_t) h * cap + pad + j) * D + d] = k.data()[src];
                if (v_trans) {
                    vimg[((size_t) h * D + d) * cap + pad + j] = v.data()[src];
                } else {
                    vimg[((size_t) h * cap + pad + j) * D + d] = v.data()[src];
                }
            }
    std::vector<uint8_t> kbytes(kimg.size() * es), vbytes(vimg.size() * es);
    if (type == GGML_TYPE_F32) {
        memcpy(kbytes.data(), kimg.data(), kbytes.size());
        memcpy(vbytes.data(), vimg.data(), vbytes.size());
    } else {
        ggml_fp32_to_fp16_row(kimg.data(), reinterpret_cast<ggml_fp16_t *>(kbytes.data()), (int64_t) kimg.size());
        ggml_fp32_to_fp16_row(vimg.data(), reinterpret_cast<ggml_fp16_t *>(vbytes.data()), (int64_t) vimg.size());
    }

    std::unique_ptr<float[]> out(new float[(size_t) Hkv * N]);
    std::string error;
    {
        nb::gil_scoped_release release;
        ggml_backend_t be = ggml_backend_cpu_init();
        ggml_init_params ip{};
        ip.mem_size = 32 * ggml_tensor_overhead() + ggml_graph_overhead();
        ip.no_alloc = true;
        ggml_context * ctx = be ? ggml_init(ip) : nullptr;
        ggml_gallocr_t ga = nullptr;
        if (!ctx) {
            error = "cannot start the ggml CPU backend";
        } else {
            ggml_backend_cpu_set_n_threads(be, n_threads);
            ggml_tensor * tq = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, W, H);
            ggml_tensor * kc = ggml_new_tensor_3d(ctx, type, D, cap, Hkv);
            ggml_tensor * vc = v_trans ? ggml_new_tensor_3d(ctx, type, cap, D, Hkv) : ggml_new_tensor_3d(ctx, type, D, cap, Hkv);
            ggml_tensor * tpq = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, W);
            ggml_tensor * tpk = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, N, Hkv);
            for (ggml_tensor * t : {tq, kc, vc, tpq, tpk}) ggml_set_input(t);
            ggml_tensor * kv = ggml_view_3d(ctx, kc, D, N, Hkv, kc->nb[1], kc->nb[2], (size_t) pad * kc->nb[1]);
            ggml_tensor * vv = v_trans ? ggml_view_3d(ctx, vc, N, D, Hkv, vc->nb[1], vc->nb[2], (size_t) pad * vc->nb[0])
                                       : ggml_view_3d(ctx, vc, D, N, Hkv, vc->nb[1], vc->nb[2], (size_t) pad * vc->nb[1]);
            ggml_tensor * res = obc_saliency(ctx, tq, kv, vv, tpq, tpk, prm);
            ggml_set_output(res);
            ggml_cgraph * gf = ggml_new_graph(ctx);
            ggml_build_forward_expand(gf, res);
            ga = ggml_gallocr_new(ggml_backend_get_default_buffer_type(be));
            if (!ga || !ggml_gallocr_alloc_graph(ga, gf)) {
                error = "graph allocation failed";
            } else {
                ggml_backend_tensor_set(tq, q.data(), 0, ggml_nbytes(tq));
                ggml_backend_tensor_set(kc, kbytes.data(), 0, ggml_nbytes(kc));
                ggml_backend_tensor_set(vc, vbytes.data(), 0, ggml_nbytes(vc));
                ggml_backend_tensor_set(tpq, pos_q.data(), 0, ggml_nbytes(tpq));
                ggml_backend_tensor_set(tpk, pos_k.data(), 0, ggml_nbytes(tpk));
                if (ggml_backend_graph_compute(be, gf) != GGML_STATUS_SUCCESS) {
                    error = "graph compute failed";
                } else {
                    ggml_backend_tensor_get(res, out.get(), 0, ggml_nbytes(res));
                }
            }
        }
        if (ga) ggml_gallocr_free(ga);
        if (ctx) ggml_free(ctx);
        if (be) ggml_backend_free(be);
    }
    if (!error.empty()) throw std::runtime_error("saliency_cache: " + error);
    float * data = out.release();
    nb::capsule owner(data, [](void * ptr) noexcept { delete[] static_cast<float *>(ptr); });
    return f32_out2(data, {(size_t) Hkv, (size_t) N}, owner);
}

f32_out compact(const f32_in & cache, const i32_in & idx, int axis) {
    if (axis != 0 && axis != 1) throw std::invalid_argument("axis must be 0 or 1 (ggml axes: 0 = last NumPy axis)");
    if (cache.ndim() != 2 && cache.ndim() != 3)
        throw std::invalid_argument("cache must be (H, d, cap), (H, cap, d) or (H, cap), got " + shape_of(cache));
    if (idx.ndim() != 2) throw std::invalid_argument("idx must be (H, n_keep), got " + shape_of(idx));
    const int64_t H = cache.shape(0);
    const int64_t n_keep = idx.shape(1);
    if (cache.ndim() == 2 && axis != 0) throw std::invalid_argument("a (H, cap) tensor compacts along axis 0");
    // ggml shape, innermost first
    int64_t ne[3] = {1, 1, 1};
    for (size_t i = 0; i < cache.ndim(); ++i) ne[i] = (int64_t) cache.shape(cache.ndim() - 1 - i);
    const int64_t cap = ne[axis];
    if ((int64_t) idx.shape(0) != H) throw std::invalid_argument("idx must have one row per head");
    if (n_keep > cap) throw std::invalid_argument("n_keep exceeds the capacity");
    if (H <= 0 || cap <= 0) throw std::invalid_argument("empty cache");
    const int32_t * ix = idx.data();
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t n = 0; n < n_keep; ++n) {
            const int32_t x = ix[h * n_keep + n];
            if (x < 0 || x >= cap) throw std::invalid_argument("idx out of range");
            if (n > 0 && x <= ix[h * n_keep + n - 1]) throw std::invalid_argument("idx must be strictly increasing per head");
        }
    }

    const size_t count = cache.size();
    std::unique_ptr<float[]> out(new float[count]);
    {
        nb::gil_scoped_release release;
        ggml_init_params ip{};
        ip.mem_size = count * sizeof(float) + (size_t) H * std::max<int64_t>(n_keep, 1) * sizeof(int32_t) +
                      8 * ggml_tensor_overhead() + ggml_graph_overhead() + 64 * 1024;
        ip.no_alloc = false;
        ggml_context * ctx = ggml_init(ip);
        if (!ctx) throw std::runtime_error("ggml_init failed");
        ggml_tensor * t = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, ne[0], ne[1], ne[2]);
        ggml_tensor * ti = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_keep, H);
        memcpy(t->data, cache.data(), count * sizeof(float));
        memcpy(ti->data, ix, (size_t) H * n_keep * sizeof(int32_t));
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, obc_compact(ctx, t, ti, axis));
        const ggml_status st = ggml_graph_compute_with_ctx(ctx, gf, 2);
        if (st == GGML_STATUS_SUCCESS) memcpy(out.get(), t->data, count * sizeof(float));
        ggml_free(ctx);
        if (st != GGML_STATUS_SUCCESS) throw std::runtime_error("obc_compact: graph compute failed");
    }
    std::vector<size_t> shape(cache.ndim());
    for (size_t i = 0; i < cache.ndim(); ++i) shape[i] = cache.shape(i);
    float * data = out.release();
    nb::capsule owner(data, [](void * ptr) noexcept { delete[] static_cast<float *>(ptr); });
    return f32_out(data, shape.size(), shape.data(), owner);
}

const char * SALIENCY_DOC =
    "saliency(q, k, v, pos_q, pos_k, score, p=2.0, scale=None, group_pool='sum', n_threads=2)\n\n"
    "Per-KV-head saliency of every cached token (obc_saliency on the ggml CPU backend).\n"
    "q: float32 (n_head, n_win, head_dim); k, v: float32 (n_head_kv, n_kv, head_dim);\n"
    "pos_q: int32 (n_win,); pos_k: int32 (n_head_kv, n_kv); token j is masked for query i when\n"
    "pos_k[j] > pos_q[i]. score: attn | v | k | vk | vk-nocross; p: OBC-V norm exponent;\n"
    "scale: logit scale (default 1/sqrt(head_dim)); group_pool: sum | mean | max | norm-sum | pre-mean over the query\n"
    "heads of a KV head. Returns float32 (n_head_kv, n_kv).";

}  // namespace

void obc_bind_ops(nb::module_ & m) {
    m.def(
        "saliency",
        [](const f32_in & q, const f32_in & k, const f32_in & v, const i32_in & pos_q, const i32_in & pos_k,
           const std::string & score, float p, std::optional<float> scale, const std::string & group_pool,
           int n_threads) {
            return run_saliency(obc_saliency_host, q, k, v, pos_q, pos_k, score, p, scale, group_pool, n_threads);
        },
        nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("pos_q"), nb::arg("pos_k"), nb::arg("score"),
        nb::arg("p") = 2.0f, nb::arg("scale") = nb::none(), nb::arg("group_pool") = "sum", nb::arg("n_threads") = 2,
        SALIENCY_DOC);
    m.def(
        "saliency_composed",
        [](const f32_in & q, const f32_in & k, const f32_in & v, const i32_in & pos_q, const i32_in & pos_k,
           const std::string & score, float p, std::optional<float> scale, const std::string & group_pool,
           int n_threads) {
            return run_saliency(obc_saliency_composed_host, q, k, v, pos_q, pos_k, score, p, scale, group_pool,
                                n_threads);
        },
        nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("pos_q"), nb::arg("pos_k"), nb::arg("score"),
        nb::arg("p") = 2.0f, nb::arg("scale") = nb::none(), nb::arg("group_pool") = "sum", nb::arg("n_threads") = 2,
        "Same as saliency(), computed with stock ggml ops (obc_saliency_composed), as a cross-check.");
    m.def("saliency_cache", &saliency_cache, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("pos_q"),
          nb::arg("pos_k"), nb::arg("score"), nb::arg("p") = 2.0f, nb::arg("scale") = nb::none(),
          nb::arg("group_pool") = "sum", nb::arg("n_threads") = 2, nb::arg("kv_type") = "f32",
          nb::arg("v_trans") = false, nb::arg("pad") = 0,
          "saliency() on K/V stored the way a ggml KV cache stores them: kv_type 'f32' or 'f16',\n"
          "V transposed ([n_kv, head_dim, n_head_kv] in ggml) when v_trans, both as strided views\n"
          "with `pad` NaN-filled slots of capacity before and after the n_kv used ones; computed\n"
          "through the ggml CPU backend. For tests of the cache layouts.");
    m.def("compact", &compact, nb::arg("cache"), nb::arg("idx"), nb::arg("axis"),
          "compact(cache, idx, axis) -> copy of cache after obc_compact.\n\n"
          "cache: float32 (H, d, cap) [axis=0], (H, cap, d) [axis=1] or (H, cap) [axis=0]; axis is the\n"
          "ggml axis (0 = last NumPy axis). idx: int32 (H, n_keep), strictly increasing per head.\n"
          "Slot n of head h receives slot idx[h, n]; slots >= n_keep keep their old values.");
}
