// CPU implementations of the ops declared in obc_ops.h, as ggml custom ops.
//
// obc_saliency is two chained custom ops, because a custom op has no barrier between its threads:
//
//   1. "stats"  F32 [S, n_win, n_head], S = 8 (+ head_dim when the score needs o_i). One row per
//      (query head g, window query i): [m_i, 1/l_i, ||o_i||^2, a_i, ||o_i - v_a||^2, 0, 0, 0, o_i],
//      where m_i is the row max of the masked logits z_ij, l_i = sum_j exp(z_ij - m_i),
//      o_i = sum_j A_ij v_j, and a_i (int32 bits) is the query's anchor, its highest-logit token
//      (see stats_scratch). A query that sees no token gets a = -1, 1/l = 0 and contributes 0.
//      Tasks are (KV head, block of up to 64 of the G*n_win rows that read it); each task streams
//      the tokens in tiles of TT = 64 with an online softmax (running max, rescaled sums), so a
//      thread holds a (rows x 64) logit tile, never a window x n_kv block.
//   2. "score"  F32 [n_kv, n_head_kv]. Tasks are (KV head, tile of 64 tokens). Each task
//      recomputes the logits of its tile for all G*n_win rows of the group (same kernel and
//      summation order as stage 1, so z matches bit for bit), forms A_ij = exp(z_ij - m_i) / l_i
//      and, for OBC-K / OBC-VK, ||v_j - o_i||^2 directly (not as ||v||^2 - 2 v.o + ||o||^2, which
//      cancels when a query attends almost only to token j; for the anchor, where even v_j - o_i
//      cancels, the value stage 1 formed exactly), accumulates the score over the window per
//      query head, then pools the group's query heads (sum / mean / max).
//
// Layout: inside a task the rows (window queries) are the vector lanes, padded to 16, and logits
// are kept token-major (ZT[t][r] = sum_d K[t][d] QT[d][r]); K and V rows are then read in place
// from the cache (F32 rows straight from the tensor, F16 rows converted per tile with
// ggml_cpu_fp16_to_fp32, BF16 and quantized rows (whole rows: a row is a run of blocks) with the
// type's to_float, any row / head stride; transposed V is read along its contiguous token axis)
// and nothing of size n_kv is materialised. Everything is accumulated in fp32.
//
// Threads: every custom op is created with n_tasks = GGML_N_TASKS_MAX, so ggml calls the function
// on each of its nth threads with ith in [0, nth); each thread takes a disjoint set of tasks
// (stage 1 round-robin, with row blocks shrunk until there are >= 2 tasks per thread when
// possible; stage 2 a contiguous range of tiles, so that the group's queries and stats are
// reloaded only when the KV head changes). Results do not depend on the thread count.
//
// Parameters: ggml's custom ops carry a void * userdata, whose lifetime the caller would have to
// manage until every graph that holds the node has been computed (graphs are rebuilt, copied by
// ggml_backend_sched and computed later). Instead each node stores its parameters by value in the
// tail of its own op_params (a 32-byte record with a magic number at bytes 32..63, behind ggml's
// 24-byte {fun, n_tasks, userdata} record), so they live exactly as long as the tensor, survive
// graph copies (op_params are copied with the node) and need no allocation. obc_set_record()
// asserts that the tail is still unused when it writes, so a future ggml that grew its record
// would fail loudly at graph build rather than corrupt anything. userdata is always NULL.
//
// Vectorisation: the matrix kernels are register-blocked micro kernels over 16-lane tiles,
// templated on an 8-lane vector policy; the elementwise loops are plain loops that the compiler
// vectorises at -O3 (with -fno-trapping-math, set in CMakeLists.txt, for the masked selects). On
// x86 with GCC/Clang the task bodies are compiled twice, portable and with
// target("avx2,fma,f16c") using 32-byte vectors, and the AVX2 build is chosen at run time with
// __builtin_cpu_supports; so no -march flag is needed and the library runs on any x86-64
// (OBC_CPU_BASELINE=1 in the environment forces the portable build, for tests). Elsewhere only the
// portable build exists.

#include "obc_ops.h"
#include "obc_cpu_isa.h"
#include "obc_ops_check.h"

#include <ggml-cpu.h>
#include <ggml.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
// 32-byte vectors only cross always-inline helpers inside this file, never an ABI boundary
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// The micro kernels hold their accumulators in registers; unrolling their reduction loop only
// adds register pressure (GCC then spills the accumulators every iteration).
#if defined(__clang__)
#define OBC_NO_UNROLL _Pragma("clang loop unroll(disable)")
#elif defined(__GNUC__)
#define OBC_NO_UNROLL _Pragma("GCC unroll 1")
#else
#define OBC_NO_UNROLL
#endif
// ... while their loops over rows and vectors, of constant bounds, must be unrolled completely for
// the accumulator arrays to live in registers.
#if defined(__clang__)
#define OBC_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define OBC_UNROLL _Pragma("GCC unroll 16")
#else
#define OBC_UNROLL
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// Parameter records stored in the tail of op_params

constexpr uint32_t OBC_MAGIC_STATS = 0x0bc50001u;
constexpr uint32_t OBC_MAGIC_SCORE = 0x0bc50002u;
constexpr uint32_t OBC_MAGIC_COMPACT = 0x0bc50003u;

struct obc_record {
    uint32_t magic;
    int32_t score;
    float p;
    float scale;
    int32_t group_pool;
    int32_t v_trans;
    int32_t axis;       // compact: gather axis
    int32_t head_axis;  // compact: which dimension indexes the heads (1 or 2)
};
static_assert(sizeof(obc_record) == 32, "obc_record must fill the op_params tail exactly");
constexpr size_t OBC_RECORD_OFFSET = GGML_MAX_OP_PARAMS - sizeof(obc_record);
static_assert(OBC_RECORD_OFFSET >= 3 * sizeof(void *), "op_params too small for ggml's record and ours");

void obc_set_record(ggml_tensor * t, const obc_record & r) {
    unsigned char * tail = reinterpret_cast<unsigned char *>(t->op_params) + OBC_RECORD_OFFSET;
    for (size_t i = 0; i < sizeof(obc_record); ++i) {
        GGML_ASSERT(tail[i] == 0 && "obc: ggml's custom-op record overlaps the op_params tail");
    }
    memcpy(tail, &r, sizeof(r));
}

obc_record obc_get_record(const ggml_tensor * t, uint32_t magic) {
    obc_record r;
    memcpy(&r, reinterpret_cast<const unsigned char *>(t->op_params) + OBC_RECORD_OFFSET, sizeof(r));
    GGML_ASSERT(r.magic == magic && "obc: custom op without its parameter record");
    return r;
}

constexpr int TT = 64;  // tokens per tile of the kernels

// ---------------------------------------------------------------------------------------------
// Validation shared by the graph builder (aborts, as ggml does) and the host entry (returns err)

bool score_needs_o(int score) {
    return score == OBC_SCORE_K || score == OBC_SCORE_VK || score == OBC_SCORE_VK_NOCROSS;
}
bool score_needs_v(int score) { return score != OBC_SCORE_ATTN; }

std::string check_saliency(const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * v,
                           const ggml_tensor * pos_q, const ggml_tensor * pos_k, const ggml_tensor * k_offset,
                           const obc_saliency_params & p) {
    std::string e = obc_check_saliency_params(p);
    if (!e.empty()) return e;
    if (!q || !k || !v || !pos_q || !pos_k) return "null tensor";
    e = obc_check_saliency_shapes(q, k, v, pos_q, pos_k, p);
    if (!e.empty()) return e;
    e = obc_check_k_offset(k_offset, k);
    if (!e.empty()) return e;
    if (k->ne[1] > INT32_MAX - 2 * TT || q->ne[0] > 65536 || q->ne[1] * q->ne[2] > INT32_MAX / 2) return "dimensions too large";
    if (q->nb[0] != sizeof(float)) return "q rows must be contiguous";
    if (k->nb[0] != ggml_type_size(k->type)) return "k rows must be contiguous";
    if (v->nb[0] != ggml_type_size(v->type)) return "v rows must be contiguous";
    if (pos_q->nb[0] != sizeof(int32_t) || pos_k->nb[0] != sizeof(int32_t)) return "positions must be contiguous";
    return std::string();
}

