#include "sampler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>
#include <unordered_set>

namespace obc {

namespace {

std::string num(float v) { return std::to_string(v); }

constexpr uint64_t kClockSeed = 0xFFFFFFFFull;

}  // namespace

// The candidates' order: higher logit first, ties to the lower id.
bool Sampler::by_logit(const Candidate & a, const Candidate & b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

// Written so that NaN fails every check: a NaN temperature or cut-off passed the old comparisons
// and silently changed the draws.
SamplerStage stage_penalties(int32_t last_n, float repeat_penalty) {
    if (last_n < 0) throw std::invalid_argument("repeat_last_n must be >= 0, got " + std::to_string(last_n));
    if (!(repeat_penalty > 0.0f && std::isfinite(repeat_penalty)))
        throw std::invalid_argument("repeat_penalty must be a positive finite number, got " + num(repeat_penalty));
    return {StageKind::penalties, repeat_penalty, last_n, 0};
}

SamplerStage stage_top_k(int32_t k) {
    if (k < 0) throw std::invalid_argument("top_k must be >= 0 (0 = off), got " + std::to_string(k));
    return {StageKind::top_k, 0.0f, k, 0};
}

SamplerStage stage_top_p(float p) {
    if (!(p > 0.0f && p <= 1.0f)) throw std::invalid_argument("top_p must be in (0, 1], got " + num(p));
    return {StageKind::top_p, p, 0, 0};
}

SamplerStage stage_min_p(float p) {
    if (!(p >= 0.0f && p <= 1.0f)) throw std::invalid_argument("min_p must be in [0, 1], got " + num(p));
    return {StageKind::min_p, p, 0, 0};
}

SamplerStage stage_temp(float t) {
    if (!std::isfinite(t)) throw std::invalid_argument("temperature must be a finite number, got " + num(t));
    return {StageKind::temp, t, 0, 0};
}

SamplerStage stage_greedy() { return {StageKind::greedy, 0.0f, 0, 0}; }

SamplerStage stage_dist(uint64_t seed) { return {StageKind::dist, 0.0f, 0, seed}; }

void validate(const SamplerParams & p) {
    stage_temp(p.temperature);
    stage_top_k(p.top_k);
    stage_top_p(p.top_p);
    stage_min_p(p.min_p);
    stage_penalties(p.repeat_last_n, p.repeat_penalty);
}

Sampler::Sampler(const SamplerParams & p) {
    validate(p);
    add(stage_penalties(p.repeat_last_n, p.repeat_penalty));
    if (p.temperature <= 0.0f) {
        add(stage_greedy());
        return;
    }
    // Probabilities at temperature 1 decide the top-p / min-p cut, as in llama.cpp's default chain.
    add(stage_top_k(p.top_k));
    add(stage_top_p(p.top_p));
    add(stage_min_p(p.min_p));
    add(stage_temp(p.temperature));
    add(stage_dist(p.seed));
}

void Sampler::add(const SamplerStage & s) {
    if (!stages_.empty() && (stages_.back().kind == StageKind::greedy || stages_.back().kind == StageKind::dist))
        throw std::logic_error("the sampler chain already ends with a greedy or dist stage, which picks the token");
    stages_.push_back(s);
    if (s.kind == StageKind::penalties) history_n_ = std::max(history_n_, s.n);
    if (s.kind == StageKind::dist) reset();
}

void Sampler::reset() {
    uint64_t seed = kClockSeed;
    for (const auto & s : stages_)
        if (s.kind == StageKind::dist) seed = s.seed;
    rng_.seed(seed == kClockSeed ? (uint64_t) std::chrono::high_resolution_clock::now().time_since_epoch().count() : seed);
    history_.clear();
}

void Sampler::accept(int32_t token) {
    if (history_n_ == 0) return;
    history_.push_back(token);
    while ((int32_t) history_.size() > history_n_) history_.pop_front();
}

void Sampler::sort() {
    if (sorted_) return;
    std::sort(cand_.begin(), cand_.end(), by_logit);
    sorted_ = true;
}

void Sampler::softmax() {
    sort();
    const float mx = cand_[0].logit;
    double sum = 0.0;
    for (auto & c : cand_) {
        c.p = std::exp((c.logit - mx) / temp_);
        sum += c.p;
    }
    for (auto & c : cand_) c.p = (float) (c.p / sum);
}

int32_t Sampler::sample(const float * logits, int32_t n_vocab) {
    if (stages_.empty() || (stages_.back().kind != StageKind::greedy && stages_.back().kind != StageKind::dist))
        throw std::logic_error("the sampler chain does not end with a greedy or dist stage to pick the token");
    cand_.resize(n_vocab);
    for (int32_t i = 0; i < n_vocab; ++i) cand_[i] = {i, logits[i], 0.0f};
    sorted_ = false;
    temp_ = 1.0f;
    for (const SamplerStage & s : stages_) {
        switch (s.kind) {
            case StageKind::penalties: {
                if (s.value == 1.0f || history_.empty()) break;
                // The last s.n accepted tokens (the history holds the longest any stage wants).
                const size_t from = history_.size() - std::min(history_.size(), (size_t) s.n);
                std::unordered_set<int32_t> seen(history_.begin() + (std::ptrdiff_t) from, history_.end());
                for (auto & c : cand_)
                    if (seen.count(c.id)) c.logit = c.logit > 0 ? c.logit / s.value : c.logit * s.value;
                sorted_ = false;
                break;
            }
            case StageKind::top_k: {
                if (s.n == 0) break;
                const size_t n = std::min(cand_.size(), (size_t) s.n);
                if (!sorted_) std::partial_sort(cand_.begin(), cand_.begin() + n, cand_.end(), by_logit);
                cand_.resize(n);
                sorted_ = true;
                break;
            }
            case StageKind::top_p: {
                if (s.value >= 1.0f) break;
                softmax();
                double cum = 0.0;
                size_t keep = cand_.size();
                for (size_t i = 0; i < cand_.size(); ++i) {
                    cum += cand_[i].p;
                    if (cum >= s.value) {
                        keep = i + 1;
                        break;
                    }
                }
                cand_.resize(keep);
                break;
            }
            case StageKind::min_p: {
                if (s.value <= 0.0f) break;
                softmax();
                const float cut = cand_[0].p * s.value;
                size_t keep = 1;
                while (keep < cand_.size() && cand_[keep].p >= cut) ++keep;
                cand_.resize(keep);
                break;
            }
            case StageKind::temp:
                if (s.value <= 0.0f) {
                    sort();
                    cand_.resize(1);
                } else {
                    temp_ *= s.value;
                }
                break;
            case StageKind::greedy:
                return std::min_element(cand_.begin(), cand_.end(), by_logit)->id;
            case StageKind::dist: {
                softmax();
                std::uniform_real_distribution<double> u(0.0, 1.0);
                const double r = u(rng_);
                double cum = 0.0;
                for (const auto & c : cand_) {
                    cum += c.p;
                    if (r < cum) return c.id;
                }
                return cand_.back().id;
            }
        }
    }
    throw std::logic_error("unreachable: the chain's last stage picks");
}

}  // namespace obc
