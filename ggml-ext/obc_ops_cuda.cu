// CUDA implementations of obc_ops_cuda.h: OBCache saliency, in-place compaction and top-k selection
// of the slots to keep, on tensors in device memory.
//
// Saliency (three kernels, all on the caller's stream):
//   1. stats_partial: grid (block of 32 query rows, chunk of tokens, KV head). A query row is one
//      (query head of the group, window query). Each block streams its chunk's K (and V when the
//      score needs o_i) in tiles of 32 tokens through shared memory and runs an online softmax per
//      row: running max m, the sum l_ex of exp(z - m) over every token but the row's anchor (its
//      highest-logit token, the first on ties), and O_ex = the same sum weighted by v. The anchor is
//      kept out of the sums for the reason obc_ops_cpu.cpp gives: o_i - v_anchor is then formed as
//      (O_ex - l_ex v_a) / (1 + l_ex) without cancellation. Splitting the tokens over chunks gives the
//      grid enough blocks when a layer has only 2-3 KV heads; the row blocks that read one chunk are
//      adjacent in the grid, so they run together and share that chunk's K/V through L2.
//   2. stats_combine: one block per row merges the chunks' partials (the anchor is the first chunk's
//      anchor with the largest m; the other chunks' anchors join the sums with their weight) into
//      [m, 1/l, ||o||^2, anchor, ||o - v_a||^2, 0, 0, 0, o[0..D)], the CPU op's stats row.
//   3. score: the one fused pass over K/V per (KV head, tile of 64 tokens). It recomputes the logits
//      of its tile for every query row of the group (same products in the same order as kernel 1, so
//      z matches it bit for bit and A = exp(z - m) / l <= 1), forms ||v_j - o_i||^2 directly (the
//      anchor pair takes kernel 2's exact value), accumulates the chosen score over the window per
//      query head and pools the group's heads. Query rows go through shared memory in chunks of
//      32 (16 for head_dim > 128); each thread owns 4 (2) rows x 2 tokens and keeps their logit and
//      distance sums in registers. The per-query-head sums live in a per-warp shared array, so they
//      are added in a fixed order: results are deterministic run to run.
//   Everything is fp32 with fmaf; K and V are read as F16 or F32 (any row and head stride, V
//   token-major or transposed), converted when the tile is staged. head_dim is padded to 64, 128 or
//   256 (a template parameter) with zeros, which changes no sum.
//
// Cost of one saliency call (R = n_head * n_win query rows, N tokens, D = head_dim, Hkv KV heads,
// e = bytes per K/V element, nrb = ceil(G * n_win / 32) row blocks per KV head):
//   bytes from HBM, at least: K once in kernel 1 and once in kernel 3 (2 N D Hkv e), plus V once in
//   kernel 1 when the score needs o_i (K, VK, VK_NOCROSS) and once in kernel 3 for every score but
//   ATTN, plus pos_k (twice) and the output (12 N Hkv). Kernel 1 reads a chunk once per row block;
//   with nrb > 1 the repeats come from L2, since a chunk's row blocks run together. The partials
//   of o_i (32 D floats per kernel-1 block, written, then read by kernel 2) add 128 / (chunk e) to
//   what a block reads of K and V: 50% at the shortest chunk (128 F16 tokens), 33% at 32k tokens and
//   8% at 128k for the shapes of bench/gpu; up to tens of MB, so they mostly stay in L2.
//   FLOPs: the logits 2 R N D twice (kernels 1 and 3); with o_i also P.V 2 R N D (kernel 1) and the
//   distances 3 R N D (kernel 3): 4 R N D for ATTN / V, 9 R N D for K / VK / VK_NOCROSS, plus
//   O(R N) exponentials.
//   On an H200 (4.8 TB/s HBM3e, about 67 TFLOP/s fp32 without tensor cores) a window of 16 makes the
//   call arithmetic-bound for every score: e.g. Qwen2.5-1.5B shapes (R = 192, D = 128, F16) do
//   9 R N D / (4 N D Hkv e) = 108 FLOP per byte against a machine balance of 14.
// Compaction moves 2 n_keep (row bytes) H bytes (read + write); top-k reads the scores once (the
// pooling window comes from cache), writes and re-reads 4-byte keys up to 9 times, and writes n_keep
// indices per head: both are bandwidth or latency bound, with no arithmetic to speak of.

#include "obc_ops_cuda.h"
#include "obc_ops_check.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ggml.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

namespace {

// ---------------------------------------------------------------------------------------------
// Errors

thread_local std::string g_last_error;

int fail(int code, const std::string & msg) {
    g_last_error = msg;
    return code;
}

// Reports a launch failure. Asynchronous errors of earlier work on the device show up here too,
// which is where the caller would otherwise meet them next.
int check_launch(const char * what) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return fail(OBC_CUDA_ERUNTIME, std::string(what) + ": " + cudaGetErrorString(e));
    return OBC_CUDA_OK;
}

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

// ---------------------------------------------------------------------------------------------
// Common device helpers

constexpr unsigned FULL = 0xffffffffu;
constexpr int NT = 256;      // threads of the saliency kernels
constexpr int NW = NT / 32;  // their warps

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
    return x;
}

// A K or V tensor of one layer: element (head h, token j, dim d) is at
// data + h*sh + j*st + d*sd bytes, so token-major and transposed layouts are one descriptor.
struct kv_desc {
    const char * data;
    int64_t st, sd, sh;
    int f16;
};

__device__ __forceinline__ float kv_load(const kv_desc & x, int h, int64_t j, int d) {
    const char * p = x.data + (int64_t) h * x.sh + j * x.st + (int64_t) d * x.sd;
    return x.f16 ? __half2float(__ldg(reinterpret_cast<const __half *>(p))) : __ldg(reinterpret_cast<const float *>(p));
}

// Stages tokens j0..j0+nt of head h as T rows of DM floats (stride ld) in shared memory, zero
// beyond nt tokens and D dims. The loop runs along whichever axis is contiguous in memory, so a
// warp's loads are coalesced in both layouts; its trip count is a constant, so that the unrolled
// body issues several loads before the first store waits for one.
template <int T, int DM>
__device__ __forceinline__ void stage_tile(float * dst, int ld, const kv_desc & x, int h, int64_t j0, int nt, int D) {
    static_assert(T * DM % NT == 0, "the tile must split evenly over the block");
    const int esz = x.f16 ? 2 : 4;
    if (x.sd == esz) {
#pragma unroll 4
        for (int it = 0; it < T * DM / NT; ++it) {
            const int i = it * NT + (int) threadIdx.x;
            const int t = i / DM, d = i % DM;
            dst[t * ld + d] = (t < nt && d < D) ? kv_load(x, h, j0 + t, d) : 0.0f;
        }
    } else {
#pragma unroll 4
        for (int it = 0; it < T * DM / NT; ++it) {
            const int i = it * NT + (int) threadIdx.x;
            const int d = i / T, t = i % T;
            dst[t * ld + d] = (t < nt && d < D) ? kv_load(x, h, j0 + t, d) : 0.0f;
        }
    }
}

struct sal_args {
    const char * q;
    int64_t q_nb1, q_nb2;
    kv_desc k, v;
    const int32_t * pos_q;
    const char * pos_k;
    int64_t pk_nb1;
    int D, W, H, N, Hkv, G, R;  // R = G * W query rows per KV head
    float scale, p;
    int group_pool;
    int n_chunk, chunk_len;
    float4 * part_hdr;  // [Hkv * R][n_chunk]: m, l_ex, anchor (int bits), unused
    float * part_o;     // [Hkv * R][n_chunk][D]: O_ex
    float * stats;      // [Hkv * R][SS]: the stats rows
    int SS;
    float * out;
    int64_t out_ld;  // in floats
};

