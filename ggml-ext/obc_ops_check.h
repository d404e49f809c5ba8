// Argument checks of obc_saliency's contract (obc_ops.h), shared by every backend; each backend
// adds its own size limits and stride rules. Internal: not part of the public API.
#pragma once

#include "obc_ops.h"

#include <cmath>
#include <string>

inline std::string obc_check_saliency_params(const obc_saliency_params & p) {
    if (p.score < OBC_SCORE_ATTN || p.score > OBC_SCORE_VK_NOCROSS) return "unknown score kind";
    if (p.group_pool < OBC_GROUP_SUM || p.group_pool > OBC_GROUP_PRE_MEAN) return "unknown group pool";
    if (!(p.p > 0.0f) || !std::isfinite(p.p)) return "p must be a positive finite number";
    if (!std::isfinite(p.scale)) return "scale must be finite";
    if (p.v_trans != 0 && p.v_trans != 1) return "v_trans must be 0 or 1";
    return std::string();
}

// Types and shapes of non-null q, k, v, pos_q, pos_k.
inline std::string obc_check_saliency_shapes(const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * v,
                                             const ggml_tensor * pos_q, const ggml_tensor * pos_k,
                                             const obc_saliency_params & p) {
    if (q->type != GGML_TYPE_F32) return "q must be F32";
    // K and V in any type with a to_float (F32, F16, BF16, the quantized ones); a quantized row
    // holds whole blocks, and a transposed V, read one value per token, cannot be quantized.
    for (const ggml_tensor * x : {k, v}) {
        if (x->type != GGML_TYPE_F32 && !ggml_get_type_traits(x->type)->to_float) return "k and v need a type that converts to F32";
        if (x->ne[0] % ggml_blck_size(x->type) != 0) return "a quantized k or v row must hold whole blocks";
    }
    if (p.v_trans && ggml_is_quantized(v->type)) return "a transposed v cannot be quantized";
    if (pos_q->type != GGML_TYPE_I32 || pos_k->type != GGML_TYPE_I32) return "positions must be I32";
    const int64_t D = q->ne[0], W = q->ne[1], H = q->ne[2], N = k->ne[1], Hkv = k->ne[2];
    if (D <= 0 || W <= 0 || H <= 0 || N <= 0 || Hkv <= 0) return "empty dimension";
    if (q->ne[3] != 1 || k->ne[3] != 1 || v->ne[3] != 1) return "4-D inputs are not supported";
    if (k->ne[0] != D) return "k head_dim differs from q";
    if (H % Hkv != 0) return "n_head must be a multiple of n_head_kv";
    if (p.v_trans) {
        if (v->ne[0] != N || v->ne[1] != D || v->ne[2] != Hkv) return "v (transposed) must be [n_kv, head_dim, n_head_kv]";
    } else {
        if (v->ne[0] != D || v->ne[1] != N || v->ne[2] != Hkv) return "v must be [head_dim, n_kv, n_head_kv]";
    }
    if (pos_q->ne[0] != W || ggml_nelements(pos_q) != W) return "pos_q must be [n_win]";
    if (pos_k->ne[0] != N || pos_k->ne[1] != Hkv || pos_k->ne[2] != 1 || pos_k->ne[3] != 1)
        return "pos_k must be [n_kv, n_head_kv]";
    return std::string();
}

// A non-null k_offset of obc_saliency: F32 [head_dim, n_head_kv], contiguous.
inline std::string obc_check_k_offset(const ggml_tensor * k_offset, const ggml_tensor * k) {
    if (!k_offset) return std::string();
    if (k_offset->type != GGML_TYPE_F32) return "k_offset must be F32";
    if (k_offset->ne[0] != k->ne[0] || k_offset->ne[1] != k->ne[2] || k_offset->ne[2] != 1 || k_offset->ne[3] != 1)
        return "k_offset must be [head_dim, n_head_kv]";
    if (!ggml_is_contiguous(k_offset)) return "k_offset must be contiguous";
    return std::string();
}