// ---------------------------------------------------------------------------------------------
// Kernels
//
// Layout: the rows of a task (window queries of the query heads that read one KV head) are the
// vector lanes. Logits are kept as ZT[t][r] (token-major), which lets the kernels read K and V
// rows in place from the cache (token-major, contiguous along head_dim) with no transposition:
//   ZT[t][r] = sum_d K[t][d] * QT[d][r]          (QT: the task's scaled queries, transposed once)

constexpr int LW = 16;  // vector lanes of a micro tile (row blocks are padded to LW)
constexpr int RC = 512; // rows per chunk in stage 2 (a multiple of LW)

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Row blocks are padded to 16 lanes, or to 8 when they have at most 8 rows (e.g. one window query
// of a small GQA group), which halves the padding work of single-query scoring.
inline int pad_rows(int n) { return n <= 8 ? 8 : round_up(n, LW); }

// Eight fp32 lanes, as two policies that the kernels are templated on:
//  * vec_portable: plain 8-float loops that any compiler may vectorise for its baseline ISA;
//  * vec_avx (x86 with GCC/Clang): a 32-byte generic vector, one AVX register. It is only used
//    inside functions compiled with target("avx2,fma,f16c") (lowered to SSE it would be slow).
struct vec_portable {
    struct T {
        float x[8];
    };
    // GCC keeps an array of these structs in registers only up to a size limit (SRA), so the
    // micro kernels split taller blocks to stay within this many accumulators.
    static constexpr int max_acc = 4;
    static OBC_INLINE T zero() { return T{}; }
    static OBC_INLINE T load(const float * p) {
        T v;
        memcpy(v.x, p, sizeof(v.x));
        return v;
    }
    static OBC_INLINE void store(float * p, T v) { memcpy(p, v.x, sizeof(v.x)); }
    // c + a * b
    static OBC_INLINE T fma(float a, T b, T c) {
        for (int l = 0; l < 8; ++l) c.x[l] += a * b.x[l];
        return c;
    }
    // c + (b - a)^2
    static OBC_INLINE T sqdiff(T b, float a, T c) {
        for (int l = 0; l < 8; ++l) {
            const float e = b.x[l] - a;
            c.x[l] += e * e;
        }
        return c;
    }
};

#if OBC_X86_DISPATCH
typedef float vf8 __attribute__((vector_size(32)));
struct vec_avx {
    typedef vf8 T;
    static constexpr int max_acc = 12;  // of AVX2's 16 registers
    static OBC_INLINE T zero() { return T{0, 0, 0, 0, 0, 0, 0, 0}; }
    static OBC_INLINE T load(const float * p) {
        T v;
        memcpy(&v, p, sizeof(v));
        return v;
    }
    static OBC_INLINE void store(float * p, T v) { memcpy(p, &v, sizeof(v)); }
    static OBC_INLINE T fma(float a, T b, T c) { return c + a * b; }
    static OBC_INLINE T sqdiff(T b, float a, T c) {
        const T e = b - a;
        return c + e * e;
    }
};
#endif

// exp(x) for x in [-87, 88]: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor
// polynomial for e^r (truncation < 2e-7 relative), scaled by 2^n built from the exponent bits.
// Branch-free so that loops calling it vectorise (NaN inputs give garbage, never a trap).
OBC_INLINE float obc_exp(float x) {
    // Written so that NaN (exp(-inf - -inf) for a fully masked row, whose result the callers
    // discard) clamps to -87 too: a NaN n made the exponent shift below shift a negative value.
    x = x > -87.0f ? x : -87.0f;
    x = x < 88.0f ? x : 88.0f;
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
    const float n = (x * 1.44269504088896341f + magic) - magic;
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-6f;
    float e = 1.0f / 720.0f;
    e = e * r + 1.0f / 120.0f;
    e = e * r + 1.0f / 24.0f;
    e = e * r + 1.0f / 6.0f;
    e = e * r + 0.5f;
    e = e * r + 1.0f;
    e = e * r + 1.0f;
    const int32_t bits = ((int32_t) n + 127) << 23;
    float s;
    memcpy(&s, &bits, sizeof(s));
    return e * s;
}

// Micro kernel: R rows of A (tokens) times NV vectors of 8 lanes of B (query rows), accumulated
// in registers (at most VP::max_acc of them: taller blocks are split).
// gemm: C (+)= A B; dist: C = sum_x (A[i][x] - B[x][r])^2, the squared distance without the
// expansion ||a||^2 - 2 a.b + ||b||^2 (and so without its cancellation when a query attends
// almost only to one token, o_i ~ v_j). A[i][x] is A[i*sr + x*sc], so that the same kernel also
// reads A transposed (gemm_pv). The constant-bound loops are fully unrolled so that the
// accumulator arrays are scalarised into registers; each accumulator sees the same sequence of
// operations as in a hand-written kernel.
template <class VP, bool DIST, bool ACC, int R, int NV>
OBC_INLINE void micro(const float * A, size_t sr, size_t sc, const float * B, size_t ldb, int K, float * C,
                      size_t ldc) {
    constexpr int RS = VP::max_acc / NV;  // rows per block within max_acc
    if constexpr (R > RS) {
        micro<VP, DIST, ACC, RS, NV>(A, sr, sc, B, ldb, K, C, ldc);
        micro<VP, DIST, ACC, R - RS, NV>(A + RS * sr, sr, sc, B, ldb, K, C + RS * ldc, ldc);
        return;
    }
    typedef typename VP::T T;
    T c[R][NV];
    OBC_UNROLL
    for (int i = 0; i < R; ++i) {
        OBC_UNROLL
        for (int j = 0; j < NV; ++j) c[i][j] = ACC ? VP::load(C + (size_t) i * ldc + 8 * j) : VP::zero();
    }
    OBC_NO_UNROLL
    for (int x = 0; x < K; ++x, A += sc, B += ldb) {
        T b[NV];
        OBC_UNROLL
        for (int j = 0; j < NV; ++j) b[j] = VP::load(B + 8 * j);
        OBC_UNROLL
        for (int i = 0; i < R; ++i) {
            const float a = A[(size_t) i * sr];
            OBC_UNROLL
            for (int j = 0; j < NV; ++j) c[i][j] = DIST ? VP::sqdiff(b[j], a, c[i][j]) : VP::fma(a, b[j], c[i][j]);
        }
    }
    OBC_UNROLL
    for (int i = 0; i < R; ++i) {
        OBC_UNROLL
        for (int j = 0; j < NV; ++j) VP::store(C + (size_t) i * ldc + 8 * j, c[i][j]);
    }
}

// Rows i0.. of the tiling below, in blocks of NR rows and 8*NV lanes; returns the first row left.
template <class VP, bool DIST, bool ACC, int NR, int NV>
OBC_INLINE int tile_block(const float * A, size_t lda, const float * B, size_t ldb, int K, int M, int Rp, float * C,
                          size_t ldc, int i0) {
    int i = i0;
    for (; i + NR <= M; i += NR)
        for (int r0 = 0; r0 < Rp; r0 += 8 * NV)
            micro<VP, DIST, ACC, NR, NV>(A + (size_t) i * lda, lda, 1, B + r0, ldb, K, C + (size_t) i * ldc + r0, ldc);
    return i;
}

// C[i*ldc + r] (+)= sum_{x<K} A[i*lda + x] * B[x*ldb + r] (gemm), or
// C[i*ldc + r] = sum_{x<K} (A[i*lda + x] - B[x*ldb + r])^2 (dist), for i < M and r < Rp, where Rp
// is a multiple of 16, or 8 (one vector of lanes, for small row counts).
template <class VP, bool DIST, bool ACC>
OBC_INLINE void tile_rows(const float * A, size_t lda, const float * B, size_t ldb, int K, int M, int Rp, float * C,
                          size_t ldc) {
    int i = 0;
    if (Rp % LW == 0) {
        i = tile_block<VP, DIST, ACC, 6, 2>(A, lda, B, ldb, K, M, Rp, C, ldc, i);
        i = tile_block<VP, DIST, ACC, 4, 2>(A, lda, B, ldb, K, M, Rp, C, ldc, i);
        tile_block<VP, DIST, ACC, 1, 2>(A, lda, B, ldb, K, M, Rp, C, ldc, i);
    } else {
        i = tile_block<VP, DIST, ACC, 8, 1>(A, lda, B, ldb, K, M, Rp, C, ldc, i);
        tile_block<VP, DIST, ACC, 1, 1>(A, lda, B, ldb, K, M, Rp, C, ldc, i);
    }
}

template <class VP, bool ACC>
OBC_INLINE void gemm_rows(const float * A, size_t lda, const float * B, size_t ldb, int K, int M, int Rp, float * C,
                          size_t ldc) {
    tile_rows<VP, false, ACC>(A, lda, B, ldb, K, M, Rp, C, ldc);
}

template <class VP>
OBC_INLINE void dist_rows(const float * A, size_t lda, const float * B, size_t ldb, int K, int M, int Rp, float * C,
                          size_t ldc) {
    tile_rows<VP, true, false>(A, lda, B, ldb, K, M, Rp, C, ldc);
}

// O[r*ldo + d] += sum_{t<nt} PT[t*ldp + r] * V[t*ldv + d] for r < R (a multiple of 4),
// d < Dp (a multiple of LW).
template <class VP>
OBC_INLINE void gemm_pv(const float * PT, size_t ldp, const float * V, size_t ldv, int nt, int R, int Dp, float * O,
                        size_t ldo) {
    for (int r = 0; r < R; r += 4)
        for (int d0 = 0; d0 < Dp; d0 += LW)
            micro<VP, false, true, 4, LW / 8>(PT + r, 1, ldp, V + d0, ldv, nt, O + (size_t) r * ldo + d0, ldo);
}

OBC_INLINE float sumsq(const float * x, int n) {
    float acc[LW] = {};
    int d = 0;
    for (; d + LW <= n; d += LW)
        for (int l = 0; l < LW; ++l) acc[l] += x[d + l] * x[d + l];
    float s = 0.0f;
    for (; d < n; ++d) s += x[d] * x[d];
    for (int l = 0; l < LW; ++l) s += acc[l];
    return s;
}

OBC_INLINE float sum_n(const float * x, int n) {
    float acc[LW] = {};
    int d = 0;
    for (; d + LW <= n; d += LW)
        for (int l = 0; l < LW; ++l) acc[l] += x[d + l];
    float s = 0.0f;
    for (; d < n; ++d) s += x[d];
    for (int l = 0; l < LW; ++l) s += acc[l];
    return s;
}

// ---------------------------------------------------------------------------------------------
// Tile access (F32 in place where possible, else converted / padded copies)

// n values from src, a whole number of blocks of a quantized type (a K or V row), or any run of
// an F32 / F16 / BF16 tensor.
void load_vec(const void * src, ggml_type type, float * dst, int n) {
    if (type == GGML_TYPE_F32) {
        memcpy(dst, src, (size_t) n * sizeof(float));
    } else if (type == GGML_TYPE_F16) {
        ggml_cpu_fp16_to_fp32(static_cast<const ggml_fp16_t *>(src), dst, n);
    } else {
        ggml_get_type_traits(type)->to_float(src, dst, n);
    }
}

struct rows_view {
    const float * p;
    size_t ld;  // in floats
};

// Rows j0..j0+nt of head h of a token-major [D, N, H] tensor, as fp32 rows of at least `width`
// readable floats (columns >= D are zero when copied). F32 rows are used in place when
// their stride is a whole number of floats and no padding is needed; else they are copied into buf.
// `add` (null for none, D floats) is added to every row, in buf: a K cache that holds k - offset
// (obc_saliency's k_offset) is read as k.
rows_view token_rows(const ggml_tensor * x, int64_t h, int64_t j0, int nt, int D, int width, float * buf,
                     const float * add = nullptr) {
    const char * base = static_cast<const char *>(x->data) + h * x->nb[2] + j0 * x->nb[1];
    if (x->type == GGML_TYPE_F32 && width == D && x->nb[1] % sizeof(float) == 0 && !add)
        return {reinterpret_cast<const float *>(base), x->nb[1] / sizeof(float)};
    for (int t = 0; t < nt; ++t) {
        float * row = buf + (size_t) t * width;
        load_vec(base + t * x->nb[1], x->type, row, D);
        if (add)
            for (int d = 0; d < D; ++d) row[d] += add[d];
        for (int d = D; d < width; ++d) row[d] = 0.0f;
    }
    return {buf, (size_t) width};
}

// The k_offset row of KV head h (null without an offset): token_rows' `add` for the K cache.
const float * key_offset(const ggml_tensor * offset, int64_t h) {
    return offset ? static_cast<const float *>(offset->data) + h * offset->ne[0] : nullptr;
}

// Rows d of head h of a transposed [N, D, H] tensor, restricted to tokens j0..j0+nt.
rows_view dim_rows(const ggml_tensor * x, int64_t h, int64_t j0, int nt, int D, float * buf) {
    const char * base = static_cast<const char *>(x->data) + h * x->nb[2] + j0 * x->nb[0];
    if (x->type == GGML_TYPE_F32 && x->nb[1] % sizeof(float) == 0)
        return {reinterpret_cast<const float *>(base), x->nb[1] / sizeof(float)};
    for (int d = 0; d < D; ++d) load_vec(base + d * x->nb[1], x->type, buf + (size_t) d * TT, nt);
    return {buf, (size_t) TT};
}

// Transposed [N, D, H] tile as token rows of `width` floats (zero padded) in buf.
rows_view dim_rows_as_token_rows(const ggml_tensor * x, int64_t h, int64_t j0, int nt, int D, int width, float * tmp,
                                 float * buf) {
    const rows_view c = dim_rows(x, h, j0, nt, D, tmp);
    for (int t = 0; t < nt; ++t) {
        float * row = buf + (size_t) t * width;
        for (int d = 0; d < D; ++d) row[d] = c.p[(size_t) d * c.ld + t];
        for (int d = D; d < width; ++d) row[d] = 0.0f;
    }
    return {buf, (size_t) width};
}

void load_pos_k(const ggml_tensor * pos_k, int64_t h, int64_t j0, int nt, int32_t * dst) {
    const char * base = static_cast<const char *>(pos_k->data) + h * pos_k->nb[1] + j0 * pos_k->nb[0];
    memcpy(dst, base, (size_t) nt * sizeof(int32_t));
}

// ---------------------------------------------------------------------------------------------
// Shapes decoded from a node

struct dims {
    int D, W, H, N, Hkv, G, Dp;
};

dims get_dims(const ggml_tensor * q, const ggml_tensor * k) {
    dims s;
    s.D = (int) q->ne[0];
    s.W = (int) q->ne[1];
    s.H = (int) q->ne[2];
    s.N = (int) k->ne[1];
    s.Hkv = (int) k->ne[2];
    s.G = s.H / s.Hkv;
    s.Dp = round_up(s.D, LW);
    return s;
}

// Rows [r0, r0+nr) of the G*W rows that read KV head h (row rr = g_local * W + i), scaled by
// `scale` and transposed into QT[d*Rp + r]; rows nr..Rp are zero. pq gets each row's position.
void load_q_rows(const ggml_tensor * q, const ggml_tensor * pos_q, const dims & s, int h, int r0, int nr, int Rp,
                 float scale, float * QT, int32_t * pq) {
    for (int r = 0; r < Rp; ++r) {
        if (r >= nr) {
            for (int d = 0; d < s.D; ++d) QT[(size_t) d * Rp + r] = 0.0f;
            pq[r] = INT32_MIN;
            continue;
        }
        const int rr = r0 + r;
        const int g = h * s.G + rr / s.W, i = rr % s.W;
        const float * src = reinterpret_cast<const float *>(static_cast<const char *>(q->data) + g * q->nb[2] + i * q->nb[1]);
        for (int d = 0; d < s.D; ++d) QT[(size_t) d * Rp + r] = scale * src[d];
        pq[r] = *reinterpret_cast<const int32_t *>(static_cast<const char *>(pos_q->data) + i * pos_q->nb[0]);
    }
}

// ---------------------------------------------------------------------------------------------
// Stage 1: per-row softmax statistics and attention output

// Stats row layout: [m, 1/l, ||o||^2, anchor, ||o - v_anchor||^2, 0, 0, 0, o[0..head_dim)].
constexpr int ST_HDR = 8;

// The anchor of a query is its highest-logit token (the first one on ties). Any token with
// A_ij > 1/2 is the anchor, and only there is ||v_j - o_i||^2 ill-conditioned: o_i - v_j =
// (1 - A_ij) (mean of the other tokens - v_j) vanishes as A_ij -> 1, below the fp32 resolution of
// o_i itself. So stage 1 keeps the anchor out of its running sums, O_ex = sum_{k != a} p_k v_k
// and l_ex = sum_{k != a} p_k with p_a = exp(z_a - m) = 1 (the anchor is the running max), and
// forms o_i - v_a = (O_ex - l_ex v_a) / (1 + l_ex) without cancellation. Stage 2 uses that value
// for the anchor pair and the direct distance for every other pair (where 1 - A_ij >= 1/2).
struct stats_scratch {
    std::vector<float> QT, ZT, O, AV, KB, VB, m, lex, mt, alpha;
    std::vector<int32_t> pq, pk, anc, newanc;
};

template <class VP>
OBC_INLINE void stats_task_t(ggml_tensor * dst, const dims & s, const obc_record & P, int h, int r0, int nr,
                             stats_scratch & w) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    const ggml_tensor * pos_q = dst->src[3];
    const ggml_tensor * pos_k = dst->src[4];
    const bool need_o = score_needs_o(P.score);
    const bool vt = P.v_trans != 0;
    const int D = s.D, Dp = s.Dp;
    const int Rp = pad_rows(nr);

    float * QT = w.QT.data();
    float * ZT = w.ZT.data();
    float * O = w.O.data();    // O_ex[r*Dp + d], or O_ex^T[d*Rp + r] when v is transposed
    float * AV = w.AV.data();  // the anchor's value row, AV[r*Dp + d]
    float * m = w.m.data();
    float * lex = w.lex.data();
    float * mt = w.mt.data();
    float * alpha = w.alpha.data();
    int32_t * pq = w.pq.data();
    int32_t * pk = w.pk.data();
    int32_t * anc = w.anc.data();
    int32_t * newanc = w.newanc.data();

    load_q_rows(q, pos_q, s, h, r0, nr, Rp, P.scale, QT, pq);
    for (int r = 0; r < Rp; ++r) {
        m[r] = -INFINITY;
        lex[r] = 0.0f;
        anc[r] = -1;
    }
    if (need_o) memset(O, 0, (size_t) Rp * Dp * sizeof(float));

    for (int j0 = 0; j0 < s.N; j0 += TT) {
        const int nt = std::min(TT, s.N - j0);
        load_pos_k(pos_k, h, j0, nt, pk);
        const rows_view K = token_rows(k, h, j0, nt, D, D, w.KB.data(), key_offset(dst->src[5], h));
        gemm_rows<VP, false>(K.p, K.ld, QT, Rp, D, nt, Rp, ZT, Rp);

        // mask and tile max
        for (int r = 0; r < Rp; ++r) mt[r] = -INFINITY;
        for (int t = 0; t < nt; ++t) {
            float * z = ZT + (size_t) t * Rp;
            const int32_t pkt = pk[t];
            for (int r = 0; r < Rp; ++r) {
                const float zz = pkt <= pq[r] ? z[r] : -INFINITY;
                z[r] = zz;
                mt[r] = mt[r] > zz ? mt[r] : zz;
            }
        }
        bool any = false;
        for (int r = 0; r < Rp; ++r) {
            newanc[r] = -1;
            if (mt[r] > m[r]) {  // a new running max, hence a new anchor, in this tile
                int t = 0;
                while (t + 1 < nt && ZT[(size_t) t * Rp + r] != mt[r]) ++t;
                newanc[r] = t;
                any = true;
            }
            any = any || mt[r] != -INFINITY;
            const float mn = m[r] > mt[r] ? m[r] : mt[r];
            // alpha rescales the running sums; 1 while the row has seen nothing
            alpha[r] = m[r] == -INFINITY ? 1.0f : std::exp(m[r] - mn);
            m[r] = mn;
        }
        if (!any) continue;
        // probabilities (unnormalised), 0 where masked
        for (int t = 0; t < nt; ++t) {
            float * z = ZT + (size_t) t * Rp;
            for (int r = 0; r < Rp; ++r) {
                const float e = obc_exp(z[r] - m[r]);
                z[r] = z[r] == -INFINITY ? 0.0f : e;
            }
        }
        // the new anchors leave the sums (their p is exactly 1); the old ones join them
        for (int r = 0; r < Rp; ++r) {
            if (newanc[r] >= 0) {
                ZT[(size_t) newanc[r] * Rp + r] = 0.0f;
                lex[r] = (lex[r] + (anc[r] >= 0 ? 1.0f : 0.0f)) * alpha[r];
            }
            mt[r] = 0.0f;  // reused as the tile's row sums
        }
        for (int t = 0; t < nt; ++t) {
            const float * z = ZT + (size_t) t * Rp;
            for (int r = 0; r < Rp; ++r) mt[r] += z[r];
        }
        for (int r = 0; r < Rp; ++r) lex[r] = (newanc[r] >= 0 ? lex[r] : lex[r] * alpha[r]) + mt[r];
        if (!need_o) {
            for (int r = 0; r < Rp; ++r)
                if (newanc[r] >= 0) anc[r] = j0 + newanc[r];
            continue;
        }

        rows_view V;
        if (!vt) {
            V = token_rows(v, h, j0, nt, D, Dp, w.VB.data());
        } else {
            V = dim_rows(v, h, j0, nt, D, w.VB.data());
        }
        for (int r = 0; r < Rp; ++r) {
            const float a = alpha[r];
            float * av = AV + (size_t) r * Dp;
            if (a != 1.0f) {
                if (!vt) {
                    float * o = O + (size_t) r * Dp;
                    for (int d = 0; d < Dp; ++d) o[d] *= a;
                } else {
                    for (int d = 0; d < D; ++d) O[(size_t) d * Rp + r] *= a;
                }
            }
            if (newanc[r] < 0) continue;
            if (anc[r] >= 0) {  // the previous anchor, now weighted alpha, joins O_ex
                if (!vt) {
                    float * o = O + (size_t) r * Dp;
                    for (int d = 0; d < Dp; ++d) o[d] += a * av[d];
                } else {
                    for (int d = 0; d < D; ++d) O[(size_t) d * Rp + r] += a * av[d];
                }
            }
            const int t = newanc[r];
            for (int d = 0; d < D; ++d) av[d] = vt ? V.p[(size_t) d * V.ld + t] : V.p[(size_t) t * V.ld + d];
            for (int d = D; d < Dp; ++d) av[d] = 0.0f;
            anc[r] = j0 + t;
        }
        if (!vt) {
            gemm_pv<VP>(ZT, Rp, V.p, V.ld, nt, Rp, Dp, O, Dp);
        } else {
            gemm_rows<VP, true>(V.p, V.ld, ZT, Rp, nt, D, Rp, O, Rp);
        }
    }

    const int S = (int) dst->ne[0];
    for (int r = 0; r < nr; ++r) {
        const int rr = r0 + r;
        const int g = h * s.G + rr / s.W, i = rr % s.W;
        float * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + g * dst->nb[2] + i * dst->nb[1]);
        for (int c = 0; c < S; ++c) out[c] = 0.0f;
        const int32_t a = anc[r];
        memcpy(&out[3], &a, sizeof(a));
        if (a < 0) continue;  // sees no token: m = 0, 1/l = 0, contributes nothing
        const float inv_l = 1.0f / (1.0f + lex[r]);
        out[0] = m[r];
        out[1] = inv_l;
        if (need_o) {
            const float * av = AV + (size_t) r * Dp;
            double n2 = 0.0, d2 = 0.0;
            for (int d = 0; d < D; ++d) {
                const float ox = vt ? O[(size_t) d * Rp + r] : O[(size_t) r * Dp + d];
                const float od = (ox + av[d]) * inv_l;           // o
                const float dd = (ox - lex[r] * av[d]) * inv_l;  // o - v_anchor
                out[ST_HDR + d] = od;
                n2 += (double) od * od;
                d2 += (double) dd * dd;
            }
            out[2] = (float) n2;
            out[4] = (float) d2;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ISA dispatch: the task bodies are inlined into one wrapper per ISA.

void stats_task_base(ggml_tensor * dst, const dims & s, const obc_record & P, int h, int r0, int nr, stats_scratch & w) {
    stats_task_t<vec_portable>(dst, s, P, h, r0, nr, w);
}
#if OBC_X86_DISPATCH
OBC_TARGET_AVX2 void stats_task_avx2(ggml_tensor * dst, const dims & s, const obc_record & P, int h, int r0, int nr,
                                     stats_scratch & w) {
    stats_task_t<vec_avx>(dst, s, P, h, r0, nr, w);
}
#endif

void stats_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const obc_record P = obc_get_record(dst, OBC_MAGIC_STATS);
    const dims s = get_dims(dst->src[0], dst->src[1]);
    const int GW = s.G * s.W;
    // Row blocks of up to 64 rows amortise the K/V reads; shrink them while there would be
    // fewer than two tasks per thread.
    int RB = 64;
    while (RB > LW && (int64_t) s.Hkv * ((GW + RB - 1) / RB) < 2 * nth) RB /= 2;
    const int nblk = (GW + RB - 1) / RB;
    const int ntask = s.Hkv * nblk;
    if (ith >= ntask) return;

    const int RBp = round_up(RB, LW);
    stats_scratch w;
    w.QT.resize((size_t) RBp * s.D);
    w.ZT.resize((size_t) RBp * TT);
    w.O.resize((size_t) RBp * s.Dp);
    w.AV.resize((size_t) RBp * s.Dp);
    w.KB.resize((size_t) TT * s.D);
    w.VB.resize((size_t) TT * s.Dp);
    w.m.resize(RBp);
    w.lex.resize(RBp);
    w.mt.resize(RBp);
    w.alpha.resize(RBp);
    w.pq.resize(RBp);
    w.anc.resize(RBp);
    w.newanc.resize(RBp);
    w.pk.resize(TT);

    const bool avx2 = obc_use_avx2();
    (void) avx2;
    for (int task = ith; task < ntask; task += nth) {
        const int h = task / nblk, b = task % nblk;
        const int r0 = b * RB;
#if OBC_X86_DISPATCH
        if (avx2) {
            stats_task_avx2(dst, s, P, h, r0, std::min(RB, GW - r0), w);
            continue;
        }
#endif
        stats_task_base(dst, s, P, h, r0, std::min(RB, GW - r0), w);
    }
}

// ---------------------------------------------------------------------------------------------
// Stage 2: scores

struct score_scratch {
    std::vector<float> QT, OT, rm, ril, ron, rdva, ZT, DVT, KB, VB, VB2, S, vn, vn2;
    std::vector<float> OBT, ronb, AB, ZB;  // OBC_GROUP_PRE_MEAN: the group means of o, ||o||^2, A and z
    std::vector<int32_t> pq, pk, ranc;
    int cur_h = -1;
};

// Per (token, row) contribution of one tile, written over ZT[t][r]. PMODE selects A^p for OBC-V
// (0: p = 1, 1: p = 2, 2: any p through powf, which does not vectorise).
template <int KIND, int PMODE>
OBC_INLINE void score_elems(float p, int nt, int Rp, float * ZT, const float * DVT, const float * rm, const float * ril,
                            const float * ron, const int32_t * pq, const int32_t * pk, const float * vn2) {
    for (int t = 0; t < nt; ++t) {
        float * z = ZT + (size_t) t * Rp;
        const float * dv = DVT ? DVT + (size_t) t * Rp : nullptr;  // ||v_t - o_r||^2
        const int32_t pkt = pk[t];
        const float v2 = vn2[t];
        for (int r = 0; r < Rp; ++r) {
            const bool keep = pkt <= pq[r];
            const float zz = keep ? z[r] : 0.0f;
            const float a = keep ? obc_exp(zz - rm[r]) * ril[r] : 0.0f;
            float c;
            if (KIND == OBC_SCORE_ATTN) {
                c = a;
            } else if (KIND == OBC_SCORE_V) {
                if (PMODE == 0) {
                    c = a;
                } else if (PMODE == 1) {
                    c = a * a;
                } else {
                    c = a > 0.0f ? std::pow(a, p) : 0.0f;
                }
            } else {
                const float a2 = a * a;
                const float dvo = dv[r];  // ||v - o||^2, computed directly
                if (KIND == OBC_SCORE_K) {
                    c = a2 * zz * zz * dvo;
                } else if (KIND == OBC_SCORE_VK) {
                    // ||v + z (v - o)||^2 = ||v||^2 + 2 z v.(v - o) + z^2 ||v - o||^2, with
                    // 2 v.(v - o) = ||v||^2 - ||o||^2 + ||v - o||^2
                    float q2 = v2 + zz * (v2 - ron[r] + dvo) + zz * zz * dvo;
                    q2 = q2 > 0.0f ? q2 : 0.0f;
                    c = a2 * q2;
                } else {  // VK_NOCROSS
                    c = a2 * (v2 + zz * zz * dvo);
                }
            }
            z[r] = c;
        }
    }
}

// OBC_GROUP_PRE_MEAN: the group's attention is averaged before scoring. For each window query i,
// Abar_ij and zbar_ij are the means over the G query heads of A_ij and z_ij, obar_i the mean of
// their o_i, and the score formula is applied once to (Abar, zbar, obar). All G*W rows are in one
// chunk (score_op sizes ZT for it). ||v_j - obar_i||^2 is taken directly (no anchor correction:
// obar is a mean over heads and rarely sits on a single value row).
template <class VP>
OBC_INLINE void score_tile_pre(ggml_tensor * dst, const dims & s, const obc_record & P, int h, int j0, int nt,
                               const rows_view & K, const rows_view & V, score_scratch & w) {
    const int D = s.D, W = s.W, G = s.G;
    const int R = G * W, Rp = pad_rows(R), Wp = pad_rows(W);
    const bool need_o = score_needs_o(P.score);
    float * ZT = w.ZT.data();
    gemm_rows<VP, false>(K.p, K.ld, w.QT.data(), Rp, D, nt, Rp, ZT, Rp);
    float * AB = w.AB.data();
    float * ZB = w.ZB.data();
    const int32_t * pk = w.pk.data();
    const float inv_g = 1.0f / (float) G;
    for (int t = 0; t < nt; ++t) {
        const float * z = ZT + (size_t) t * Rp;
        float * ab = AB + (size_t) t * Wp;
        float * zb = ZB + (size_t) t * Wp;
        for (int i = 0; i < Wp; ++i) ab[i] = zb[i] = 0.0f;
        for (int g = 0; g < G; ++g)
            for (int i = 0; i < W; ++i) {
                const int r = g * W + i;
                if (pk[t] > w.pq[r]) continue;  // the same mask for every head of the group
                ab[i] += obc_exp(z[r] - w.rm[r]) * w.ril[r] * inv_g;
                zb[i] += z[r] * inv_g;
            }
    }
    float * DV = nullptr;
    if (need_o) {
        DV = w.DVT.data();
        dist_rows<VP>(V.p, V.ld, w.OBT.data(), Wp, D, nt, Wp, DV, Wp);  // ||v_t - obar_i||^2
    }
    float * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + h * dst->nb[1] + (size_t) j0 * dst->nb[0]);
    const float * vn = w.vn.data();
    const float * vn2 = w.vn2.data();
    for (int t = 0; t < nt; ++t) {
        const float * ab = AB + (size_t) t * Wp;
        const float * zb = ZB + (size_t) t * Wp;
        const float v2 = vn2[t];
        double acc = 0.0;
        for (int i = 0; i < W; ++i) {
            const float a = ab[i], zz = zb[i];
            if (a == 0.0f) continue;
            float c;
            switch (P.score) {
                case OBC_SCORE_ATTN: c = a; break;
                case OBC_SCORE_V: c = P.p == 1.0f ? a : P.p == 2.0f ? a * a : std::pow(a, P.p); break;
                case OBC_SCORE_K: c = a * a * zz * zz * DV[(size_t) t * Wp + i]; break;
                case OBC_SCORE_VK: {
                    const float dvo = DV[(size_t) t * Wp + i];
                    float q2 = v2 + zz * (v2 - w.ronb[i] + dvo) + zz * zz * dvo;
                    c = a * a * (q2 > 0.0f ? q2 : 0.0f);
                    break;
                }
                default: c = a * a * (v2 + zz * zz * DV[(size_t) t * Wp + i]); break;
            }
            acc += c;
        }
        out[t] = (float) acc * (P.score == OBC_SCORE_V ? vn[t] : 1.0f);
    }
}

