// obc_saliency_composed: the saliency scores of obc_ops.h built only from stock ggml ops
// (mul_mat, soft_max_ext, elementwise ops, sum_rows, pool_2d), as an independent cross-check of
// the fused custom ops. It materialises several [n_kv, n_win, n_head] tensors, so it is meant
// for tests and research tools, not for the inference path.
//
// Broadcasting: ggml_mul_mat maps query head g to KV head g / G (G = n_head / n_head_kv), while
// the elementwise ops and soft_max_ext broadcast modulo the smaller size. To keep the two
// consistent, per-query-head tensors are viewed as 4-D [n_kv, n_win, G, n_head_kv], so that
// per-KV-head tensors [.., 1, 1, n_head_kv] broadcast over dims 1 and 2 only.
//
// Identities used (all in fp32; K and V are cast to F32 first so that mul_mat does not round q
// to F16):
//   ||v_j - o_i||^2            = ||v_j||^2 - 2 v_j.o_i + ||o_i||^2
//   ||v_j + z (v_j - o_i)||^2  = ||v_j||^2 + 2 z (||v_j||^2 - v_j.o_i) + z^2 ||v_j - o_i||^2
//   x^p                        = exp(p log x)   (for the general-p OBC-V variant)
// The first expansion cancels when a query attends almost only to token j (o_i ~ v_j): there
// OBC-K loses about 2 log10(1 / (1 - A_ij)) digits, which the fused ops avoid. Compare the two at
// moderately concentrated attention, or with a tolerance on that absolute error.

#include "obc_ops.h"

#include <ggml-alloc.h>
#include <ggml-backend.h>
#include <ggml-cpu.h>
#include <ggml.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>

namespace {

ggml_tensor * to_f32(ggml_context * ctx, ggml_tensor * x) {
    if (x->type == GGML_TYPE_F32) return x;
    return ggml_cast(ctx, x, GGML_TYPE_F32);
}

// Sum of x [n_kv, n_win, G, n_head_kv] over the window (dim 1) -> [n_kv, G, n_head_kv].
ggml_tensor * sum_window(ggml_context * ctx, ggml_tensor * x) {
    const int64_t N = x->ne[0], G = x->ne[2], Hkv = x->ne[3];
    ggml_tensor * t = ggml_cont(ctx, ggml_permute(ctx, x, 1, 0, 2, 3));  // [W, N, G, Hkv]
    t = ggml_sum_rows(ctx, t);                                          // [1, N, G, Hkv]
    return ggml_reshape_3d(ctx, t, N, G, Hkv);
}

void set_err(char * err, size_t err_len, const std::string & msg) {
    if (err && err_len > 0) snprintf(err, err_len, "%s", msg.c_str());
}

}  // namespace