// Query row rr (0 <= rr < R) of KV head h is window query rr % W of query head h*G + rr / W; its
// global row index h*R + rr equals (query head) * W + (window query).
__device__ __forceinline__ const float * q_row(const sal_args & a, int h, int rr) {
    const int g = h * a.G + rr / a.W, i = rr % a.W;
    return reinterpret_cast<const float *>(a.q + g * a.q_nb2 + i * a.q_nb1);
}

__device__ __forceinline__ int32_t pos_k_at(const sal_args & a, int h, int64_t j) {
    return reinterpret_cast<const int32_t *>(a.pos_k + h * a.pk_nb1)[j];
}

// ---------------------------------------------------------------------------------------------
// Kernel 1: softmax statistics and O_ex per (chunk, row block, KV head)

constexpr int RB1 = 32;  // query rows per block (4 per warp)
constexpr int TT1 = 32;  // tokens per tile (one per lane)

template <int DM, bool NEED_O>
size_t stats_smem_bytes() {
    size_t f = (size_t) RB1 * DM + (size_t) TT1 * (DM + 1);
    if (NEED_O) f += (size_t) RB1 * TT1 + (size_t) TT1 * (DM + 1) + RB1;
    return (f + TT1 + 2 * RB1) * 4;
}

template <int DM, bool NEED_O>
__global__ void __launch_bounds__(NT) stats_partial_kernel(const sal_args a) {
    extern __shared__ float4 smem4[];
    float * Qs = reinterpret_cast<float *>(smem4);  // [RB1][DM], scaled queries
    float * Ps = Qs + RB1 * DM;                      // [RB1][TT1], exp(z - m) of the tile (NEED_O)
    float * Ks = Ps + (NEED_O ? RB1 * TT1 : 0);     // [TT1][DM + 1]
    float * Vs = Ks + TT1 * (DM + 1);               // [TT1][DM + 1] (NEED_O)
    float * alpha_s = Vs + (NEED_O ? TT1 * (DM + 1) : 0);
    int * join_s = reinterpret_cast<int *>(alpha_s + (NEED_O ? RB1 : 0));
    int * pk_s = join_s + RB1;
    int * pq_s = pk_s + TT1;

    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int c = blockIdx.y, h = blockIdx.z;
    const int r0 = blockIdx.x * RB1;
    const int D = a.D;
    const int64_t jb = (int64_t) c * a.chunk_len;
    const int64_t je = min((int64_t) a.N, jb + a.chunk_len);

    for (int i = tid; i < RB1 * DM; i += NT) {
        const int r = i / DM, d = i % DM, rr = r0 + r;
        Qs[i] = (rr < a.R && d < D) ? a.scale * q_row(a, h, rr)[d] : 0.0f;
    }
    for (int r = tid; r < RB1; r += NT) pq_s[r] = r0 + r < a.R ? a.pos_q[(r0 + r) % a.W] : INT_MIN;

    // Row state of this warp's rows 4w..4w+3, the same in every lane.
    float m[4], lex[4];
    int anc[4];
    for (int k = 0; k < 4; ++k) {
        m[k] = -INFINITY;
        lex[k] = 0.0f;
        anc[k] = -1;
    }
    // O_ex: this thread owns column od of rows orow..orow+ORPT-1.
    constexpr int ORPT = RB1 * DM / NT;
    const int od = tid % DM, orow = (tid / DM) * ORPT;
    float O[NEED_O ? ORPT : 1];
    for (int k = 0; k < (NEED_O ? ORPT : 1); ++k) O[k] = 0.0f;

    for (int64_t j0 = jb; j0 < je; j0 += TT1) {
        const int nt = (int) min((int64_t) TT1, je - j0);
        stage_tile<TT1, DM>(Ks, DM + 1, a.k, h, j0, nt, D);
        if (NEED_O) stage_tile<TT1, DM>(Vs, DM + 1, a.v, h, j0, nt, D);
        if (tid < TT1) pk_s[tid] = tid < nt ? pos_k_at(a, h, j0 + tid) : 0;
        __syncthreads();

        float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const float * kr = Ks + lane * (DM + 1);
#pragma unroll 4
        for (int d = 0; d < DM; d += 4) {
            const float k0 = kr[d], k1 = kr[d + 1], k2 = kr[d + 2], k3 = kr[d + 3];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float4 qv = *reinterpret_cast<const float4 *>(Qs + (4 * w + k) * DM + d);
                z[k] = fmaf(qv.x, k0, z[k]);
                z[k] = fmaf(qv.y, k1, z[k]);
                z[k] = fmaf(qv.z, k2, z[k]);
                z[k] = fmaf(qv.w, k3, z[k]);
            }
        }

        const bool tv = lane < nt;
        const int32_t pkt = pk_s[lane];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int r = 4 * w + k;
            const bool vis = tv && pkt <= pq_s[r];
            const float zz = vis ? z[k] : -INFINITY;
            const float mt = warp_max(zz);
            float alpha = 1.0f, p = 0.0f;
            int join = -1;
            if (mt != -INFINITY) {
                const bool new_anchor = mt > m[k];
                int na = -1;
                if (new_anchor) na = __ffs(__ballot_sync(FULL, zz == mt)) - 1;
                const float mn = fmaxf(m[k], mt);
                alpha = m[k] == -INFINITY ? 1.0f : expf(m[k] - mn);
                p = (vis && lane != na) ? expf(zz - mn) : 0.0f;
                const float ps = warp_sum(p);
                if (new_anchor) {
                    // the old anchor, weighted exp(m_old - m_new) = alpha, joins the sums
                    lex[k] = (lex[k] + (anc[k] >= 0 ? 1.0f : 0.0f)) * alpha + ps;
                    join = anc[k];
                    anc[k] = (int) j0 + na;
                } else {
                    lex[k] = lex[k] * alpha + ps;
                }
                m[k] = mn;
            }
            if (NEED_O) {
                Ps[r * TT1 + lane] = p;
                if (lane == 0) {
                    alpha_s[r] = alpha;
                    join_s[r] = join;
                }
            }
        }

        if (NEED_O) {
            __syncthreads();
#pragma unroll
            for (int k = 0; k < ORPT; ++k) {
                const int r = orow + k;
                const float al = alpha_s[r];
                const int jn = join_s[r];
                float o = O[k] * al;
                if (jn >= 0 && od < D) o = fmaf(al, kv_load(a.v, h, jn, od), o);
                O[k] = o;
            }
#pragma unroll 2
            for (int t = 0; t < TT1; t += 4) {
                const float v0 = Vs[t * (DM + 1) + od], v1 = Vs[(t + 1) * (DM + 1) + od];
                const float v2 = Vs[(t + 2) * (DM + 1) + od], v3 = Vs[(t + 3) * (DM + 1) + od];
#pragma unroll
                for (int k = 0; k < ORPT; ++k) {
                    const float4 pv = *reinterpret_cast<const float4 *>(Ps + (orow + k) * TT1 + t);
                    O[k] = fmaf(pv.x, v0, O[k]);
                    O[k] = fmaf(pv.y, v1, O[k]);
                    O[k] = fmaf(pv.z, v2, O[k]);
                    O[k] = fmaf(pv.w, v3, O[k]);
                }
            }
        }
        __syncthreads();  // the next tile overwrites Ks, Vs and Ps
    }

    if (lane == 0) {
        for (int k = 0; k < 4; ++k) {
            const int rr = r0 + 4 * w + k;
            if (rr < a.R) a.part_hdr[((size_t) h * a.R + rr) * a.n_chunk + c] = make_float4(m[k], lex[k], __int_as_float(anc[k]), 0.0f);
        }
    }
    if (NEED_O && od < D) {
#pragma unroll
        for (int k = 0; k < ORPT; ++k) {
            const int rr = r0 + orow + k;
            if (rr < a.R) a.part_o[(((size_t) h * a.R + rr) * a.n_chunk + c) * D + od] = O[k];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: merge the chunks of one row into its stats row

constexpr int NT2 = 128;
constexpr int MAX_CHUNKS = 1024;

__device__ float block_sum2(float x, float * red) {
    x = warp_sum(x);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
    __syncthreads();
    float s = 0.0f;
    for (int i = 0; i < NT2 / 32; ++i) s += red[i];
    return s;
}

template <bool NEED_O>
__global__ void __launch_bounds__(NT2) stats_combine_kernel(const sal_args a) {
    __shared__ float wgt[MAX_CHUNKS];
    __shared__ int canc[MAX_CHUNKS];
    __shared__ float red[NT2 / 32];
    __shared__ float redm[NT2 / 32];
    __shared__ int redc[NT2 / 32];

    const int row = blockIdx.x;  // h * R + rr
    const int h = row / a.R;
    const int tid = threadIdx.x, lane = tid & 31;
    const float4 * hdr = a.part_hdr + (size_t) row * a.n_chunk;
    float * st = a.stats + (size_t) row * a.SS;

    // the largest m, and the first chunk that has it
    float M = -INFINITY;
    int win = INT_MAX;
    for (int c = tid; c < a.n_chunk; c += NT2) {
        const float mc = hdr[c].x;
        if (mc > M) {
            M = mc;
            win = c;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float M2 = __shfl_xor_sync(FULL, M, o);
        const int w2 = __shfl_xor_sync(FULL, win, o);
        if (M2 > M || (M2 == M && w2 < win)) {
            M = M2;
            win = w2;
        }
    }
    if (lane == 0) {
        redm[tid >> 5] = M;
        redc[tid >> 5] = win;
    }
    __syncthreads();
    M = redm[0];
    win = redc[0];
    for (int i = 1; i < NT2 / 32; ++i) {
        if (redm[i] > M || (redm[i] == M && redc[i] < win)) {
            M = redm[i];
            win = redc[i];
        }
    }

    if (M == -INFINITY) {  // sees no token: m = 0, 1/l = 0, anchor -1, contributes nothing
        for (int i = tid; i < a.SS; i += NT2) st[i] = i == 3 ? __int_as_float(-1) : 0.0f;
        return;
    }

    float ls = 0.0f;
    for (int c = tid; c < a.n_chunk; c += NT2) {
        const float4 hc = hdr[c];
        const float wc = hc.x == -INFINITY ? 0.0f : expf(hc.x - M);
        wgt[c] = wc;
        canc[c] = c == win ? -1 : __float_as_int(hc.z);  // the anchors that join the sums
        ls += wc * (hc.y + (c != win && hc.x != -INFINITY ? 1.0f : 0.0f));
    }
    const float lex = block_sum2(ls, red);  // its barriers also publish wgt and canc
    const float il = 1.0f / (1.0f + lex);
    const int anc = __float_as_int(hdr[win].z);

    float n2 = 0.0f, d2 = 0.0f;
    if (NEED_O) {
        const float * po = a.part_o + (size_t) row * a.n_chunk * a.D;
        for (int d = tid; d < a.D; d += NT2) {
            float ox = 0.0f;
            for (int c = 0; c < a.n_chunk; ++c) {
                const float wc = wgt[c];
                if (wc == 0.0f) continue;
                float x = po[(size_t) c * a.D + d];
                if (canc[c] >= 0) x += kv_load(a.v, h, canc[c], d);
                ox = fmaf(wc, x, ox);
            }
            const float va = kv_load(a.v, h, anc, d);
            const float o = (ox + va) * il;
            const float dd = (ox - lex * va) * il;
            st[8 + d] = o;
            n2 = fmaf(o, o, n2);
            d2 = fmaf(dd, dd, d2);
        }
        n2 = block_sum2(n2, red);
        d2 = block_sum2(d2, red);
    }
    if (tid == 0) {
        st[0] = M;
        st[1] = il;
        st[2] = n2;
        st[3] = __int_as_float(anc);
        st[4] = d2;
        st[5] = st[6] = st[7] = 0.0f;
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel 3: scores per (tile of 64 tokens, KV head)

constexpr int TS = 64;  // tokens per block: lanes own tokens lane and lane + 32

template <int DM, int RPW, bool NEED_V, bool NEED_O>
size_t score_smem_bytes(int G) {
    constexpr int RC = NW * RPW;
    size_t f = (size_t) RC * DM * (NEED_O ? 2 : 1) + (size_t) TS * (DM + 1) * (NEED_V ? 2 : 1);
    f += (size_t) NW * G * TS + 7 * RC + 3 * TS;
    return f * 4;
}

template <int KIND, int PMODE>
__device__ __forceinline__ float contribution(float z, bool vis, float m, float il, float on2, float dvo, float v2, float p) {
    const float zz = vis ? z : 0.0f;
    const float a = vis ? expf(zz - m) * il : 0.0f;
    if (KIND == OBC_SCORE_ATTN) return a;
    if (KIND == OBC_SCORE_V) {
        if (PMODE == 0) return a;
        if (PMODE == 1) return a * a;
        return a > 0.0f ? powf(a, p) : 0.0f;
    }
    const float a2 = a * a;
    if (KIND == OBC_SCORE_K) return a2 * zz * zz * dvo;
    if (KIND == OBC_SCORE_VK) {
        // ||v + z (v - o)||^2 = ||v||^2 + z (||v||^2 - ||o||^2 + ||v - o||^2) + z^2 ||v - o||^2
        const float q2 = v2 + zz * (v2 - on2 + dvo) + zz * zz * dvo;
        return a2 * fmaxf(q2, 0.0f);
    }
    return a2 * (v2 + zz * zz * dvo);  // VK_NOCROSS
}

template <int DM, int RPW, int KIND, int PMODE>
__global__ void __launch_bounds__(NT) score_kernel(const sal_args a) {
    constexpr bool NEED_V = KIND != OBC_SCORE_ATTN;
    constexpr bool NEED_O = KIND == OBC_SCORE_K || KIND == OBC_SCORE_VK || KIND == OBC_SCORE_VK_NOCROSS;
    constexpr int RC = NW * RPW;  // query rows per chunk
    extern __shared__ float4 smem4[];
    float * Qs = reinterpret_cast<float *>(smem4);  // [RC][DM], scaled queries
    float * Os = Qs + RC * DM;                       // [RC][DM], o_i (NEED_O)
    float * Ks = Os + (NEED_O ? RC * DM : 0);        // [TS][DM + 1]
    float * Vs = Ks + TS * (DM + 1);                 // [TS][DM + 1] (NEED_V)
    float * Sp = Vs + (NEED_V ? TS * (DM + 1) : 0);  // [NW][G][TS], per-warp window sums
    float * rm = Sp + NW * a.G * TS;
    float * ril = rm + RC;
    float * ron = ril + RC;
    float * rdva = ron + RC;
    int * ranc = reinterpret_cast<int *>(rdva + RC);
    int * rpq = ranc + RC;
    int * rg = rpq + RC;
    int * pk_s = rg + RC;
    float * vn2 = reinterpret_cast<float *>(pk_s + TS);
    float * vnp = vn2 + TS;

    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int h = blockIdx.y;
    const int64_t j0 = (int64_t) blockIdx.x * TS;
    const int nt = (int) min((int64_t) TS, (int64_t) a.N - j0);
    const int D = a.D;

    for (int i = tid; i < NW * a.G * TS; i += NT) Sp[i] = 0.0f;
    stage_tile<TS, DM>(Ks, DM + 1, a.k, h, j0, nt, D);
    if (NEED_V) stage_tile<TS, DM>(Vs, DM + 1, a.v, h, j0, nt, D);
    if (tid < TS) pk_s[tid] = tid < nt ? pos_k_at(a, h, j0 + tid) : 0;
    __syncthreads();

    if (NEED_V) {  // ||v||^2 and ||v||_p^p per token, a warp per token
        for (int t = w; t < TS; t += NW) {
            float s2 = 0.0f, sp = 0.0f;
            for (int d = lane; d < DM; d += 32) {
                const float x = Vs[t * (DM + 1) + d];
                s2 = fmaf(x, x, s2);
                if (KIND == OBC_SCORE_V && PMODE == 0) sp += fabsf(x);
                if (KIND == OBC_SCORE_V && PMODE == 2) sp += x != 0.0f ? powf(fabsf(x), a.p) : 0.0f;
            }
            s2 = warp_sum(s2);
            sp = warp_sum(sp);
            if (lane == 0) {
                vn2[t] = s2;
                vnp[t] = (KIND == OBC_SCORE_V && PMODE != 1) ? sp : s2;
            }
        }
    }

    const float * k0p = Ks + lane * (DM + 1);
    const float * k1p = Ks + (lane + 32) * (DM + 1);
    const float * v0p = Vs + lane * (DM + 1);
    const float * v1p = Vs + (lane + 32) * (DM + 1);
    for (int c0 = 0; c0 < a.R; c0 += RC) {
        if (c0 > 0) __syncthreads();  // the previous chunk's rows are no longer read
#pragma unroll 4
        for (int it = 0; it < RC * DM / NT; ++it) {
            const int i = it * NT + tid;
            const int r = i / DM, d = i % DM, rr = c0 + r;
            const bool ok = rr < a.R && d < D;
            Qs[i] = ok ? a.scale * q_row(a, h, rr)[d] : 0.0f;
            if (NEED_O) Os[i] = ok ? a.stats[((size_t) h * a.R + rr) * a.SS + 8 + d] : 0.0f;
        }
        for (int r = tid; r < RC; r += NT) {
            const int rr = c0 + r;
            if (rr < a.R) {
                const float * st = a.stats + ((size_t) h * a.R + rr) * a.SS;
                rm[r] = st[0];
                ril[r] = st[1];
                ron[r] = st[2];
                ranc[r] = __float_as_int(st[3]);
                rdva[r] = st[4];
                rpq[r] = a.pos_q[rr % a.W];
                rg[r] = rr / a.W;
            }
        }
        __syncthreads();

        // logits (same products in the same order as kernel 1) and ||v - o||^2
        float z[RPW][2], dv[RPW][2];
#pragma unroll
        for (int k = 0; k < RPW; ++k) z[k][0] = z[k][1] = dv[k][0] = dv[k][1] = 0.0f;
#pragma unroll 2
        for (int d = 0; d < DM; d += 4) {
            float ka[4], kb[4];
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                ka[x] = k0p[d + x];
                kb[x] = k1p[d + x];
            }
#pragma unroll
            for (int k = 0; k < RPW; ++k) {
                const float4 qv = *reinterpret_cast<const float4 *>(Qs + (w * RPW + k) * DM + d);
                z[k][0] = fmaf(qv.x, ka[0], z[k][0]);
                z[k][0] = fmaf(qv.y, ka[1], z[k][0]);
                z[k][0] = fmaf(qv.z, ka[2], z[k][0]);
                z[k][0] = fmaf(qv.w, ka[3], z[k][0]);
                z[k][1] = fmaf(qv.x, kb[0], z[k][1]);
                z[k][1] = fmaf(qv.y, kb[1], z[k][1]);
                z[k][1] = fmaf(qv.z, kb[2], z[k][1]);
                z[k][1] = fmaf(qv.w, kb[3], z[k][1]);
            }
            if (NEED_O) {
                float va[4], vb[4];
#pragma unroll
                for (int x = 0; x < 4; ++x) {
                    va[x] = v0p[d + x];
                    vb[x] = v1p[d + x];
                }
#pragma unroll
                for (int k = 0; k < RPW; ++k) {
                    const float4 ov = *reinterpret_cast<const float4 *>(Os + (w * RPW + k) * DM + d);
                    const float o4[4] = {ov.x, ov.y, ov.z, ov.w};
#pragma unroll
                    for (int x = 0; x < 4; ++x) {
                        const float e0 = va[x] - o4[x], e1 = vb[x] - o4[x];
                        dv[k][0] = fmaf(e0, e0, dv[k][0]);
                        dv[k][1] = fmaf(e1, e1, dv[k][1]);
                    }
                }
            }
        }

#pragma unroll
        for (int k = 0; k < RPW; ++k) {
            const int r = w * RPW + k;
            if (c0 + r >= a.R) continue;
            float * S = Sp + (w * a.G + rg[r]) * TS;
#pragma unroll
            for (int x = 0; x < 2; ++x) {
                const int t = lane + 32 * x;
                const bool vis = t < nt && pk_s[t] <= rpq[r];
                float dvo = 0.0f, v2 = 0.0f;
                if (NEED_O) dvo = (j0 + t == ranc[r]) ? rdva[r] : dv[k][x];
                if (NEED_V) v2 = vn2[t];
                S[t] += contribution<KIND, PMODE>(z[k][x], vis, rm[r], ril[r], ron[r], dvo, v2, a.p);
            }
        }
    }
    __syncthreads();

    // window sums of each query head (warps added in a fixed order), then the group pool
    for (int t = tid; t < nt; t += NT) {
        float acc = 0.0f;
        for (int g = 0; g < a.G; ++g) {
            float s = 0.0f;
            for (int ww = 0; ww < NW; ++ww) s += Sp[(ww * a.G + g) * TS + t];
            if (KIND == OBC_SCORE_V) s *= vnp[t];
            if (g == 0) {
                acc = s;
            } else {
                acc = a.group_pool == OBC_GROUP_MAX ? (acc < s ? s : acc) : acc + s;
            }
        }
        if (a.group_pool == OBC_GROUP_MEAN) acc /= (float) a.G;
        a.out[h * a.out_ld + j0 + t] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// Saliency: host side

bool needs_o(int score) { return score == OBC_SCORE_K || score == OBC_SCORE_VK || score == OBC_SCORE_VK_NOCROSS; }

int dm_for(int64_t D) { return D <= 64 ? 64 : D <= 128 ? 128 : 256; }

struct sal_plan {
    int n_chunk, chunk_len, nrb, SS;
    size_t off_o, off_stats, total;
};

// How the tokens are split over kernel 1's blocks. It depends on the shapes only, so the result
// and the workspace size are the same on every device. About 1024 blocks fill an H200 (132 SMs)
// a few times over; a chunk stays >= 128 tokens so that the partials cost little next to K/V.
sal_plan plan_saliency(int64_t D, int64_t W, int64_t H, int64_t N, int64_t Hkv, bool need_o) {
    constexpr int64_t TARGET_BLOCKS = 1024, MIN_CHUNK = 128;
    sal_plan p;
    const int64_t G = H / Hkv, R = G * W;
    p.nrb = (int) ((R + RB1 - 1) / RB1);
    int64_t nc = (TARGET_BLOCKS + p.nrb * Hkv - 1) / (p.nrb * Hkv);
    nc = std::max<int64_t>(1, std::min<int64_t>({nc, (N + MIN_CHUNK - 1) / MIN_CHUNK, (int64_t) MAX_CHUNKS}));
    int64_t len = (N + nc - 1) / nc;
    len = (len + TT1 - 1) / TT1 * TT1;
    p.chunk_len = (int) len;
    p.n_chunk = (int) ((N + len - 1) / len);
    p.SS = 8 + (need_o ? (int) D : 0);
    const size_t rows = (size_t) H * W;
    p.off_o = align256(rows * p.n_chunk * sizeof(float4));
    p.off_stats = p.off_o + (need_o ? align256(rows * p.n_chunk * D * sizeof(float)) : 0);
    p.total = p.off_stats + align256(rows * p.SS * sizeof(float));
    return p;
}

bool aligned_to(const void * ptr, size_t n) { return reinterpret_cast<uintptr_t>(ptr) % n == 0; }

std::string check_args(const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * v, const ggml_tensor * pos_q,
                       const ggml_tensor * pos_k, const obc_saliency_params & p, const ggml_tensor * out) {
    if (!q || !k || !v || !pos_q || !pos_k || !out) return "null tensor";
    if (!q->data || !k->data || !v->data || !pos_q->data || !pos_k->data || !out->data) return "tensor without data";
    std::string e = obc_check_saliency_params(p);
    if (e.empty()) e = obc_check_saliency_shapes(q, k, v, pos_q, pos_k, p);
    if (!e.empty()) return e;
    if (p.group_pool > OBC_GROUP_MAX) return "group pooling norm-sum and pre-mean are not implemented on CUDA yet";
    for (const ggml_tensor * x : {k, v})
        if (x->type != GGML_TYPE_F32 && x->type != GGML_TYPE_F16)
            return std::string("CUDA reads F16 or F32 k and v; a ") + ggml_type_name(x->type) + " cache is not implemented on CUDA yet";
    if (out->type != GGML_TYPE_F32) return "out must be F32";
    const int64_t D = q->ne[0], W = q->ne[1], H = q->ne[2], N = k->ne[1], Hkv = k->ne[2];
    if (D > 256) return "head_dim above 256 is not supported";
    if (N > INT32_MAX - 256 || H * W > INT32_MAX / 2 || Hkv > 65535) return "dimensions too large";
    if (out->ne[0] != N || out->ne[1] != Hkv || out->ne[2] != 1 || out->ne[3] != 1) return "out must be [n_kv, n_head_kv]";
    if (q->nb[0] != 4 || q->nb[1] % 4 || q->nb[2] % 4 || !aligned_to(q->data, 4)) return "q rows must be contiguous and 4-byte aligned";
    for (const ggml_tensor * x : {k, v}) {
        const size_t es = ggml_type_size(x->type);
        if (x->nb[0] != es) return "k and v rows must be contiguous";
        if (x->nb[1] % es || x->nb[2] % es || !aligned_to(x->data, es)) return "k and v strides must be whole elements";
    }
    if (pos_q->nb[0] != 4 || pos_k->nb[0] != 4 || pos_k->nb[1] % 4) return "positions must be contiguous";
    if (out->nb[0] != 4 || out->nb[1] % 4 || !aligned_to(out->data, 4)) return "out rows must be contiguous";
    return std::string();
}

kv_desc make_desc(const ggml_tensor * x, bool transposed) {
    kv_desc d;
    d.data = static_cast<const char *>(x->data);
    const int64_t es = (int64_t) ggml_type_size(x->type);
    d.st = transposed ? es : (int64_t) x->nb[1];
    d.sd = transposed ? (int64_t) x->nb[1] : es;
    d.sh = (int64_t) x->nb[2];
    d.f16 = x->type == GGML_TYPE_F16;
    return d;
}

int max_smem_optin(int * out) {
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(out, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return fail(OBC_CUDA_ERUNTIME, std::string("obc_cuda: no usable CUDA device: ") + cudaGetErrorString(e));
    }
    return OBC_CUDA_OK;
}

// Raises the kernel's dynamic shared-memory limit (above 48 KB a launch needs it) and launches.
template <class Kernel>
int launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t s, const sal_args & a, const char * name) {
    int limit = 0;
    if (int rc = max_smem_optin(&limit)) return rc;
    if (smem > (size_t) limit)
        return fail(OBC_CUDA_EINVAL, std::string("obc_cuda_saliency: ") + name + " needs " + std::to_string(smem) +
                                         " bytes of shared memory, the device allows " + std::to_string(limit) +
                                         " (head_dim or the GQA group too large)");
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return fail(OBC_CUDA_ERUNTIME, std::string("obc_cuda_saliency: ") + name + ": " + cudaGetErrorString(e));
    }
    kernel<<<grid, block, smem, s>>>(a);
    return check_launch(name);
}

template <int DM>
int launch_stats(const sal_args & a, int nrb, int Hkv, bool need_o, cudaStream_t s) {
    const dim3 grid(nrb, a.n_chunk, Hkv);
    int rc = need_o ? launch(stats_partial_kernel<DM, true>, grid, NT, stats_smem_bytes<DM, true>(), s, a, "stats_partial")
                    : launch(stats_partial_kernel<DM, false>, grid, NT, stats_smem_bytes<DM, false>(), s, a, "stats_partial");
    if (rc) return rc;
    const dim3 grid2(Hkv * a.R);
    if (need_o) {
        stats_combine_kernel<true><<<grid2, NT2, 0, s>>>(a);
    } else {
        stats_combine_kernel<false><<<grid2, NT2, 0, s>>>(a);
    }
    return check_launch("stats_combine");
}

template <int DM, int KIND, int PMODE>
int launch_score_kind(const sal_args & a, cudaStream_t s) {
    constexpr int RPW = DM > 128 ? 2 : 4;
    constexpr bool NEED_V = KIND != OBC_SCORE_ATTN;
    constexpr bool NEED_O = KIND == OBC_SCORE_K || KIND == OBC_SCORE_VK || KIND == OBC_SCORE_VK_NOCROSS;
    const dim3 grid((a.N + TS - 1) / TS, a.Hkv);
    return launch(score_kernel<DM, RPW, KIND, PMODE>, grid, NT, score_smem_bytes<DM, RPW, NEED_V, NEED_O>(a.G), s, a,
                  "score");
}

template <int DM>
int launch_score(const sal_args & a, int score, cudaStream_t s) {
    switch (score) {
        case OBC_SCORE_ATTN: return launch_score_kind<DM, OBC_SCORE_ATTN, 0>(a, s);
        case OBC_SCORE_V:
            if (a.p == 1.0f) return launch_score_kind<DM, OBC_SCORE_V, 0>(a, s);
            if (a.p == 2.0f) return launch_score_kind<DM, OBC_SCORE_V, 1>(a, s);
            return launch_score_kind<DM, OBC_SCORE_V, 2>(a, s);
        case OBC_SCORE_K: return launch_score_kind<DM, OBC_SCORE_K, 0>(a, s);
        case OBC_SCORE_VK: return launch_score_kind<DM, OBC_SCORE_VK, 0>(a, s);
        default: return launch_score_kind<DM, OBC_SCORE_VK_NOCROSS, 0>(a, s);
    }
}

// ---------------------------------------------------------------------------------------------
// Compaction
//
// Why the in-place gather is safe: idx is strictly increasing, so idx[n] >= n, and slot n can be
// the source of an earlier element m < n only. Each kernel walks the kept slots of one head in
// increasing chunks; every thread reads all its sources of the chunk, the group syncs, then every
// thread writes its destinations. A write to slot n of chunk k could clobber the source of an
// element m < n: either in chunk k, read before the barrier, or in an earlier chunk, read before
// an earlier barrier. The sources of later chunks are slots >= their first element > n, never
// written by chunk k. One barrier per chunk is enough: a thread that runs ahead into chunk k + 1
// only reads slots beyond chunk k, and writes only after the next barrier. Groups that handle
// different byte columns of the rows (or different rows along axis 0) touch disjoint bytes and
// need no ordering between them. Loads go through the coherent path (no __ldg / const restrict).

constexpr int CT = 256;     // threads per compaction block
constexpr int CUNROLL = 4;  // steps of a chunk read before the barrier

// Axis 1: whole rows of `row_units` units of type U per slot, one block per (column group of uc
// units, head); a block moves CT/uc rows per step.
template <typename U>
__global__ void __launch_bounds__(CT) compact_rows_kernel(char * data, int64_t nb1, int64_t nbh, const int32_t * idx,
                                                          int64_t idx_ld, int n_keep, int64_t cap, int row_units, int uc) {
    const int h = blockIdx.y;
    const int rps = CT / uc;
    const int ro = threadIdx.x / uc;
    const int u = blockIdx.x * uc + threadIdx.x % uc;
    const bool active = ro < rps && u < row_units;
    char * base = data + h * nbh + (int64_t) u * sizeof(U);
    const int32_t * ix = idx + h * idx_ld;
    for (int n0 = 0; n0 < n_keep; n0 += rps * CUNROLL) {
        U val[CUNROLL];
        int64_t src[CUNROLL];
#pragma unroll
        for (int s = 0; s < CUNROLL; ++s) {
            const int n = n0 + s * rps + ro;
            src[s] = -1;
            if (active && n < n_keep) {
                const int64_t i = ix[n];
                if (i >= 0 && i < cap && i != n) src[s] = i;
            }
            if (src[s] >= 0) val[s] = *reinterpret_cast<const U *>(base + src[s] * nb1);
        }
        __syncthreads();
#pragma unroll
        for (int s = 0; s < CUNROLL; ++s) {
            if (src[s] >= 0) *reinterpret_cast<U *>(base + (int64_t) (n0 + s * rps + ro) * nb1) = val[s];
        }
    }
}

// Axis 0: each row (dimension 1, or the whole [cap] row of a [cap, H] tensor) gathers its own
// elements; one warp per row, 32 x CUNROLL elements per chunk, synchronised with __syncwarp.
template <typename E>
__global__ void __launch_bounds__(CT) compact_elems_kernel(char * data, int64_t row_nb, int64_t head_nb, int rows_per_head,
                                                           int64_t n_rows, const int32_t * idx, int64_t idx_ld, int n_keep,
                                                           int64_t cap) {
    const int lane = threadIdx.x & 31;
    const int64_t gw = (int64_t) blockIdx.x * (CT / 32) + (threadIdx.x >> 5);
    if (gw >= n_rows) return;  // whole warps leave: only __syncwarp below
    const int64_t h = gw / rows_per_head, r = gw % rows_per_head;
    E * base = reinterpret_cast<E *>(data + h * head_nb + r * row_nb);
    const int32_t * ix = idx + h * idx_ld;
    for (int n0 = 0; n0 < n_keep; n0 += 32 * CUNROLL) {
        E val[CUNROLL];
        int64_t src[CUNROLL];
#pragma unroll
        for (int s = 0; s < CUNROLL; ++s) {
            const int n = n0 + s * 32 + lane;
            src[s] = -1;
            if (n < n_keep) {
                const int64_t i = ix[n];
                if (i >= 0 && i < cap && i != n) src[s] = i;
            }
            if (src[s] >= 0) val[s] = base[src[s]];
        }
        __syncwarp();
#pragma unroll
        for (int s = 0; s < CUNROLL; ++s) {
            if (src[s] >= 0) base[n0 + s * 32 + lane] = val[s];
        }
    }
}

template <typename U>
int launch_rows(ggml_tensor * cache, const ggml_tensor * idx, int n_keep, int64_t H, size_t row_bytes, cudaStream_t s) {
    const int row_units = (int) (row_bytes / sizeof(U));
    // 32 bytes of each row per block: one full memory sector per row, and the most column groups
    // (independent chains of chunks) per head.
    const int uc = std::min(row_units, std::max(1, (int) (32 / sizeof(U))));
    const dim3 grid((row_units + uc - 1) / uc, (unsigned) H);
    compact_rows_kernel<U><<<grid, CT, 0, s>>>(static_cast<char *>(cache->data), (int64_t) cache->nb[1],
                                               (int64_t) cache->nb[2], static_cast<const int32_t *>(idx->data),
                                               (int64_t) (idx->nb[1] / 4), n_keep, cache->ne[1], row_units, uc);
    return check_launch("obc_cuda_compact");
}

template <typename E>
int launch_elems(ggml_tensor * cache, const ggml_tensor * idx, int n_keep, int64_t H, int head_axis, cudaStream_t s) {
    const int rows_per_head = head_axis == 2 ? (int) cache->ne[1] : 1;
    const int64_t n_rows = (int64_t) rows_per_head * H;
    const int64_t row_nb = head_axis == 2 ? (int64_t) cache->nb[1] : 0;
    const int64_t blocks = (n_rows + CT / 32 - 1) / (CT / 32);
    compact_elems_kernel<E><<<(unsigned) blocks, CT, 0, s>>>(static_cast<char *>(cache->data), row_nb,
                                                            (int64_t) cache->nb[head_axis], rows_per_head, n_rows,
                                                            static_cast<const int32_t *>(idx->data),
                                                            (int64_t) (idx->nb[1] / 4), n_keep, cache->ne[0]);
    return check_launch("obc_cuda_compact");
}

// ---------------------------------------------------------------------------------------------
// Top-k selection
//
// Keys: the pooled score as an unsigned integer that orders like the float (sign flip), with
// -0 taken as +0 since select_keep compares floats, then the composite c = key << 32 | ~j: the
// order of select_keep's `better` (higher score, then the earlier slot) is the order of c, and c
// is unique. A radix select over c, 8 bits per pass from the top, finds the n_pick largest among
// the candidates exactly; it stops as soon as a pass's digit holds exactly the elements still
// needed (at the latest once the index bits tell every element apart). The kept slots are then
// written in index order by a block-wide stream compaction (ballots and one scan per 4096 slots),
// so they come out sorted as select_keep's.

constexpr int KT = 1024;  // threads of the selection kernel (one block per head)

__device__ __forceinline__ uint32_t float_key(float x) {
    if (x == 0.0f) x = 0.0f;
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__global__ void pool_keys_kernel(const char * scores, int64_t s_nb1, int n_used, int lo, int hi, int pooling, int kernel,
                                 uint32_t * keys) {
    const int h = blockIdx.y;
    const int j = lo + blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= hi) return;
    const float * s = reinterpret_cast<const float *>(scores + h * s_nb1);
    float x;
    if (pooling == OBC_POOL_NONE || kernel <= 1) {
        x = s[j];
    } else {
        const int r = kernel / 2;
        const int a = max(0, j - r), b = min(hi - 1, j + r);   // pooled over the candidates and sinks only
        if (pooling == OBC_POOL_MAX) {
            float m = s[a];
            for (int t = a + 1; t <= b; ++t) m = m < s[t] ? s[t] : m;
            x = m;
        } else {
            double acc = 0.0;  // as obc_pool_scores_host: double sum in slot order, zero padding counts
            for (int t = a; t <= b; ++t) acc += s[t];
            x = (float) (acc / kernel);
        }
    }
    keys[(size_t) h * n_used + j] = float_key(x);
}

__device__ __forceinline__ uint64_t composite(const uint32_t * keys, int j) {
    return ((uint64_t) keys[j] << 32) | (uint32_t) ~(uint32_t) j;
}

__global__ void __launch_bounds__(KT) select_kernel(const uint32_t * keys_all, int n_used, int budget, int lo, int hi,
                                                    int n_pick, int32_t * keep_all, int64_t keep_ld) {
    __shared__ uint32_t hist[256];
    __shared__ int wcnt[4 * (KT / 32)];
    __shared__ int sh_digit, sh_k, sh_done, sh_total;

    const int h = blockIdx.x;
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const uint32_t * keys = keys_all + (size_t) h * n_used;
    int32_t * out = keep_all + h * keep_ld;

    if (n_used <= budget) {
        for (int j = tid; j < n_used; j += KT) out[j] = j;
        return;
    }

    // radix select of the n_pick largest composites among [lo, hi)
    uint64_t P = 0;
    int shift = 64;  // 64: nothing picked
    int k = n_pick;
    if (n_pick > 0) {
        for (int s = 56; s >= 0; s -= 8) {
            if (tid < 256) hist[tid] = 0;
            __syncthreads();
            for (int base = lo; base < hi; base += KT) {
                const int j = base + tid;
                bool act = j < hi;
                uint32_t d = 0;
                if (act) {
                    const uint64_t c = composite(keys, j);
                    act = s == 56 || (c >> (s + 8)) == (P >> (s + 8));
                    d = (uint32_t) (c >> s) & 255u;
                }
                const unsigned mask = __ballot_sync(FULL, act);
                if (act) {
                    const unsigned peers = __match_any_sync(mask, d);
                    if (lane == __ffs(peers) - 1) atomicAdd(&hist[d], (uint32_t) __popc(peers));
                }
            }
            __syncthreads();
            if (w == 0) {
                // bins from the top: lane l holds bins 255 - 8l down to 248 - 8l
                uint32_t cnt[8], lsum = 0;
#pragma unroll
                for (int x = 0; x < 8; ++x) {
                    cnt[x] = hist[255 - 8 * lane - x];
                    lsum += cnt[x];
                }
                uint32_t incl = lsum;
                for (int o = 1; o < 32; o <<= 1) {
                    const uint32_t y = __shfl_up_sync(FULL, incl, o);
                    if (lane >= o) incl += y;
                }
                const uint32_t excl = incl - lsum;
                if (excl < (uint32_t) k && (uint32_t) k <= incl) {
                    uint32_t kk = (uint32_t) k - excl;
                    for (int x = 0; x < 8; ++x) {
                        if (kk <= cnt[x]) {
                            sh_digit = 255 - 8 * lane - x;
                            sh_k = (int) kk;
                            sh_done = kk == cnt[x];
                            break;
                        }
                        kk -= cnt[x];
                    }
                }
            }
            __syncthreads();
            P |= (uint64_t) sh_digit << s;
            k = sh_k;
            if (sh_done) {
                shift = s;
                break;
            }
        }
    }

    // the kept slots in index order: sinks, picked candidates, recent
    int written = 0;
    for (int t0 = 0; t0 < n_used; t0 += 4 * KT) {
        bool f[4];
        unsigned bal[4];
#pragma unroll
        for (int x = 0; x < 4; ++x) {
            const int j = t0 + x * KT + tid;
            bool keep = false;
            if (j < n_used) {
                if (j < lo || j >= hi) {
                    keep = true;
                } else if (shift < 64) {
                    keep = (composite(keys, j) >> shift) >= (P >> shift);
                }
            }
            f[x] = keep;
            bal[x] = __ballot_sync(FULL, keep);
            if (lane == 0) wcnt[x * (KT / 32) + w] = __popc(bal[x]);
        }
        __syncthreads();
        if (w == 0) {  // exclusive scan of the 128 counts, in slot order
            int c4[4], lsum = 0;
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                c4[x] = wcnt[4 * lane + x];
                lsum += c4[x];
            }
            int incl = lsum;
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_up_sync(FULL, incl, o);
                if (lane >= o) incl += y;
            }
            int run = incl - lsum;
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                wcnt[4 * lane + x] = run;
                run += c4[x];
            }
            if (lane == 31) sh_total = incl;
        }
        __syncthreads();
        const unsigned below = (1u << lane) - 1u;
#pragma unroll
        for (int x = 0; x < 4; ++x) {
            if (f[x]) out[written + wcnt[x * (KT / 32) + w] + __popc(bal[x] & below)] = t0 + x * KT + tid;
        }
        written += sh_total;
        __syncthreads();  // wcnt and sh_total are rewritten by the next 4096 slots
    }
}

}  // namespace