template <class VP>
OBC_INLINE void score_tile_t(ggml_tensor * dst, const dims & s, const obc_record & P, int h, int j0, score_scratch & w) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    const ggml_tensor * pos_q = dst->src[3];
    const ggml_tensor * pos_k = dst->src[4];
    const ggml_tensor * st = dst->src[5];
    const bool need_o = score_needs_o(P.score);
    const bool need_v = score_needs_v(P.score);
    const int D = s.D;
    const int R = s.G * s.W;
    const int Rp = pad_rows(R);
    const int nt = std::min(TT, s.N - j0);

    if (w.cur_h != h) {
        load_q_rows(q, pos_q, s, h, 0, R, Rp, P.scale, w.QT.data(), w.pq.data());
        for (int r = 0; r < Rp; ++r) {
            if (r >= R) {
                w.rm[r] = 0.0f;
                w.ril[r] = 0.0f;
                w.ron[r] = 0.0f;
                w.ranc[r] = -1;
                w.rdva[r] = 0.0f;
                if (need_o)
                    for (int d = 0; d < D; ++d) w.OT[(size_t) d * Rp + r] = 0.0f;
                continue;
            }
            const int g = h * s.G + r / s.W, i = r % s.W;
            const float * row = reinterpret_cast<const float *>(static_cast<const char *>(st->data) + g * st->nb[2] + i * st->nb[1]);
            w.rm[r] = row[0];
            w.ril[r] = row[1];
            w.ron[r] = row[2];
            memcpy(&w.ranc[r], &row[3], sizeof(int32_t));
            w.rdva[r] = row[4];
            if (need_o)
                for (int d = 0; d < D; ++d) w.OT[(size_t) d * Rp + r] = row[ST_HDR + d];
        }
        if (P.group_pool == OBC_GROUP_PRE_MEAN && need_o) {
            const int Wp = pad_rows(s.W);
            for (int i = 0; i < Wp; ++i) {
                double n2 = 0.0;
                for (int d = 0; d < D; ++d) {
                    float m = 0.0f;
                    if (i < s.W)
                        for (int g = 0; g < s.G; ++g) m += w.OT[(size_t) d * Rp + g * s.W + i];
                    m /= (float) s.G;
                    w.OBT[(size_t) d * Wp + i] = m;
                    n2 += (double) m * m;
                }
                w.ronb[i] = (float) n2;
            }
        }
        w.cur_h = h;
    }

    int32_t * pk = w.pk.data();
    load_pos_k(pos_k, h, j0, nt, pk);
    const rows_view K = token_rows(k, h, j0, nt, D, D, w.KB.data(), key_offset(dst->src[6], h));

    float * vn = w.vn.data();
    float * vn2 = w.vn2.data();
    rows_view V = {nullptr, 0};
    if (need_v) {
        V = P.v_trans ? dim_rows_as_token_rows(v, h, j0, nt, D, D, w.VB2.data(), w.VB.data())
                      : token_rows(v, h, j0, nt, D, D, w.VB.data());
        for (int t = 0; t < nt; ++t) vn2[t] = sumsq(V.p + (size_t) t * V.ld, D);
        if (P.score == OBC_SCORE_V && P.p != 2.0f) {
            for (int t = 0; t < nt; ++t) {
                const float * x = V.p + (size_t) t * V.ld;
                float acc = 0.0f;
                if (P.p == 1.0f) {
                    for (int d = 0; d < D; ++d) acc += std::fabs(x[d]);
                } else {
                    for (int d = 0; d < D; ++d) acc += std::pow(std::fabs(x[d]), P.p);
                }
                vn[t] = acc;
            }
        } else {
            for (int t = 0; t < nt; ++t) vn[t] = vn2[t];
        }
    } else {
        for (int t = 0; t < nt; ++t) vn2[t] = vn[t] = 0.0f;
    }

    if (P.group_pool == OBC_GROUP_PRE_MEAN) {
        score_tile_pre<VP>(dst, s, P, h, j0, nt, K, V, w);
        return;
    }

    // Rows in chunks of RC (bounded scratch for long windows); per-query-head window sums in S.
    float * S = w.S.data();
    memset(S, 0, (size_t) s.G * TT * sizeof(float));
    float * ZT = w.ZT.data();
    float * DVT = need_o ? w.DVT.data() : nullptr;
    for (int r0 = 0; r0 < R; r0 += RC) {
        const int nr = std::min(RC, R - r0);
        const int Rc = pad_rows(nr);
        gemm_rows<VP, false>(K.p, K.ld, w.QT.data() + r0, Rp, D, nt, Rc, ZT, Rc);
        if (need_o) {
            dist_rows<VP>(V.p, V.ld, w.OT.data() + r0, Rp, D, nt, Rc, DVT, Rc);  // ||v_t - o_r||^2
            for (int r = 0; r < nr; ++r) {  // each query's anchor: the value stage 1 formed exactly
                const int t = w.ranc[r0 + r] - j0;
                if (t >= 0 && t < nt) DVT[(size_t) t * Rc + r] = w.rdva[r0 + r];
            }
        }

        const float * rm = w.rm.data() + r0;
        const float * ril = w.ril.data() + r0;
        const float * ron = w.ron.data() + r0;
        const int32_t * pq = w.pq.data() + r0;
        switch (P.score) {
            case OBC_SCORE_ATTN:
                score_elems<OBC_SCORE_ATTN, 0>(P.p, nt, Rc, ZT, DVT, rm, ril, ron, pq, pk, vn2);
                break;
            case OBC_SCORE_V:
                if (P.p == 1.0f) {
                    score_elems<OBC_SCORE_V, 0>(P.p, nt, Rc, ZT, DVT, rm, ril, ron, pq, pk, vn2);
                } else if (P.p == 2.0f) {
                    score_elems<OBC_SCORE_V, 1>(P.p, nt, Rc, ZT, DVT, rm, ril, ron, pq, pk, vn2);
                } else {
                    score_elems<OBC_SCORE_V, 2>(P.p, nt, Rc, ZT, DVT, rm, ril, ron, pq, pk, vn2);
                }
                break;
            case OBC_SCORE_K:
                score_elems<OBC_SCORE_K, 0>(P.p, nt, Rc, ZT, DVT, rm, ril, ron, pq, pk, vn2);
                break;
            case OBC_SCORE_VK:
                score_elems<OBC_SCORE_VK, 0>(P.p, nt, Rc, ZT, DVT, rm, ril, ron, pq, pk, vn2);
                break;
            default:
                score_elems<OBC_SCORE_VK_NOCROSS, 0>(P.p, nt, Rc, ZT, DVT, rm, ril, ron, pq, pk, vn2);
                break;
        }
        // window sums: rows r0..r0+nr of the chunk belong to query heads (r0 + r) / W
        for (int g = r0 / s.W; g < s.G && g * s.W < r0 + nr; ++g) {
            const int a = std::max(g * s.W, r0) - r0, b = std::min((g + 1) * s.W, r0 + nr) - r0;
            float * Sg = S + (size_t) g * TT;
            for (int t = 0; t < nt; ++t) Sg[t] += sum_n(ZT + (size_t) t * Rc + a, b - a);
        }
    }

    const bool vscale = P.score == OBC_SCORE_V;
    if (P.group_pool == OBC_GROUP_NORM_SUM) {
        // Every query head's own scores ([n_kv, n_head]); the reduce stage normalises and sums them.
        for (int g = 0; g < s.G; ++g) {
            float * o = reinterpret_cast<float *>(static_cast<char *>(dst->data) + (size_t) (h * s.G + g) * dst->nb[1] +
                                                  (size_t) j0 * dst->nb[0]);
            for (int t = 0; t < nt; ++t) o[t] = S[(size_t) g * TT + t] * (vscale ? vn[t] : 1.0f);
        }
        return;
    }
    // group pool
    float * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + h * dst->nb[1] + (size_t) j0 * dst->nb[0]);
    for (int t = 0; t < nt; ++t) {
        float acc = 0.0f;
        for (int g = 0; g < s.G; ++g) {
            float x = S[(size_t) g * TT + t];
            if (vscale) x *= vn[t];
            if (g == 0) {
                acc = x;
            } else {
                acc = P.group_pool == OBC_GROUP_MAX ? std::max(acc, x) : acc + x;
            }
        }
        if (P.group_pool == OBC_GROUP_MEAN) acc /= (float) s.G;
        out[t] = acc;
    }
}

