#include "request.h"

#include <stdexcept>

namespace obc {

Request::Request(const Model & model, const ContextParams & cp, const KVConfig & kv, std::vector<int32_t> prompt,
                 const GenerateParams & gp)
    : n_prompt_((int64_t) prompt.size()) {
    check_generate_params(gp, model.hp.n_vocab);   // before the cache is allocated
    if (prompt.empty()) throw std::invalid_argument("the prompt is empty");
    session_ = std::make_unique<Session>(model, cp, kv, (int32_t) prompt.size(), gp.max_new_tokens);   // n_ctx, the cache
    gen_ = session_->generate(prompt, gp);
}

std::vector<int32_t> Request::tokenize(const Model & model, const std::string & text) {
    return model.vocab.tokenize(text, true, false);
}

bool Request::next(std::string & piece) {
    try {
        return gen_->next(piece);
    } catch (const Interrupted &) {
        interrupted_ = true;
        throw;
    }
}

RequestReport Request::report() const {
    RequestReport r;
    const Context::Timings & t = session_->context().timings;
    r.prompt_tokens = n_prompt_;
    r.generated_tokens = gen_ ? (int64_t) gen_->generated().size() : 0;
    r.prompt_ms = t.prompt_ms;
    r.gen_ms = t.gen_ms;
    r.finish_reason = interrupted_ ? "interrupt" : gen_ ? gen_->finish_reason() : "";
    r.kv = session_->stats();
    return r;
}

std::unique_ptr<Session> Request::finish() {
    gen_.reset();
    return std::move(session_);
}

}  // namespace obc
