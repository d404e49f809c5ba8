#include "generator.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace obc {

size_t utf8_complete_prefix(const std::string & s) {
    // Walk back over at most 3 continuation bytes to the last lead byte and check its length.
    size_t n = s.size();
    size_t i = n;
    int back = 0;
    while (i > 0 && back < 4) {
        const unsigned char c = (unsigned char) s[i - 1];
        if ((c & 0xC0) != 0x80) {
            const int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
            return (int) (n - (i - 1)) >= len ? n : i - 1;
        }
        --i;
        ++back;
    }
    return n;
}

void check_generate_params(const GenerateParams & gp, int32_t n_vocab) {
    if (gp.max_new_tokens < 0) throw std::invalid_argument("max_new_tokens must be >= 0, got " + std::to_string(gp.max_new_tokens));
    for (const auto & s : gp.stop)
        if (s.empty()) throw std::invalid_argument("stop strings must not be empty");
    if (gp.n_logprobs > n_vocab)
        throw std::invalid_argument("n_logprobs must be at most the vocabulary size " + std::to_string(n_vocab));
    if (!gp.sampler) validate(gp.sampling);
}

Generator::Generator(Context & ctx, std::vector<int32_t> prompt, const GenerateParams & params)
    : ctx_(ctx), prompt_(std::move(prompt)), params_(params),
      own_sampler_((check_generate_params(params, ctx.n_vocab()), params.sampler ? Sampler() : Sampler(params.sampling))),
      sampler_(params.sampler ? *params.sampler : own_sampler_) {
    if (prompt_.empty()) throw std::invalid_argument("the prompt is empty");
    const int64_t need = (int64_t) ctx_.kv().n_past() + (int64_t) prompt_.size();
    if (need > ctx_.n_ctx())
        throw std::length_error("the prompt has " + std::to_string(prompt_.size()) + " tokens, more than the context size n_ctx=" +
                                std::to_string(ctx_.n_ctx()) + (ctx_.kv().n_past() ? " minus the tokens already in it" : ""));
    for (int32_t t : prompt_) sampler_.accept(t);
}

Generator::~Generator() {
    if (listener_) listener_->turn_ended(*this);
}

std::vector<int32_t> Generator::sequence() const {
    std::vector<int32_t> seq = prompt_;
    seq.insert(seq.end(), generated_.begin(), generated_.end());
    if (eog_ >= 0) seq.push_back(eog_);
    return seq;
}

void Generator::detach() {
    listener_ = nullptr;
    if (!done_) finish_reason_ = "abandoned";
    done_ = true;
    pending_.clear();
}

void Generator::decode_or_end(const int32_t * tokens, int32_t n) {
    // What reached the cache before a failure stays; this generation cannot resume.
    try {
        ctx_.decode(tokens, n);
    } catch (const Interrupted &) {
        done_ = true;
        finish_reason_ = "interrupt";
        pending_.clear();
        throw;
    } catch (...) {
        done_ = true;
        finish_reason_ = "error";
        pending_.clear();
        throw;
    }
}

void Generator::record_logprob(int32_t tok) {
    const float * l = ctx_.logits();
    const int32_t n = ctx_.n_vocab();
    const float mx = *std::max_element(l, l + n);
    double sum = 0.0;
    for (int32_t i = 0; i < n; ++i) sum += std::exp((double) l[i] - mx);
    const float lse = mx + (float) std::log(sum);
    TokenLogprob lp;
    lp.logprob = l[tok] - lse;
    std::vector<int32_t> idx(n);
    for (int32_t i = 0; i < n; ++i) idx[i] = i;
    const int32_t k = std::min(params_.n_logprobs, n);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    for (int32_t i = 0; i < k; ++i) lp.top.emplace_back(idx[i], l[idx[i]] - lse);
    logprobs_.push_back(std::move(lp));
}

void Generator::finish(const std::string & reason, std::string & piece) {
    finish_reason_ = reason;
    done_ = true;
    piece += pending_;
    pending_.clear();
}

bool Generator::next(std::string & piece) {
    piece.clear();
    if (done_) return false;
    if (!prefilled_) {
        prefilled_ = true;
        if (params_.max_new_tokens == 0) {
            finish("length", piece);
            return true;
        }
        decode_or_end(prompt_.data(), (int32_t) prompt_.size());
    } else if ((int32_t) generated_.size() >= params_.max_new_tokens) {
        finish("length", piece);
        return true;
    } else if (ctx_.kv().n_past() >= ctx_.n_ctx()) {
        finish("context", piece);   // the sequence reached n_ctx before max_new_tokens
        return true;
    } else {
        const int32_t last = generated_.back();
        decode_or_end(&last, 1);
    }

    const Vocab & vocab = ctx_.model().vocab;
    const int32_t tok = sampler_.sample(ctx_.logits(), ctx_.n_vocab());
    sampler_.accept(tok);
    if (!params_.ignore_eos && vocab.is_eog(tok)) {
        eog_ = tok;
        finish("eos", piece);
        return true;
    }
    generated_.push_back(tok);
    if (params_.n_logprobs >= 0) record_logprob(tok);
    pending_ += vocab.token_to_piece(tok, false);

    for (const auto & s : params_.stop) {
        const size_t at = pending_.find(s);
        if (at != std::string::npos) {
            pending_.resize(at);
            finish("stop", piece);
            return true;
        }
    }
    // Hold back the longest tail that could still grow into a stop string.
    size_t hold = 0;
    for (const auto & s : params_.stop) {
        for (size_t k = std::min(s.size() - 1, pending_.size()); k > hold; --k)
            if (pending_.compare(pending_.size() - k, k, s, 0, k) == 0) { hold = k; break; }
    }
    const size_t emit = utf8_complete_prefix(pending_.substr(0, pending_.size() - hold));
    piece = pending_.substr(0, emit);
    pending_.erase(0, emit);
    if ((int32_t) generated_.size() >= params_.max_new_tokens) {
        std::string rest;
        finish("length", rest);
        piece += rest;
    }
    return true;
}

}  // namespace obc