void score_tile_base(ggml_tensor * dst, const dims & s, const obc_record & P, int h, int j0, score_scratch & w) {
    score_tile_t<vec_portable>(dst, s, P, h, j0, w);
}
#if OBC_X86_DISPATCH
OBC_TARGET_AVX2 void score_tile_avx2(ggml_tensor * dst, const dims & s, const obc_record & P, int h, int j0,
                                     score_scratch & w) {
    score_tile_t<vec_avx>(dst, s, P, h, j0, w);
}
#endif

void score_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const obc_record P = obc_get_record(dst, OBC_MAGIC_SCORE);
    const dims s = get_dims(dst->src[0], dst->src[1]);
    const int ntile = (s.N + TT - 1) / TT;
    const int64_t ntask = (int64_t) s.Hkv * ntile;
    const int64_t t0 = ntask * ith / nth, t1 = ntask * (ith + 1) / nth;
    if (t0 >= t1) return;

    const int R = s.G * s.W, Rp = pad_rows(R);
    score_scratch w;
    w.QT.resize((size_t) Rp * s.D);
    w.OT.resize((size_t) Rp * s.D);
    w.rm.resize(Rp);
    w.ril.resize(Rp);
    w.ron.resize(Rp);
    w.rdva.resize(Rp);
    w.ranc.resize(Rp);
    w.pq.resize(Rp);
    const bool pre = P.group_pool == OBC_GROUP_PRE_MEAN;
    const int Rcp = pre ? Rp : std::min(RC, Rp);
    w.ZT.resize((size_t) Rcp * TT);
    w.DVT.resize((size_t) Rcp * TT);
    if (pre) {
        const int Wp = pad_rows(s.W);
        w.OBT.resize((size_t) Wp * s.D);
        w.ronb.resize(Wp);
        w.AB.resize((size_t) Wp * TT);
        w.ZB.resize((size_t) Wp * TT);
    }
    w.S.resize((size_t) s.G * TT);
    w.KB.resize((size_t) TT * s.D);
    w.VB.resize((size_t) TT * s.D);
    w.VB2.resize((size_t) TT * s.D);
    w.vn.resize(TT);
    w.vn2.resize(TT);
    w.pk.resize(TT);

    const bool avx2 = obc_use_avx2();
    (void) avx2;
    for (int64_t task = t0; task < t1; ++task) {
        const int h = (int) (task / ntile);
        const int j0 = (int) (task % ntile) * TT;
#if OBC_X86_DISPATCH
        if (avx2) {
            score_tile_avx2(dst, s, P, h, j0, w);
            continue;
        }
#endif
        score_tile_base(dst, s, P, h, j0, w);
    }
}

