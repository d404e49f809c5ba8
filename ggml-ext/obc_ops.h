// pyobcache's own ggml ops for KV-cache eviction. Each op is declared once here and
// implemented per backend (obc_ops_cpu.cpp; CUDA in obc_ops_cuda.cu).
#pragma once

#include <ggml.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum obc_score {
    OBC_SCORE_ATTN = 0,        // sum_i A_ij                              (H2O / TOVA / SnapKV)
    OBC_SCORE_V = 1,           // (sum_i A_ij^p) * ||v_j||_p^p             (OBC-V)
    OBC_SCORE_K = 2,           // sum_i A_ij^2 z_ij^2 ||v_j - o_i||^2      (OBC-K)
    OBC_SCORE_VK = 3,          // sum_i A_ij^2 ||v_j + z_ij (v_j - o_i)||^2 (OBC-VK)
    OBC_SCORE_VK_NOCROSS = 4,  // S_V(p=2) + S_K                           (OBC-VK without the cross term)
};

// How the G = n_head / n_head_kv query heads that read one KV head are combined into its score.
enum obc_group_pool {
    OBC_GROUP_SUM = 0,       // sum over the group of each query head's window score
    OBC_GROUP_MEAN = 1,      // the same divided by G
    OBC_GROUP_MAX = 2,       // the largest query head's score
    OBC_GROUP_NORM_SUM = 3,  // each query head's window scores scaled to sum 1 over the tokens, then summed,
                             // so that a head with spread-out attention votes as much as a sharp one
    OBC_GROUP_PRE_MEAN = 4,  // A_ij, z_ij and o_i averaged over the group first, then the score once
};

struct obc_saliency_params {
    int32_t score;       // enum obc_score
    float p;             // norm exponent of OBC-V, > 0: usually 1 or 2 (other values take a slower powf path)
    float scale;         // logit scale, usually 1/sqrt(head_dim)
    int32_t group_pool;  // enum obc_group_pool: how the query heads of one KV head are combined
    int32_t v_trans;     // 1 when v is stored transposed as [n_kv, head_dim, n_head_kv]
};

// Per-KV-head saliency of every cached token, accumulated in fp32 over the window queries.
//   q     F32 [head_dim, n_win, n_head]           window queries, after RoPE
//   k     F16|F32 [head_dim, n_kv, n_head_kv]     cached keys (may be a strided view)
//   v     F16|F32 [head_dim, n_kv, n_head_kv], or [n_kv, head_dim, n_head_kv] when v_trans
//   pos_q I32 [n_win]                             absolute position of each window query
//   pos_k I32 [n_kv, n_head_kv]                   absolute position of each cached token, per head;
//                                                 a token with pos_k > pos_q is masked for that query
// Query head h reads KV head h / (n_head / n_head_kv), as in ggml_mul_mat broadcasting.
// Returns F32 [n_kv, n_head_kv]. Scores are summed over the window and pooled over the group
// (OBC_GROUP_PRE_MEAN instead pools A, z and o before the score; on the CPU only).
// Masked (i, j) pairs contribute 0 (a token masked for every query scores exactly 0); a query
// that sees no token contributes nothing. k and v rows must be contiguous (nb[0] = element size);
// row and head strides are free, so views into a larger cache work. On the CPU this is two
// chained custom ops (softmax statistics and o_i per window query, then the scores per tile of
// tokens; with OBC_GROUP_NORM_SUM a third that normalises and pools the query heads), run on
// ggml's thread pool and accumulated in fp32; the result is the last node.
// Relative error vs float64 is ~1e-6 typically (< 1e-4 of each head's maximum).
struct ggml_tensor * obc_saliency(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                  struct ggml_tensor * v, struct ggml_tensor * pos_q, struct ggml_tensor * pos_k,
                                  struct obc_saliency_params params);

// In-place compaction of a per-head cache tensor: for every head h (dimension 2), the slots
// idx[0..n_keep, h] (I32 [n_keep, n_head], strictly increasing per head) are moved to the front
// along `axis` (0 or 1). Works for K [d, cap, H] (axis 1), transposed V [cap, d, H] (axis 0),
// and running scores / positions [cap, H] (axis 0, ne[1] = H). Returns a view of `cache`
// that must be computed for the move to happen.
// The heads are dimension 2 when cache->ne[2] == n_head, else dimension 1 (a [cap, H] tensor,
// axis 0 only). Slots >= n_keep keep whatever they held. Strictly increasing indices make the
// in-place move safe (idx[n] >= n, so no source is overwritten before it is read). A head that
// keeps fewer slots than n_keep may end its list with idx[n] = n (a slot left in place, which
// only element n writes, with its own bytes): the engine's padding for head-wise budgets. An index
// outside [0, cap) aborts. Axis 1 moves whole rows (any type, quantized too); axis 0 needs a
// non-quantized type.
struct ggml_tensor * obc_compact(struct ggml_context * ctx, struct ggml_tensor * cache, struct ggml_tensor * idx,
                                 int axis);

// Host convenience for tests and research tools: runs obc_saliency on the CPU over contiguous host
// arrays (q, k, v in F32 with the shapes above, i.e. C arrays [n_head][n_win][head_dim] and
// [n_head_kv][n_kv][head_dim]; v not transposed), with n_threads threads, read in place; out
// receives [n_head_kv][n_kv]. Returns 0 on success; on failure a non-zero code (1: bad arguments,
// 2: out of memory, 3: compute failed, 4: other) and a message in err.
int obc_saliency_host(const float * q, const float * k, const float * v, const int32_t * pos_q,
                      const int32_t * pos_k, int head_dim, int n_win, int n_head, int n_kv, int n_head_kv,
                      struct obc_saliency_params params, int n_threads, float * out, char * err, size_t err_len);

// Cross-check of obc_saliency built only from stock ggml ops (mul_mat, soft_max_ext, elementwise
// ops, sum_rows, pool_2d), same arguments and result; it materialises [n_kv, n_win, n_head]
// tensors, so it is for tests and research tools (obc_ops_ref.cpp). It expands
// ||v - o||^2 = ||v||^2 - 2 v.o + ||o||^2, which loses accuracy for OBC-K where a query attends
// almost only to one token.
struct ggml_tensor * obc_saliency_composed(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                           struct ggml_tensor * v, struct ggml_tensor * pos_q,
                                           struct ggml_tensor * pos_k, struct obc_saliency_params params);

// obc_saliency_host for obc_saliency_composed, on the ggml CPU backend (inputs are copied).
int obc_saliency_composed_host(const float * q, const float * k, const float * v, const int32_t * pos_q,
                               const int32_t * pos_k, int head_dim, int n_win, int n_head, int n_kv, int n_head_kv,
                               struct obc_saliency_params params, int n_threads, float * out, char * err,
                               size_t err_len);

#ifdef __cplusplus
}
#endif