// -------------------------------------------------------------------------------------------------
// Public API

extern "C" const char * obc_cuda_last_error(void) { return g_last_error.c_str(); }

extern "C" int obc_cuda_synchronize(struct CUstream_st * stream) {
    const cudaError_t err = cudaStreamSynchronize(stream);
    if (err != cudaSuccess) return fail(OBC_CUDA_ERUNTIME, std::string("obc_cuda_synchronize: ") + cudaGetErrorString(err));
    return OBC_CUDA_OK;
}

extern "C" size_t obc_cuda_saliency_work_size(const struct ggml_tensor * q, const struct ggml_tensor * k,
                                              struct obc_saliency_params params) {
    if (!q || !k || k->ne[2] <= 0 || q->ne[2] % k->ne[2] != 0) return 0;
    return plan_saliency(q->ne[0], q->ne[1], q->ne[2], k->ne[1], k->ne[2], needs_o(params.score)).total;
}

extern "C" int obc_cuda_saliency(const struct ggml_tensor * q, const struct ggml_tensor * k, const struct ggml_tensor * v,
                                 const struct ggml_tensor * pos_q, const struct ggml_tensor * pos_k,
                                 struct obc_saliency_params params, struct ggml_tensor * out, void * work,
                                 size_t work_size, struct CUstream_st * stream) {
    const std::string e = check_args(q, k, v, pos_q, pos_k, params, out);
    if (!e.empty()) return fail(OBC_CUDA_EINVAL, "obc_cuda_saliency: " + e);
    const bool need_o = needs_o(params.score);
    const int64_t D = q->ne[0], W = q->ne[1], H = q->ne[2], N = k->ne[1], Hkv = k->ne[2];
    const sal_plan pl = plan_saliency(D, W, H, N, Hkv, need_o);
    if (!work || work_size < pl.total || !aligned_to(work, 256))
        return fail(OBC_CUDA_EWORK, "obc_cuda_saliency: the workspace must be 256-byte aligned and hold " +
                                        std::to_string(pl.total) + " bytes");

    sal_args a;
    a.q = static_cast<const char *>(q->data);
    a.q_nb1 = (int64_t) q->nb[1];
    a.q_nb2 = (int64_t) q->nb[2];
    a.k = make_desc(k, false);
    a.v = make_desc(v, params.v_trans != 0);
    a.pos_q = static_cast<const int32_t *>(pos_q->data);
    a.pos_k = static_cast<const char *>(pos_k->data);
    a.pk_nb1 = (int64_t) pos_k->nb[1];
    a.D = (int) D;
    a.W = (int) W;
    a.H = (int) H;
    a.N = (int) N;
    a.Hkv = (int) Hkv;
    a.G = (int) (H / Hkv);
    a.R = a.G * a.W;
    a.scale = params.scale;
    a.p = params.p;
    a.group_pool = params.group_pool;
    a.n_chunk = pl.n_chunk;
    a.chunk_len = pl.chunk_len;
    char * wb = static_cast<char *>(work);
    a.part_hdr = reinterpret_cast<float4 *>(wb);
    a.part_o = reinterpret_cast<float *>(wb + pl.off_o);
    a.stats = reinterpret_cast<float *>(wb + pl.off_stats);
    a.SS = pl.SS;
    a.out = static_cast<float *>(out->data);
    a.out_ld = (int64_t) (out->nb[1] / 4);

    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    int rc;
    switch (dm_for(D)) {
        case 64: rc = launch_stats<64>(a, pl.nrb, a.Hkv, need_o, s); break;
        case 128: rc = launch_stats<128>(a, pl.nrb, a.Hkv, need_o, s); break;
        default: rc = launch_stats<256>(a, pl.nrb, a.Hkv, need_o, s); break;
    }
    if (rc) return rc;
    switch (dm_for(D)) {
        case 64: return launch_score<64>(a, params.score, s);
        case 128: return launch_score<128>(a, params.score, s);
        default: return launch_score<256>(a, params.score, s);
    }
}