extern "C" struct ggml_tensor * obc_saliency_composed(struct ggml_context * ctx, struct ggml_tensor * q,
                                                      struct ggml_tensor * k, struct ggml_tensor * v,
                                                      struct ggml_tensor * pos_q, struct ggml_tensor * pos_k,
                                                      struct ggml_tensor * k_offset, struct obc_saliency_params params) {
    GGML_ASSERT(q->type == GGML_TYPE_F32 && pos_q->type == GGML_TYPE_I32 && pos_k->type == GGML_TYPE_I32);
    const int64_t D = q->ne[0], W = q->ne[1], H = q->ne[2];
    const int64_t N = k->ne[1], Hkv = k->ne[2];
    GGML_ASSERT(k->ne[0] == D && H % Hkv == 0);
    GGML_ASSERT(params.score >= OBC_SCORE_ATTN && params.score <= OBC_SCORE_VK_NOCROSS);
    GGML_ASSERT(params.group_pool >= OBC_GROUP_SUM && params.group_pool <= OBC_GROUP_MAX);
    const int64_t G = H / Hkv;
    const int score = params.score;

    // Logits and mask
    ggml_tensor * kf = to_f32(ctx, k);
    if (k_offset) kf = ggml_add(ctx, kf, ggml_reshape_3d(ctx, k_offset, D, 1, Hkv));   // the keys the cache stands for
    ggml_tensor * zr = ggml_mul_mat(ctx, kf, q);  // [N, W, H], unscaled
    zr = ggml_reshape_4d(ctx, zr, N, W, G, Hkv);

    ggml_tensor * pk = ggml_reshape_4d(ctx, ggml_cont(ctx, ggml_cast(ctx, pos_k, GGML_TYPE_F32)), N, 1, 1, Hkv);
    ggml_tensor * pq = ggml_reshape_4d(ctx, ggml_cont(ctx, ggml_cast(ctx, pos_q, GGML_TYPE_F32)), 1, W, 1, 1);
    ggml_tensor * diff = ggml_sub(ctx, ggml_repeat_4d(ctx, pk, N, W, 1, Hkv), pq);  // pos_k - pos_q
    ggml_tensor * masked = ggml_step(ctx, diff);                                 // 1 where pos_k > pos_q
    ggml_tensor * keep = ggml_scale_bias(ctx, masked, -1.0f, 1.0f);               // 1 where visible
    ggml_tensor * mask = ggml_scale(ctx, masked, -1e30f);

    // A_ij, with fully masked rows forced to 0 by `keep`
    ggml_tensor * A = ggml_soft_max_ext(ctx, zr, mask, params.scale, 0.0f);
    A = ggml_mul(ctx, A, keep);
    ggml_tensor * X = nullptr;      // per (j, i, g) contribution, [N, W, G, Hkv]
    ggml_tensor * vnorm = nullptr;  // factor applied after the window sum (OBC-V)

    if (score == OBC_SCORE_ATTN) {
        X = A;
    } else {
        // V rows [D, N, Hkv] and V^T [N, D, Hkv], both F32 contiguous
        ggml_tensor * vr;
        ggml_tensor * vt;
        if (params.v_trans) {
            vt = ggml_cont(ctx, to_f32(ctx, v));
            vr = ggml_cont(ctx, ggml_transpose(ctx, vt));
        } else {
            vr = ggml_cont(ctx, to_f32(ctx, v));
            vt = ggml_cont(ctx, ggml_transpose(ctx, vr));
        }
        ggml_tensor * vn2 = ggml_reshape_4d(ctx, ggml_sum_rows(ctx, ggml_sqr(ctx, vr)), N, 1, 1, Hkv);
        ggml_tensor * A2 = ggml_sqr(ctx, A);

        if (score == OBC_SCORE_V) {
            if (params.p == 2.0f) {
                X = A2;
                vnorm = vn2;
            } else if (params.p == 1.0f) {
                X = A;
                vnorm = ggml_reshape_4d(ctx, ggml_sum_rows(ctx, ggml_abs(ctx, vr)), N, 1, 1, Hkv);
            } else {
                X = ggml_exp(ctx, ggml_scale(ctx, ggml_log(ctx, A), params.p));
                ggml_tensor * vp = ggml_exp(ctx, ggml_scale(ctx, ggml_log(ctx, ggml_abs(ctx, vr)), params.p));
                vnorm = ggml_reshape_4d(ctx, ggml_sum_rows(ctx, vp), N, 1, 1, Hkv);
            }
        } else {
            ggml_tensor * zs = ggml_mul(ctx, ggml_scale(ctx, zr, params.scale), keep);     // z, 0 where masked
            ggml_tensor * o = ggml_mul_mat(ctx, vt, ggml_reshape_3d(ctx, A, N, W, H));  // [D, W, H]
            ggml_tensor * vo = ggml_reshape_4d(ctx, ggml_mul_mat(ctx, vr, o), N, W, G, Hkv);
            ggml_tensor * on2 = ggml_reshape_4d(ctx, ggml_sum_rows(ctx, ggml_sqr(ctx, o)), 1, W, G, Hkv);
            ggml_tensor * dvo = ggml_add(ctx, ggml_add(ctx, ggml_scale(ctx, vo, -2.0f), vn2), on2);  // ||v-o||^2
            ggml_tensor * z2 = ggml_sqr(ctx, zs);
            ggml_tensor * sk = ggml_mul(ctx, ggml_mul(ctx, A2, z2), dvo);
            if (score == OBC_SCORE_K) {
                X = sk;
            } else if (score == OBC_SCORE_VK_NOCROSS) {
                X = ggml_add(ctx, ggml_mul(ctx, A2, vn2), sk);
            } else {
                // vn2 + 2 z (vn2 - v.o) + z^2 ||v-o||^2
                ggml_tensor * vmo = ggml_add(ctx, ggml_neg(ctx, vo), vn2);  // vn2 - v.o
                ggml_tensor * cross = ggml_mul(ctx, ggml_scale(ctx, zs, 2.0f), vmo);
                ggml_tensor * t = ggml_add(ctx, ggml_add(ctx, cross, ggml_mul(ctx, z2, dvo)), vn2);
                X = ggml_mul(ctx, A2, t);
            }
        }
    }

    ggml_tensor * Y = sum_window(ctx, X);  // [N, G, Hkv]
    if (vnorm) Y = ggml_mul(ctx, Y, ggml_reshape_3d(ctx, vnorm, N, 1, Hkv));

    ggml_tensor * Yt = ggml_cont(ctx, ggml_permute(ctx, Y, 1, 0, 2, 3));  // [G, N, Hkv]
    ggml_tensor * out;
    if (params.group_pool == OBC_GROUP_MAX) {
        out = ggml_pool_2d(ctx, Yt, GGML_OP_POOL_MAX, (int) G, 1, (int) G, 1, 0.0f, 0.0f);  // [1, N, Hkv]
    } else {
        out = ggml_sum_rows(ctx, Yt);
        if (params.group_pool == OBC_GROUP_MEAN) out = ggml_scale(ctx, out, 1.0f / (float) G);
    }
    out = ggml_reshape_2d(ctx, ggml_cont(ctx, out), N, Hkv);
    ggml_format_name(out, "obc_saliency_composed");
    return out;
}

