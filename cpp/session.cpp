#include "session.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <stdexcept>
#include <string>

namespace obc {

namespace {

constexpr char kStateMagic[8] = {'O', 'B', 'C', 'S', 'T', 'A', 'T', 'E'};
constexpr uint32_t kStateVersion = 4;   // 2: the KV cache types, rows in those types; 3: a quantized K rotated;
                                        // 4: and stored minus its offsets, which follow the positions

struct Writer {
    std::vector<uint8_t> out;
    template <class T> void put(T v) {
        static_assert(std::is_trivially_copyable_v<T>);
        const auto * p = reinterpret_cast<const uint8_t *>(&v);
        out.insert(out.end(), p, p + sizeof(T));
    }
    template <class T> void put_vec(const std::vector<T> & v) {
        put<uint64_t>(v.size());
        const auto * p = reinterpret_cast<const uint8_t *>(v.data());
        out.insert(out.end(), p, p + v.size() * sizeof(T));
    }
    void put_str(const std::string & s) { put_vec(std::vector<char>(s.begin(), s.end())); }
};

// Reads a state written by a stranger: every read is bounds-checked, every length is checked
// against what is left before anything is allocated.
struct Reader {
    const uint8_t * p;
    size_t left;
    [[noreturn]] static void bad(const std::string & what) {
        throw std::invalid_argument("invalid session state: " + what);
    }
    template <class T> T get(const char * what) {
        if (left < sizeof(T)) bad(std::string("truncated at ") + what);
        T v;
        std::memcpy(&v, p, sizeof(T));
        p += sizeof(T);
        left -= sizeof(T);
        return v;
    }
    template <class T> std::vector<T> get_vec(const char * what, uint64_t expect = UINT64_MAX) {
        const uint64_t n = get<uint64_t>(what);
        if (expect != UINT64_MAX && n != expect)
            bad(std::string(what) + " has " + std::to_string(n) + " entries, expected " + std::to_string(expect));
        if (n > left / sizeof(T)) bad(std::string("truncated in ") + what);
        std::vector<T> v(n);
        std::memcpy(v.data(), p, n * sizeof(T));
        p += n * sizeof(T);
        left -= n * sizeof(T);
        return v;
    }
    std::string get_str(const char * what) {
        const auto v = get_vec<char>(what);
        return std::string(v.begin(), v.end());
    }
    int32_t get_enum(const char * what, int32_t n_values) {
        const int32_t v = get<int32_t>(what);
        if (v < 0 || v >= n_values) bad(std::string(what) + " = " + std::to_string(v) + " is not a known value");
        return v;
    }
};

void put_model(Writer & w, const HParams & hp) {
    w.put_str(hp.arch_name);
    for (int32_t v : {hp.n_vocab, hp.n_embd, hp.n_layer, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff}) w.put(v);
}

void put_kv_config(Writer & w, const KVConfig & c) {
    w.put_str(c.method);
    w.put<int32_t>((int32_t) c.score);
    w.put(c.p);
    w.put<int32_t>((int32_t) c.window);
    w.put(c.window_size);
    w.put<int32_t>((int32_t) c.pooling);
    w.put(c.kernel);
    w.put<int32_t>((int32_t) c.group_pool);
    w.put<int32_t>((int32_t) c.gqa);
    w.put<int32_t>((int32_t) c.head_budget);
    w.put(c.head_floor);
    w.put(c.budget);
    w.put(c.ratio);
    w.put(c.n_recent);
    w.put(c.n_sink);
    w.put<int32_t>((int32_t) c.mode);
    w.put(c.slack);
    w.put_str(ggml_type_name(c.type_k));
    w.put_str(ggml_type_name(c.type_v));
}

void check_ids(const std::vector<int32_t> & tokens, int32_t n_vocab) {
    for (int32_t t : tokens)
        if (t < 0 || t >= n_vocab)
            throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary (size " +
                                        std::to_string(n_vocab) + ")");
}

KVConfig get_kv_config(Reader & r) {
    KVConfig c;
    c.method = r.get_str("kv method");
    if (c.method.size() > 256) Reader::bad("the kv method name is too long");
    c.score = (ScoreKind) r.get_enum("kv score", 6);
    c.p = r.get<float>("kv p");
    c.window = (Window) r.get_enum("kv window", 3);
    c.window_size = r.get<int32_t>("kv window_size");
    c.pooling = (Pooling) r.get_enum("kv pooling", 3);
    c.kernel = r.get<int32_t>("kv kernel");
    c.group_pool = (obc_group_pool) r.get_enum("kv group_pool", 5);
    c.gqa = (GqaMode) r.get_enum("kv gqa", 2);
    c.head_budget = (HeadBudget) r.get_enum("kv head_budget", 2);
    c.head_floor = r.get<float>("kv head_floor");
    c.budget = r.get<int32_t>("kv budget");
    c.ratio = r.get<float>("kv ratio");
    c.n_recent = r.get<int32_t>("kv n_recent");
    c.n_sink = r.get<int32_t>("kv n_sink");
    c.mode = (EvictMode) r.get_enum("kv mode", 3);
    c.slack = r.get<int32_t>("kv slack");
    const std::string type_k = r.get_str("kv type_k"), type_v = r.get_str("kv type_v");
    try {
        KVConfig out = c.method == "full" ? kv_config_for_method("full") : finalize_kv_config(c);   // the checks of a configuration given by hand
        out.type_k = parse_kv_cache_type("type_k", type_k);
        out.type_v = parse_kv_cache_type("type_v", type_v);
        return out;
    } catch (const std::invalid_argument & e) {
        Reader::bad(std::string("its KV configuration: ") + e.what());
    }
}

}  // namespace

bool prefer_flash_attn(int32_t n_prompt, int32_t max_new_tokens, const KVConfig & kv) {
    // On the CPU, ggml's flash attention prefills ~1.45x faster at 4k tokens (fewer passes over
    // the KQ matrix), while the mul_mat + soft_max path decodes ~1.2x faster at the same depth
    // (bench/results/speed_smollm2_cpu.json). Both gaps grow with depth, so flash attention wins
    // once the prompt is more than ~3x the generation, or when eviction keeps decode depth small.
    // The choice depends on the request's shape only: a budget that holds the whole prompt takes
    // the full cache's path, so that it gives the full cache's tokens.
    // A quantized V has no other path.
    const bool evicts = kv.enabled() && kv_budget_for(kv, n_prompt) < n_prompt;
    return evicts || (int64_t) n_prompt >= 3 * (int64_t) max_new_tokens || kv_type_needs_flash_attn(kv.type_v);
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
    open(model, cp, kv);
}

void Session::open(const Model & model, ContextParams cp, const KVConfig & kv) {
    cp.kv_scores = kv.enabled();
    cp.kv_per_query_head = kv.gqa == GqaMode::expand;
    cp.type_k = kv.type_k;
    cp.type_v = kv.type_v;
    ctx_ = std::make_unique<Context>(model, cp);
    if (kv.enabled()) {
        ev_ = std::make_unique<Evictor>(*ctx_, kv);
        ev_->set_bounded(conversation_);
        ctx_->set_observer(ev_.get());
    }
}

Session::Session(const Model & model, const ContextParams & cp_in, const KVConfig & kv, Conversation)
    : conversation_(true) {
    ContextParams cp = cp_in;
    if (cp.n_ctx <= 0) throw std::invalid_argument("n_ctx must be positive, got " + std::to_string(cp.n_ctx));
    if (cp.n_batch <= 0) throw std::invalid_argument("n_batch must be positive, got " + std::to_string(cp.n_batch));
    cp.kv_capacity = cp.n_ctx;
    if (kv.enabled()) {
        if (kv.budget <= 0)
            throw std::invalid_argument("a conversation needs its KV budget in tokens (budget=...): a ratio of a sequence that "
                                        "keeps growing has no fixed size");
        if (kv.head_budget == HeadBudget::adaptive)
            throw std::invalid_argument("head_budget=adaptive evicts once after a prompt; a conversation evicts again every "
                                        "turn and needs head_budget=uniform");
        if (kv.budget >= cp.n_ctx)
            throw std::invalid_argument("the KV budget (" + std::to_string(kv.budget) + ") must be below n_ctx (" +
                                        std::to_string(cp.n_ctx) + "), or use the full cache");
        cp.kv_capacity = (int32_t) std::min<int64_t>(cp.n_ctx, (int64_t) kv.budget + std::max(cp.n_batch, kv.slack));
        cp.n_batch = std::min(cp.n_batch, cp.kv_capacity - kv.budget);
    }
    // A bounded conversation decodes at a short depth, where flash attention costs nothing.
    if (cp.flash_attn < 0) cp.flash_attn = kv.enabled() || kv_type_needs_flash_attn(kv.type_v) ? 1 : 0;
    open(model, cp, kv);
}

Session::~Session() {
    if (turn_) turn_->set_listener(nullptr);
}

void Session::absorb(const std::vector<int32_t> & seq) {
    const size_t n_in = (size_t) ctx_->kv().n_past() - decoded_.size();
    decoded_.insert(decoded_.end(), seq.begin(), seq.begin() + std::min(n_in, seq.size()));
    waiting_.assign(seq.begin() + std::min(n_in, seq.size()), seq.end());
}

void Session::turn_ended(Generator & g) {
    if (&g != turn_) return;
    absorb(g.sequence());
    turn_ = nullptr;
}

void Session::end_turn() {
    if (!turn_) return;
    Generator * g = turn_;
    turn_ended(*g);
    g->detach();
}

void Session::append(const std::vector<int32_t> & tokens, bool decode_last, bool all_logits) {
    if (!conversation_) throw std::logic_error("append: this session is not a conversation");
    if (all_logits && !decode_last) throw std::logic_error("append: every token's logits need decode_last");
    end_turn();
    logit_tokens_ = 0;
    if (tokens.empty()) return;
    check_ids(tokens, ctx_->n_vocab());
    std::vector<int32_t> seg = waiting_;
    seg.insert(seg.end(), tokens.begin(), tokens.end());
    const int64_t reach = (int64_t) ctx_->kv().n_past() + (int64_t) seg.size();
    if (reach > ctx_->n_ctx())
        throw std::length_error("the conversation would reach " + std::to_string(reach) + " positions, more than n_ctx=" +
                                std::to_string(ctx_->n_ctx()));
    // The last token waits for the next turn (which decodes it with what follows), unless the
    // caller wants the logits after it.
    const int32_t n = (int32_t) seg.size() - (decode_last ? 0 : 1);
    if (n > 0) {
        // One token decoded for its logits is a generation step (obc_decode in a sampling loop):
        // eviction treats it as generated, with the mode's slack, not as a prompt of its own.
        if (ev_ && !(decode_last && seg.size() == 1)) ev_->begin_prompt(n);
        try {
            ctx_->decode(seg.data(), n, all_logits);
        } catch (...) {
            absorb(seg);
            throw;
        }
        logits_all_ = all_logits;
        logit_rows_skip_ = all_logits ? (int32_t) (seg.size() - tokens.size()) : 0;
        logit_tokens_ = (int32_t) tokens.size();
    }
    absorb(seg);
}

const float * Session::logits_of(int32_t i) const {
    if (!logits_follow_sequence() || logit_tokens_ == 0) return nullptr;
    if (i < 0) i += logit_tokens_;
    if (i < 0 || i >= logit_tokens_) return nullptr;
    if (!logits_all_) return i == logit_tokens_ - 1 ? ctx_->logits() : nullptr;
    return ctx_->logits() + (size_t) (logit_rows_skip_ + i) * ctx_->n_vocab();
}

std::unique_ptr<Generator> Session::continue_generation(const std::vector<int32_t> & tokens, const GenerateParams & gp) {
    if (!conversation_) throw std::logic_error("continue_generation: this session is not a conversation");
    end_turn();
    check_ids(tokens, ctx_->n_vocab());
    std::vector<int32_t> seq = waiting_;
    seq.insert(seq.end(), tokens.begin(), tokens.end());
    if (seq.empty()) throw std::invalid_argument("nothing to generate from: the conversation is empty (append a prompt first)");
    if (ev_) ev_->begin_prompt((int32_t) seq.size());
    auto g = std::make_unique<Generator>(*ctx_, seq, gp);   // checks the ids and the room left
    waiting_.clear();
    g->set_listener(this);
    turn_ = g.get();
    return g;
}

size_t Session::sequence_size() const {
    return decoded_.size() + (turn_ ? turn_->sequence_size() : waiting_.size());
}

std::vector<int32_t> Session::sequence() const {
    std::vector<int32_t> seq = decoded_;
    const std::vector<int32_t> rest = turn_ ? turn_->sequence() : waiting_;
    seq.insert(seq.end(), rest.begin(), rest.end());
    return seq;
}

std::vector<uint8_t> Session::save_state() {
    if (!conversation_) throw std::logic_error("save_state: only a conversation has a state to save");
    end_turn();
    if (ev_) ev_->flush();
    const Context & c = *ctx_;
    const KVCache & kv = c.kv();
    Writer w;
    w.out.insert(w.out.end(), kStateMagic, kStateMagic + sizeof(kStateMagic));
    w.put(kStateVersion);
    put_model(w, c.model().hp);
    w.put(c.n_ctx());
    w.put(c.n_batch());
    w.put(kv.capacity());
    w.put<uint8_t>(c.flash_attn() ? 1 : 0);
    w.put<uint8_t>(ev_ ? 1 : 0);
    KVConfig saved = ev_ ? ev_->config() : kv_config_for_method("full");
    saved.type_k = kv.type_k();
    saved.type_v = kv.type_v();
    put_kv_config(w, saved);
    const EvictionStats st = ev_ ? ev_->stats() : EvictionStats{};
    w.put(ev_ ? ev_->budget() : 0);
    w.put(st.tokens_seen);
    w.put(st.evictions);
    w.put(st.tokens_evicted);
    w.put(st.score_ms);
    w.put(st.compact_ms);
    w.put_vec(decoded_);
    w.put_vec(waiting_);
    w.put(kv.n_used());
    w.put(kv.n_past());
    w.put<uint8_t>(kv.has_holes() ? 1 : 0);
    std::vector<int32_t> pos;
    for (int il = 0; il < kv.n_layer(); ++il)
        for (int h = 0; h < kv.n_head_kv(); ++h) pos.insert(pos.end(), kv.pos(il, h), kv.pos(il, h) + kv.n_used());
    w.put_vec(pos);
    w.put_vec(kv.k_offsets_values());
    std::vector<uint8_t> k, v;
    for (int il = 0; il < kv.n_layer(); ++il) {
        kv.get_layer_rows(il, k, v);
        w.put_vec(k);
        w.put_vec(v);
        if (ev_) {
            std::vector<float> sc;
            for (int h = 0; h < kv.n_head_kv(); ++h) sc.insert(sc.end(), kv.scores(il, h), kv.scores(il, h) + kv.n_used());
            w.put_vec(sc);
        }
    }
    return std::move(w.out);
}

std::unique_ptr<Session> Session::load_state(const Model & model, const ContextParams & cp_in, const uint8_t * data,
                                             size_t size, int32_t max_n_ctx) {
    if (!data && size) throw std::invalid_argument("invalid session state: no data");
    Reader r{data, size};
    if (size < sizeof(kStateMagic) || std::memcmp(data, kStateMagic, sizeof(kStateMagic)) != 0)
        Reader::bad("it does not start with the pyobcache session magic");
    r.p += sizeof(kStateMagic);
    r.left -= sizeof(kStateMagic);
    const uint32_t version = r.get<uint32_t>("version");
    if (version != kStateVersion)
        Reader::bad("version " + std::to_string(version) + ", this build reads version " + std::to_string(kStateVersion));
    {
        Writer mine;
        put_model(mine, model.hp);
        Reader theirs = r;
        const std::string arch = r.get_str("model arch");
        for (int i = 0; i < 7; ++i) r.get<int32_t>("model shape");
        const size_t n = mine.out.size();
        if (theirs.left < n || std::memcmp(theirs.p, mine.out.data(), n) != 0)
            Reader::bad("it was saved with another model (" + arch + ") than " + model.describe());
    }
    ContextParams cp = cp_in;
    cp.n_ctx = r.get<int32_t>("n_ctx");
    cp.n_batch = r.get<int32_t>("n_batch");
    const int32_t capacity = r.get<int32_t>("kv capacity");
    cp.flash_attn = r.get<uint8_t>("flash_attn") ? 1 : 0;
    const bool evicts = r.get<uint8_t>("eviction flag") != 0;
    // Sizes come from a stranger: nothing is allocated for more positions than the caller allows.
    if (cp.n_ctx <= 0 || cp.n_ctx > max_n_ctx)
        Reader::bad("n_ctx " + std::to_string(cp.n_ctx) + " is outside [1, " + std::to_string(max_n_ctx) + "]");
    if (cp.n_batch <= 0 || cp.n_batch > cp.n_ctx || capacity <= 0 || capacity > cp.n_ctx) Reader::bad("its cache sizes");
    const KVConfig kvc = get_kv_config(r);
    if (kvc.enabled() != evicts) Reader::bad("its eviction flag contradicts its KV configuration");
    if (kvc.enabled() && (kvc.budget <= 0 || kvc.budget >= cp.n_ctx || kvc.head_budget != HeadBudget::uniform))
        Reader::bad("its KV configuration is not one a conversation can have");
    std::unique_ptr<Session> s;
    try {
        s = std::make_unique<Session>(model, cp, kvc, Conversation{});
    } catch (const std::invalid_argument & e) {
        Reader::bad(e.what());
    }
    KVCache & kv = s->ctx_->kv();
    if (kv.capacity() != capacity) Reader::bad("its KV capacity " + std::to_string(capacity) + " does not follow from its configuration");
    EvictionStats st;
    const int32_t budget = r.get<int32_t>("eviction budget");
    st.tokens_seen = r.get<int64_t>("tokens_seen");
    st.evictions = r.get<int64_t>("evictions");
    st.tokens_evicted = r.get<int64_t>("tokens_evicted");
    st.score_ms = r.get<double>("score_ms");
    st.compact_ms = r.get<double>("compact_ms");
    if (s->ev_) {
        if (budget != kvc.budget || st.tokens_seen < 0 || st.evictions < 0 || st.tokens_evicted < 0)
            Reader::bad("its eviction counters");
        s->ev_->restore(budget, st);
    }
    s->decoded_ = r.get_vec<int32_t>("decoded tokens");
    s->waiting_ = r.get_vec<int32_t>("waiting tokens");
    const int32_t n_used = r.get<int32_t>("n_used"), n_past = r.get<int32_t>("n_past");
    if (r.get<uint8_t>("holes") != 0) Reader::bad("it has head-wise holes, which no conversation makes");
    if (n_past < 0 || n_past > cp.n_ctx || n_used < 0 || n_used > capacity || n_used > n_past)
        Reader::bad("n_used " + std::to_string(n_used) + " / n_past " + std::to_string(n_past) + " do not fit its cache");
    if ((int64_t) s->decoded_.size() != n_past || (int64_t) n_past + (int64_t) s->waiting_.size() > cp.n_ctx)
        Reader::bad("its token history does not match its positions");
    const int32_t n_vocab = model.hp.n_vocab;
    for (const auto * toks : {&s->decoded_, &s->waiting_})
        for (int32_t t : *toks)
            if (t < 0 || t >= n_vocab) Reader::bad("token id " + std::to_string(t) + " is outside the vocabulary");
    const int H = kv.n_head_kv();
    const auto pos = r.get_vec<int32_t>("positions", (uint64_t) kv.n_layer() * H * n_used);
    for (size_t i = 0; i < pos.size(); ++i) {
        const int32_t q = pos[i];
        if (q < 0 || q >= n_past) Reader::bad("position " + std::to_string(q) + " is not in the sequence");
        if (i % n_used != 0 && q <= pos[i - 1]) Reader::bad("positions are not increasing");   // within one head
    }
    kv.set_used(n_used, n_past, false, pos);
    {
        // A quantized K holding rows needs the offsets they were stored with; a float K has none.
        const uint64_t n_off = kv.k_offsets() ? (uint64_t) ggml_nelements(kv.k_offsets()) : 0;
        const auto c = r.get_vec<float>("K offsets", n_used > 0 ? n_off : UINT64_MAX);
        try {   // set_k_offsets checks the count and the values
            kv.set_k_offsets(c);
        } catch (const std::invalid_argument & e) {
            Reader::bad(e.what());
        }
    }
    // Rows in the cache's types; a value that decodes to inf or NaN (an fp16 or a block scale
    // with every exponent bit set) is refused.
    auto finite_rows = [&](const std::vector<uint8_t> & rows, ggml_type type) {
        const size_t row_bytes = ggml_row_size(type, kv.head_dim());
        std::vector<float> x(kv.head_dim());
        for (size_t off = 0; off < rows.size(); off += row_bytes) {
            kv_row_to_float(type, rows.data() + off, x.data(), kv.head_dim());
            for (float f : x)
                if (!std::isfinite(f)) return false;
        }
        return true;
    };
    for (int il = 0; il < kv.n_layer(); ++il) {
        const auto k = r.get_vec<uint8_t>("K rows", (uint64_t) H * n_used * kv.k_row_bytes());
        const auto v = r.get_vec<uint8_t>("V rows", (uint64_t) H * n_used * kv.v_row_bytes());
        if (!finite_rows(k, kv.type_k()) || !finite_rows(v, kv.type_v())) Reader::bad("its keys or values are not finite");
        kv.set_layer_rows(il, k, v);
        if (s->ev_) {
            const auto sc = r.get_vec<float>("scores", (uint64_t) H * n_used);
            for (float x : sc)
                if (!std::isfinite(x)) Reader::bad("its eviction scores are not finite");
            for (int h = 0; h < H; ++h) {
                float * dst = kv.scores(il, h);
                std::copy_n(sc.data() + (size_t) h * n_used, n_used, dst);
                std::fill(dst + n_used, dst + kv.capacity(), 0.0f);
            }
        }
    }
    if (r.left != 0) Reader::bad(std::to_string(r.left) + " bytes follow its end");
    return s;
}

void Session::prefill(const std::vector<int32_t> & prompt, bool all_logits) {
    if (conversation_) throw std::logic_error("prefill: a conversation appends (append / continue_generation)");
    if (prompt.empty()) throw std::invalid_argument("the prompt is empty");
    if (ev_) ev_->begin_prompt((int32_t) prompt.size());
    ctx_->decode(prompt.data(), (int32_t) prompt.size(), all_logits);
}

std::unique_ptr<Generator> Session::generate(const std::vector<int32_t> & prompt, const GenerateParams & gp) {
    if (conversation_) throw std::logic_error("generate: a conversation continues (continue_generation)");
    if (ev_) ev_->begin_prompt((int32_t) prompt.size());
    return std::make_unique<Generator>(*ctx_, prompt, gp);
}

void Session::prefill_snapshot(const std::vector<int32_t> & prompt, const std::vector<KVConfig> & methods) {
    if (ev_ || conversation_) throw std::logic_error("a snapshot sweep needs a single-request session with the full cache");
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
