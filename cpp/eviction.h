// KV-cache eviction as a composition of four parts (as in kvpress):
//   score     what a token's saliency is (attention mass, OBC-V, OBC-K, OBC-VK, ...)
//   window    which queries the score is summed over (last w prompt queries, latest query, all)
//   pooling   smoothing of the scores over neighbouring positions before selection (SnapKV)
//   budget    how many tokens stay per layer and KV head: n_sink first + n_recent last + top by score
// Every named method is a configuration of these parts; there is one code path.
#pragma once

#include "context.h"
#include "obc_ops.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace obc {

enum class ScoreKind { none, attn, v, k, vk, vk_nocross };
enum class Window { last, latest, all };
enum class Pooling { none, max, avg };
enum class EvictMode { prefill, chunked, decode };
// native: one cache per KV head, the query heads' scores pooled over the group (GQA saves memory).
// expand: one cache per query head, K and V repeated, each head ranking its own tokens, as the
// paper's reference code does; it costs n_head / n_head_kv times the memory of native.
enum class GqaMode { native, expand };
// uniform: every KV head of a layer keeps `budget` tokens. adaptive (AdaKV): the layer's
// budget * n_heads slots go to the top scores across all its heads, each head keeping at least
// head_floor of its uniform share of the scored slots.
enum class HeadBudget { uniform, adaptive };

struct KVConfig {
    std::string method = "full";   // "full" disables eviction
    ScoreKind score = ScoreKind::none;
    float p = 2.0f;                 // OBC-V norm exponent
    Window window = Window::last;
    int32_t window_size = -1;       // queries in a "last" window; -1: n_recent (or 16 when that is 0)
    Pooling pooling = Pooling::none;
    int32_t kernel = 7;
    obc_group_pool group_pool = OBC_GROUP_SUM;
    GqaMode gqa = GqaMode::native;
    HeadBudget head_budget = HeadBudget::uniform;
    float head_floor = 0.2f;        // adaptive: the share of a head's uniform picks it always keeps
    int32_t budget = 0;             // tokens kept per layer and KV head (per query head with gqa=expand)
    float ratio = 0.0f;             // or a fraction of the prompt length, when budget is 0
    int32_t n_recent = -1;          // -1: the method's default
    int32_t n_sink = -1;            // -1: the method's default
    EvictMode mode = EvictMode::prefill;
    int32_t slack = 32;             // decode-time growth allowed above the budget before compaction
    // What the cache stores K and V in (llama.cpp's -ctk / -ctv), with or without eviction.
    ggml_type type_k = GGML_TYPE_F16, type_v = GGML_TYPE_F16;

    bool enabled() const { return method != "full"; }
};

// The method a bounded cache uses when none is named (KVConfig() in Python, --kv-budget or
// --kv-ratio without --kv-method in the CLIs); README "Evaluation" says why.
inline constexpr const char * kDefaultKVMethod = "obc-k+snapkv";

// The parts and defaults a named method stands for (e.g. "obc-vk+snapkv"). Throws
// std::invalid_argument naming the known methods when the name is unknown.
KVConfig kv_config_for_method(const std::string & method);
// Fills the -1 defaults (n_recent, n_sink, window_size) and checks the configuration; throws
// std::invalid_argument with a clear message when it is impossible.
KVConfig finalize_kv_config(const KVConfig & cfg);
std::vector<std::string> kv_method_names();
std::string describe(const KVConfig & cfg);

// Tokens kept per layer and head for a prompt of n_prompt tokens (budget, or ratio of the prompt).
int32_t kv_budget_for(const KVConfig & cfg, int32_t n_prompt);
// KV slots to allocate for that budget in the configuration's mode.
int32_t kv_capacity_for(const KVConfig & cfg, int32_t n_prompt, int32_t n_ctx, int32_t n_batch, int32_t max_new_tokens);

// Picks the slots to keep in one (layer, head): first n_sink, last n_recent, and the top-scoring
// rest after pooling (obc_select_keep_host, ggml-ext). Strictly increasing slot indices.
std::vector<int32_t> select_keep(const float * scores, int32_t n_used, int32_t budget, int32_t n_sink,
                                 int32_t n_recent, Pooling pooling, int32_t kernel);
// Head-wise budgets for one layer (obc_select_keep_adaptive_host): scores[h] holds n_used scores of
// head h; returns each head's kept slots.
std::vector<std::vector<int32_t>> select_keep_adaptive(const std::vector<const float *> & scores, int32_t n_used,
                                                       int32_t budget, int32_t n_sink, int32_t n_recent,
                                                       Pooling pooling, int32_t kernel, float head_floor);

