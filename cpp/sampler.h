// Token sampling: repetition penalty, top-k, top-p, min-p, temperature, seeded draw; greedy at temp <= 0.
#pragma once

#include <cstdint>
#include <deque>
#include <random>
#include <vector>

namespace obc {

struct SamplerParams {
    float temperature = 0.8f;    // <= 0: greedy
    int32_t top_k = 40;          // 0: off
    float top_p = 0.95f;         // >= 1: off
    float min_p = 0.05f;         // <= 0: off
    float repeat_penalty = 1.0f; // 1: off
    int32_t repeat_last_n = 64;  // tokens of history the penalty looks at
    uint64_t seed = 0xFFFFFFFFull;  // fixed seed: reproducible draws; default seeds from the clock
};

// Throws std::invalid_argument naming the first parameter out of range (NaN and inf included).
void validate(const SamplerParams & p);

class Sampler {
public:
    explicit Sampler(const SamplerParams & p);
    // Picks the next token from raw logits (n_vocab floats). Does not record it: call accept().
    int32_t sample(const float * logits, int32_t n_vocab);
    void accept(int32_t token);
    void reset();
    const SamplerParams & params() const { return p_; }

private:
    struct Candidate { int32_t id; float logit; float p; };
    SamplerParams p_;
    std::mt19937_64 rng_;
    std::deque<int32_t> history_;
    std::vector<Candidate> cand_;
};

}  // namespace obc