extern "C" int obc_cuda_compact(struct ggml_tensor * cache, const struct ggml_tensor * idx, int axis,
                                struct CUstream_st * stream) {
    if (!cache || !idx || !cache->data || !idx->data) return fail(OBC_CUDA_EINVAL, "obc_cuda_compact: null tensor");
    if (idx->type != GGML_TYPE_I32 || idx->nb[0] != 4 || idx->nb[1] % 4 || idx->ne[2] != 1 || idx->ne[3] != 1)
        return fail(OBC_CUDA_EINVAL, "obc_cuda_compact: idx must be a contiguous I32 [n_keep, n_head]");
    if (axis != 0 && axis != 1) return fail(OBC_CUDA_EINVAL, "obc_cuda_compact: axis must be 0 or 1");
    if (cache->ne[3] != 1) return fail(OBC_CUDA_EINVAL, "obc_cuda_compact: 4-D caches are not supported");
    const int64_t n_keep = idx->ne[0], H = idx->ne[1];
    int head_axis;
    if (cache->ne[2] == H) {
        head_axis = 2;
    } else if (axis == 0 && cache->ne[2] == 1 && cache->ne[1] == H) {
        head_axis = 1;
    } else {
        return fail(OBC_CUDA_EINVAL, "obc_cuda_compact: idx has " + std::to_string(H) + " heads but the cache is [" +
                                         std::to_string(cache->ne[0]) + ", " + std::to_string(cache->ne[1]) + ", " +
                                         std::to_string(cache->ne[2]) + "]");
    }
    if (n_keep > cache->ne[axis]) return fail(OBC_CUDA_EINVAL, "obc_cuda_compact: more kept slots than capacity");
    if (H > 65535 || n_keep > INT32_MAX - 4096) return fail(OBC_CUDA_EINVAL, "obc_cuda_compact: dimensions too large");
    if (cache->nb[0] != ggml_type_size(cache->type))
        return fail(OBC_CUDA_EINVAL, "obc_cuda_compact: rows must be contiguous");
    if (n_keep == 0 || H == 0) return OBC_CUDA_OK;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);

    if (axis == 1) {
        const size_t row_bytes = ggml_row_size(cache->type, cache->ne[0]);
        // the widest unit that divides the row, both strides and the base address
        size_t u = 16;
        while (u > 1 && (row_bytes % u || cache->nb[1] % u || cache->nb[2] % u || !aligned_to(cache->data, u))) u /= 2;
        switch (u) {
            case 16: return launch_rows<uint4>(cache, idx, (int) n_keep, H, row_bytes, s);
            case 8: return launch_rows<uint2>(cache, idx, (int) n_keep, H, row_bytes, s);
            case 4: return launch_rows<uint32_t>(cache, idx, (int) n_keep, H, row_bytes, s);
            case 2: return launch_rows<uint16_t>(cache, idx, (int) n_keep, H, row_bytes, s);
            default: return launch_rows<uint8_t>(cache, idx, (int) n_keep, H, row_bytes, s);
        }
    }
    if (ggml_blck_size(cache->type) != 1) return fail(OBC_CUDA_EINVAL, "obc_cuda_compact: axis 0 needs a non-quantized type");
    switch (cache->nb[0]) {
        case 1: return launch_elems<uint8_t>(cache, idx, (int) n_keep, H, head_axis, s);
        case 2: return launch_elems<uint16_t>(cache, idx, (int) n_keep, H, head_axis, s);
        case 4: return launch_elems<uint32_t>(cache, idx, (int) n_keep, H, head_axis, s);
        case 8: return launch_elems<uint64_t>(cache, idx, (int) n_keep, H, head_axis, s);
        default: return fail(OBC_CUDA_EINVAL, "obc_cuda_compact: unsupported element size");
    }
}

