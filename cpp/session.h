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

class Session : public TurnListener {
public:
    // kv must be finalized. The KV cache gets the capacity the mode needs for this prompt.
    Session(const Model & model, const ContextParams & cp, const KVConfig & kv, int32_t n_prompt, int32_t max_new_tokens);

    // A conversation: a session that lives across requests, each turn appending to one sequence
    // whose positions stay absolute (cp.n_ctx bounds them). Its cache is allocated once. With the
    // full cache it holds n_ctx slots. With eviction (kv.budget > 0; a ratio of a sequence that
    // keeps growing has no fixed size) it holds budget + max(n_batch, slack) slots, so memory
    // stays bounded however long the conversation grows: whatever does not fit is evicted first,
    // and an appended segment that does not fit whole is scored and evicted chunk by chunk, as
    // evict=chunked does.
    struct Conversation {};
    Session(const Model & model, const ContextParams & cp, const KVConfig & kv, Conversation);
    ~Session() override;
    bool is_conversation() const { return conversation_; }
    // A conversation whose context's logits are those after its sequence's last token: nothing
    // waits undecoded and no turn is in flight (after append(..., decode_last = true)).
    bool logits_follow_sequence() const { return conversation_ && !turn_ && waiting_.empty() && ctx_->n_logit_rows() > 0; }

    Context & context() { return *ctx_; }
    Evictor * evictor() { return ev_.get(); }

    // Runs the prompt through the model (evicting as configured); logits of the last token follow.
    void prefill(const std::vector<int32_t> & prompt, bool all_logits = false);
    std::unique_ptr<Generator> generate(const std::vector<int32_t> & prompt, const GenerateParams & gp);
    EvictionStats stats() const;

    // --- conversations ---------------------------------------------------------------------
    // Appends tokens to the sequence. The last token of the sequence waits, undecoded, for the
    // next append or generate, which then has at least one token whose logits it samples; with
    // decode_last every token is decoded, so that the context's logits follow the last one (for
    // a caller that samples itself: obc_decode).
    // all_logits (with decode_last): keep the logits of each of `tokens`, for logits_of().
    void append(const std::vector<int32_t> & tokens, bool decode_last = false, bool all_logits = false);
    // After append(tokens, true, all_logits): the logits after tokens[i] (i < 0 counts from the
    // end; without all_logits only the last), or null when that row was not kept.
    const float * logits_of(int32_t i) const;
    // Generates after everything appended so far plus `tokens` (which may be empty). The turn's
    // tokens join the sequence when the Generator is destroyed; a second turn started before
    // that ends the first one (its next() returns false).
    std::unique_ptr<Generator> continue_generation(const std::vector<int32_t> & tokens, const GenerateParams & gp);
    // Every token of the sequence, evicted ones included, in position order, and their count.
    std::vector<int32_t> sequence() const;
    size_t sequence_size() const;
    int32_t n_past() const { return ctx_->kv().n_past(); }

    // The whole state of a conversation (tokens, KV cache, running scores, eviction counters) as
    // bytes, and a conversation rebuilt from them. load_state() checks every value against the
    // model and the limits before using it, and throws std::invalid_argument naming what is wrong.
    std::vector<uint8_t> save_state();
    // max_n_ctx bounds the positions (and so the cache) a state may ask for.
    static std::unique_ptr<Session> load_state(const Model & model, const ContextParams & cp, const uint8_t * data,
                                               size_t size, int32_t max_n_ctx);
    // Ends the generation in flight, if any: its tokens join the sequence, its next() returns false.
    void end_turn();

    void turn_ended(Generator & g) override;

    // For sweeps over eviction configurations (a session created with the full cache): prefills
    // once while computing the scores of every method listed, and keeps the resulting cache.
    void prefill_snapshot(const std::vector<int32_t> & prompt, const std::vector<KVConfig> & methods);
    // Restores that cache and evicts it as cfg says (the full cache for "full"); returns the tokens
    // kept per head. Decoding may then continue from the prompt's end.
    int32_t apply_snapshot(const KVConfig & cfg);
    ScoredSnapshot * snapshot() { return snap_.get(); }

private:
    // The context and, with eviction, the evictor, once cp is sized.
    void open(const Model & model, ContextParams cp, const KVConfig & kv);
    // The tokens that follow decoded_: the first n_past - |decoded_| of them reached the cache.
    void absorb(const std::vector<int32_t> & seq);

    bool conversation_ = false;
    std::vector<int32_t> decoded_;   // the sequence's tokens in the cache's history (positions [0, n_past))
    std::vector<int32_t> waiting_;   // the tokens after those, not decoded yet
    // The last append's logit rows: logit_tokens_ of the caller's tokens, after logit_rows_skip_
    // rows of the waiting tokens decoded before them (all rows kept only with logits_all_).
    int32_t logit_rows_skip_ = 0, logit_tokens_ = 0;
    bool logits_all_ = false;
    Generator * turn_ = nullptr;     // the generation in flight, if any
    std::unique_ptr<Context> ctx_;
    std::unique_ptr<Evictor> ev_;
    std::unique_ptr<ScoredSnapshot> snap_;
};

}  // namespace obc
