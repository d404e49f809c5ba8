// NumPy bindings of the ggml-ext ops (obc_ops.h), for tests and research tools.
// The main module (bindings.cpp) calls obc_bind_ops(m).
//
// Layout: NumPy arrays are C-contiguous (row-major), so a NumPy shape (a, b, c) is the ggml
// shape [c, b, a] over the same memory: q (n_head, n_win, head_dim) is ggml q [head_dim, n_win,
// n_head], and the result (n_head_kv, n_kv) is ggml [n_kv, n_head_kv].

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

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

// A backend by name, for running the ops where a cache would live: "cpu", or "cuda" (the first
// GPU ggml knows; only on a build with the CUDA ops).
std::vector<std::string> op_backends() {
    std::vector<std::string> names{"cpu"};
#ifdef OBCACHE_HAVE_CUDA
    if (ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU)) names.push_back("cuda");
#endif
    return names;
}

// Tensors allocated in one backend's memory, and the runner that serves them.
struct OnBackend {
    ggml_backend_t be = nullptr;
    ggml_context * ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    obc_runner * runner = nullptr;

    OnBackend(const std::string & name, int n_threads) {
        const auto names = op_backends();
        if (std::find(names.begin(), names.end(), name) == names.end())
            throw std::invalid_argument("backend must be one of this build's: cpu" +
                                        std::string(names.size() > 1 ? ", cuda" : "") + " (got '" + name + "')");
        if (name == "cpu") {
            be = ggml_backend_cpu_init();
            if (be) ggml_backend_cpu_set_n_threads(be, n_threads);
        } else {
            be = ggml_backend_dev_init(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU), nullptr);
        }
        ggml_init_params ip{};
        ip.mem_size = 32 * ggml_tensor_overhead();
        ip.no_alloc = true;
        ctx = ggml_init(ip);
        runner = be ? obc_runner_new(be) : nullptr;
        if (!be || !ctx || !runner) {
            release();
            throw std::runtime_error("cannot start the " + name + " backend");
        }
    }
    void alloc() {
        buf = ggml_backend_alloc_ctx_tensors(ctx, be);
        if (!buf) throw std::runtime_error("out of memory on the backend");
    }
    // An error of the runner as a Python exception: ValueError for bad arguments.
    void check(int rc) const {
        if (rc == OBC_RUN_OK) return;
        if (rc == OBC_RUN_EINVAL) throw std::invalid_argument(obc_runner_error(runner));
        throw std::runtime_error(obc_runner_error(runner));
    }
    void release() {
        obc_runner_free(runner);
        if (buf) ggml_backend_buffer_free(buf);
        if (ctx) ggml_free(ctx);
        if (be) ggml_backend_free(be);
        runner = nullptr;
        buf = nullptr;
        ctx = nullptr;
        be = nullptr;
    }
    ~OnBackend() { release(); }
};

// Rows of n_per_row floats in a KV cache type, converted as the engine's set_rows converts them
// (the CPU type traits' from_float).
std::vector<uint8_t> encode_rows(ggml_type type, const float * x, int64_t n_rows, int64_t n_per_row) {
    if (n_per_row % ggml_blck_size(type) != 0)
        throw std::invalid_argument(std::string(ggml_type_name(type)) + " rows hold whole blocks of " +
                                    std::to_string(ggml_blck_size(type)) + " values; got rows of " + std::to_string(n_per_row));
    const size_t row_bytes = ggml_row_size(type, n_per_row);
    std::vector<uint8_t> out(row_bytes * n_rows);
    for (int64_t r = 0; r < n_rows; ++r) {
        const float * src = x + r * n_per_row;
        if (type == GGML_TYPE_F32) std::memcpy(out.data() + r * row_bytes, src, row_bytes);
        else ggml_get_type_traits_cpu(type)->from_float(src, out.data() + r * row_bytes, n_per_row);
    }
    return out;
}

