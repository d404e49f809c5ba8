// The CPU implementation of the selection in obc_ops.h: pooling and the top-k of the heads'
// scores, with one budget split for uniform and head-wise budgets. Its CUDA twin is
// obc_cuda_select_keep (obc_ops_cuda.cu); both give the same indices.
#include "obc_ops.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

// The budget split of one head when n_used > budget: slots [0, n_sink) and [hi, n_used) are always
// kept, and n_pick of the candidates [n_sink, hi) by score.
struct Split {
    int32_t n_sink, hi, n_pick;
};

Split split_budget(int32_t n_used, int32_t budget, int32_t n_sink, int32_t n_recent) {
    n_sink = std::min(n_sink, budget);
    n_recent = std::min(n_recent, budget - n_sink);
    return {n_sink, n_used - n_recent, budget - n_sink - n_recent};
}

bool bad_counts(int32_t n_used, int32_t budget, int32_t n_sink, int32_t n_recent, int32_t pooling) {
    return n_used < 0 || budget < 0 || n_sink < 0 || n_recent < 0 || pooling < OBC_POOL_NONE || pooling > OBC_POOL_AVG;
}

// The sinks, the picks (sorted, all candidates) and the recent tokens, in slot order, to keep.
int32_t write_kept(const Split & sp, int32_t n_used, const int32_t * picks, int32_t n_picks, int32_t * keep) {
    int32_t n = 0;
    for (int32_t i = 0; i < sp.n_sink; ++i) keep[n++] = i;
    for (int32_t i = 0; i < n_picks; ++i) keep[n++] = picks[i];
    for (int32_t i = sp.hi; i < n_used; ++i) keep[n++] = i;
    return n;
}

}  // namespace

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
    if (bad_counts(n_used, budget, n_sink, n_recent, pooling)) return -1;
    if (n_used <= budget) {
        std::iota(keep, keep + n_used, 0);
        return n_used;
    }
    const Split sp = split_budget(n_used, budget, n_sink, n_recent);
    // Pooling runs over the slots before the protected recent tokens only, so that candidates next
    // to the recent window do not inherit its large scores.
    std::vector<float> pooled(sp.hi);
    obc_pool_scores_host(scores, sp.hi, pooling, kernel, pooled.data());
    std::vector<int32_t> cand(sp.hi - sp.n_sink);
    std::iota(cand.begin(), cand.end(), sp.n_sink);
    auto better = [&](int32_t a, int32_t b) { return pooled[a] > pooled[b] || (pooled[a] == pooled[b] && a < b); };
    std::nth_element(cand.begin(), cand.begin() + sp.n_pick, cand.end(), better);
    std::sort(cand.begin(), cand.begin() + sp.n_pick);
    return write_kept(sp, n_used, cand.data(), sp.n_pick, keep);
}

extern "C" int32_t obc_select_keep_adaptive_host(const float * const * scores, int32_t n_heads, int32_t n_used,
                                                 int32_t budget, int32_t n_sink, int32_t n_recent, int32_t pooling,
                                                 int32_t kernel, float head_floor, int32_t * keep, int32_t * n_kept) {
    if (n_heads <= 0 || bad_counts(n_used, budget, n_sink, n_recent, pooling) || !(head_floor >= 0.0f && head_floor <= 1.0f))
        return -1;
    const size_t row = (size_t) n_used;   // a head may keep more than budget slots: the others' share
    if (n_used <= budget) {
        for (int h = 0; h < n_heads; ++h) {
            std::iota(keep + h * row, keep + h * row + n_used, 0);
            n_kept[h] = n_used;
        }
        return 0;
    }
    const Split sp = split_budget(n_used, budget, n_sink, n_recent);
    const int32_t floor_picks = std::min(sp.n_pick, (int32_t) std::floor(head_floor * (float) sp.n_pick));
    struct Cand {
        float s;
        int h;
        int32_t j;
    };
    auto better = [](const Cand & a, const Cand & b) {
        return a.s > b.s || (a.s == b.s && (a.h < b.h || (a.h == b.h && a.j < b.j)));
    };
    std::vector<Cand> rest;
    std::vector<std::vector<int32_t>> picked(n_heads);
    std::vector<float> pooled(sp.hi);
    for (int h = 0; h < n_heads; ++h) {
        obc_pool_scores_host(scores[h], sp.hi, pooling, kernel, pooled.data());
        std::vector<Cand> c;
        c.reserve(sp.hi - sp.n_sink);
        for (int32_t j = sp.n_sink; j < sp.hi; ++j) c.push_back({pooled[j], h, j});
        std::sort(c.begin(), c.end(), better);
        for (int32_t i = 0; i < (int32_t) c.size(); ++i) {
            if (i < floor_picks) picked[h].push_back(c[i].j);
            else rest.push_back(c[i]);
        }
    }
    const size_t n_rest = (size_t) n_heads * (sp.n_pick - floor_picks);
    if (rest.size() > n_rest) {
        std::nth_element(rest.begin(), rest.begin() + n_rest, rest.end(), better);
        rest.resize(n_rest);
    }
    for (const Cand & c : rest) picked[c.h].push_back(c.j);
    for (int h = 0; h < n_heads; ++h) {
        std::sort(picked[h].begin(), picked[h].end());
        n_kept[h] = write_kept(sp, n_used, picked[h].data(), (int32_t) picked[h].size(), keep + h * row);
    }
    return 0;
}
