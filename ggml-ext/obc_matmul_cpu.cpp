// obc_mul_mat (obc_ops.h): a CPU matrix product for Q6_K weights that unpacks each weight row once
// and reuses it across many activation columns.
//
// Why: Qwen2.5's Q4_K_M files keep ffn_down and attn_v in Q6_K, which ggml 0.20.2 multiplies on x86
// one (row, column) dot product at a time (ggml_vec_dot_q6_K_q8_K), re-extracting the 6-bit values
// of a row for every column. That was 18% of a Qwen prefill (bench/results/profile_prefill_*); the
// Q4_K tensors are repacked and run ggml's GEMM already.
//
// How: two chained custom ops, because a custom op has no barrier between its threads.
//   1. The activations x (F32 [K, N]) are quantized to Q8_K with the CPU type traits' from_float,
//      which is what ggml_mul_mat does with them, into a Q8_K tensor [K, N]. Threads take rows.
//   2. Each thread takes a contiguous range of weight rows. For each tile of kColumnTile columns
//      (whose Q8_K rows then stay in L2), it unpacks one weight row into a scratch row (a byte
//      0..63 per weight, i.e. q + 32; per 32-value chunk the int16 vector of its two sub-block
//      scales; per block its 16 scales and d), then takes the tile's columns four at a time:
//      per chunk, maddubs(weights, x) gives 16 pair sums and madd with the scale vector 8 int32
//      partial sums; the +32 of the stored weights is taken back per block as
//      32 * sum_g scale_g * bsum_g from Q8_K's sub-block sums; each block's integer sum is scaled by
//      d_w * d_x and accumulated in fp32.
// The integer sums are exact and equal to ggml's; only the order of the fp32 accumulation over
// blocks differs, so the result matches ggml_mul_mat to float rounding. Each output element is
// computed by one thread in a fixed order: results do not depend on the thread count.
//
// The path is taken only where it is faster than ggml's: x86 with AVX2/FMA/F16C (chosen at run
// time), Q6_K weights in plain host memory (not a repacked or device buffer), an F32 activation
// matrix of at least kMinColumns columns. Otherwise obc_mul_mat is ggml_mul_mat. OBC_TILED_MATMUL=0
// in the environment (read when a graph is built) turns it off, for comparisons.

#include "obc_cpu_isa.h"
#include "obc_ops.h"

#include <ggml-backend.h>
#include <ggml-cpu.h>
#include <ggml.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if OBC_X86_DISPATCH
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace {

constexpr int kQK = 256;          // values per K-quant block
constexpr int kMinColumns = 8;    // below this ggml's dot products are faster (decode is one column)
constexpr int kColumnTile = 32;   // columns per tile: 32 Q8_K rows of 8960 values are 327 KiB
constexpr int kColsPerKernel = 4;

// The blocks as ggml lays them out (ggml-common.h); obc_mul_mat checks the sizes against
// ggml_type_size before it takes this path.
struct block_q6k {
    uint8_t ql[kQK / 2];      // low 4 bits of each value
    uint8_t qh[kQK / 4];      // high 2 bits
    int8_t scales[kQK / 16];  // one per sub-block of 16 values
    uint16_t d;               // fp16 block scale
};
struct block_q8k {
    float d;
    int8_t qs[kQK];
    int16_t bsums[kQK / 16];  // sum of each sub-block of 16 values
};
struct block_q4k {
    uint16_t d;               // fp16 scale of the scales
    uint16_t dmin;            // fp16 scale of the mins
    uint8_t scales[12];       // 8 6-bit scales and 8 6-bit mins
    uint8_t qs[kQK / 2];      // 4-bit values
};
static_assert(sizeof(block_q6k) == 210, "block_q6k layout");
static_assert(sizeof(block_q4k) == 144, "block_q4k layout");
static_assert(sizeof(block_q8k) == 292, "block_q8k layout");

#if OBC_X86_DISPATCH

bool tiled_matmul_enabled() {
    const char * v = getenv("OBC_TILED_MATMUL");
    return !(v && strcmp(v, "0") == 0);
}

void quantize_q8k_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const ggml_tensor * x = dst->src[0];
    const ggml_from_float_t quantize = ggml_get_type_traits_cpu(GGML_TYPE_Q8_K)->from_float;
    const int64_t K = x->ne[0], N = x->ne[1];
    for (int64_t c = ith; c < N; c += nth) {
        quantize(reinterpret_cast<const float *>(static_cast<const char *>(x->data) + c * x->nb[1]),
                 static_cast<char *>(dst->data) + c * dst->nb[1], K);
    }
}