// kv_round_trip: float rows stored in a KV cache type and read back, for the tests' references.
f32_out kv_round_trip(const f32_in & x, const std::string & kv_type) {
    if (x.ndim() != 2) throw std::invalid_argument("x must be 2-D (rows, values)");
    const ggml_type type = obc::parse_kv_cache_type("kv_type", kv_type);
    const int64_t n_rows = x.shape(0), n = x.shape(1);
    const std::vector<uint8_t> bytes = encode_rows(type, x.data(), n_rows, n);
    std::unique_ptr<float[]> out(new float[(size_t) n_rows * n]);
    for (int64_t r = 0; r < n_rows; ++r)
        obc::kv_row_to_float(type, bytes.data() + r * ggml_row_size(type, n), out.get() + r * n, n);
    float * data = out.release();
    nb::capsule owner(data, [](void * ptr) noexcept { delete[] static_cast<float *>(ptr); });
    return f32_out(data, {(size_t) n_rows, (size_t) n}, owner);
}

// obc_saliency on K/V laid out as a ggml KV cache holds them: in any KV cache type, V optionally transposed
// ([n_kv, head_dim, n_head_kv]), both as strided views into a larger cache whose unused slots
// (pad before and after the n_kv used ones) hold NaN, so that any read outside the view shows.
// Run as the engine runs it: obc_runner_saliency on the named backend's memory.
f32_out2 saliency_cache(const f32_in & q, const f32_in & k, const f32_in & v, const i32_in & pos_q,
                        const i32_in & pos_k, const std::string & score, float p, std::optional<float> scale,
                        const std::string & group_pool, int n_threads, const std::string & kv_type, bool v_trans,
                        int pad, const std::string & backend, std::optional<f32_in> k_offset) {
    if (q.ndim() != 3 || k.ndim() != 3) throw std::invalid_argument("q and k must be 3-D");
    const int64_t H = q.shape(0), W = q.shape(1), D = q.shape(2);
    const int64_t Hkv = k.shape(0), N = k.shape(1);
    expect_shape("k", k, {Hkv, N, D});
    expect_shape("v", v, {Hkv, N, D});
    expect_shape("pos_q", pos_q, {W});
    expect_shape("pos_k", pos_k, {Hkv, N});
    if (k_offset) expect_shape("k_offset", *k_offset, {Hkv, D});
    if (H <= 0 || W <= 0 || D <= 0 || Hkv <= 0 || N <= 0 || H % Hkv != 0) throw std::invalid_argument("bad dimensions");
    if (pad < 0) throw std::invalid_argument("pad must be >= 0");
    if (n_threads < 1) throw std::invalid_argument("n_threads must be >= 1");
    const ggml_type type = obc::parse_kv_cache_type("kv_type", kv_type);
    if (v_trans && ggml_is_quantized(type)) throw std::invalid_argument("a transposed v cannot be quantized");
    obc_saliency_params prm{};
    prm.score = parse_score(score);
    prm.p = p;
    prm.scale = scale ? *scale : 1.0f / std::sqrt((float) D);
    prm.group_pool = parse_pool(group_pool);
    prm.v_trans = v_trans ? 1 : 0;
    if (!(p > 0.0f)) throw std::invalid_argument("p must be positive");

    const int64_t cap = N + 2 * (int64_t) pad;
    // host images of the caches, NaN everywhere first (a quantized NaN row keeps a NaN scale)
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
    const int64_t v_row = v_trans ? cap : D;
    const std::vector<uint8_t> kbytes = encode_rows(type, kimg.data(), cap * Hkv, D);
    const std::vector<uint8_t> vbytes = encode_rows(type, vimg.data(), (int64_t) vimg.size() / v_row, v_row);
    // The runner takes the queries as the model computes them: [n_q][n_head][head_dim].
    std::vector<float> qt((size_t) W * H * D);
    for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < W; ++i) std::copy_n(q.data() + ((size_t) h * W + i) * D, D, qt.begin() + ((size_t) i * H + h) * D);

    std::unique_ptr<float[]> out(new float[(size_t) Hkv * N]);
    {
        nb::gil_scoped_release release;
        OnBackend ob(backend, n_threads);
        ggml_tensor * kc = ggml_new_tensor_3d(ob.ctx, type, D, cap, Hkv);
        ggml_tensor * vc = v_trans ? ggml_new_tensor_3d(ob.ctx, type, cap, D, Hkv) : ggml_new_tensor_3d(ob.ctx, type, D, cap, Hkv);
        ggml_tensor * kview = ggml_view_3d(ob.ctx, kc, D, N, Hkv, kc->nb[1], kc->nb[2], (size_t) pad * kc->nb[1]);
        ggml_tensor * vview = v_trans ? ggml_view_3d(ob.ctx, vc, N, D, Hkv, vc->nb[1], vc->nb[2], (size_t) pad * vc->nb[0])
                                      : ggml_view_3d(ob.ctx, vc, D, N, Hkv, vc->nb[1], vc->nb[2], (size_t) pad * vc->nb[1]);
        ob.alloc();
        ggml_backend_tensor_set(kc, kbytes.data(), 0, ggml_nbytes(kc));
        ggml_backend_tensor_set(vc, vbytes.data(), 0, ggml_nbytes(vc));
        const obc_saliency_layer layer{qt.data(), kview, vview, pos_k.data(), out.get(),
                                       k_offset ? k_offset->data() : nullptr};
        ob.check(obc_runner_saliency(ob.runner, &layer, 1, pos_q.data(), (int32_t) W, (int32_t) H, N, prm));
    }
    float * data = out.release();
    nb::capsule owner(data, [](void * ptr) noexcept { delete[] static_cast<float *>(ptr); });
    return f32_out2(data, {(size_t) Hkv, (size_t) N}, owner);
}

