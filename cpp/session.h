// A context sized for one request, with the eviction policy attached: what the CLI, the C API
// and the Python bindings create per generation.
#pragma once

#include "context.h"
#include "eviction.h"
#include "generator.h"

#include <memory>

namespace obc {

// The attention path for a request when the caller leaves it to us (ContextParams::flash_attn < 0).
bool prefer_flash_attn(int32_t n_prompt, int32_t max_new_tokens, const KVConfig & kv);

class Session {
public:
    // kv must be finalized. The KV cache gets the capacity the mode needs for this prompt.
    Session(const Model & model, const ContextParams & cp, const KVConfig & kv, int32_t n_prompt, int32_t max_new_tokens);

    Context & context() { return *ctx_; }
    Evictor * evictor() { return ev_.get(); }

    // Runs the prompt through the model (evicting as configured); logits of the last token follow.
    void prefill(const std::vector<int32_t> & prompt, bool all_logits = false);
    std::unique_ptr<Generator> generate(const std::vector<int32_t> & prompt, const GenerateParams & gp);
    EvictionStats stats() const;

private:
    std::unique_ptr<Context> ctx_;
    std::unique_ptr<Evictor> ev_;
};

}  // namespace obc
