// The generation loop shared by the CLI, the C API and the Python bindings: prefill, then
// sample / decode one token at a time, streaming text that is complete UTF-8 and cannot still
// turn into a stop string.
#pragma once

#include "context.h"
#include "sampler.h"

#include <string>
#include <vector>

namespace obc {

struct GenerateParams {
    int32_t max_new_tokens = 256;
    SamplerParams sampling;
    std::vector<std::string> stop;   // generation ends before the first occurrence of any of these
    bool ignore_eos = false;
};

class Generator {
public:
    // The prompt is appended to whatever the context already holds.
    Generator(Context & ctx, std::vector<int32_t> prompt, const GenerateParams & params);

    // Produces the next piece of text (possibly empty while bytes are held back). Returns false once
    // generation has finished and everything has been emitted.
    bool next(std::string & piece);

    const std::vector<int32_t> & generated() const { return generated_; }
    const std::string & finish_reason() const { return finish_reason_; }   // "eos" | "stop" | "length"
    bool done() const { return done_; }
    Context & context() { return ctx_; }

private:
    void finish(const std::string & reason, std::string & piece);

    Context & ctx_;
    std::vector<int32_t> prompt_;
    GenerateParams params_;
    Sampler sampler_;
    std::vector<int32_t> generated_;
    std::string pending_;
    std::string finish_reason_;
    bool prefilled_ = false, done_ = false;
};

// Length of the longest prefix of s that ends on a UTF-8 character boundary.
size_t utf8_complete_prefix(const std::string & s);

}  // namespace obc