// One weight row, unpacked (see the top of the file).
struct unpacked_row {
    std::vector<uint8_t> q;       // K unsigned values: Q6_K's q + 32 (0..63), Q4_K's q (0..15)
    std::vector<int16_t> chunk;   // per 32-value chunk: 8 x the scale of its first 16 values, 8 x its second
    std::vector<int16_t> corr;    // per block: the 16 weights of Q8_K's bsums in the correction term
    std::vector<float> d;         // per block: the scale of the integer sum
    std::vector<float> dcorr;     // per block: the scale of the correction (Q4_K's dmin; Q6_K folds it)
    explicit unpacked_row(int64_t n_blocks)
        : q(n_blocks * kQK), chunk(n_blocks * 8 * 16), corr(n_blocks * 16), d(n_blocks), dcorr(n_blocks) {}
};

OBC_TARGET_AVX2 OBC_INLINE void store_chunk_scales(int16_t * chunk, int16_t first, int16_t second) {
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(chunk), _mm256_set_m128i(_mm_set1_epi16(second), _mm_set1_epi16(first)));
}

// Q6_K: a block is 16 sub-blocks of 16 values with signed 8-bit scales; the stored values are
// q + 32, and the +32 comes back as 32 * sum_g scale_g * bsum_g, folded into the integer sum.
struct q6k_format {
    using block = block_q6k;
    static constexpr bool fold_correction = true;
    static constexpr ggml_type type = GGML_TYPE_Q6_K;

    OBC_TARGET_AVX2 static void unpack(const block * w, int64_t n_blocks, unpacked_row & r) {
        const __m256i low4 = _mm256_set1_epi8(0x0F);
        const __m256i bits45 = _mm256_set1_epi8(0x30);
        for (int64_t b = 0; b < n_blocks; ++b) {
            const block & B = w[b];
            r.d[b] = _cvtsh_ss(B.d);
            for (int half = 0; half < 2; ++half) {
                // values 128*half + 32*c + l (c = 0..3, l = 0..31): low nibble of ql[l] (c = 0), of
                // ql[32 + l] (c = 1), high nibbles of the same (c = 2, 3); high bits 2c, 2c+1 of qh[l]
                const __m256i la = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(B.ql + 64 * half));
                const __m256i lb = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(B.ql + 64 * half + 32));
                const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(B.qh + 32 * half));
                uint8_t * out = r.q.data() + b * kQK + 128 * half;
                const __m256i v0 = _mm256_or_si256(_mm256_and_si256(la, low4), _mm256_and_si256(_mm256_slli_epi16(h, 4), bits45));
                const __m256i v1 = _mm256_or_si256(_mm256_and_si256(lb, low4), _mm256_and_si256(_mm256_slli_epi16(h, 2), bits45));
                const __m256i v2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(la, 4), low4), _mm256_and_si256(h, bits45));
                const __m256i v3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lb, 4), low4),
                                                   _mm256_and_si256(_mm256_srli_epi16(h, 2), bits45));
                _mm256_storeu_si256(reinterpret_cast<__m256i *>(out), v0);
                _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + 32), v1);
                _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + 64), v2);
                _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + 96), v3);
            }
            int16_t * corr = r.corr.data() + b * 16;
            for (int g = 0; g < 16; ++g) corr[g] = B.scales[g];
            for (int c = 0; c < 8; ++c) store_chunk_scales(r.chunk.data() + (b * 8 + c) * 16, corr[2 * c], corr[2 * c + 1]);
        }
    }
};

// Q4_K: a block is 8 sub-blocks of 32 values, value = d * scale_s * q - dmin * min_s with 6-bit
// scales and mins packed in 12 bytes; the mins come back as dmin * sum_s min_s * (bsum_2s + bsum_2s+1).
struct q4k_format {
    using block = block_q4k;
    static constexpr bool fold_correction = false;
    static constexpr ggml_type type = GGML_TYPE_Q4_K;

