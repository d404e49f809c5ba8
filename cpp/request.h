// One generation request, as every front door runs it: Python's Model.generate and its
// conversations, the C API's obc_generate and obc_conversation_generate, and obcache-cli translate
// their arguments into a Request and read its report.
// The request owns the path from tokens to report: it checks the parameters before anything is
// allocated (check_generate_params, the prompt not empty, within n_ctx; token ids are checked
// where they are decoded), sizes the KV cache for the prompt (Session), streams the text
// (Generator) and reports what it did.
#pragma once

#include "session.h"

#include <memory>
#include <string>
#include <vector>

namespace obc {

struct RequestReport {
    int64_t prompt_tokens = 0, generated_tokens = 0;
    double prompt_ms = 0, gen_ms = 0;
    // The Generator's reason ("eos", "stop", "length", "context", ...); "interrupt" when the
    // prefill or a token was interrupted, "" while the request runs.
    std::string finish_reason;
    EvictionStats kv;
};

class Request {
public:
    // The cache is allocated here; nothing is decoded until the first next().
    Request(const Model & model, const ContextParams & cp, const KVConfig & kv, std::vector<int32_t> prompt,
            const GenerateParams & gp);
    // A turn of a conversation, which stays the caller's and must outlive the request: `tokens`
    // (possibly empty) join what it holds, then the reply. The report covers this turn: its
    // appended tokens, its timings, the conversation's KV stats. The turn's tokens join the
    // conversation when the request finishes (or is destroyed, or another turn starts).
    Request(Session & conversation, std::vector<int32_t> tokens, const GenerateParams & gp);
    // The prompt text tokenized as every door tokenizes a prompt: the model's BOS rule, special
    // tokens read as text.
    static std::vector<int32_t> tokenize(const Model & model, const std::string & text);

    // The next piece of text (possibly empty); false once generation has finished. Throws
    // Interrupted when the context's abort callback asks to stop.
    bool next(std::string & piece);
    // Valid before and after finish().
    RequestReport report() const;
    const std::vector<int32_t> & generated() const;
    // The Generator's reason, or "interrupt"; "" while the request runs.
    std::string finish_reason() const;

    Session & session() { return *session_; }
    Context & context() { return session_->context(); }
    // The generation in flight; throws std::logic_error after finish().
    Generator & generator();
    // Ends the generation. A single request hands over its session (its cache and stats), for a
    // caller that keeps it after the request (the C API's obc_kv_stats_get); a conversation's turn
    // joins the conversation and returns null.
    std::unique_ptr<Session> finish();

private:
    int64_t n_prompt_;
    std::unique_ptr<Session> owned_;   // a single request's session; null for a conversation's turn
    Session * session_;
    std::unique_ptr<Generator> gen_;
    double prompt_ms0_ = 0, gen_ms0_ = 0;   // the context's timings when the request started
    bool interrupted_ = false, finished_ = false;
    RequestReport final_;                  // the report and tokens as finish() left them
    std::vector<int32_t> final_generated_;
};

}  // namespace obc
