#include "request.h"

#include <stdexcept>

namespace obc {

Request::Request(const Model & model, const ContextParams & cp, const KVConfig & kv, std::vector<int32_t> prompt,
                 const GenerateParams & gp)
    : n_prompt_((int64_t) prompt.size()) {
    check_generate_params(gp, model.hp.n_vocab);   // before the cache is allocated
    if (prompt.empty()) throw std::invalid_argument("the prompt is empty");
    owned_ = std::make_unique<Session>(model, cp, kv, (int32_t) prompt.size(), gp.max_new_tokens);   // n_ctx, the cache
    session_ = owned_.get();
    gen_ = session_->generate(prompt, gp);
}

Request::Request(Session & conversation, std::vector<int32_t> tokens, const GenerateParams & gp)
    : n_prompt_((int64_t) tokens.size()), session_(&conversation) {
    if (!conversation.is_conversation()) throw std::logic_error("a turn needs a conversation");
    check_generate_params(gp, conversation.context().n_vocab());
    const Context::Timings & t = conversation.context().timings;
    prompt_ms0_ = t.prompt_ms;
    gen_ms0_ = t.gen_ms;
    gen_ = conversation.continue_generation(tokens, gp);   // checks the ids and the room left
}

std::vector<int32_t> Request::tokenize(const Model & model, const std::string & text) {
    return model.vocab.tokenize(text, true, false);
}

bool Request::next(std::string & piece) {
    if (finished_) return false;
    try {
        return gen_->next(piece);
    } catch (const Interrupted &) {
        interrupted_ = true;
        throw;
    }
}

RequestReport Request::report() const {
    if (finished_) return final_;
    RequestReport r;
    const Context::Timings & t = session_->context().timings;
    r.prompt_tokens = n_prompt_;
    r.generated_tokens = (int64_t) gen_->generated().size();
    r.prompt_ms = t.prompt_ms - prompt_ms0_;
    r.gen_ms = t.gen_ms - gen_ms0_;
    r.finish_reason = finish_reason();
    r.kv = session_->stats();
    return r;
}

const std::vector<int32_t> & Request::generated() const {
    return finished_ ? final_generated_ : gen_->generated();
}

std::string Request::finish_reason() const {
    if (finished_) return final_.finish_reason;
    return interrupted_ ? "interrupt" : gen_->finish_reason();
}

Generator & Request::generator() {
    if (finished_) throw std::logic_error("the request has finished");
    return *gen_;
}

std::unique_ptr<Session> Request::finish() {
    if (!finished_) {
        final_ = report();
        final_generated_ = gen_->generated();
        gen_.reset();   // a turn's tokens join its conversation here
        final_.kv = session_->stats();
        finished_ = true;
    }
    return std::move(owned_);
}

}  // namespace obc
