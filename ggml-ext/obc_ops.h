// pyobcache's own ops for KV-cache eviction. Each op is declared once here and implemented per
// backend in its own file: the CPU graph ops in obc_ops_cpu.cpp, the CPU selection in
// obc_select_cpu.cpp, CUDA in obc_ops_cuda.cu. The engine calls them through obc_runner (below),
// which dispatches on where the tensors live, so that it has no backend of its own to know about.
#pragma once

#include <ggml-backend.h>
#include <ggml.h>
#include <stdbool.h>
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

// Score pooling over neighbouring positions before selection (SnapKV's).
enum obc_pool {
    OBC_POOL_NONE = 0,
    OBC_POOL_MAX = 1,
    OBC_POOL_AVG = 2,  // zero padding counts, as avg_pool1d's default does
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
//   k_offset NULL, or F32 [head_dim, n_head_kv]   contiguous: the cache holds k - k_offset (per KV
//                                                 head), and the op reads k as stored + k_offset
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
// A quantized K cache stores each key minus a per-head constant (see KVCache::k_offsets): softmax
// does not see it, but the scores' z_ij do, so the op adds it back to every key row it reads.
struct ggml_tensor * obc_saliency(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                  struct ggml_tensor * v, struct ggml_tensor * pos_q, struct ggml_tensor * pos_k,
                                  struct ggml_tensor * k_offset, struct obc_saliency_params params);

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

// ggml_mul_mat(ctx, w, x), computed by pyobcache's CPU kernel where that is faster than ggml's:
// Q6_K or Q4_K weights w [K, M] in plain host memory (not a repacked buffer) times F32 activations
// x [K, N] with N >= 8, on x86 with AVX2/FMA/F16C (obc_matmul_cpu.cpp: each weight row is unpacked
// once per tile of columns, where ggml's dot products re-extract it for every column). Everywhere
// else this is ggml_mul_mat itself. The result, F32 [M, N], equals ggml_mul_mat's to float rounding
// (the same Q8_K activations and integer sums). w must be allocated when the graph is built (its
// buffer decides the path); OBC_TILED_MATMUL=0 in the environment turns the kernel off.
struct ggml_tensor * obc_mul_mat(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * x);

// Whether obc_mul_mat has its own kernel for weights of this type on this machine (so a model
// loader should leave them in plain host memory rather than a repacked buffer).
bool obc_mul_mat_has_kernel(enum ggml_type type);

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
                                           struct ggml_tensor * pos_k, struct ggml_tensor * k_offset,
                                           struct obc_saliency_params params);

// obc_saliency_host for obc_saliency_composed, on the ggml CPU backend (inputs are copied).
int obc_saliency_composed_host(const float * q, const float * k, const float * v, const int32_t * pos_q,
                               const int32_t * pos_k, int head_dim, int n_win, int n_head, int n_kv, int n_head_kv,
                               struct obc_saliency_params params, int n_threads, float * out, char * err,
                               size_t err_len);

// ---------------------------------------------------------------------------------------------
// Selection of the slots to keep, on host arrays (obc_select_cpu.cpp).

// scores[0..n) pooled over kernel / 2 positions on each side, the window clipped at both ends
// (none when kernel <= 1 or pooling is OBC_POOL_NONE); out receives n floats.
void obc_pool_scores_host(const float * scores, int32_t n, int32_t pooling, int32_t kernel, float * out);

// The slots one head keeps: the first n_sink, the last n_recent and, among the candidates between
// them, the budget - n_sink - n_recent highest scores after pooling over the candidates only (as
// the reference code pools scores[:recent_cutoff]); ties go to the earlier slot. Writes
// min(budget, n_used) strictly increasing slot indices to keep (all slots when n_used <= budget)
// and returns their count, or -1 for a negative count or an unknown pooling.
int32_t obc_select_keep_host(const float * scores, int32_t n_used, int32_t budget, int32_t n_sink, int32_t n_recent,
                             int32_t pooling, int32_t kernel, int32_t * keep);

