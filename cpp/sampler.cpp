#include "sampler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>
#include <unordered_set>

namespace obc {

void validate(const SamplerParams & p) {
    // Written so that NaN fails every check: a NaN temperature or cut-off passed the old
    // comparisons and silently changed the draws.
    auto num = [](float v) { return std::to_string(v); };
    if (!std::isfinite(p.temperature)) throw std::invalid_argument("temperature must be a finite number, got " + num(p.temperature));
    if (p.top_k < 0) throw std::invalid_argument("top_k must be >= 0 (0 = off), got " + std::to_string(p.top_k));
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) throw std::invalid_argument("top_p must be in (0, 1], got " + num(p.top_p));
    if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) throw std::invalid_argument("min_p must be in [0, 1], got " + num(p.min_p));
    if (!(p.repeat_penalty > 0.0f && std::isfinite(p.repeat_penalty)))
        throw std::invalid_argument("repeat_penalty must be a positive finite number, got " + num(p.repeat_penalty));
    if (p.repeat_last_n < 0) throw std::invalid_argument("repeat_last_n must be >= 0, got " + std::to_string(p.repeat_last_n));
}

Sampler::Sampler(const SamplerParams & p) : p_(p) {
    validate(p_);
    reset();
}

void Sampler::reset() {
    const uint64_t seed = p_.seed == 0xFFFFFFFFull
                              ? (uint64_t) std::chrono::high_resolution_clock::now().time_since_epoch().count()
                              : p_.seed;
    rng_.seed(seed);
    history_.clear();
}

void Sampler::accept(int32_t token) {
    if (p_.repeat_last_n == 0) return;
    history_.push_back(token);
    while ((int32_t) history_.size() > p_.repeat_last_n) history_.pop_front();
}

int32_t Sampler::sample(const float * logits, int32_t n_vocab) {
    cand_.resize(n_vocab);
    for (int32_t i = 0; i < n_vocab; ++i) cand_[i] = {i, logits[i], 0.0f};

    if (p_.repeat_penalty != 1.0f && !history_.empty()) {
        std::unordered_set<int32_t> seen(history_.begin(), history_.end());
        for (int32_t id : seen) {
            if (id < 0 || id >= n_vocab) continue;
            float & l = cand_[id].logit;
            l = l > 0 ? l / p_.repeat_penalty : l * p_.repeat_penalty;
        }
    }

    auto by_logit = [](const Candidate & a, const Candidate & b) {
        return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
    };
    if (p_.temperature <= 0.0f) {
        return std::min_element(cand_.begin(), cand_.end(), by_logit)->id;
    }

    size_t n = cand_.size();
    if (p_.top_k > 0 && (size_t) p_.top_k < n) n = (size_t) p_.top_k;
    std::partial_sort(cand_.begin(), cand_.begin() + n, cand_.end(), by_logit);
    cand_.resize(n);

    // Probabilities at temperature 1 decide the top-p / min-p cut, as in llama.cpp's default chain.
    auto softmax = [&](float temp) {
        const float mx = cand_[0].logit;
        double sum = 0.0;
        for (auto & c : cand_) { c.p = std::exp((c.logit - mx) / temp); sum += c.p; }
        for (auto & c : cand_) c.p = (float) (c.p / sum);
    };
    softmax(1.0f);
    if (p_.top_p < 1.0f) {
        double cum = 0.0;
        size_t keep = cand_.size();
        for (size_t i = 0; i < cand_.size(); ++i) {
            cum += cand_[i].p;
            if (cum >= p_.top_p) { keep = i + 1; break; }
        }
        cand_.resize(keep);
    }
    if (p_.min_p > 0.0f) {
        const float cut = cand_[0].p * p_.min_p;
        size_t keep = 1;
        while (keep < cand_.size() && cand_[keep].p >= cut) ++keep;
        cand_.resize(keep);
    }
    softmax(p_.temperature);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    double r = u(rng_), cum = 0.0;
    for (const auto & c : cand_) {
        cum += c.p;
        if (r < cum) return c.id;
    }
    return cand_.back().id;
}

}  // namespace obc