extern "C" int obc_saliency_composed_host(const float * q, const float * k, const float * v, const int32_t * pos_q,
                                          const int32_t * pos_k, int head_dim, int n_win, int n_head, int n_kv,
                                          int n_head_kv, struct obc_saliency_params params, int n_threads,
                                          float * out, char * err, size_t err_len) {
    if (!q || !k || !v || !pos_q || !pos_k || !out) {
        set_err(err, err_len, "obc_saliency_composed_host: null pointer");
        return 1;
    }
    if (head_dim <= 0 || n_win <= 0 || n_head <= 0 || n_kv <= 0 || n_head_kv <= 0 || n_head % n_head_kv != 0) {
        set_err(err, err_len, "obc_saliency_composed_host: bad dimensions");
        return 1;
    }
    if (params.score < OBC_SCORE_ATTN || params.score > OBC_SCORE_VK_NOCROSS || params.group_pool < OBC_GROUP_SUM ||
        params.v_trans != 0 || !(params.p > 0.0f)) {
        set_err(err, err_len, "obc_saliency_composed_host: bad parameters");
        return 1;
    }
    if (params.group_pool > OBC_GROUP_MAX) {
        set_err(err, err_len, "obc_saliency_composed_host: the composed op pools the group by sum, mean or max only");
        return 1;
    }
    ggml_backend_t be = nullptr;
    ggml_context * ctx = nullptr;
    ggml_gallocr_t ga = nullptr;
    int rc = 0;
    try {
        be = ggml_backend_cpu_init();
        if (!be) throw std::runtime_error("cannot start the CPU backend");
        ggml_backend_cpu_set_n_threads(be, n_threads < 1 ? 1 : n_threads);

        ggml_init_params ip{};
        ip.mem_size = 256 * ggml_tensor_overhead() + ggml_graph_overhead();
        ip.no_alloc = true;
        ctx = ggml_init(ip);
        if (!ctx) throw std::runtime_error("ggml_init failed");

        ggml_tensor * tq = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, head_dim, n_win, n_head);
        ggml_tensor * tk = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, head_dim, n_kv, n_head_kv);
        ggml_tensor * tv = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, head_dim, n_kv, n_head_kv);
        ggml_tensor * tpq = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_win);
        ggml_tensor * tpk = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_kv, n_head_kv);
        for (ggml_tensor * t : {tq, tk, tv, tpq, tpk}) ggml_set_input(t);
        ggml_tensor * res = obc_saliency_composed(ctx, tq, tk, tv, tpq, tpk, nullptr, params);
        ggml_set_output(res);
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, res);

        ga = ggml_gallocr_new(ggml_backend_get_default_buffer_type(be));
        if (!ga || !ggml_gallocr_alloc_graph(ga, gf)) throw std::runtime_error("graph allocation failed");
        // inputs the graph does not read (v for the attn score) get no buffer
        const void * src[5] = {q, k, v, pos_q, pos_k};
        ggml_tensor * dst[5] = {tq, tk, tv, tpq, tpk};
        for (int i = 0; i < 5; ++i)
            if (dst[i]->buffer) ggml_backend_tensor_set(dst[i], src[i], 0, ggml_nbytes(dst[i]));
        const ggml_status st = ggml_backend_graph_compute(be, gf);
        if (st != GGML_STATUS_SUCCESS) throw std::runtime_error(std::string("compute failed: ") + ggml_status_to_string(st));
        ggml_backend_tensor_get(res, out, 0, ggml_nbytes(res));
    } catch (const std::exception & e) {
        set_err(err, err_len, std::string("obc_saliency_composed_host: ") + e.what());
        rc = 2;
    }
    if (ga) ggml_gallocr_free(ga);
    if (ctx) ggml_free(ctx);
    if (be) ggml_backend_free(be);
    return rc;
}