    OBC_TARGET_AVX2 static void unpack(const block * w, int64_t n_blocks, unpacked_row & r) {
        const __m256i low4 = _mm256_set1_epi8(0x0F);
        for (int64_t b = 0; b < n_blocks; ++b) {
            const block & B = w[b];
            r.d[b] = _cvtsh_ss(B.d);
            r.dcorr[b] = _cvtsh_ss(B.dmin);
            for (int g = 0; g < 4; ++g) {
                // qs[32 g + l]: value 64 g + l in its low nibble, 64 g + 32 + l in its high nibble
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(B.qs + 32 * g));
                uint8_t * out = r.q.data() + b * kQK + 64 * g;
                _mm256_storeu_si256(reinterpret_cast<__m256i *>(out), _mm256_and_si256(v, low4));
                _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
            }
            const uint8_t * sc = B.scales;
            int16_t * corr = r.corr.data() + b * 16;
            for (int s = 0; s < 8; ++s) {
                const int scale = s < 4 ? sc[s] & 63 : (sc[s + 4] & 0xF) | ((sc[s - 4] >> 6) << 4);
                const int min = s < 4 ? sc[s + 4] & 63 : (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
                store_chunk_scales(r.chunk.data() + (b * 8 + s) * 16, (int16_t) scale, (int16_t) scale);
                corr[2 * s] = corr[2 * s + 1] = (int16_t) min;
            }
        }
    }
};

OBC_TARGET_AVX2 OBC_INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// out[j] = dot(row, column j) for NC columns x[0..NC).
template <int NC, bool Fold>
OBC_TARGET_AVX2 OBC_INLINE void dot_columns_avx2(const unpacked_row & r, int64_t n_blocks, const block_q8k * const * x,
                                                 float * out) {
    __m256 acc[NC];
    for (int j = 0; j < NC; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
        const uint8_t * wq = r.q.data() + b * kQK;
        const int16_t * chunk = r.chunk.data() + b * 8 * 16;
        __m256i isum[NC];
        for (int j = 0; j < NC; ++j) isum[j] = _mm256_setzero_si256();
        for (int c = 0; c < 8; ++c) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(wq + 32 * c));
            const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(chunk + 16 * c));
            for (int j = 0; j < NC; ++j) {
                const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x[j][b].qs + 32 * c));
                // 0..63 times -128..127, pairs summed: |sum| <= 16002, no int16 saturation
                isum[j] = _mm256_add_epi32(isum[j], _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), s));
            }
        }
        const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(r.corr.data() + b * 16));
        for (int j = 0; j < NC; ++j) {
            const __m256i bs = _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(x[j][b].bsums)), corr);
            if (Fold) {
                isum[j] = _mm256_sub_epi32(isum[j], _mm256_slli_epi32(bs, 5));
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(r.d[b] * x[j][b].d), _mm256_cvtepi32_ps(isum[j]), acc[j]);
            } else {
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(r.d[b] * x[j][b].d), _mm256_cvtepi32_ps(isum[j]), acc[j]);
                acc[j] = _mm256_fnmadd_ps(_mm256_set1_ps(r.dcorr[b] * x[j][b].d), _mm256_cvtepi32_ps(bs), acc[j]);
            }
        }
    }
    for (int j = 0; j < NC; ++j) out[j] = hsum(acc[j]);
}

// Q4_K for a few columns (decode): each block is read straight into registers, its scales and mins
// decoded with shifts and masks of the 12 bytes, the scale of each 32-value chunk broadcast with one
// byte shuffle; no staging row, whose stores and reloads would cost more than one column saves.
alignas(32) const uint8_t kScaleShuffle[8][32] = {
#define OBC_PAIR(c) 2 * c, 2 * c + 1
#define OBC_ROW(c) {OBC_PAIR(c), OBC_PAIR(c), OBC_PAIR(c), OBC_PAIR(c), OBC_PAIR(c), OBC_PAIR(c), OBC_PAIR(c), OBC_PAIR(c), \
                    OBC_PAIR(c), OBC_PAIR(c), OBC_PAIR(c), OBC_PAIR(c), OBC_PAIR(c), OBC_PAIR(c), OBC_PAIR(c), OBC_PAIR(c)}
    OBC_ROW(0), OBC_ROW(1), OBC_ROW(2), OBC_ROW(3), OBC_ROW(4), OBC_ROW(5), OBC_ROW(6), OBC_ROW(7)
#undef OBC_ROW
#undef OBC_PAIR
};

