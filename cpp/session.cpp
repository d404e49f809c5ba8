#include "session.h"

#include <stdexcept>
#include <string>

namespace obc {

bool prefer_flash_attn(int32_t n_prompt, int32_t max_new_tokens, const KVConfig & kv) {
    // On the CPU, ggml's flash attention prefills ~1.45x faster at 4k tokens (fewer passes over
    // the KQ matrix), while the mul_mat + soft_max path decodes ~1.2x faster at the same depth
    // (bench/results/speed_smollm2_cpu.json). Both gaps grow with depth, so flash attention wins
    // once the prompt is more than ~3x the generation, or when eviction keeps decode depth small.
    // The choice depends on the request's shape only: a budget that holds the whole prompt takes
    // the full cache's path, so that it gives the full cache's tokens.
    const bool evicts = kv.enabled() && kv_budget_for(kv, n_prompt) < n_prompt;
    return evicts || (int64_t) n_prompt >= 3 * (int64_t) max_new_tokens;
}

Session::Session(const Model & model, const ContextParams & cp_in, const KVConfig & kv, int32_t n_prompt,
                 int32_t max_new_tokens) {
    ContextParams cp = cp_in;
    if (n_prompt > cp.n_ctx)
        throw std::length_error("the prompt has " + std::to_string(n_prompt) + " tokens, more than the context size n_ctx=" +
                                std::to_string(cp.n_ctx));
    cp.kv_capacity = kv_capacity_for(kv, n_prompt, cp.n_ctx, cp.n_batch, max_new_tokens);
    if (cp.flash_attn < 0) cp.flash_attn = prefer_flash_attn(n_prompt, max_new_tokens, kv) ? 1 : 0;
    // Chunked prefill must never write more than the cache holds beyond the budget.
    if (kv.enabled() && kv.mode == EvictMode::chunked) {
        const int32_t budget = kv_budget_for(kv, n_prompt);
        if (budget >= cp.kv_capacity)
            throw std::invalid_argument("KV budget " + std::to_string(budget) + " with chunked eviction leaves no room for a prompt chunk: the cache "
                                        "holds at most n_ctx=" + std::to_string(cp.n_ctx) + " tokens; give a budget below n_ctx");
        cp.n_batch = std::min(cp.n_batch, cp.kv_capacity - budget);
    }
    cp.kv_scores = kv.enabled();
    cp.kv_per_query_head = kv.gqa == GqaMode::expand;
    ctx_ = std::make_unique<Context>(model, cp);
    if (kv.enabled()) {
        ev_ = std::make_unique<Evictor>(*ctx_, kv);
        ctx_->set_observer(ev_.get());
    }
}

void Session::prefill(const std::vector<int32_t> & prompt, bool all_logits) {
    if (prompt.empty()) throw std::invalid_argument("the prompt is empty");
    if (ev_) ev_->begin_prompt((int32_t) prompt.size());
    ctx_->decode(prompt.data(), (int32_t) prompt.size(), all_logits);
}

std::unique_ptr<Generator> Session::generate(const std::vector<int32_t> & prompt, const GenerateParams & gp) {
    if (ev_) ev_->begin_prompt((int32_t) prompt.size());
    return std::make_unique<Generator>(*ctx_, prompt, gp);
}

void Session::prefill_snapshot(const std::vector<int32_t> & prompt, const std::vector<KVConfig> & methods) {
    if (ev_) throw std::logic_error("a snapshot sweep needs a session created with the full cache");
    if (prompt.empty()) throw std::invalid_argument("the prompt is empty");
    ctx_->reset();
    snap_ = std::make_unique<ScoredSnapshot>(*ctx_, methods);
    snap_->begin_prompt((int32_t) prompt.size());
    ctx_->set_observer(snap_.get());
    try {
        ctx_->decode(prompt.data(), (int32_t) prompt.size(), false);
    } catch (...) {
        ctx_->set_observer(nullptr);
        throw;
    }
    ctx_->set_observer(nullptr);
}

int32_t Session::apply_snapshot(const KVConfig & cfg) {
    if (!snap_ || !snap_->ready()) throw std::logic_error("no snapshot: call prefill_snapshot first");
    return snap_->apply(cfg);
}

EvictionStats Session::stats() const {
    if (ev_) return ev_->stats();
    EvictionStats s = kv_stats(ctx_->kv());
    s.tokens_seen = ctx_->kv().n_past();
    return s;
}

}  // namespace obc