// mul_mat: w (M, K) stored in a weight type times x (N, K), on the CPU backend with w in its buffer
// as a model's weights are, through obc_mul_mat or through ggml_mul_mat; returns (N, M) and whether
// obc_mul_mat took its own kernel.
std::pair<f32_out2, bool> mul_mat(const f32_in & w, const f32_in & x, const std::string & w_type, int n_threads,
                                  bool ggml_only) {
    if (w.ndim() != 2 || x.ndim() != 2) throw std::invalid_argument("w and x must be 2-D: (M, K) and (N, K)");
    const int64_t M = w.shape(0), K = w.shape(1), N = x.shape(0);
    expect_shape("x", x, {N, K});
    if (M <= 0 || K <= 0 || N <= 0) throw std::invalid_argument("empty dimension");
    if (n_threads < 1) throw std::invalid_argument("n_threads must be >= 1");
    ggml_type type = GGML_TYPE_COUNT;
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * name = ggml_type_name((ggml_type) t);
        if (name && w_type == name && ggml_get_type_traits_cpu((ggml_type) t)->from_float) type = (ggml_type) t;
    }
    if (w_type == "f32") type = GGML_TYPE_F32;
    if (type == GGML_TYPE_COUNT) throw std::invalid_argument("unknown weight type '" + w_type + "'");
    const std::vector<uint8_t> wbytes = encode_rows(type, w.data(), M, K);
    std::unique_ptr<float[]> out(new float[(size_t) N * M]);
    bool tiled = false;
    {
        nb::gil_scoped_release release;
        OnBackend ob("cpu", n_threads);
        ggml_tensor * tw = ggml_new_tensor_2d(ob.ctx, type, K, M);
        ggml_tensor * tx = ggml_new_tensor_2d(ob.ctx, GGML_TYPE_F32, K, N);
        ob.alloc();
        ggml_backend_tensor_set(tw, wbytes.data(), 0, wbytes.size());
        ggml_backend_tensor_set(tx, x.data(), 0, ggml_nbytes(tx));
        ggml_init_params ip{};
        ip.mem_size = 8 * ggml_tensor_overhead() + ggml_graph_overhead();
        ip.no_alloc = true;
        ggml_context * gctx = ggml_init(ip);
        if (!gctx) throw std::runtime_error("ggml_init failed");
        std::unique_ptr<ggml_context, decltype(&ggml_free)> gguard(gctx, ggml_free);
        ggml_tensor * y = ggml_only ? ggml_mul_mat(gctx, tw, tx) : obc_mul_mat(gctx, tw, tx);
        tiled = y->op == GGML_OP_CUSTOM;
        ggml_cgraph * gf = ggml_new_graph(gctx);
        ggml_build_forward_expand(gf, y);
        std::unique_ptr<ggml_gallocr, decltype(&ggml_gallocr_free)> galloc(
            ggml_gallocr_new(ggml_backend_get_default_buffer_type(ob.be)), ggml_gallocr_free);
        if (!ggml_gallocr_alloc_graph(galloc.get(), gf)) throw std::runtime_error("out of memory for the graph");
        if (ggml_backend_graph_compute(ob.be, gf) != GGML_STATUS_SUCCESS) throw std::runtime_error("compute failed");
        ggml_backend_tensor_get(y, out.get(), 0, ggml_nbytes(y));
    }
    float * data = out.release();
    nb::capsule owner(data, [](void * ptr) noexcept { delete[] static_cast<float *>(ptr); });
    return {f32_out2(data, {(size_t) N, (size_t) M}, owner), tiled};
}