template <int NC>
OBC_TARGET_AVX2 OBC_INLINE void q4k_dot_direct_avx2(const block_q4k * w, int64_t n_blocks, const block_q8k * const * x,
                                                    float * out) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 acc[NC];
    __m128 acc_min[NC];
    for (int j = 0; j < NC; ++j) {
        acc[j] = _mm256_setzero_ps();
        acc_min[j] = _mm_setzero_ps();
    }
    for (int64_t b = 0; b < n_blocks; ++b) {
        const block_q4k & B = w[b];
        // bytes 0..3: scales 0..3 (+ high bits of scales 4..7); 4..7: mins 0..3 (+ high bits of
        // mins 4..7); 8..11: low nibbles of scales 4..7, high nibbles of mins 4..7
        uint32_t a[3];
        memcpy(a, B.scales, sizeof(a));
        const uint64_t scales = (uint64_t) (a[0] & 0x3f3f3f3fu) |
                                (uint64_t) ((a[2] & 0x0f0f0f0fu) | ((a[0] >> 2) & 0x30303030u)) << 32;
        const uint64_t mins = (uint64_t) (a[1] & 0x3f3f3f3fu) |
                              (uint64_t) (((a[2] >> 4) & 0x0f0f0f0fu) | ((a[1] >> 2) & 0x30303030u)) << 32;
        const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long) scales)));
        const __m128i mn = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long) mins));
        __m256i isum[NC];
        for (int j = 0; j < NC; ++j) isum[j] = _mm256_setzero_si256();
        for (int g = 0; g < 4; ++g) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(B.qs + 32 * g));
            const __m256i lo = _mm256_and_si256(v, low4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            const __m256i s_lo = _mm256_shuffle_epi8(sc, _mm256_load_si256(reinterpret_cast<const __m256i *>(kScaleShuffle[2 * g])));
            const __m256i s_hi = _mm256_shuffle_epi8(sc, _mm256_load_si256(reinterpret_cast<const __m256i *>(kScaleShuffle[2 * g + 1])));
            for (int j = 0; j < NC; ++j) {
                const __m256i x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x[j][b].qs + 64 * g));
                const __m256i x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x[j][b].qs + 64 * g + 32));
                isum[j] = _mm256_add_epi32(isum[j], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x_lo), s_lo));
                isum[j] = _mm256_add_epi32(isum[j], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x_hi), s_hi));
            }
        }
        const float dw = _cvtsh_ss(B.d), dmin = _cvtsh_ss(B.dmin);
        for (int j = 0; j < NC; ++j) {
            const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x[j][b].bsums));
            // sums of each 32 values' two bsums, times the mins
            const __m128i pairs = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x[j][b].d), _mm256_cvtepi32_ps(isum[j]), acc[j]);
            acc_min[j] = _mm_fmadd_ps(_mm_set1_ps(dmin * x[j][b].d), _mm_cvtepi32_ps(_mm_madd_epi16(pairs, mn)), acc_min[j]);
        }
    }
    for (int j = 0; j < NC; ++j) {
        __m128 m = _mm_add_ps(acc_min[j], _mm_movehl_ps(acc_min[j], acc_min[j]));
        m = _mm_add_ss(m, _mm_movehdup_ps(m));
        out[j] = hsum(acc[j]) - _mm_cvtss_f32(m);
    }
}

OBC_TARGET_AVX2 void q4k_few_columns_avx2(ggml_tensor * dst, int64_t r0, int64_t r1) {
    const ggml_tensor * w = dst->src[0];
    const ggml_tensor * xq = dst->src[1];
    const int64_t n_blocks = w->ne[0] / kQK;
    const int64_t N = xq->ne[1];
    const block_q8k * cols[kColsPerKernel];
    float out[kColsPerKernel];
    for (int64_t r = r0; r < r1; ++r) {
        const block_q4k * row = reinterpret_cast<const block_q4k *>(static_cast<const char *>(w->data) + r * w->nb[1]);
        for (int64_t c = 0; c < N; c += kColsPerKernel) {
            const int nc = (int) std::min<int64_t>(kColsPerKernel, N - c);
            for (int j = 0; j < nc; ++j)
                cols[j] = reinterpret_cast<const block_q8k *>(static_cast<const char *>(xq->data) + (c + j) * xq->nb[1]);
            switch (nc) {
                case 4: q4k_dot_direct_avx2<4>(row, n_blocks, cols, out); break;
                case 3: q4k_dot_direct_avx2<3>(row, n_blocks, cols, out); break;
                case 2: q4k_dot_direct_avx2<2>(row, n_blocks, cols, out); break;
                default: q4k_dot_direct_avx2<1>(row, n_blocks, cols, out); break;
            }
            for (int j = 0; j < nc; ++j)
                *reinterpret_cast<float *>(static_cast<char *>(dst->data) + (c + j) * dst->nb[1] + r * dst->nb[0]) = out[j];
        }
    }
}

