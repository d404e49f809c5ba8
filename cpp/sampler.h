// Token sampling as a chain of stages the caller orders, as llama.cpp's llama_sampler_chain:
// repetition penalties, top-k, top-p, min-p and temperature narrow or reshape the candidates, and
// a final greedy or seeded-draw stage picks one. SamplerParams builds the default chain.
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

enum class StageKind { penalties, top_k, top_p, min_p, temp, greedy, dist };

struct SamplerStage {
    StageKind kind;
    float value = 0.0f;       // top_p / min_p: the cut; temp: the temperature; penalties: the penalty
    int32_t n = 0;            // top_k: k; penalties: the tokens of history looked at
    uint64_t seed = 0;        // dist
};
// Each checks its values (std::invalid_argument naming the parameter).
SamplerStage stage_penalties(int32_t last_n, float repeat_penalty);   // last_n >= 0, penalty > 0; 1: off
SamplerStage stage_top_k(int32_t k);        // k >= 0; 0: off
SamplerStage stage_top_p(float p);          // (0, 1]; 1: off
SamplerStage stage_min_p(float p);          // [0, 1]; 0: off
SamplerStage stage_temp(float t);           // finite; <= 0 keeps only the most likely token
SamplerStage stage_greedy();
SamplerStage stage_dist(uint64_t seed);     // 0xFFFFFFFF: seeded from the clock

class Sampler {
public:
    Sampler() = default;                          // an empty chain: add stages, ending with greedy or dist
    explicit Sampler(const SamplerParams & p);    // penalties, then greedy, or top-k, top-p, min-p, temp, dist
    // Appends a stage; nothing may follow greedy or dist (std::logic_error).
    void add(const SamplerStage & s);
    // Picks the next token from raw logits (n_vocab floats). Does not record it: call accept().
    int32_t sample(const float * logits, int32_t n_vocab);
    void accept(int32_t token);
    // Forgets the history and reseeds the draw.
    void reset();
    const std::vector<SamplerStage> & stages() const { return stages_; }

private:
    struct Candidate { int32_t id; float logit; float p; };
    static bool by_logit(const Candidate & a, const Candidate & b);
    void sort();
    void softmax();
    std::vector<SamplerStage> stages_;
    std::mt19937_64 rng_;
    std::deque<int32_t> history_;
    int32_t history_n_ = 0;      // the longest history a penalties stage looks at
    std::vector<Candidate> cand_;
    bool sorted_ = false;
    float temp_ = 1.0f;          // the temperature the stages so far applied
};

}  // namespace obc