extern "C" size_t obc_cuda_select_keep_work_size(int32_t n_used, int32_t n_head) {
    if (n_used <= 0 || n_head <= 0) return 0;
    return align256((size_t) n_used * n_head * sizeof(uint32_t));
}

extern "C" int obc_cuda_select_keep(const struct ggml_tensor * scores, int32_t n_used, int32_t budget, int32_t n_sink,
                                    int32_t n_recent, int32_t pooling, int32_t kernel, struct ggml_tensor * keep,
                                    void * work, size_t work_size, struct CUstream_st * stream) {
    if (!scores || !keep || !scores->data || !keep->data) return fail(OBC_CUDA_EINVAL, "obc_cuda_select_keep: null tensor");
    if (scores->type != GGML_TYPE_F32 || scores->nb[0] != 4 || scores->nb[1] % 4 || scores->ne[2] != 1 || scores->ne[3] != 1)
        return fail(OBC_CUDA_EINVAL, "obc_cuda_select_keep: scores must be F32 [>= n_used, n_head] with contiguous rows");
    if (keep->type != GGML_TYPE_I32 || keep->nb[0] != 4 || keep->nb[1] % 4 || keep->ne[2] != 1 || keep->ne[3] != 1)
        return fail(OBC_CUDA_EINVAL, "obc_cuda_select_keep: keep must be I32 [>= n_keep, n_head] with contiguous rows");
    const int64_t H = scores->ne[1];
    if (n_used < 0 || budget < 0 || n_sink < 0 || n_recent < 0)
        return fail(OBC_CUDA_EINVAL, "obc_cuda_select_keep: negative count");
    if (pooling < OBC_POOL_NONE || pooling > OBC_POOL_AVG) return fail(OBC_CUDA_EINVAL, "obc_cuda_select_keep: unknown pooling");
    if (n_used > scores->ne[0]) return fail(OBC_CUDA_EINVAL, "obc_cuda_select_keep: scores hold fewer than n_used slots");
    if (keep->ne[1] != H) return fail(OBC_CUDA_EINVAL, "obc_cuda_select_keep: keep and scores differ in heads");
    const int32_t n_keep = std::min(budget, n_used);
    if (keep->ne[0] < n_keep) return fail(OBC_CUDA_EINVAL, "obc_cuda_select_keep: keep holds fewer than n_keep slots");
    if (H > 65535 || n_used > INT32_MAX - 4 * KT) return fail(OBC_CUDA_EINVAL, "obc_cuda_select_keep: dimensions too large");
    if (n_used == 0 || H == 0) return OBC_CUDA_OK;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);

    int lo = 0, hi = 0, n_pick = 0;
    if (n_used > budget) {
        const int32_t ns = std::min(n_sink, budget);
        const int32_t nr = std::min(n_recent, budget - ns);
        lo = ns;
        hi = n_used - nr;
        n_pick = budget - ns - nr;
        const size_t need = obc_cuda_select_keep_work_size(n_used, (int32_t) H);
        if (!work || work_size < need || !aligned_to(work, 4))
            return fail(OBC_CUDA_EWORK, "obc_cuda_select_keep: the workspace must hold " + std::to_string(need) + " bytes");
        if (n_pick > 0) {
            const dim3 grid((hi - lo + 255) / 256, (unsigned) H);
            pool_keys_kernel<<<grid, 256, 0, s>>>(static_cast<const char *>(scores->data), (int64_t) scores->nb[1], n_used,
                                                  lo, hi, pooling, kernel, static_cast<uint32_t *>(work));
            if (int rc = check_launch("obc_cuda_select_keep (pool)")) return rc;
        }
    }
    select_kernel<<<(unsigned) H, KT, 0, s>>>(static_cast<const uint32_t *>(work), n_used, budget, lo, hi, n_pick,
                                              static_cast<int32_t *>(keep->data), (int64_t) (keep->nb[1] / 4));
    return check_launch("obc_cuda_select_keep");
}