struct EvictionStats {
    int64_t tokens_seen = 0;
    int64_t evictions = 0;
    int64_t tokens_evicted = 0;         // summed over layers and heads
    double score_ms = 0, compact_ms = 0;
    int32_t budget = 0;
    std::vector<int32_t> kept_per_layer;
    size_t kv_bytes_allocated = 0, kv_bytes_used = 0, kv_bytes_full = 0;   // full: what the full cache would hold
    // kept: the tokens held, holes of head-wise budgets excluded (what a layout that stores each
    // head's own count would use); used: the slots in use in this cache's padded layout.
    size_t kv_bytes_kept = 0;
};

// What the cache holds now: kept tokens per layer and KV bytes; eviction counters stay zero.
EvictionStats kv_stats(const KVCache & kv);

// The parts of a configuration that decide the scores (not which tokens they then select).
struct ScoreSpec {
    ScoreKind score = ScoreKind::none;
    float p = 2.0f;
    Window window = Window::last;
    int32_t window_size = 16;
    obc_group_pool group_pool = OBC_GROUP_SUM;
    bool operator==(const ScoreSpec & o) const {
        return score == o.score && p == o.p && window == o.window && group_pool == o.group_pool &&
               (window != Window::last || window_size == o.window_size);
    }
};
ScoreSpec score_spec(const KVConfig & cfg);   // cfg must be resolved

// How many of the last queries of a micro-batch [begin, begin+n) of an n_total-token prompt fall
// in the scoring window that ends at window_end.
int32_t window_queries(const ScoreSpec & spec, int32_t begin, int32_t n, int32_t window_end);

// Runs obc_saliency for one score over all layers of a context's cache, where the cache lives.
class CacheScorer {
public:
    explicit CacheScorer(Context & ctx);
    // q: per layer [n_q][n_head][head_dim] queries at positions pq (the last n_q of each layer's
    // array are used when it holds more). sink(il, h, scores) receives n_used() scores per head.
    template <class Sink>
    void score(const ScoreSpec & spec, const std::vector<std::vector<float>> & q, const std::vector<int32_t> & pq,
               Sink && sink) {
        using Fn = std::remove_reference_t<Sink>;
        run(spec, q, pq, [](void * fn, int il, int h, const float * s) { (*static_cast<Fn *>(fn))(il, h, s); }, (void *) &sink);
    }

private:
    void run(const ScoreSpec & spec, const std::vector<std::vector<float>> & q, const std::vector<int32_t> & pq,
             void (*sink)(void *, int, int, const float *), void * sink_ctx);
    Context & ctx_;
    std::vector<int32_t> pos_k_;   // per layer [n_head_kv][n_kv], reused from call to call
    std::vector<float> out_;
};

// The slots every (layer, head) keeps under cfg at this budget; scores(il, h) gives the n_used
// scores of one head (it is not called for score-free methods such as StreamingLLM).
template <class Scores>
std::vector<std::vector<std::vector<int32_t>>> keep_lists(const KVConfig & cfg, int32_t budget, int32_t n_used,
                                                          int n_layer, int n_head_kv, Scores && scores) {
    const bool scored = cfg.score != ScoreKind::none;
    // StreamingLLM keeps the sinks and fills the rest of the budget with the most recent tokens.
    const int32_t n_recent = scored ? cfg.n_recent : budget - std::min(cfg.n_sink, budget);
    const std::vector<float> zeros(scored ? 0 : n_used, 0.0f);
    std::vector<std::vector<std::vector<int32_t>>> keep(n_layer, std::vector<std::vector<int32_t>>(n_head_kv));
    for (int il = 0; il < n_layer; ++il) {
        if (scored && cfg.head_budget == HeadBudget::adaptive) {
            std::vector<const float *> s(n_head_kv);
            for (int h = 0; h < n_head_kv; ++h) s[h] = scores(il, h);
            keep[il] = select_keep_adaptive(s, n_used, budget, cfg.n_sink, n_recent, cfg.pooling, cfg.kernel,
                                            cfg.head_floor);
            continue;
        }
        for (int h = 0; h < n_head_kv; ++h)
            keep[il][h] = select_keep(scored ? scores(il, h) : zeros.data(), n_used, budget, cfg.n_sink, n_recent,
                                      cfg.pooling, cfg.kernel);
    }
    return keep;
}