f32_out compact(const f32_in & cache, const i32_in & idx, int axis, const std::string & backend,
                const std::string & kv_type) {
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
    if ((int64_t) idx.shape(0) != H) throw std::invalid_argument("idx must have one row per head");
    if (n_keep > ne[axis]) throw std::invalid_argument("n_keep exceeds the capacity");
    if (H <= 0 || ne[axis] <= 0 || n_keep <= 0) throw std::invalid_argument("empty cache or keep list");
    const ggml_type type = obc::parse_kv_cache_type("kv_type", kv_type);

    // The cache in its type (rows along ggml axis 0), compacted, then read back as floats.
    const size_t count = cache.size();
    const int64_t n_rows = (int64_t) count / ne[0];
    std::vector<uint8_t> bytes = encode_rows(type, cache.data(), n_rows, ne[0]);
    std::unique_ptr<float[]> out(new float[count]);
    {
        nb::gil_scoped_release release;
        OnBackend ob(backend, 2);
        ggml_tensor * t = ggml_new_tensor_3d(ob.ctx, type, ne[0], ne[1], ne[2]);
        ob.alloc();
        ggml_backend_tensor_set(t, bytes.data(), 0, bytes.size());
        const int32_t * list = idx.data();
        ob.check(obc_runner_compact(ob.runner, &t, &axis, &list, 1, n_keep, (int32_t) H));
        ggml_backend_tensor_get(t, bytes.data(), 0, bytes.size());
    }
    const size_t row_bytes = ggml_row_size(type, ne[0]);
    for (int64_t r = 0; r < n_rows; ++r) obc::kv_row_to_float(type, bytes.data() + r * row_bytes, out.get() + r * ne[0], ne[0]);
    std::vector<size_t> shape(cache.ndim());
    for (size_t i = 0; i < cache.ndim(); ++i) shape[i] = cache.shape(i);
    float * data = out.release();
    nb::capsule owner(data, [](void * ptr) noexcept { delete[] static_cast<float *>(ptr); });
    return f32_out(data, shape.size(), shape.data(), owner);
}

