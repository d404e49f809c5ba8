// The CPU implementation of the selection in obc_ops.h: pooling and the top-k of one head's
// scores. Its CUDA twin is obc_cuda_select_keep (obc_ops_cuda.cu); both give the same indices.
#include "obc_ops.h"

#include <algorithm>
#include <numeric>
#include <vector>

extern "C" void obc_pool_scores_host(const float * s, int32_t n, int32_t pooling, int32_t kernel, float * out) {
    if (pooling == OBC_POOL_NONE || kernel <= 1) {
        std::copy(s, s + n, out);
        return;
    }
    const int32_t r = kernel / 2;
    for (int32_t j = 0; j < n; ++j) {
        const int32_t lo = std::max(0, j - r), hi = std::min(n - 1, j + r);
        if (pooling == OBC_POOL_MAX) {
            float m = s[lo];
            for (int32_t t = lo + 1; t <= hi; ++t) m = std::max(m, s[t]);
            out[j] = m;
        } else {
            double acc = 0.0;   // zero padding counts, as avg_pool1d's default does
            for (int32_t t = lo; t <= hi; ++t) acc += s[t];
            out[j] = (float) (acc / kernel);
        }
    }
}

extern "C" int32_t obc_select_keep_host(const float * scores, int32_t n_used, int32_t budget, int32_t n_sink,
                                        int32_t n_recent, int32_t pooling, int32_t kernel, int32_t * keep) {
    if (n_used < 0 || budget < 0 || n_sink < 0 || n_recent < 0 || pooling < OBC_POOL_NONE || pooling > OBC_POOL_AVG)
        return -1;
    if (n_used <= budget) {
        std::iota(keep, keep + n_used, 0);
        return n_used;
    }
    n_sink = std::min(n_sink, budget);
    n_recent = std::min(n_recent, budget - n_sink);
    const int32_t hi = n_used - n_recent, n_pick = budget - n_sink - n_recent;
    // Pooling runs over the slots before the protected recent tokens only, so that candidates next
    // to the recent window do not inherit its large scores.
    std::vector<float> pooled(hi);
    obc_pool_scores_host(scores, hi, pooling, kernel, pooled.data());
    std::vector<int32_t> cand(hi - n_sink);
    std::iota(cand.begin(), cand.end(), n_sink);
    auto better = [&](int32_t a, int32_t b) { return pooled[a] > pooled[b] || (pooled[a] == pooled[b] && a < b); };
    std::nth_element(cand.begin(), cand.begin() + n_pick, cand.end(), better);
    std::sort(cand.begin(), cand.begin() + n_pick);
    int32_t n = 0;
    for (int32_t i = 0; i < n_sink; ++i) keep[n++] = i;
    for (int32_t i = 0; i < n_pick; ++i) keep[n++] = cand[i];
    for (int32_t i = hi; i < n_used; ++i) keep[n++] = i;
    return n;
}
