// One prefill, many eviction configurations. Evaluating a method at a budget after prefill only
// needs the full-cache state and that method's scores, so a sweep prefills each prompt once with
// every distinct score accumulated side by side, keeps a host copy of the cache, and then
// restores and evicts for each (method, budget) instead of prefilling again.
#pragma once

#include "eviction.h"

#include <memory>
#include <vector>

namespace obc {

class ScoredSnapshot : public DecodeObserver {
public:
    // methods: resolved configurations (eviction after prefill) whose scores the prefill computes;
    // methods with the same score, window and group pooling share one pass.
    ScoredSnapshot(Context & ctx, const std::vector<KVConfig> & methods);

    void begin_prompt(int32_t n_prompt);
    int32_t before_ubatch(int32_t begin, int32_t n, int32_t n_total) override;
    void after_ubatch(const std::vector<std::vector<float>> & q, int32_t n_q) override;
    // Keeps the snapshot once the prompt has run.
    void after_decode(int32_t n_total) override;

    bool ready() const { return ready_; }
    // Puts the cache back as the prefill left it, then, for an enabled cfg (one of the methods
    // given, or any score-free one), evicts every (layer, head) to cfg's budget for this prompt.
    // Returns the tokens each head keeps.
    int32_t apply(const KVConfig & cfg);
    // The prefill's scores of cfg for one (layer, head), one per prompt token.
    std::vector<float> scores(const KVConfig & cfg, int il, int h) const;
    double score_ms() const { return score_ms_; }
    int32_t n_prompt() const { return n_prompt_; }

private:
    struct Entry {
        ScoreSpec spec;
        std::vector<float> s;     // [layer][head][capacity]
        int32_t n_now = 0;        // window queries of the current micro-batch
    };
    const Entry & entry_for(const KVConfig & cfg) const;

    Context & ctx_;
    CacheScorer scorer_;
    std::vector<Entry> entries_;
    KVCache::Snapshot snap_;
    int32_t n_prompt_ = 0, cap_ = 0;
    bool in_prompt_ = false, ready_ = false;
    double score_ms_ = 0;
};

}  // namespace obc