nb::ndarray<nb::numpy, int32_t, nb::ndim<2>> select_keep_heads(const f32_in & scores, int32_t budget, int32_t n_sink,
                                                               int32_t n_recent, const std::string & pooling,
                                                               int32_t kernel, const std::string & backend) {
    if (scores.ndim() != 2) throw std::invalid_argument("scores must be (H, n_used), got " + shape_of(scores));
    const int64_t H = scores.shape(0), n = scores.shape(1);
    if (H <= 0 || n <= 0 || n > INT32_MAX) throw std::invalid_argument("empty scores");
    const int32_t pool = (int32_t) obc::parse_pooling(pooling);
    const int64_t n_keep = std::max<int64_t>(1, std::min<int64_t>(budget, n));
    std::unique_ptr<int32_t[]> out(new int32_t[(size_t) H * n_keep]);
    {
        nb::gil_scoped_release release;
        OnBackend ob(backend, 2);
        ggml_tensor * ts = ggml_new_tensor_2d(ob.ctx, GGML_TYPE_F32, n, H);
        ggml_tensor * tk = ggml_new_tensor_2d(ob.ctx, GGML_TYPE_I32, n_keep, H);
        ob.alloc();
        ggml_backend_tensor_set(ts, scores.data(), 0, ggml_nbytes(ts));
        ob.check(obc_runner_select_keep(ob.runner, ts, (int32_t) n, budget, n_sink, n_recent, pool, kernel, tk));
        ggml_backend_tensor_get(tk, out.get(), 0, ggml_nbytes(tk));
    }
    int32_t * data = out.release();
    nb::capsule owner(data, [](void * ptr) noexcept { delete[] static_cast<int32_t *>(ptr); });
    return nb::ndarray<nb::numpy, int32_t, nb::ndim<2>>(data, {(size_t) H, (size_t) n_keep}, owner);
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
          nb::arg("v_trans") = false, nb::arg("pad") = 0, nb::arg("backend") = "cpu", nb::arg("k_offset") = nb::none(),
          "saliency() on K/V stored the way a ggml KV cache stores them: kv_type one of kv_cache_types(),\n"
          "V transposed ([n_kv, head_dim, n_head_kv] in ggml) when v_trans, both as strided views\n"
          "with `pad` NaN-filled slots of capacity before and after the n_kv used ones; run as the\n"
          "engine runs it (obc_runner) in the memory of `backend` (one of op_backends()).\n"
          "k_offset: float32 (n_head_kv, head_dim) or None; k then holds the keys minus it (per head),\n"
          "as a quantized KV cache stores them, and the op adds it back.");
    m.def("kv_round_trip", &kv_round_trip, nb::arg("x"), nb::arg("kv_type"),
          "kv_round_trip(x, kv_type) -> float32 rows of x (rows, values) stored in a KV cache type and read back.");
    m.def("compact", &compact, nb::arg("cache"), nb::arg("idx"), nb::arg("axis"), nb::arg("backend") = "cpu",
          nb::arg("kv_type") = "f32",
          "compact(cache, idx, axis, backend='cpu', kv_type='f32') -> copy of cache after obc_compact.\n\n"
          "kv_type: the type the cache is stored in while it moves (one of kv_cache_types(); a quantized\n"
          "type moves whole rows, axis 1 only).\n"
          "cache: float32 (H, d, cap) [axis=0], (H, cap, d) [axis=1] or (H, cap) [axis=0]; axis is the\n"
          "ggml axis (0 = last NumPy axis). idx: int32 (H, n_keep), strictly increasing per head.\n"
          "Slot n of head h receives slot idx[h, n]; slots >= n_keep keep their old values.");
    m.def("mul_mat", &mul_mat, nb::arg("w"), nb::arg("x"), nb::arg("w_type") = "q6_K", nb::arg("n_threads") = 1,
          nb::arg("ggml_only") = false,
          "mul_mat(w, x, w_type='q6_K', n_threads=1, ggml_only=False) -> (y, tiled): y = x @ w.T as float32\n"
          "(N, M), with w (M, K) stored in w_type (a ggml type name) in the CPU backend's memory, computed\n"
          "by obc_mul_mat (or ggml_mul_mat with ggml_only); tiled says whether obc_mul_mat used its own\n"
          "kernel rather than ggml_mul_mat.");
    m.def("select_keep_heads", &select_keep_heads, nb::arg("scores"), nb::arg("budget"), nb::arg("n_sink"),
          nb::arg("n_recent"), nb::arg("pooling") = "none", nb::arg("kernel") = 7, nb::arg("backend") = "cpu",
          "The slots each head of scores (H, n_used) keeps, as int32 (H, min(budget, n_used)), from\n"
          "obc_runner_select_keep in the memory of `backend`.");
    m.def("op_backends", &op_backends, "The backends this build runs the ops on: 'cpu', and 'cuda' with a GPU.");
}