// OBC_GROUP_NORM_SUM: src[0] holds every query head's scores [n_kv, n_head]; each head's row is
// scaled to sum 1 (a head that scores nothing stays 0) and the G heads of a KV head are summed.
void norm_sum_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const ggml_tensor * per = dst->src[0];
    const int64_t N = per->ne[0], H = per->ne[1], Hkv = dst->ne[1], G = H / Hkv;
    for (int64_t h = ith; h < Hkv; h += nth) {
        float * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + h * dst->nb[1]);
        for (int64_t j = 0; j < N; ++j) out[j] = 0.0f;
        for (int64_t g = 0; g < G; ++g) {
            const float * x = reinterpret_cast<const float *>(static_cast<const char *>(per->data) + (h * G + g) * per->nb[1]);
            double tot = 0.0;
            for (int64_t j = 0; j < N; ++j) tot += x[j];
            if (!(tot > 0.0)) continue;
            const float inv = (float) (1.0 / tot);
            for (int64_t j = 0; j < N; ++j) out[j] += x[j] * inv;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Compaction

template <typename T>
void gather_row(char * base, size_t stride, const int32_t * idx, int64_t n_keep) {
    for (int64_t n = 0; n < n_keep; ++n) {
        const int64_t src = idx[n];
        if (src != n) {
            T x;
            memcpy(&x, base + src * stride, sizeof(T));
            memcpy(base + n * stride, &x, sizeof(T));
        }
    }
}

void compact_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const obc_record P = obc_get_record(dst, OBC_MAGIC_COMPACT);
    const ggml_tensor * idx = dst->src[1];
    const int64_t n_keep = idx->ne[0], H = idx->ne[1];
    const int hd = P.head_axis;
    const int64_t cap = dst->ne[P.axis];
    char * data = static_cast<char *>(dst->data);

    if (P.axis == 1) {
        // rows of ne[0] elements move within each head (dimension 2)
        const size_t row_bytes = ggml_row_size(dst->type, dst->ne[0]);
        for (int64_t h = ith; h < H; h += nth) {
            const int32_t * ix = reinterpret_cast<const int32_t *>(static_cast<const char *>(idx->data) + h * idx->nb[1]);
            char * base = data + h * dst->nb[2];
            for (int64_t n = 0; n < n_keep; ++n) {
                const int64_t src = ix[n];
                GGML_ASSERT(src >= 0 && src < cap && "obc_compact: index out of range");
                if (src != n) memcpy(base + n * dst->nb[1], base + src * dst->nb[1], row_bytes);
            }
        }
        return;
    }

    // axis 0: every row (dimension 1 when the heads are dimension 2) gathers its own elements
    const int64_t rows_per_head = hd == 2 ? dst->ne[1] : 1;
    const int64_t nrows = rows_per_head * H;
    const size_t es = dst->nb[0];
    for (int64_t rr = ith; rr < nrows; rr += nth) {
        const int64_t h = rr / rows_per_head, r = rr % rows_per_head;
        const int32_t * ix = reinterpret_cast<const int32_t *>(static_cast<const char *>(idx->data) + h * idx->nb[1]);
        if (r == 0) {
            for (int64_t n = 0; n < n_keep; ++n)
                GGML_ASSERT(ix[n] >= 0 && ix[n] < cap && "obc_compact: index out of range");
        }
        char * base = data + h * dst->nb[hd] + (hd == 2 ? r * dst->nb[1] : 0);
        switch (es) {
            case 1: gather_row<uint8_t>(base, es, ix, n_keep); break;
            case 2: gather_row<uint16_t>(base, es, ix, n_keep); break;
            case 4: gather_row<uint32_t>(base, es, ix, n_keep); break;
            case 8: gather_row<uint64_t>(base, es, ix, n_keep); break;
            default:
                for (int64_t n = 0; n < n_keep; ++n)
                    if (ix[n] != n) memcpy(base + n * es, base + ix[n] * es, es);
                break;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Host runner

struct ctx_guard {
    ggml_context * ctx = nullptr;
    ~ctx_guard() {
        if (ctx) ggml_free(ctx);
    }
};

void set_err(char * err, size_t err_len, const std::string & msg) {
    if (err && err_len > 0) snprintf(err, err_len, "%s", msg.c_str());
}

}  // namespace

// -------------------------------------------------------------------------------------------------
// Public API

extern "C" struct ggml_tensor * obc_saliency(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                             struct ggml_tensor * v, struct ggml_tensor * pos_q,
                                             struct ggml_tensor * pos_k, struct ggml_tensor * k_offset,
                                             struct obc_saliency_params params) {
    const std::string e = check_saliency(q, k, v, pos_q, pos_k, k_offset, params);
    if (!e.empty()) GGML_ABORT("obc_saliency: %s", e.c_str());

    obc_record rec{};
    rec.score = params.score;
    rec.p = params.p;
    rec.scale = params.scale;
    rec.v_trans = params.v_trans;

    const int64_t D = q->ne[0], W = q->ne[1], H = q->ne[2], N = k->ne[1], Hkv = k->ne[2];
    // A group of one query head has nothing to average: pre-mean is the sum, which the main path
    // computes with its anchored ||v - o||^2 (the pre-mean path's direct distance cancels when one
    // head's attention sits on one token).
    rec.group_pool = params.group_pool == OBC_GROUP_PRE_MEAN && H == Hkv ? OBC_GROUP_SUM : params.group_pool;
    const int64_t S = ST_HDR + (score_needs_o(params.score) ? D : 0);

    // k_offset, when given, is the last source: src[5] of the stats op, src[6] of the score op.
    ggml_tensor * args1[6] = {q, k, v, pos_q, pos_k, k_offset};
    ggml_tensor * stats = ggml_custom_4d(ctx, GGML_TYPE_F32, S, W, H, 1, args1, k_offset ? 6 : 5, stats_op,
                                         GGML_N_TASKS_MAX, nullptr);
    rec.magic = OBC_MAGIC_STATS;
    obc_set_record(stats, rec);
    ggml_format_name(stats, "obc_stats");

    ggml_tensor * args2[7] = {q, k, v, pos_q, pos_k, stats, k_offset};
    const bool per_head = params.group_pool == OBC_GROUP_NORM_SUM;
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, N, per_head ? H : Hkv, 1, 1, args2, k_offset ? 7 : 6, score_op,
                                       GGML_N_TASKS_MAX, nullptr);
    rec.magic = OBC_MAGIC_SCORE;
    obc_set_record(out, rec);
    ggml_format_name(out, per_head ? "obc_saliency_per_head" : "obc_saliency");
    if (!per_head) return out;
    ggml_tensor * args3[1] = {out};
    ggml_tensor * pooled = ggml_custom_4d(ctx, GGML_TYPE_F32, N, Hkv, 1, 1, args3, 1, norm_sum_op, GGML_N_TASKS_MAX, nullptr);
    ggml_format_name(pooled, "obc_saliency");
    return pooled;
}

extern "C" struct ggml_tensor * obc_compact(struct ggml_context * ctx, struct ggml_tensor * cache,
                                            struct ggml_tensor * idx, int axis) {
    GGML_ASSERT(cache && idx);
    GGML_ASSERT(idx->type == GGML_TYPE_I32 && "obc_compact: idx must be I32");
    GGML_ASSERT(idx->nb[0] == sizeof(int32_t) && idx->ne[2] == 1 && idx->ne[3] == 1);
    GGML_ASSERT((axis == 0 || axis == 1) && "obc_compact: axis must be 0 or 1");
    GGML_ASSERT(cache->ne[3] == 1 && "obc_compact: 4-D caches are not supported");
    const int64_t n_keep = idx->ne[0], H = idx->ne[1];
    int head_axis;
    if (cache->ne[2] == H) {
        head_axis = 2;
    } else if (axis == 0 && cache->ne[2] == 1 && cache->ne[1] == H) {
        head_axis = 1;  // [cap, H]: scores or positions
    } else {
        GGML_ABORT("obc_compact: idx has %lld heads but cache is [%lld, %lld, %lld]", (long long) H,
                   (long long) cache->ne[0], (long long) cache->ne[1], (long long) cache->ne[2]);
    }
    GGML_ASSERT(n_keep <= cache->ne[axis] && "obc_compact: more kept slots than capacity");
    if (axis == 0) {
        GGML_ASSERT(ggml_blck_size(cache->type) == 1 && "obc_compact: axis 0 needs a non-quantized type");
        GGML_ASSERT(cache->nb[0] == ggml_type_size(cache->type));
    } else {
        GGML_ASSERT(cache->nb[0] == ggml_type_size(cache->type) && "obc_compact: rows must be contiguous");
    }

    ggml_tensor * args[1] = {idx};
    ggml_tensor * out = ggml_custom_inplace(ctx, cache, args, 1, compact_op, GGML_N_TASKS_MAX, nullptr);
    GGML_ASSERT(out->src[1] == idx && "obc_compact: unexpected source layout of ggml_custom_inplace");
    obc_record rec{};
    rec.magic = OBC_MAGIC_COMPACT;
    rec.axis = axis;
    rec.head_axis = head_axis;
    obc_set_record(out, rec);
    ggml_format_name(out, "obc_compact(%s)", cache->name);
    return out;
}

extern "C" int obc_saliency_host(const float * q, const float * k, const float * v, const int32_t * pos_q,
                                 const int32_t * pos_k, int head_dim, int n_win, int n_head, int n_kv, int n_head_kv,
                                 struct obc_saliency_params params, int n_threads, float * out, char * err,
                                 size_t err_len) {
    try {
        if (!q || !k || !v || !pos_q || !pos_k || !out) {
            set_err(err, err_len, "obc_saliency_host: null pointer");
            return 1;
        }
        if (head_dim <= 0 || n_win <= 0 || n_head <= 0 || n_kv <= 0 || n_head_kv <= 0) {
            set_err(err, err_len, "obc_saliency_host: dimensions must be positive");
            return 1;
        }
        if (n_head % n_head_kv != 0) {
            set_err(err, err_len, "obc_saliency_host: n_head must be a multiple of n_head_kv");
            return 1;
        }
        if (params.v_trans != 0) {
            set_err(err, err_len, "obc_saliency_host: v must not be transposed");
            return 1;
        }
        const std::string pe = obc_check_saliency_params(params);
        if (!pe.empty()) {
            set_err(err, err_len, "obc_saliency_host: " + pe);
            return 1;
        }
        if (n_threads < 1) n_threads = 1;

        // Zero copy: the input tensors point at the caller's arrays (the ops only read them), the
        // result at `out`; only the intermediate stats tensor and the work buffer are allocated.
        // ggml_graph_plan + ggml_graph_compute is what ggml_graph_compute_with_ctx does, minus
        // carving the work buffer out of a context that would also have to hold copies of the data.
        ggml_init_params ip{};
        ip.mem_size = 16 * ggml_tensor_overhead() + ggml_graph_overhead();
        ip.mem_buffer = nullptr;
        ip.no_alloc = true;
        ctx_guard g;
        g.ctx = ggml_init(ip);
        if (!g.ctx) {
            set_err(err, err_len, "obc_saliency_host: ggml_init failed (out of memory?)");
            return 2;
        }
        ggml_context * ctx = g.ctx;
        ggml_tensor * tq = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, head_dim, n_win, n_head);
        ggml_tensor * tk = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, head_dim, n_kv, n_head_kv);
        ggml_tensor * tv = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, head_dim, n_kv, n_head_kv);
        ggml_tensor * tpq = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_win);
        ggml_tensor * tpk = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_kv, n_head_kv);
        tq->data = const_cast<float *>(q);
        tk->data = const_cast<float *>(k);
        tv->data = const_cast<float *>(v);
        tpq->data = const_cast<int32_t *>(pos_q);
        tpk->data = const_cast<int32_t *>(pos_k);

        ggml_tensor * res = obc_saliency(ctx, tq, tk, tv, tpq, tpk, nullptr, params);
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, res);
        res->data = out;
        std::vector<std::vector<float>> bufs;
        for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
            ggml_tensor * t = ggml_graph_node(gf, i);
            if (t->data == nullptr) {
                bufs.emplace_back((ggml_nbytes(t) + sizeof(float) - 1) / sizeof(float));
                t->data = bufs.back().data();
            }
        }
        ggml_cplan plan = ggml_graph_plan(gf, n_threads, nullptr);
        std::vector<uint8_t> work(plan.work_size);
        plan.work_data = plan.work_size ? work.data() : nullptr;
        const ggml_status st = ggml_graph_compute(gf, &plan);
        if (st != GGML_STATUS_SUCCESS) {
            set_err(err, err_len, std::string("obc_saliency_host: graph compute failed: ") + ggml_status_to_string(st));
            return 3;
        }
        return 0;
    } catch (const std::bad_alloc &) {
        set_err(err, err_len, "obc_saliency_host: out of memory");
        return 2;
    } catch (const std::exception & e) {
        set_err(err, err_len, std::string("obc_saliency_host: ") + e.what());
        return 4;
    }
}