// Head-wise budgets (AdaKV) for one layer: scores[h] holds n_used scores of head h. Each head keeps
// its first n_sink and last n_recent slots; the layer's n_heads * (budget - n_sink - n_recent)
// other slots go first to each head's top floor(head_floor * share), then to the best pooled
// scores of any head (ties to the lower head, then the earlier slot), so a head may keep more than
// budget slots. Head h's kept slots, in increasing order, go to keep[h * n_used ...] (keep holds
// n_heads * n_used entries) and their count to n_kept[h]. Returns 0, or -1 for a bad count, an
// unknown pooling or a head_floor outside [0, 1].
int32_t obc_select_keep_adaptive_host(const float * const * scores, int32_t n_heads, int32_t n_used, int32_t budget,
                                      int32_t n_sink, int32_t n_recent, int32_t pooling, int32_t kernel,
                                      float head_floor, int32_t * keep, int32_t * n_kept);

// ---------------------------------------------------------------------------------------------
// Running the ops where the tensors live (obc_ops_run.cpp).
//
// A runner serves one backend: the one whose memory holds the KV cache. Tensors in host memory run
// as ggml CPU graphs on that backend (which must then be a CPU backend: its thread pool and abort
// callback apply); tensors in a CUDA buffer run the CUDA kernels, on a build with CUDA
// (OBCACHE_HAVE_CUDA), after the backend's pending graphs and before its next ones. A runner keeps
// its scratch (graph allocator, device buffers) from one call to the next. Every call returns
// OBC_RUN_OK or an error code, with a message in obc_runner_error(). Not thread-safe: one runner
// per thread, as one ggml backend.
typedef struct obc_runner obc_runner;

enum obc_run_status {
    OBC_RUN_OK = 0,
    OBC_RUN_EINVAL = 1,     // bad arguments (shapes, types, counts)
    OBC_RUN_ENOMEM = 2,     // a scratch buffer could not be allocated
    OBC_RUN_EFAILED = 3,    // the computation failed, or the tensors' memory has no implementation here
    OBC_RUN_ABORTED = 4,    // the backend's abort callback asked to stop
};

obc_runner * obc_runner_new(ggml_backend_t backend);   // NULL when backend is NULL or out of memory
void obc_runner_free(obc_runner * runner);
const char * obc_runner_error(const obc_runner * runner);

// One layer of obc_runner_saliency: the window queries as the model computed them, host floats
// [n_q][n_head][head_dim]; the layer's cache tensors k [head_dim, capacity, n_head_kv] and v (the
// same, or [capacity, head_dim, n_head_kv] when params.v_trans), of which the first n_kv slots
// are scored; pos_k, host [n_head_kv][n_kv]; out, host [n_head_kv][n_kv], which receives the
// scores; k_offset, NULL or host [n_head_kv][head_dim], obc_saliency's k_offset (CPU only: a CUDA
// cache with an offset is refused).
struct obc_saliency_layer {
    const float * q;
    const struct ggml_tensor * k;
    const struct ggml_tensor * v;
    const int32_t * pos_k;
    float * out;
    const float * k_offset;
};
// obc_saliency over n_layers layers that share the window positions pos_q (host, n_q of them).
int obc_runner_saliency(obc_runner * runner, const struct obc_saliency_layer * layers, int32_t n_layers,
                        const int32_t * pos_q, int32_t n_q, int32_t n_head, int64_t n_kv,
                        struct obc_saliency_params params);

// obc_compact on n_caches cache tensors in place: cache c moves along axes[c] the slots idx[c],
// host [n_head][n_keep] (obc_compact's rules: strictly increasing per head, in [0, capacity), a
// shorter list padded with idx[i] = i).
// Caches that share one list may share the pointer. Indices are checked before anything moves.
int obc_runner_compact(obc_runner * runner, struct ggml_tensor * const * caches, const int32_t * axes,
                       const int32_t * const * idx, int32_t n_caches, int64_t n_keep, int32_t n_head);

// obc_select_keep_host for every head h of scores F32 [>= n_used, n_head] into keep I32
// [>= min(budget, n_used), n_head] (rows of each tensor contiguous), both in the runner's memory.
int obc_runner_select_keep(obc_runner * runner, const struct ggml_tensor * scores, int32_t n_used, int32_t budget,
                           int32_t n_sink, int32_t n_recent, int32_t pooling, int32_t kernel,
                           struct ggml_tensor * keep);

#ifdef __cplusplus
}
#endif
