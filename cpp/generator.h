// The generation loop shared by the CLI, the C API and the Python bindings: prefill, then
// sample / decode one token at a time, streaming text that is complete UTF-8 and cannot still
// turn into a stop string.
#pragma once

#include "context.h"
#include "sampler.h"

#include <string>
#include <utility>
#include <vector>

namespace obc {

// What one generation may add when the caller does not say: the Python API, the C API and both
// CLIs take it from here.
inline constexpr int32_t kDefaultMaxNewTokens = 256;

struct GenerateParams {
    int32_t max_new_tokens = kDefaultMaxNewTokens;
    SamplerParams sampling;
    // The caller's own sampler chain, used in place (it records the prompt and the generated
    // tokens) for the generation's lifetime; null: a chain built from `sampling`.
    Sampler * sampler = nullptr;
    std::vector<std::string> stop;   // generation ends before the first occurrence of any of these
    bool ignore_eos = false;
    // >= 0: record each generated token's log-probability under the model (log-softmax of the raw
    // logits, before any sampling transform) and the n_logprobs most likely alternatives.
    int32_t n_logprobs = -1;
};

// The one check of a generation's parameters (max_new_tokens, stop strings, n_logprobs, and the
// sampling values unless the caller brings its own chain); throws std::invalid_argument. The
// Generator runs it, and a Request runs it before allocating anything.
void check_generate_params(const GenerateParams & gp, int32_t n_vocab);

struct TokenLogprob {
    float logprob = 0.0f;
    std::vector<std::pair<int32_t, float>> top;   // most likely first
};

class Generator;

// Told when a generation ends (its Generator is destroyed), so that a conversation knows which of
// the turn's tokens reached the cache.
class TurnListener {
public:
    virtual ~TurnListener() = default;
    virtual void turn_ended(Generator & g) = 0;
};

class Generator {
public:
    // The prompt is appended to whatever the context already holds.
    Generator(Context & ctx, std::vector<int32_t> prompt, const GenerateParams & params);
    ~Generator();
    Generator(const Generator &) = delete;
    Generator & operator=(const Generator &) = delete;

    // Produces the next piece of text (possibly empty while bytes are held back). Returns false once
    // generation has finished and everything has been emitted.
    bool next(std::string & piece);

    const std::vector<int32_t> & generated() const { return generated_; }
    const std::vector<TokenLogprob> & logprobs() const { return logprobs_; }   // one per generated token
    const std::string & finish_reason() const { return finish_reason_; }   // "eos" | "stop" | "length" (max_new_tokens) | "context" (n_ctx reached) | "interrupt" | "error" | "abandoned"
    bool done() const { return done_; }
    Context & context() { return ctx_; }

    // The turn's whole token sequence: the prompt, the generated tokens and the end-of-generation
    // token that ended it (sampled, not returned). The cache holds a prefix of it: the last
    // sampled token is decoded only when the sequence continues.
    std::vector<int32_t> sequence() const;
    size_t sequence_size() const { return prompt_.size() + generated_.size() + (eog_ >= 0 ? 1 : 0); }

    void set_listener(TurnListener * l) { listener_ = l; }
    // Ends this generation for good (its conversation moved on): next() returns false.
    void detach();

private:
    void finish(const std::string & reason, std::string & piece);
    void record_logprob(int32_t tok);
    void decode_or_end(const int32_t * tokens, int32_t n);

    Context & ctx_;
    std::vector<int32_t> prompt_;
    GenerateParams params_;
    Sampler own_sampler_;
    Sampler & sampler_;
    std::vector<int32_t> generated_;
    std::vector<TokenLogprob> logprobs_;
    std::string pending_;
    std::string finish_reason_;
    int32_t eog_ = -1;
    bool prefilled_ = false, done_ = false;
    TurnListener * listener_ = nullptr;
};

// Length of the longest prefix of s that ends on a UTF-8 character boundary.
size_t utf8_complete_prefix(const std::string & s);

}  // namespace obc
