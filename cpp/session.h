// A context sized for one request, with the eviction policy attached: what the CLI, the C API
// and the Python bindings create per generation.
#pragma once

#include "context.h"
#include "eviction.h"
#include "generator.h"
#include "snapshot.h"

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

    // For sweeps over eviction configurations (a session created with the full cache): prefills
    // once while computing the scores of every method listed, and keeps the resulting cache.
    void prefill_snapshot(const std::vector<int32_t> & prompt, const std::vector<KVConfig> & methods);
    // Restores that cache and evicts it as cfg says (the full cache for "full"); returns the tokens
    // kept per head. Decoding may then continue from the prompt's end.
    int32_t apply_snapshot(const KVConfig & cfg);
    ScoredSnapshot * snapshot() { return snap_.get(); }

private:
    std::unique_ptr<Context> ctx_;
    std::unique_ptr<Evictor> ev_;
    std::unique_ptr<ScoredSnapshot> snap_;
};

}  // namespace obc
