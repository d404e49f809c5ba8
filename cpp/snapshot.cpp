#include "snapshot.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>

namespace obc {

namespace {

// One snapshot holds one cache layout: per KV head (gqa=native) or per query head (gqa=expand).
void check_heads(const KVCache & kv, const HParams & hp, const KVConfig & m) {
    if (!m.enabled()) return;
    const int32_t want = m.gqa == GqaMode::expand ? hp.n_head : hp.n_head_kv;
    if (kv.n_head_kv() != want)
        throw std::invalid_argument("'" + m.method + "' with gqa=" + (m.gqa == GqaMode::expand ? "expand" : "native") +
                                    " needs a cache of " + std::to_string(want) + " heads, the snapshot's has " +
                                    std::to_string(kv.n_head_kv()) + ": make one snapshot per gqa mode");
}

}  // namespace

ScoredSnapshot::ScoredSnapshot(Context & ctx, const std::vector<KVConfig> & methods)
    : ctx_(ctx), scorer_(ctx), cap_(ctx.kv().capacity()) {
    const KVCache & kv = ctx_.kv();
    for (const KVConfig & m : methods) {
        check_heads(kv, ctx_.model().hp, m);
        if (!m.enabled() || m.score == ScoreKind::none) continue;
        if (m.mode != EvictMode::prefill)
            throw std::invalid_argument("a snapshot evaluates eviction after prefill; '" + m.method +
                                        "' asks for another mode");
        const ScoreSpec spec = score_spec(m);
        if (std::none_of(entries_.begin(), entries_.end(), [&](const Entry & e) { return e.spec == spec; }))
            entries_.push_back({spec, std::vector<float>((size_t) kv.n_layer() * kv.n_head_kv() * cap_, 0.0f)});
    }
}

void ScoredSnapshot::begin_prompt(int32_t n_prompt) {
    if (ctx_.kv().n_used() != 0) throw std::logic_error("a scored snapshot starts from an empty cache");
    n_prompt_ = n_prompt;
    in_prompt_ = true;
    ready_ = false;
    for (Entry & e : entries_) std::fill(e.s.begin(), e.s.end(), 0.0f);
}

int32_t ScoredSnapshot::before_ubatch(int32_t begin, int32_t n, int32_t n_total) {
    if (!in_prompt_) return 0;
    int32_t n_q = 0;
    for (Entry & e : entries_) {
        e.n_now = window_queries(e.spec, begin, n, n_total);
        n_q = std::max(n_q, e.n_now);
    }
    return n_q;
}

void ScoredSnapshot::after_ubatch(const std::vector<std::vector<float>> & q, int32_t n_q) {
    if (!in_prompt_ || n_q <= 0) return;
    const auto t0 = std::chrono::steady_clock::now();
    const KVCache & kv = ctx_.kv();
    const int32_t n_past = kv.n_past(), n_kv = kv.n_used(), n_head_kv = kv.n_head_kv();
    for (Entry & e : entries_) {
        if (e.n_now <= 0) continue;
        std::vector<int32_t> pos(e.n_now);
        for (int32_t i = 0; i < e.n_now; ++i) pos[i] = n_past - e.n_now + i;
        const bool replace = e.spec.window == Window::latest;
        scorer_.score(e.spec, q, pos, [&](int il, int h, const float * o) {
            float * s = e.s.data() + ((size_t) il * n_head_kv + h) * cap_;
            if (replace) std::copy(o, o + n_kv, s);
            else for (int32_t j = 0; j < n_kv; ++j) s[j] += o[j];
        });
    }
    score_ms_ += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

void ScoredSnapshot::after_decode(int32_t /*n_total*/) {
    if (!in_prompt_) return;
    in_prompt_ = false;
    snap_ = ctx_.kv().snapshot();
    ready_ = true;
}

const ScoredSnapshot::Entry & ScoredSnapshot::entry_for(const KVConfig & cfg) const {
    const ScoreSpec spec = score_spec(cfg);
    for (const Entry & e : entries_)
        if (e.spec == spec) return e;
    throw std::invalid_argument("the prefill did not compute the scores of '" + cfg.method +
                                "': list it among the snapshot's methods");
}

int32_t ScoredSnapshot::apply(const KVConfig & cfg) {
    if (!ready_) throw std::logic_error("no snapshot yet: prefill the prompt first");
    KVCache & kv = ctx_.kv();
    check_heads(kv, ctx_.model().hp, cfg);
    kv.restore(snap_);
    if (!cfg.enabled()) return kv.n_used();
    if (cfg.mode != EvictMode::prefill)
        throw std::invalid_argument("a snapshot evaluates eviction after prefill, not in another mode");
    if (cfg.type_k != kv.type_k() || cfg.type_v != kv.type_v())
        throw std::invalid_argument(std::string("the snapshot's cache holds type_k=") + ggml_type_name(kv.type_k()) +
                                    " type_v=" + ggml_type_name(kv.type_v()) + "; the configuration asks for other types");
    const int32_t budget = kv_budget_for(cfg, n_prompt_);
    const int32_t n_used = kv.n_used();
    if (n_used <= budget) return n_used;
    const Entry * e = cfg.score == ScoreKind::none ? nullptr : &entry_for(cfg);
    const int n_head_kv = kv.n_head_kv();
    kv.compact(keep_lists(cfg, budget, n_used, kv.n_layer(), n_head_kv, [&](int il, int h) {
        return e->s.data() + ((size_t) il * n_head_kv + h) * cap_;
    }));
    return kv.n_used();
}

std::vector<float> ScoredSnapshot::scores(const KVConfig & cfg, int il, int h) const {
    const KVCache & kv = ctx_.kv();
    if (il < 0 || il >= kv.n_layer() || h < 0 || h >= kv.n_head_kv()) throw std::out_of_range("layer or head out of range");
    const float * s = entry_for(cfg).s.data() + ((size_t) il * kv.n_head_kv() + h) * cap_;
    return std::vector<float>(s, s + snap_.n_used);
}

}  // namespace obc
