#include "eviction.h"

#include <ggml-alloc.h>
#include <ggml-backend.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace obc {

namespace {

struct NamedBase { const char * name; Window window; Pooling pooling; int32_t n_recent; };
// The selection schemes the paper builds on, as its released code defines them for eviction
// after prefill; the score part is chosen separately. H2O sums over the last n_recent prompt
// queries there (SnapKV's window, without pooling); accumulating over every prompt query is its
// "fullhist" variant. TOVA keeps no recent tokens: its window is the latest query only.
const NamedBase kBases[] = {
    {"h2o", Window::last, Pooling::none, 16},
    {"h2o-fullhist", Window::all, Pooling::none, 16},
    {"tova", Window::latest, Pooling::none, 0},
    {"snapkv", Window::last, Pooling::max, 16},
};

struct NamedGroupPool { const char * name; obc_group_pool pool; };
const NamedGroupPool kGroupPools[] = {
    {"sum", OBC_GROUP_SUM}, {"mean", OBC_GROUP_MEAN}, {"max", OBC_GROUP_MAX},
    {"norm-sum", OBC_GROUP_NORM_SUM}, {"pre-mean", OBC_GROUP_PRE_MEAN},
};

struct NamedScore { const char * name; ScoreKind kind; };
const NamedScore kScores[] = {
    {"obc-v", ScoreKind::v}, {"obc-k", ScoreKind::k}, {"obc-vk", ScoreKind::vk}, {"obc-vk-nocross", ScoreKind::vk_nocross},
};

std::string known_methods_text() {
    std::string s;
    for (const auto & n : kv_method_names()) s += (s.empty() ? "" : ", ") + n;
    return s;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

std::vector<std::string> kv_method_names() {
    std::vector<std::string> names = {"full", "streamingllm"};
    for (const auto & b : kBases) names.push_back(b.name);
    // A score alone ("obc-vk") builds on H2O, as in the paper; "obc-vk+h2o" is accepted too.
    for (const auto & sc : kScores) {
        names.push_back(sc.name);
        for (const auto & b : kBases)
            if (std::string(b.name) != "h2o") names.push_back(std::string(sc.name) + "+" + b.name);
    }
    return names;
}

KVConfig kv_config_for_method(const std::string & method) {
    KVConfig c;
    c.method = method;
    if (method == "full") return c;
    if (method == "streamingllm") {
        c.score = ScoreKind::none;
        c.n_sink = 4;
        return c;
    }
    std::string score_part = method, base_part = "h2o";
    const auto plus = method.find('+');
    if (plus != std::string::npos) {
        score_part = method.substr(0, plus);
        base_part = method.substr(plus + 1);
    }
    const NamedBase * base = nullptr;
    for (const auto & b : kBases)
        if (base_part == b.name) base = &b;
    bool found_score = false;
    if (plus == std::string::npos && base_part == "h2o") {
        for (const auto & b : kBases)
            if (method == b.name) { base = &b; c.score = ScoreKind::attn; found_score = true; }
    }
    if (!found_score)
        for (const auto & sc : kScores)
            if (score_part == sc.name) { c.score = sc.kind; found_score = true; }
    if (!base || !found_score)
        throw std::invalid_argument("unknown KV method '" + method + "'; known methods: " + known_methods_text());
    c.window = base->window;
    c.pooling = base->pooling;
    c.n_recent = base->n_recent;
    c.n_sink = 0;
    return c;
}

KVConfig finalize_kv_config(const KVConfig & in) {
    KVConfig c = in;
    if (!c.enabled()) return c;
    // -1 means "the method's default"; any other negative count would index before the cache.
    if (c.n_sink < -1) throw std::invalid_argument("n_sink must be >= 0 (or -1 for the method's default), got " + std::to_string(c.n_sink));
    if (c.n_recent < -1) throw std::invalid_argument("n_recent must be >= 0 (or -1 for the method's default), got " + std::to_string(c.n_recent));
    if (c.window_size < -1) throw std::invalid_argument("the query window must be >= 1 (or -1 for the default), got " + std::to_string(c.window_size));
    if (c.n_sink < 0) c.n_sink = c.score == ScoreKind::none ? 4 : 0;
    // StreamingLLM keeps the sinks and fills the rest of the budget with the most recent tokens.
    if (c.n_recent < 0) c.n_recent = (c.window == Window::latest || c.score == ScoreKind::none) ? 0 : 16;
    if (c.window_size < 0) c.window_size = c.n_recent > 0 ? c.n_recent : 16;
    if (c.budget < 0) throw std::invalid_argument("KV budget must be >= 0, got " + std::to_string(c.budget));
    if (c.budget == 0) {
        if (!(c.ratio > 0.0f && c.ratio <= 1.0f))
            throw std::invalid_argument("set a KV budget in tokens, or a ratio in (0, 1]; got ratio " + std::to_string(c.ratio));
    } else if (c.ratio != 0.0f) {
        throw std::invalid_argument("give either a KV budget or a ratio, not both");
    }
    if (c.budget > 0 && (int64_t) c.budget < (int64_t) c.n_recent + c.n_sink)
        throw std::invalid_argument("KV budget " + std::to_string(c.budget) + " is smaller than n_recent + n_sink = " +
                                    std::to_string((int64_t) c.n_recent + c.n_sink));
    if (c.window_size < 1) throw std::invalid_argument("the query window must hold at least one query");
    // Far above any context a model supports, and low enough that window and slack arithmetic
    // cannot overflow int32.
    constexpr int32_t kMaxSpan = 1 << 24;
    if (c.window_size > kMaxSpan) throw std::invalid_argument("the query window must be at most 2^24 queries");
    if (c.kernel < 1 || c.kernel % 2 == 0 || c.kernel > 4097) throw std::invalid_argument("the pooling kernel must be odd, in [1, 4097]");
    if (c.slack > kMaxSpan) throw std::invalid_argument("the decode slack must be at most 2^24 tokens");
    if (!(c.p == 1.0f || c.p == 2.0f)) throw std::invalid_argument("OBC-V's p must be 1 or 2");
    if (c.slack < 1) throw std::invalid_argument("the decode slack must be at least 1 token");
    if (!(c.head_floor >= 0.0f && c.head_floor <= 1.0f))
        throw std::invalid_argument("head_floor must be in [0, 1], got " + std::to_string(c.head_floor));
    if (c.head_budget == HeadBudget::adaptive && c.mode != EvictMode::prefill)
        throw std::invalid_argument("head_budget=adaptive evicts once after the prompt (evict=prefill); chunked and "
                                    "decode eviction keep uniform head budgets");
    if (c.group_pool == OBC_GROUP_PRE_MEAN && c.gqa == GqaMode::expand)
        throw std::invalid_argument("group_pool=pre-mean pools the query heads of a KV head; with gqa=expand every query "
                                    "head has its own cache and there is no group to pool");
    return c;
}

std::string describe(const KVConfig & c) {
    const std::string types = c.type_k == GGML_TYPE_F16 && c.type_v == GGML_TYPE_F16
                                  ? ""
                                  : std::string(" type_k=") + ggml_type_name(c.type_k) + " type_v=" + ggml_type_name(c.type_v);
    if (!c.enabled()) return types.empty() ? "full cache" : "full cache [" + types.substr(1) + "]";
    static const char * scores[] = {"none", "attn", "v", "k", "vk", "vk-nocross"};
    static const char * windows[] = {"last", "latest", "all"};
    static const char * pools[] = {"none", "max", "avg"};
    static const char * modes[] = {"prefill", "chunked", "decode"};
    std::string s = c.method + " [score=" + scores[(int) c.score] + (c.score == ScoreKind::v ? "(p=" + std::to_string((int) c.p) + ")" : "") +
                    " window=" + windows[(int) c.window] + (c.window == Window::last ? "(" + std::to_string(c.window_size) + ")" : "") +
                    " pooling=" + pools[(int) c.pooling] + " n_recent=" + std::to_string(c.n_recent) +
                    " n_sink=" + std::to_string(c.n_sink) + " evict=" + modes[(int) c.mode] +
                    " group_pool=" + group_pool_name(c.group_pool) + " gqa=" + (c.gqa == GqaMode::expand ? "expand" : "native") +
                    (c.head_budget == HeadBudget::adaptive ? " head_budget=adaptive(floor=" + std::to_string(c.head_floor) + ")" : "");
    s += c.budget > 0 ? " budget=" + std::to_string(c.budget) : " ratio=" + std::to_string(c.ratio);
    return s + types + "]";
}

int32_t kv_budget_for(const KVConfig & c, int32_t n_prompt) {
    if (c.budget > 0) return c.budget;
    const int32_t b = std::max<int32_t>(1, (int32_t) std::ceil(c.ratio * (double) n_prompt));
    if ((int64_t) b < (int64_t) c.n_recent + c.n_sink)
        throw std::invalid_argument("ratio " + std::to_string(c.ratio) + " of a " + std::to_string(n_prompt) +
                                    "-token prompt gives a budget of " + std::to_string(b) +
                                    " tokens, smaller than n_recent + n_sink = " + std::to_string((int64_t) c.n_recent + c.n_sink));
    return b;
}

int32_t kv_capacity_for(const KVConfig & c, int32_t n_prompt, int32_t n_ctx, int32_t n_batch, int32_t max_new_tokens) {
    // 64-bit sums: a budget near 2^31 plus the slack or a chunk overflowed int32.
    const int32_t full = (int32_t) std::min<int64_t>(n_ctx, std::max<int64_t>(1, (int64_t) n_prompt + std::max(0, max_new_tokens)));
    if (!c.enabled()) return full;
    const int64_t b = kv_budget_for(c, n_prompt);
    switch (c.mode) {
        case EvictMode::prefill: return full;
        case EvictMode::decode: return (int32_t) std::min<int64_t>(n_ctx, std::max<int64_t>(n_prompt, b + c.slack));
        case EvictMode::chunked: return (int32_t) std::min<int64_t>(n_ctx, b + std::max(n_batch, c.slack));
    }
    return full;
}

static_assert((int) Pooling::none == OBC_POOL_NONE && (int) Pooling::max == OBC_POOL_MAX && (int) Pooling::avg == OBC_POOL_AVG,
              "Pooling names obc_pool's values");

std::vector<int32_t> select_keep(const float * scores, int32_t n_used, int32_t budget, int32_t n_sink, int32_t n_recent,
                                 Pooling pooling, int32_t kernel) {
    std::vector<int32_t> keep(std::max(0, std::min(budget, n_used)));
    if (obc_select_keep_host(scores, n_used, budget, n_sink, n_recent, (int32_t) pooling, kernel, keep.data()) < 0)
        throw std::invalid_argument("select_keep: counts must be >= 0");
    return keep;
}

std::vector<std::vector<int32_t>> select_keep_adaptive(const std::vector<const float *> & scores, int32_t n_used,
                                                       int32_t budget, int32_t n_sink, int32_t n_recent,
                                                       Pooling pooling, int32_t kernel, float head_floor) {
    const int n_heads = (int) scores.size();
    std::vector<int32_t> flat((size_t) n_heads * std::max(0, n_used)), counts(n_heads);
    if (obc_select_keep_adaptive_host(scores.data(), n_heads, n_used, budget, n_sink, n_recent, (int32_t) pooling, kernel,
                                      head_floor, flat.data(), counts.data()) < 0)
        throw std::invalid_argument("select_keep_adaptive: counts must be >= 0 and head_floor in [0, 1]");
    std::vector<std::vector<int32_t>> keep(n_heads);
    for (int h = 0; h < n_heads; ++h)
        keep[h].assign(flat.begin() + (size_t) h * n_used, flat.begin() + (size_t) h * n_used + counts[h]);
    return keep;
}

ScoreSpec score_spec(const KVConfig & c) {
    ScoreSpec s;
    s.score = c.score;
    s.p = c.p;
    s.window = c.window;
    s.window_size = c.window_size;
    s.group_pool = c.group_pool;
    return s;
}

int32_t window_queries(const ScoreSpec & spec, int32_t begin, int32_t n, int32_t window_end) {
    const int32_t end = begin + n;
    switch (spec.window) {
        case Window::all: return n;
        case Window::latest: return end == window_end ? 1 : 0;
        case Window::last: return std::max(0, std::min(n, end - (window_end - spec.window_size)));
    }
    return 0;
}

CacheScorer::CacheScorer(Context & ctx) : ctx_(ctx) {}

Evictor::Evictor(Context & ctx, const KVConfig & cfg) : scorer_(ctx), ctx_(ctx), cfg_(cfg) {
    const KVCache & kv = ctx_.kv();
    n_head_kv_ = kv.n_head_kv();
    cap_ = kv.capacity();
    n_layer_ = kv.n_layer();
    if (!kv.scores(0, 0)) throw std::logic_error("eviction needs a KV cache created with running scores");
    budget_ = cfg_.budget;
}

Evictor::~Evictor() = default;

void Evictor::begin_prompt(int32_t n_prompt) {
    budget_ = kv_budget_for(cfg_, n_prompt);
    if (cfg_.mode == EvictMode::chunked && budget_ >= cap_)
        throw std::invalid_argument("the KV cache (" + std::to_string(cap_) + " slots) cannot hold the budget of " +
                                    std::to_string(budget_) + " tokens plus a chunk");
    in_prompt_ = true;
    chunk_windows_ = cfg_.mode == EvictMode::chunked || (int64_t) ctx_.kv().n_used() + n_prompt > cap_;
}

void Evictor::flush() { flush_pending(); }

void Evictor::restore(int32_t budget, const EvictionStats & counters) {
    budget_ = budget;
    stats_.tokens_seen = counters.tokens_seen;
    stats_.evictions = counters.evictions;
    stats_.tokens_evicted = counters.tokens_evicted;
    stats_.score_ms = counters.score_ms;
    stats_.compact_ms = counters.compact_ms;
}

int32_t Evictor::before_ubatch(int32_t begin, int32_t n, int32_t n_total) {
    KVCache & kv = ctx_.kv();
    const bool prompt = in_prompt_;
    stats_.tokens_seen += n;
    // A micro-batch that does not fit makes room first: with evict=chunked, and in any mode in a
    // conversation, whose cache is fixed (a single request sizes its cache for what it will hold).
    if ((cfg_.mode == EvictMode::chunked || bounded_) && kv.n_used() + n > kv.capacity()) evict_to(budget_);
    if (!prompt && cfg_.mode != EvictMode::prefill && (int64_t) kv.n_used() + n > (int64_t) budget_ + cfg_.slack)
        evict_to(budget_);

    if (cfg_.score == ScoreKind::none) return debug_capture && prompt ? std::max(0, std::min(n, begin + n - (n_total - cfg_.window_size))) : 0;
    if (!prompt) return cfg_.mode == EvictMode::prefill ? 0 : n;
    // In chunked mode each chunk is its own window, since the cache is evicted between chunks.
    return window_queries(score_spec(cfg_), begin, n, chunk_windows_ ? begin + n : n_total);
}

void Evictor::after_ubatch(const std::vector<std::vector<float>> & q, int32_t n_q) {
    if (n_q <= 0) return;
    const int32_t n_past = ctx_.kv().n_past();
    std::vector<int32_t> pos(n_q);
    for (int32_t i = 0; i < n_q; ++i) pos[i] = n_past - n_q + i;
    if (debug_capture && in_prompt_) {
        if (captured_q.empty()) captured_q.resize(n_layer_);
        for (int il = 0; il < n_layer_; ++il) captured_q[il].insert(captured_q[il].end(), q[il].begin(), q[il].end());
        captured_pos_q.insert(captured_pos_q.end(), pos.begin(), pos.end());
    }
    if (cfg_.score == ScoreKind::none) return;
    if (in_prompt_) {
        score(q, pos);
        return;
    }
    if (cfg_.window == Window::latest) {   // only the latest query counts: drop older pending ones
        pending_q_.clear();
        pending_pos_.clear();
    }
    if (pending_q_.empty()) pending_q_.resize(n_layer_);
    for (int il = 0; il < n_layer_; ++il) pending_q_[il].insert(pending_q_[il].end(), q[il].begin(), q[il].end());
    pending_pos_.insert(pending_pos_.end(), pos.begin(), pos.end());
}

void Evictor::flush_pending() {
    if (pending_pos_.empty()) return;
    score(pending_q_, pending_pos_);
    pending_q_.clear();
    pending_pos_.clear();
}

void Evictor::score(const std::vector<std::vector<float>> & q, const std::vector<int32_t> & pq) {
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t n_kv = ctx_.kv().n_used();
    const bool replace = cfg_.window == Window::latest;
    scorer_.score(score_spec(cfg_), q, pq, [&](int il, int h, const float * o) {
        float * s = layer_scores(il, h);
        if (replace) std::copy(o, o + n_kv, s);
        else for (int64_t j = 0; j < n_kv; ++j) s[j] += o[j];
    });
    stats_.score_ms += ms_since(t0);
}

void CacheScorer::run(const ScoreSpec & spec, const std::vector<std::vector<float>> & q, const std::vector<int32_t> & pq,
                      void (*sink)(void *, int, int, const float *), void * sink_ctx) {
    const int32_t n_q = (int32_t) pq.size();
    KVCache & kv = ctx_.kv();
    const HParams & hp = ctx_.model().hp;
    const int64_t hd = hp.head_dim, n_kv = kv.n_used();
    const int n_layer = kv.n_layer(), n_head_kv = kv.n_head_kv();
    const size_t q_elems = (size_t) hd * hp.n_head * n_q, per_layer = (size_t) n_kv * n_head_kv;

    obc_saliency_params sp{};
    static const int32_t kinds[] = {0, OBC_SCORE_ATTN, OBC_SCORE_V, OBC_SCORE_K, OBC_SCORE_VK, OBC_SCORE_VK_NOCROSS};
    sp.score = kinds[(int) spec.score];
    sp.p = spec.p;
    sp.scale = 1.0f / std::sqrt((float) hd);
    sp.group_pool = spec.group_pool;
    sp.v_trans = kv.v_trans() ? 1 : 0;

    pos_k_.resize(per_layer * n_layer);
    out_.resize(per_layer * n_layer);
    std::vector<obc_saliency_layer> layers(n_layer);
    for (int il = 0; il < n_layer; ++il) {
        if (q[il].size() < q_elems) throw std::logic_error("fewer captured queries than positions to score");
        int32_t * pk = pos_k_.data() + per_layer * il;
        for (int h = 0; h < n_head_kv; ++h) std::copy(kv.pos(il, h), kv.pos(il, h) + n_kv, pk + (size_t) h * n_kv);
        layers[il] = {q[il].data() + (q[il].size() - q_elems), kv.k(il), kv.v(il), pk, out_.data() + per_layer * il,
                      kv.k_offset_host(il)};
    }
    ctx_.check_abort();
    const int rc = [&] {
        const auto threads = ctx_.use_cpu_threads();
        return obc_runner_saliency(kv.runner(), layers.data(), n_layer, pq.data(), n_q, hp.n_head, n_kv, sp);
    }();
    if (rc == OBC_RUN_ABORTED) throw Interrupted();
    if (rc != OBC_RUN_OK) throw std::runtime_error(obc_runner_error(kv.runner()));
    for (int il = 0; il < n_layer; ++il)
        for (int h = 0; h < n_head_kv; ++h) sink(sink_ctx, il, h, out_.data() + per_layer * il + (size_t) h * n_kv);
}

void Evictor::after_decode(int32_t /*n_total*/) {
    if (!in_prompt_) return;
    in_prompt_ = false;
    if (ctx_.kv().n_used() > budget_) evict_to(budget_);
}

void Evictor::evict_to(int32_t budget) {
    KVCache & kv = ctx_.kv();
    if (kv.n_used() <= budget) return;
    flush_pending();   // the generated tokens' queries count before anything is dropped
    const int32_t n_used = kv.n_used();
    const auto t0 = std::chrono::steady_clock::now();
    if (debug_capture && captured_k.empty()) {
        // Keep what the first eviction saw, for checking the selection outside the engine.
        captured_n_kv = n_used;
        captured_k.resize(n_layer_);
        captured_v.resize(n_layer_);
        for (int il = 0; il < n_layer_; ++il) kv.get_layer_values(il, captured_k[il], captured_v[il]);
    }
    auto keep = keep_lists(cfg_, budget, n_used, n_layer_, n_head_kv_, [&](int il, int h) { return layer_scores(il, h); });
    kv.compact(keep);
    stats_.evictions += 1;
    stats_.tokens_evicted += (int64_t) (n_used - budget) * n_layer_ * n_head_kv_;
    last_keep_ = std::move(keep);
    stats_.compact_ms += ms_since(t0);
}

std::vector<float> Evictor::scores_of(int32_t il, int32_t h) {
    if (il < 0 || il >= n_layer_ || h < 0 || h >= n_head_kv_) throw std::out_of_range("layer or head out of range");
    flush_pending();
    const float * s = layer_scores(il, h);
    return std::vector<float>(s, s + ctx_.kv().n_used());
}

EvictionStats kv_stats(const KVCache & kv) {
    EvictionStats s;
    s.budget = kv.capacity();
    s.kept_per_layer.assign(kv.n_layer(), kv.n_used());
    s.kv_bytes_allocated = kv.bytes_allocated();
    s.kv_bytes_used = kv.bytes_used();
    s.kv_bytes_kept = kv.bytes_per_token() / kv.n_head_kv() / kv.n_layer() * (size_t) kv.tokens_kept();
    // What the model's own full cache (one head per KV head) would hold, also for a cache per query head.
    s.kv_bytes_full = kv.bytes_per_token() / kv.n_head_kv() * kv.n_head_kv_model() * (size_t) kv.n_past();
    return s;
}

EvictionStats Evictor::stats() const {
    EvictionStats s = kv_stats(ctx_.kv());
    s.tokens_seen = stats_.tokens_seen;
    s.evictions = stats_.evictions;
    s.tokens_evicted = stats_.tokens_evicted;
    s.score_ms = stats_.score_ms;
    s.compact_ms = stats_.compact_ms;
    s.budget = budget_;
    return s;
}

EvictMode parse_evict_mode(const std::string & s) {
    if (s == "prefill") return EvictMode::prefill;
    if (s == "chunked") return EvictMode::chunked;
    if (s == "decode") return EvictMode::decode;
    throw std::invalid_argument("the eviction mode must be prefill, chunked or decode, not '" + s + "'");
}

Pooling parse_pooling(const std::string & s) {
    if (s == "none") return Pooling::none;
    if (s == "max") return Pooling::max;
    if (s == "avg") return Pooling::avg;
    throw std::invalid_argument("the pooling must be none, max or avg, not '" + s + "'");
}

obc_group_pool parse_group_pool(const std::string & s) {
    std::string names;
    for (const auto & g : kGroupPools) {
        if (s == g.name) return g.pool;
        names += (names.empty() ? "" : ", ") + std::string(g.name);
    }
    throw std::invalid_argument("the group pooling must be one of " + names + ", not '" + s + "'");
}

const char * group_pool_name(obc_group_pool p) {
    for (const auto & g : kGroupPools)
        if (g.pool == p) return g.name;
    return "?";
}

HeadBudget parse_head_budget(const std::string & s) {
    if (s == "uniform") return HeadBudget::uniform;
    if (s == "adaptive") return HeadBudget::adaptive;
    throw std::invalid_argument("head_budget must be uniform or adaptive, not '" + s + "'");
}

ScoreKind parse_score(const std::string & s) {
    static const std::pair<const char *, ScoreKind> names[] = {{"none", ScoreKind::none}, {"attn", ScoreKind::attn},
        {"v", ScoreKind::v}, {"k", ScoreKind::k}, {"vk", ScoreKind::vk}, {"vk-nocross", ScoreKind::vk_nocross}};
    for (const auto & [n, k] : names)
        if (s == n) return k;
    throw std::invalid_argument("score must be none, attn, v, k, vk or vk-nocross, not '" + s + "'");
}

Window parse_query_window(const std::string & s) {
    if (s == "last") return Window::last;
    if (s == "latest") return Window::latest;
    if (s == "all") return Window::all;
    throw std::invalid_argument("query_window must be last, latest or all, not '" + s + "'");
}

const std::vector<std::string> & kv_option_keys() {
    static const std::vector<std::string> keys = {"method", "budget", "ratio", "compression_ratio", "n_recent", "n_sink", "window", "evict",
        "score", "query_window", "pooling", "kernel", "p", "group_pool", "gqa", "head_budget", "head_floor", "slack", "type_k", "type_v"};
    return keys;
}

namespace {

int32_t option_int(const std::string & key, const std::string & v, int64_t lo) {
    size_t used = 0;
    long long x = 0;
    try {
        x = std::stoll(v, &used);
    } catch (const std::exception &) {
        used = 0;
    }
    if (used == 0 || used != v.size()) throw std::invalid_argument(key + " must be an integer, got '" + v + "'");
    if (x < lo || x > INT32_MAX)
        throw std::invalid_argument(key + " must be in [" + std::to_string(lo) + ", 2^31), got " + v);
    return (int32_t) x;
}

float option_float(const std::string & key, const std::string & v) {
    size_t used = 0;
    float x = 0;
    try {
        x = std::stof(v, &used);
    } catch (const std::exception &) {
        used = 0;
    }
    if (used == 0 || used != v.size() || !std::isfinite(x)) throw std::invalid_argument(key + " must be a finite number, got '" + v + "'");
    return x;
}

}  // namespace

KVConfig kv_config_from_options(const KVOptions & options) {
    std::string method = "full";
    for (const auto & [k, v] : options)
        if (k == "method") method = v;
    KVConfig c = kv_config_for_method(method);
    bool has_budget = false, has_ratio = false, has_ratio_from_cr = false;
    for (const auto & [k, v] : options) {
        if (k == "method") continue;
        else if (k == "budget") { c.budget = option_int(k, v, 1); has_budget = true; }
        else if (k == "ratio") {
            c.ratio = option_float(k, v);
            if (!(c.ratio > 0.0f && c.ratio <= 1.0f)) throw std::invalid_argument("ratio must be in (0, 1], got " + v);
            has_ratio = true;
        }
        else if (k == "compression_ratio") {   // kvpress's name: the share removed
            const float cr = option_float(k, v);
            if (!(cr >= 0.0f && cr < 1.0f)) throw std::invalid_argument("compression_ratio (the share removed) must be in [0, 1), got " + v);
            c.ratio = 1.0f - cr;
            has_ratio_from_cr = true;
        }
        else if (k == "n_recent") c.n_recent = option_int(k, v, 0);
        else if (k == "n_sink") c.n_sink = option_int(k, v, 0);
        else if (k == "window") c.window_size = option_int(k, v, 0);
        else if (k == "evict") c.mode = parse_evict_mode(v);
        else if (k == "score") c.score = parse_score(v);
        else if (k == "query_window") c.window = parse_query_window(v);
        else if (k == "pooling") c.pooling = parse_pooling(v);
        else if (k == "kernel") c.kernel = option_int(k, v, INT32_MIN);
        else if (k == "p") c.p = option_float(k, v);
        else if (k == "group_pool") c.group_pool = parse_group_pool(v);
        else if (k == "gqa") c.gqa = parse_gqa_mode(v);
        else if (k == "head_budget") c.head_budget = parse_head_budget(v);
        else if (k == "head_floor") c.head_floor = option_float(k, v);
        else if (k == "slack") c.slack = option_int(k, v, INT32_MIN);
        else if (k == "type_k") c.type_k = parse_kv_cache_type(k, v);
        else if (k == "type_v") c.type_v = parse_kv_cache_type(k, v);
        else {
            std::string keys;
            for (const auto & n : kv_option_keys()) keys += (keys.empty() ? "" : ", ") + n;
            throw std::invalid_argument("unknown KV option '" + k + "' (options: " + keys + ")");
        }
    }
    if (!c.enabled()) return c;
    if (has_ratio && has_ratio_from_cr) throw std::invalid_argument("give either ratio (the share kept) or compression_ratio (the share removed), not both");
    has_ratio = has_ratio || has_ratio_from_cr;
    if (!has_budget && !has_ratio) throw std::invalid_argument("a KV configuration needs a budget (tokens) or a ratio of the prompt");
    if (has_budget && has_ratio) throw std::invalid_argument("give either budget or ratio, not both");
    return finalize_kv_config(c);
}

KVOptions parse_kv_spec(const std::string & spec) {
    KVOptions out;
    size_t start = 0;
    bool first = true;
    while (start <= spec.size()) {
        size_t end = spec.find_first_of(",:", start);
        if (end == std::string::npos) end = spec.size();
        const std::string part = spec.substr(start, end - start);
        if (first) {
            if (part.empty() || part.find('=') != std::string::npos)
                throw std::invalid_argument("a KV spec starts with a method name, e.g. \"obc-vk+snapkv,budget=512\"; got '" + spec + "'");
            out.emplace_back("method", part);
            first = false;
        } else {
            const size_t eq = part.find('=');
            if (eq == std::string::npos || eq == 0)
                throw std::invalid_argument("a KV spec option is key=value; got '" + part + "' in '" + spec + "'");
            out.emplace_back(part.substr(0, eq), part.substr(eq + 1));
        }
        start = end + 1;
    }
    return out;
}

GqaMode parse_gqa_mode(const std::string & s) {
    if (s == "native") return GqaMode::native;
    if (s == "expand") return GqaMode::expand;
    throw std::invalid_argument("gqa must be native or expand, not '" + s + "'");
}

}  // namespace obc