template <typename F>
OBC_TARGET_AVX2 void matmul_rows_avx2(ggml_tensor * dst, int64_t r0, int64_t r1) {
    const ggml_tensor * w = dst->src[0];
    const ggml_tensor * xq = dst->src[1];
    const int64_t n_blocks = w->ne[0] / kQK;
    const int64_t N = xq->ne[1];
    unpacked_row row(n_blocks);
    const block_q8k * cols[kColsPerKernel];
    float out[kColsPerKernel];
    for (int64_t c0 = 0; c0 < N; c0 += kColumnTile) {
        const int64_t c1 = std::min<int64_t>(N, c0 + kColumnTile);
        for (int64_t r = r0; r < r1; ++r) {
            F::unpack(reinterpret_cast<const typename F::block *>(static_cast<const char *>(w->data) + r * w->nb[1]),
                      n_blocks, row);
            for (int64_t c = c0; c < c1; c += kColsPerKernel) {
                const int nc = (int) std::min<int64_t>(kColsPerKernel, c1 - c);
                for (int j = 0; j < nc; ++j)
                    cols[j] = reinterpret_cast<const block_q8k *>(static_cast<const char *>(xq->data) + (c + j) * xq->nb[1]);
                switch (nc) {
                    case 4: dot_columns_avx2<4, F::fold_correction>(row, n_blocks, cols, out); break;
                    case 3: dot_columns_avx2<3, F::fold_correction>(row, n_blocks, cols, out); break;
                    case 2: dot_columns_avx2<2, F::fold_correction>(row, n_blocks, cols, out); break;
                    default: dot_columns_avx2<1, F::fold_correction>(row, n_blocks, cols, out); break;
                }
                for (int j = 0; j < nc; ++j)
                    *reinterpret_cast<float *>(static_cast<char *>(dst->data) + (c + j) * dst->nb[1] + r * dst->nb[0]) = out[j];
            }
        }
    }
}

template <typename F>
void matmul_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const int64_t M = dst->src[0]->ne[1];
    const int64_t r0 = M * ith / nth, r1 = M * (ith + 1) / nth;
    if (F::type == GGML_TYPE_Q4_K && dst->src[1]->ne[1] < kMinColumns) {
        q4k_few_columns_avx2(dst, r0, r1);
    } else {
        matmul_rows_avx2<F>(dst, r0, r1);
    }
}

#endif  // OBC_X86_DISPATCH

// The kernel's weight types, with the block size this file assumes for each.
bool kernel_type(ggml_type t) {
    return (t == GGML_TYPE_Q6_K && ggml_type_size(t) == sizeof(block_q6k)) ||
           (t == GGML_TYPE_Q4_K && ggml_type_size(t) == sizeof(block_q4k));
}

bool kernel_runs_here() {
#if OBC_X86_DISPATCH
    return ggml_type_size(GGML_TYPE_Q8_K) == sizeof(block_q8k) && ggml_get_type_traits_cpu(GGML_TYPE_Q8_K)->from_float &&
           obc_use_avx2() && tiled_matmul_enabled();
#else
    return false;
#endif
}

bool takes_tiled_path(const ggml_tensor * w, const ggml_tensor * x) {
    return kernel_type(w->type) && x->type == GGML_TYPE_F32 && w->buffer && ggml_backend_buffer_is_host(w->buffer) &&
           w->extra == nullptr && w->data != nullptr && ggml_n_dims(w) <= 2 && w->nb[0] == ggml_type_size(w->type) &&
           w->ne[0] % kQK == 0 && x->ne[0] == w->ne[0] && (x->ne[1] >= kMinColumns || w->type == GGML_TYPE_Q4_K) &&
           x->ne[2] == 1 && x->ne[3] == 1 &&
           x->nb[0] == sizeof(float) && kernel_runs_here();
}

}  // namespace

extern "C" struct ggml_tensor * obc_mul_mat(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * x) {
    if (takes_tiled_path(w, x)) {
#if OBC_X86_DISPATCH
        ggml_tensor * args1[] = {x};
        ggml_tensor * xq = ggml_custom_4d(ctx, GGML_TYPE_Q8_K, x->ne[0], x->ne[1], 1, 1, args1, 1, quantize_q8k_op,
                                          GGML_N_TASKS_MAX, nullptr);
        ggml_tensor * args2[] = {w, xq};
        return ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], x->ne[1], 1, 1, args2, 2,
                              w->type == GGML_TYPE_Q6_K ? matmul_op<q6k_format> : matmul_op<q4k_format>,
                              GGML_N_TASKS_MAX, nullptr);
#endif
    }
    return ggml_mul_mat(ctx, w, x);
}

extern "C" bool obc_mul_mat_has_kernel(enum ggml_type type) { return kernel_type(type) && kernel_runs_here(); }