// Parse the names the CLI and the C API use; throw std::invalid_argument listing the choices.
EvictMode parse_evict_mode(const std::string & s);
Pooling parse_pooling(const std::string & s);
obc_group_pool parse_group_pool(const std::string & s);
GqaMode parse_gqa_mode(const std::string & s);
HeadBudget parse_head_budget(const std::string & s);
ScoreKind parse_score(const std::string & s);
Window parse_query_window(const std::string & s);
const char * group_pool_name(obc_group_pool p);

// The one reader of a KV configuration given as text: Python's KVConfig, the CLIs' --kv and
// --kv-* flags, the C API and the eval harness's method labels all come here. options are
// (key, value) pairs applied in order over the named method's parts:
//   method, budget, ratio, n_recent, n_sink, window (queries in a "last" window), evict,
//   score, query_window, pooling, kernel, p, group_pool, gqa, head_budget, head_floor, slack,
//   type_k, type_v (the cache types, kv_cache_types(); these apply to "full" as well).
// Checks every value and returns the finalized configuration; throws std::invalid_argument
// naming the key. A method other than "full" needs a budget or a ratio (not both).
using KVOptions = std::vector<std::pair<std::string, std::string>>;
KVConfig kv_config_from_options(const KVOptions & options);
// A spec string, "obc-vk+snapkv,budget=512,evict=chunked" (',' or ':' between the parts): the
// method first, then key=value options as above.
KVOptions parse_kv_spec(const std::string & spec);
const std::vector<std::string> & kv_option_keys();

// Drives eviction from the context's decode loop: captures the window queries, scores the cache
// with obc_saliency after each micro-batch, keeps running scores per (layer, head, slot) and
// compacts the cache to the budget when the mode says so.
class Evictor : public DecodeObserver {
public:
    Evictor(Context & ctx, const KVConfig & cfg);   // cfg must be resolved
    ~Evictor() override;
    // The prompt length fixes a ratio budget. Call before decoding the prompt.
    void begin_prompt(int32_t n_prompt);

    int32_t before_ubatch(int32_t begin, int32_t n, int32_t n_total) override;
    void after_ubatch(const std::vector<std::vector<float>> & q, int32_t n_q) override;
    void after_decode(int32_t n_total) override;

    // Compacts every (layer, head) to `budget` slots now.
    void evict_to(int32_t budget);
    // Scores the generated tokens' queries that wait for the next compaction (the sums do not
    // change), so that the running scores are complete, e.g. before the state is saved.
    void flush();
    // A conversation's cache: evict whenever a micro-batch does not fit, whatever the mode.
    void set_bounded(bool on) { bounded_ = on; }
    // Restores the budget and counters of a saved conversation.
    void restore(int32_t budget, const EvictionStats & counters);

    EvictionStats stats() const;
    const KVConfig & config() const { return cfg_; }
    int32_t budget() const { return budget_; }

    // Research hooks: running scores [layer][head][slot] of the used slots, and the last kept lists.
    std::vector<float> scores_of(int32_t il, int32_t h);
    const std::vector<std::vector<std::vector<int32_t>>> & last_keep() const { return last_keep_; }
    // Debug hook: when set, keeps the captured window queries of the prompt per layer
    // ([n_q][n_head][head_dim]) and a copy of the cache keys/values before the first eviction.
    bool debug_capture = false;
    std::vector<std::vector<float>> captured_q;        // per layer [n_q][n_head][head_dim]
    std::vector<std::vector<float>> captured_k, captured_v;   // per layer [n_head_kv][n_kv][head_dim]
    std::vector<int32_t> captured_pos_q;
    int32_t captured_n_kv = 0;

private:
    float * layer_scores(int il, int h) const { return ctx_.kv().scores(il, h); }
    void score(const std::vector<std::vector<float>> & q, const std::vector<int32_t> & pos_q);
    CacheScorer scorer_;
    // Generated tokens' queries wait here until the next compaction needs their scores: scoring
    // them together then gives the same sums (later keys are masked by position) at one graph
    // per compaction instead of one per token.
    void flush_pending();
    std::vector<std::vector<float>> pending_q_;
    std::vector<int32_t> pending_pos_;

    Context & ctx_;
    KVConfig cfg_;
    int32_t n_head_kv_, cap_, n_layer_;
    int32_t budget_ = 0;
    bool in_prompt_ = false;
    // Each micro-batch of the prompt is its own scoring window (evicted before the next one):
    // always with evict=chunked, and for a conversation's segment that does not fit whole.
    bool chunk_windows_ = false;
    bool bounded_ = false;
    std::vector<std::vector<std::vector<int32_t>>> last_keep_;
    EvictionStats stats_;
};

}  // namespace obc
