// Tokenizer built from GGUF tokenizer.ggml.* metadata.
//
// Two vocabulary types are supported:
//   "gpt2"  byte-level BPE: the text is split by a pre-tokenizer (chosen by tokenizer.ggml.pre),
//           each piece's bytes are mapped to the GPT-2 unicode alphabet and merged by rank.
//   "llama" SentencePiece-style BPE: spaces become U+2581, adjacent symbols are merged by the
//           score of the merged token, characters without a token fall back to <0xXX> tokens.
// Behaviour follows llama.cpp's tokenizer (the reference the tests compare against); the
// implementation is independent.

#include "vocab.h"

#include "gguf.h"
#include "unicode.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string_view>

namespace obc {

namespace {

namespace uni = unicode;

// ---------------------------------------------------------------------------------------------
// GGUF helpers
// ---------------------------------------------------------------------------------------------

bool gguf_int(const gguf_context * ctx, const char * key, int64_t & out) {
    const int64_t k = gguf_find_key(ctx, key);
    if (k < 0) return false;
    switch (gguf_get_kv_type(ctx, k)) {
        case GGUF_TYPE_UINT8:  out = gguf_get_val_u8(ctx, k); return true;
        case GGUF_TYPE_INT8:   out = gguf_get_val_i8(ctx, k); return true;
        case GGUF_TYPE_UINT16: out = gguf_get_val_u16(ctx, k); return true;
        case GGUF_TYPE_INT16:  out = gguf_get_val_i16(ctx, k); return true;
        case GGUF_TYPE_UINT32: out = gguf_get_val_u32(ctx, k); return true;
        case GGUF_TYPE_INT32:  out = gguf_get_val_i32(ctx, k); return true;
        case GGUF_TYPE_UINT64: out = (int64_t) gguf_get_val_u64(ctx, k); return true;
        case GGUF_TYPE_INT64:  out = gguf_get_val_i64(ctx, k); return true;
        default: return false;
    }
}

bool gguf_bool(const gguf_context * ctx, const char * key, bool & out) {
    const int64_t k = gguf_find_key(ctx, key);
    if (k < 0) return false;
    if (gguf_get_kv_type(ctx, k) == GGUF_TYPE_BOOL) {
        out = gguf_get_val_bool(ctx, k);
        return true;
    }
    int64_t v = 0;
    if (gguf_int(ctx, key, v)) {
        out = v != 0;
        return true;
    }
    return false;
}

bool gguf_str(const gguf_context * ctx, const char * key, std::string & out) {
    const int64_t k = gguf_find_key(ctx, key);
    if (k < 0 || gguf_get_kv_type(ctx, k) != GGUF_TYPE_STRING) return false;
    out = gguf_get_val_str(ctx, k);
    return true;
}

// Array key of the given element type; returns its index or -1 (throws if present with another type).
int64_t gguf_array(const gguf_context * ctx, const char * key, gguf_type elem) {
    const int64_t k = gguf_find_key(ctx, key);
    if (k < 0) return -1;
    if (gguf_get_kv_type(ctx, k) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ctx, k) != elem) {
        throw std::runtime_error(std::string("GGUF key '") + key + "' has an unexpected type (expected an array of " +
                                 gguf_type_name(elem) + ")");
    }
    return k;
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers (hand-written matchers for the regexes llama.cpp uses)
// ---------------------------------------------------------------------------------------------

enum PreType {
    PRE_DEFAULT,         // [\p{P}\$\+<=>\^~\|]+ , gpt2 , \p{N}+ , [0-9][0-9][0-9]
    PRE_GPT2,            // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
    PRE_SMOLLM,          // \p{N} , then gpt2
    PRE_LLAMA3,          // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
    PRE_QWEN2,           // the same with \p{N} instead of \p{N}{1,3}
    PRE_DEEPSEEK_CODER,  // [\r\n] , \s?\p{L}+ , \s?\p{P}+ , [一-龥ࠀ-一가-퟿]+ , \p{N}
};

struct PreInfo {
    const char * name;
    PreType type;
    bool clean_spaces;   // llama.cpp's detokenize clean-up of " ." / " 's" etc.
    bool ignore_merges;  // a pre-token that is itself a vocab token is emitted as is
    bool add_bos;        // default for add_bos when tokenizer.ggml.add_bos_token is absent
};

const PreInfo k_pre_infos[] = {
    {"default", PRE_DEFAULT, true, false, false},
    {"gpt-2", PRE_GPT2, true, false, false},
    {"phi-2", PRE_GPT2, true, false, false},
    {"mpt", PRE_GPT2, true, false, false},
    {"olmo", PRE_GPT2, true, false, false},
    {"jais", PRE_GPT2, true, false, false},
    {"exaone4", PRE_GPT2, true, false, false},
    {"trillion", PRE_GPT2, false, false, false},
    {"granite-docling", PRE_GPT2, false, false, false},
    {"smollm", PRE_SMOLLM, false, false, false},
    {"starcoder", PRE_SMOLLM, true, false, false},
    {"refact", PRE_SMOLLM, true, false, false},
    {"codeshell", PRE_SMOLLM, true, false, false},
    {"exaone", PRE_SMOLLM, true, false, false},
    {"minerva-7b", PRE_SMOLLM, true, false, false},
    {"command-r", PRE_SMOLLM, false, false, false},
    {"llama3", PRE_LLAMA3, true, true, true},
    {"llama-v3", PRE_LLAMA3, true, true, true},
    {"llama-bpe", PRE_LLAMA3, true, true, true},
    {"falcon3", PRE_LLAMA3, true, true, true},
    {"falcon-h1", PRE_LLAMA3, true, true, true},
    {"pixtral", PRE_LLAMA3, true, true, true},
    {"midm-2.0", PRE_LLAMA3, true, true, true},
    {"lfm2", PRE_LLAMA3, true, true, true},
    {"dbrx", PRE_LLAMA3, true, false, false},
    {"smaug-bpe", PRE_LLAMA3, true, false, false},
    {"qwen2", PRE_QWEN2, false, false, false},
    {"deepseek-r1-qwen", PRE_QWEN2, false, false, false},
    {"hunyuan", PRE_QWEN2, false, false, false},
    {"stablelm2", PRE_QWEN2, true, false, false},
    {"megrez", PRE_QWEN2, true, false, false},
    {"deepseek-coder", PRE_DEEPSEEK_CODER, false, false, false},
};

const PreInfo * find_pre(const std::string & name) {
    for (const PreInfo & p : k_pre_infos) {
        if (name == p.name) return &p;
    }
    return nullptr;
}

std::string supported_pre_list() {
    std::string s;
    for (const PreInfo & p : k_pre_infos) {
        if (!s.empty()) s += ", ";
        s += p.name;
    }
    return s;
}

// A piece of the text, as a half-open range of code point indices.
struct Span {
    uint32_t b, e;
};

// Code points of a text fragment with their class flags.
struct CptText {
    std::vector<uint32_t> cp;
    std::vector<uint8_t> fl;

    void assign(const std::string & s) {
        cp.clear();
        fl.clear();
        cp.reserve(s.size());
        size_t pos = 0;
        while (pos < s.size()) cp.push_back(uni::decode_utf8(s.data(), s.size(), pos));
        fl.resize(cp.size());
        for (size_t i = 0; i < cp.size(); ++i) fl[i] = uni::cpt_flags(cp[i]);
    }
    bool letter(uint32_t i) const { return fl[i] & uni::CPT_LETTER; }
    bool number(uint32_t i) const { return fl[i] & uni::CPT_NUMBER; }
    bool space(uint32_t i) const { return fl[i] & uni::CPT_WHITESPACE; }
    bool punct(uint32_t i) const { return fl[i] & uni::CPT_PUNCT; }
    // [^\s\p{L}\p{N}]
    bool other(uint32_t i) const { return !(fl[i] & (uni::CPT_WHITESPACE | uni::CPT_LETTER | uni::CPT_NUMBER)); }
};

// Length of a contraction ('s 't 're 've 'm 'll 'd) starting at i, or 0.
uint32_t match_contraction(const CptText & t, uint32_t i, uint32_t e, bool ignore_case) {
    if (t.cp[i] != '\'' || i + 1 >= e) return 0;
    auto low = [&](uint32_t c) { return ignore_case ? uni::to_lower_ascii(c) : c; };
    const uint32_t c1 = low(t.cp[i + 1]);
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
    if (i + 2 < e) {
        const uint32_t c2 = low(t.cp[i + 2]);
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return 3;
    }
    return 0;
}

// Whitespace run handling shared by the gpt2 / llama3 patterns: \s+(?!\S) leaves the last
// whitespace character for the following word when the run is followed by a non-space in
// the same segment; at the segment end the whole run is taken.
uint32_t match_space_run(const CptText & t, uint32_t i, uint32_t e) {
    uint32_t n = 0;
    while (i + n < e && t.space(i + n)) ++n;
    if (n > 1 && i + n < e) return n - 1;
    return n;
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
void split_gpt2(const CptText & t, uint32_t b, uint32_t e, std::vector<Span> & out) {
    uint32_t i = b;
    while (i < e) {
        uint32_t n = match_contraction(t, i, e, false);
        if (n == 0) {
            // optional leading ' ' before a letter / number / other run
            const uint32_t j = (t.cp[i] == ' ' && i + 1 < e) ? i + 1 : i;
            const bool lead_ok = j == i + 1 || t.cp[i] != ' ';
            if (lead_ok && t.letter(j)) {
                uint32_t k = j;
                while (k < e && t.letter(k)) ++k;
                n = k - i;
            } else if (lead_ok && t.number(j)) {
                uint32_t k = j;
                while (k < e && t.number(k)) ++k;
                n = k - i;
            } else if (lead_ok && t.other(j)) {
                uint32_t k = j;
                while (k < e && t.other(k)) ++k;
                n = k - i;
            } else {
                n = match_space_run(t, i, e);
                if (n == 0) n = 1;
            }
        }
        out.push_back({i, i + n});
        i += n;
    }
}

// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
void split_llama3(const CptText & t, uint32_t b, uint32_t e, uint32_t max_digits, std::vector<Span> & out) {
    uint32_t i = b;
    while (i < e) {
        const uint32_t c = t.cp[i];
        uint32_t n = match_contraction(t, i, e, true);
        if (n == 0 && c != '\r' && c != '\n' && !t.number(i) && (t.letter(i) || (i + 1 < e && t.letter(i + 1)))) {
            uint32_t k = i + 1;
            while (k < e && t.letter(k)) ++k;
            n = k - i;
        }
        if (n == 0 && t.number(i)) {
            uint32_t k = i;
            while (k < e && k - i < max_digits && t.number(k)) ++k;
            n = k - i;
        }
        if (n == 0) {
            const uint32_t j = (c == ' ') ? i + 1 : i;
            if (j < e && t.other(j)) {
                uint32_t k = j;
                while (k < e && t.other(k)) ++k;
                while (k < e && (t.cp[k] == '\r' || t.cp[k] == '\n')) ++k;
                n = k - i;
            }
        }
        if (n == 0) {
            // \s*[\r\n]+ : up to the last \r or \n of the whitespace run
            uint32_t k = i, last_nl = 0;
            while (k < e && t.space(k)) {
                if (t.cp[k] == '\r' || t.cp[k] == '\n') last_nl = k + 1;
                ++k;
            }
            if (last_nl > 0) {
                n = last_nl - i;
            } else {
                n = match_space_run(t, i, e);
                if (n == 0) n = 1;
            }
        }
        out.push_back({i, i + n});
        i += n;
    }
}

// Applies a "match at position" function to every segment the way a regex split does:
// matches and the unmatched text between them both become pieces.
template <typename Match>
void split_matches(const std::vector<Span> & in, std::vector<Span> & out, Match match) {
    out.clear();
    for (const Span & s : in) {
        uint32_t gap = s.b, i = s.b;
        while (i < s.e) {
            const uint32_t n = match(i, s.e);
            if (n == 0) {
                ++i;
                continue;
            }
            if (gap < i) out.push_back({gap, i});
            out.push_back({i, i + n});
            i += n;
            gap = i;
        }
        if (gap < s.e) out.push_back({gap, s.e});
    }
}

void pretokenize(int pre_type, const CptText & t, std::vector<Span> & out, std::vector<Span> & tmp) {
    const uint32_t n = (uint32_t) t.cp.size();
    out.clear();
    if (n == 0) return;
    auto run_of = [&](auto pred) {
        return [&t, pred](uint32_t i, uint32_t e) {
            uint32_t k = i;
            while (k < e && pred(k)) ++k;
            return k - i;
        };
    };
    auto each_gpt2 = [&](const std::vector<Span> & in, std::vector<Span> & dst) {
        dst.clear();
        for (const Span & s : in) split_gpt2(t, s.b, s.e, dst);
    };
    switch (pre_type) {
        case PRE_GPT2:
            split_gpt2(t, 0, n, out);
            break;
        case PRE_SMOLLM:
            tmp.assign(1, Span{0, n});
            split_matches(tmp, out, [&t](uint32_t i, uint32_t) { return t.number(i) ? 1u : 0u; });
            tmp.swap(out);
            each_gpt2(tmp, out);
            break;
        case PRE_LLAMA3:
            split_llama3(t, 0, n, 3, out);
            break;
        case PRE_QWEN2:
            split_llama3(t, 0, n, 1, out);
            break;
        case PRE_DEEPSEEK_CODER: {
            out.assign(1, Span{0, n});
            auto nl = [&t](uint32_t i, uint32_t) { return (t.cp[i] == '\r' || t.cp[i] == '\n') ? 1u : 0u; };
            auto sp_run = [&t](bool (CptText::*cls)(uint32_t) const) {
                return [&t, cls](uint32_t i, uint32_t e) {
                    const uint32_t j = (t.space(i) && i + 1 < e && (t.*cls)(i + 1)) ? i + 1 : i;
                    if (!(t.*cls)(j)) return 0u;
                    uint32_t k = j;
                    while (k < e && (t.*cls)(k)) ++k;
                    return k - i;
                };
            };
            auto cjk = run_of([&t](uint32_t k) {
                const uint32_t c = t.cp[k];
                return (c >= 0x4E00 && c <= 0x9FA5) || (c >= 0x0800 && c <= 0x4E00) || (c >= 0xAC00 && c <= 0xD7FF);
            });
            split_matches(out, tmp, nl);
            split_matches(tmp, out, sp_run(&CptText::letter));
            split_matches(out, tmp, sp_run(&CptText::punct));
            split_matches(tmp, out, cjk);
            split_matches(out, tmp, [&t](uint32_t i, uint32_t) { return t.number(i) ? 1u : 0u; });
            out.swap(tmp);
            break;
        }
        case PRE_DEFAULT:
        default: {
            out.assign(1, Span{0, n});
            split_matches(out, tmp, run_of([&t](uint32_t k) {
                const uint32_t c = t.cp[k];
                return t.punct(k) || c == '$' || c == '+' || c == '<' || c == '=' || c == '>' || c == '^' || c == '~' ||
                       c == '|';
            }));
            each_gpt2(tmp, out);
            split_matches(out, tmp, run_of([&t](uint32_t k) { return t.number(k); }));
            split_matches(tmp, out, [&t](uint32_t i, uint32_t e) {
                auto d = [&t](uint32_t k) { return t.cp[k] >= '0' && t.cp[k] <= '9'; };
                return (i + 2 < e && d(i) && d(i + 1) && d(i + 2)) ? 3u : 0u;
            });
            break;
        }
    }
}

// llama.cpp's post-processing of detokenized text for vocabs with clean_spaces:
// " ?" " !" " ." " ," lose the space, " ' " becomes "'", and " 's" " 'm" " 're" " 've" lose the space.
std::string clean_up_spaces(const std::string & in) {
    if (in.size() < 2) return in;
    std::string a;
    a.reserve(in.size());
    a.push_back(in[0]);
    for (size_t i = 1; i < in.size(); ++i) {
        const char x = in[i];
        if (in[i - 1] == ' ' && (x == '?' || x == '!' || x == '.' || x == ',')) a.pop_back();
        a.push_back(x);
    }
    if (a.size() < 2) return a;
    std::string b;
    b.reserve(a.size());
    b.push_back(a[0]);
    for (size_t i = 1; i < a.size(); ++i) {
        const char x = a[i];
        if (x == '\'' && i + 1 < a.size() && a[i - 1] == ' ' && a[i + 1] == ' ') {
            b.pop_back();   // the space before
            a[++i] = '\0';  // the space after is dropped (and no longer counts as a space)
        }
        b.push_back(x);
    }
    if (b.size() < 2) return b;
    std::string c;
    c.reserve(b.size());
    c.push_back(b[0]);
    for (size_t i = 1; i < b.size(); ++i) {
        const char x = b[i];
        if (b[i - 1] == ' ' && x == '\'' && i + 1 < b.size()) {
            const char x1 = b[i + 1];
            const char x2 = i + 2 < b.size() ? b[i + 2] : '\0';
            if (x1 == 's' || x1 == 'm' || (i + 2 < b.size() && ((x1 == 'r' && x2 == 'e') || (x1 == 'v' && x2 == 'e')))) {
                c.pop_back();
            }
        }
        c.push_back(x);
    }
    return c;
}

const char * const k_space_marker = "\xE2\x96\x81";  // U+2581, SentencePiece's visible space

// ids of parsed "<0xXX>" byte tokens; -1 if the text is not one
int parse_byte_token(const std::string & s) {
    if (s.size() != 6 || s[0] != '<' || s[1] != '0' || s[2] != 'x' || s[5] != '>') return -1;
    auto hex = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        return -1;
    };
    const int hi = hex(s[3]), lo = hex(s[4]);
    return (hi < 0 || lo < 0) ? -1 : hi * 16 + lo;
}

}  // namespace

struct Vocab::Fragment {
    int32_t id;  // >= 0: a special token; -1: raw text
    size_t off, len;
};

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

Vocab Vocab::from_file(const std::string & path) {
    gguf_init_params gp{};
    gp.no_alloc = true;
    gp.ctx = nullptr;
    gguf_context * g = gguf_init_from_file(path.c_str(), gp);
    if (!g) throw std::runtime_error(path + ": not a readable GGUF file");
    try {
        Vocab v = from_gguf(g);
        gguf_free(g);
        return v;
    } catch (...) {
        gguf_free(g);
        throw;
    }
}

Vocab Vocab::from_gguf(const gguf_context * ctx) {
    if (!ctx) throw std::runtime_error("Vocab::from_gguf: null gguf context");
    Vocab v;

    if (!gguf_str(ctx, "tokenizer.ggml.model", v.model_)) {
        throw std::runtime_error("GGUF has no tokenizer (missing tokenizer.ggml.model)");
    }
    const bool is_bpe = v.model_ == "gpt2";
    const bool is_spm = v.model_ == "llama";
    if (!is_bpe && !is_spm) {
        throw std::runtime_error("unsupported tokenizer model '" + v.model_ + "' (supported: gpt2, llama)");
    }

    // ---- pre-tokenizer and defaults
    const PreInfo * pre = nullptr;
    if (is_bpe) {
        if (!gguf_str(ctx, "tokenizer.ggml.pre", v.pre_) || v.pre_.empty()) v.pre_ = "default";
        pre = find_pre(v.pre_);
        if (!pre) {
            throw std::runtime_error("unsupported pre-tokenizer '" + v.pre_ + "' (tokenizer.ggml.pre); supported: " +
                                     supported_pre_list());
        }
        v.pre_type_ = pre->type;
        v.clean_spaces_ = pre->clean_spaces;
        v.ignore_merges_ = pre->ignore_merges;
        v.add_bos_ = pre->add_bos;
        v.add_eos_ = false;
        v.add_space_prefix_ = false;
    } else {
        if (!gguf_str(ctx, "tokenizer.ggml.pre", v.pre_) || v.pre_.empty()) v.pre_ = "default";
        v.pre_type_ = PRE_DEFAULT;
        v.clean_spaces_ = false;
        v.add_bos_ = true;
        v.add_eos_ = false;
        v.add_space_prefix_ = true;
        v.bos_ = 1;
        v.eos_ = 2;
        v.unk_ = 0;
    }
    gguf_bool(ctx, "tokenizer.ggml.add_space_prefix", v.add_space_prefix_);

    // ---- tokens, scores, types
    const int64_t tok_k = gguf_array(ctx, "tokenizer.ggml.tokens", GGUF_TYPE_STRING);
    if (tok_k < 0) throw std::runtime_error("GGUF has no tokenizer.ggml.tokens");
    const size_t n = gguf_get_arr_n(ctx, tok_k);
    if (n == 0 || n > (size_t) INT32_MAX / 2) throw std::runtime_error("tokenizer.ggml.tokens has an invalid size");

    const int64_t score_k = gguf_array(ctx, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32);
    const float * scores = nullptr;
    if (score_k >= 0) {
        if (gguf_get_arr_n(ctx, score_k) < n) throw std::runtime_error("tokenizer.ggml.scores is shorter than the vocab");
        scores = (const float *) gguf_get_arr_data(ctx, score_k);
    }
    const int64_t type_k = gguf_array(ctx, "tokenizer.ggml.token_type", GGUF_TYPE_INT32);
    const int32_t * types = nullptr;
    if (type_k >= 0) {
        if (gguf_get_arr_n(ctx, type_k) < n) throw std::runtime_error("tokenizer.ggml.token_type is shorter than the vocab");
        types = (const int32_t *) gguf_get_arr_data(ctx, type_k);
    }

    v.tokens_.resize(n);
    v.scores_.resize(n);
    v.attrs_.resize(n);
    v.token_to_id_.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        std::string text = gguf_get_arr_str(ctx, tok_k, i);
        if (text.empty()) text = "[EMPTY_" + std::to_string(i) + "]";
        v.token_to_id_[text] = (int32_t) i;  // a duplicated text maps to its last id
        v.tokens_[i] = std::move(text);
        v.scores_[i] = scores ? scores[i] : 0.0f;
        TokenAttr a = TokenAttr::normal;
        if (types) {
            switch (types[i]) {
                case 1: a = TokenAttr::normal; break;
                case 2: a = TokenAttr::unknown; break;
                case 3: a = TokenAttr::control; break;
                case 4: a = TokenAttr::user_defined; break;
                case 5: a = TokenAttr::unused; break;
                case 6: a = TokenAttr::byte; break;
                default: a = TokenAttr::unused; break;  // undefined: renders as nothing
            }
        }
        v.attrs_[i] = a;
    }
    auto find_id = [&v](const std::string & s) -> int32_t {
        auto it = v.token_to_id_.find(s);
        return it == v.token_to_id_.end() ? -1 : it->second;
    };

    // ---- merges (byte-level BPE) / byte tokens (SentencePiece)
    if (is_bpe) {
        const int64_t merges_k = gguf_array(ctx, "tokenizer.ggml.merges", GGUF_TYPE_STRING);
        if (merges_k < 0) throw std::runtime_error("GGUF has no tokenizer.ggml.merges (required for a gpt2 tokenizer)");
        std::unordered_map<std::string, int32_t> extra;  // merge symbols that are not tokens
        auto sym_id = [&](const std::string & s) -> int32_t {
            const int32_t id = find_id(s);
            if (id >= 0) return id;
            auto it = extra.find(s);
            if (it != extra.end()) return it->second;
            const int32_t nid = (int32_t) (n + extra.size());
            extra.emplace(s, nid);
            return nid;
        };
        for (int b = 0; b < 256; ++b) v.byte_ids_[b] = sym_id(uni::byte_to_utf8((uint8_t) b));
        const size_t n_merges = gguf_get_arr_n(ctx, merges_k);
        v.merges_.reserve(n_merges);
        std::string left, right;
        for (size_t i = 0; i < n_merges; ++i) {
            const char * m = gguf_get_arr_str(ctx, merges_k, i);
            const size_t len = std::strlen(m);
            const char * sp = len > 1 ? (const char *) std::memchr(m + 1, ' ', len - 1) : nullptr;
            if (!sp) continue;
            left.assign(m, sp - m);
            right.assign(sp + 1, m + len - (sp + 1));
            const uint32_t l = (uint32_t) sym_id(left), r = (uint32_t) sym_id(right);
            const int32_t res = sym_id(left + right);
            v.merges_.emplace(((uint64_t) l << 32) | r, std::make_pair((int32_t) i, res));
        }
    } else {
        for (int b = 0; b < 256; ++b) {
            char buf[8];
            std::snprintf(buf, sizeof(buf), "<0x%02X>", b);
            int32_t id = find_id(buf);
            if (id < 0) id = find_id(std::string(1, (char) b));
            v.byte_ids_[b] = id;
        }
    }

    // ---- special token ids
    auto read_id = [&](const char * key, int32_t & id) {
        int64_t x = 0;
        if (gguf_int(ctx, key, x) && x >= 0 && x < (int64_t) n) id = (int32_t) x;
    };
    read_id("tokenizer.ggml.bos_token_id", v.bos_);
    read_id("tokenizer.ggml.eos_token_id", v.eos_);
    read_id("tokenizer.ggml.eot_token_id", v.eot_);
    read_id("tokenizer.ggml.eom_token_id", v.eom_);
    read_id("tokenizer.ggml.unknown_token_id", v.unk_);
    read_id("tokenizer.ggml.padding_token_id", v.pad_);
    int32_t fim_pre = -1, fim_suf = -1, fim_mid = -1, fim_pad = -1, fim_rep = -1, fim_sep = -1;
    read_id("tokenizer.ggml.prefix_token_id", fim_pre);
    read_id("tokenizer.ggml.suffix_token_id", fim_suf);
    read_id("tokenizer.ggml.middle_token_id", fim_mid);
    read_id("tokenizer.ggml.fim_pre_token_id", fim_pre);
    read_id("tokenizer.ggml.fim_suf_token_id", fim_suf);
    read_id("tokenizer.ggml.fim_mid_token_id", fim_mid);
    read_id("tokenizer.ggml.fim_pad_token_id", fim_pad);
    read_id("tokenizer.ggml.fim_rep_token_id", fim_rep);
    read_id("tokenizer.ggml.fim_sep_token_id", fim_sep);

    gguf_bool(ctx, "tokenizer.ggml.add_bos_token", v.add_bos_);
    gguf_bool(ctx, "tokenizer.ggml.add_eos_token", v.add_eos_);

    // ---- auto-detect end-of-turn / FIM tokens by their text (as llama.cpp does); such
    // tokens are treated as control tokens even if the file marks them otherwise.
    auto make_control = [&v](int32_t id) {
        if (v.attrs_[id] != TokenAttr::control) v.attrs_[id] = TokenAttr::control;
    };
    auto text_in = [](const std::string & s, std::initializer_list<const char *> names) {
        for (const char * nm : names) {
            if (s == nm) return true;
        }
        return false;
    };
    auto detect = [&](int32_t & id, int32_t tok, std::initializer_list<const char *> names) {
        if (id < 0 && text_in(v.tokens_[tok], names)) {
            id = tok;
            make_control(tok);
        }
    };
    for (int32_t t = 0; t < (int32_t) n; ++t) {
        detect(v.eot_, t, {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                           "<EOT>", "_<EOT>", "[EOT]", "<end_of_utterance>"});
        detect(v.eom_, t, {"<|eom_id|>"});
        detect(fim_pre, t, {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "<|code_prefix|>", "<|prefix|>"});
        detect(fim_suf, t, {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "<|code_suffix|>", "<|suffix|>"});
        detect(fim_mid, t, {"<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "<|code_middle|>", "<|middle|>"});
        detect(fim_pad, t, {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"});
        detect(fim_rep, t, {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"});
        detect(fim_sep, t, {"<|file_sep|>"});
    }

    // ---- end-of-generation set
    std::vector<int32_t> eog;
    for (int32_t id : {fim_pad, fim_rep, fim_sep}) {
        if (id >= 0) eog.push_back(id);
    }
    for (int32_t t = 0; t < (int32_t) n; ++t) {
        if (text_in(v.tokens_[t], {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
                                   "<|calls|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>",
                                   "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>",
                                   "<|tool_response>"}) ||
            // llama.cpp also lists "</s>" unconditionally; byte-level vocabs such as Qwen2 have
            // "</s>" as an ordinary text token (HTML), so only a special "</s>" counts here.
            (v.tokens_[t] == "</s>" && v.attrs_[t] != TokenAttr::normal)) {
            eog.push_back(t);
            make_control(t);
        }
    }
    // gpt-oss: these are rendered even when special tokens are not
    for (int32_t t = 0; t < (int32_t) n; ++t) {
        if (text_in(v.tokens_[t], {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})) {
            v.attrs_[t] = TokenAttr::user_defined;
        }
    }
    for (int32_t id : {v.eos_, v.eot_, v.eom_}) {
        if (id >= 0) eog.push_back(id);
    }
    std::sort(eog.begin(), eog.end());
    eog.erase(std::unique(eog.begin(), eog.end()), eog.end());
    {
        // "<|end|>" is not end-of-generation in vocabs that also have "<|return|>" + "<|call|>"
        // (o200k_harmony) or "<|calls|>" + "<|flush|>" (solar-open); "</s>" is not in gemma4.
        bool has_return = false, has_call = false, has_flush = false, has_tool_response = false;
        int32_t end_id = -1, s_id = -1;
        for (int32_t id : eog) {
            const std::string & s = v.tokens_[id];
            if (s == "<|return|>") has_return = true;
            else if (s == "<|call|>" || s == "<|calls|>") has_call = true;
            else if (s == "<|flush|>") has_flush = true;
            else if (s == "<|tool_response>") has_tool_response = true;
            else if (s == "<|end|>") end_id = id;
            else if (s == "</s>") s_id = id;
        }
        if (end_id >= 0 && has_call && (has_return || has_flush)) {
            eog.erase(std::find(eog.begin(), eog.end(), end_id));
            v.attrs_[end_id] = TokenAttr::user_defined;
        }
        if (s_id >= 0 && has_tool_response) {
            eog.erase(std::find(eog.begin(), eog.end(), s_id));
            v.attrs_[s_id] = TokenAttr::normal;
        }
    }
    v.eog_ids_ = std::move(eog);

    // ---- special tokens matched before pre-tokenization, longest text first
    for (int32_t t = 0; t < (int32_t) n; ++t) {
        const TokenAttr a = v.attrs_[t];
        if (a == TokenAttr::control || a == TokenAttr::user_defined || a == TokenAttr::unknown) v.special_ids_.push_back(t);
    }
    std::stable_sort(v.special_ids_.begin(), v.special_ids_.end(),
                     [&v](int32_t a, int32_t b) { return v.tokens_[a].size() > v.tokens_[b].size(); });

    // ---- decoded pieces
    v.pieces_.resize(n);
    for (size_t i = 0; i < n; ++i) {
        const std::string & text = v.tokens_[i];
        std::string & p = v.pieces_[i];
        switch (v.attrs_[i]) {
            case TokenAttr::control:
            case TokenAttr::unknown:
            case TokenAttr::user_defined:
                p = text;
                break;
            case TokenAttr::unused:
                break;
            case TokenAttr::byte: {
                const int b = parse_byte_token(text);
                if (b >= 0) p.assign(1, (char) b);
                break;
            }
            case TokenAttr::normal:
                if (is_bpe) {
                    size_t pos = 0;
                    p.reserve(text.size());
                    while (pos < text.size()) {
                        const uint32_t c = uni::decode_utf8(text, pos);
                        const int b = uni::cpt_to_byte(c);
                        if (b >= 0) p.push_back((char) b);
                        else uni::append_utf8(p, c);  // not in the byte alphabet: keep as is
                    }
                } else {
                    size_t pos = 0;
                    while (true) {
                        const size_t f = text.find(k_space_marker, pos);
                        if (f == std::string::npos) break;
                        p.append(text, pos, f - pos);
                        p.push_back(' ');
                        pos = f + 3;
                    }
                    p.append(text, pos, std::string::npos);
                }
                break;
        }
    }
    return v;
}

// ---------------------------------------------------------------------------------------------
// Tokenization
// ---------------------------------------------------------------------------------------------

std::vector<Vocab::Fragment> Vocab::partition_special(const std::string & text, bool parse_special) const {
    std::vector<Fragment> frags;
    if (text.empty()) return frags;
    frags.push_back({-1, 0, text.size()});
    std::vector<Fragment> next;
    for (const int32_t sid : special_ids_) {
        const TokenAttr a = attrs_[sid];
        // user-defined tokens are always split out; control/unknown ones only when asked to
        if (!parse_special && (a == TokenAttr::control || a == TokenAttr::unknown)) continue;
        const std::string & st = tokens_[sid];
        if (st.empty() || text.find(st) == std::string::npos) continue;
        next.clear();
        for (const Fragment & f : frags) {
            if (f.id >= 0) {
                next.push_back(f);
                continue;
            }
            const std::string_view view(text.data(), f.off + f.len);
            size_t pos = f.off;
            while (true) {
                const size_t m = view.find(st, pos);
                if (m == std::string_view::npos) break;
                if (m > pos) next.push_back({-1, pos, m - pos});
                next.push_back({sid, m, st.size()});
                pos = m + st.size();
            }
            if (pos < f.off + f.len) next.push_back({-1, pos, f.off + f.len - pos});
        }
        frags.swap(next);
    }
    return frags;
}

std::vector<int32_t> Vocab::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    std::vector<int32_t> out;
    if (add_special && add_bos_ && bos_ >= 0) out.push_back(bos_);
    const bool spm = model_ == "llama";
    bool prev_special = true;  // SentencePiece: a space prefix goes on text at the start / after a special token
    std::string piece;
    for (const Fragment & f : partition_special(text, parse_special)) {
        if (f.id >= 0) {
            out.push_back(f.id);
            prev_special = true;
            continue;
        }
        piece.assign(text, f.off, f.len);
        if (spm) {
            std::string esc;
            esc.reserve(piece.size() + 8);
            if (add_space_prefix_ && prev_special) esc += k_space_marker;
            for (char c : piece) {
                if (c == ' ') esc += k_space_marker;
                else esc.push_back(c);
            }
            tokenize_spm(esc, out);
        } else {
            tokenize_bpe(piece, out);
        }
        prev_special = false;
    }
    if (add_special && add_eos_ && eos_ >= 0) out.push_back(eos_);
    return out;
}

void Vocab::tokenize_bpe(const std::string & text, std::vector<int32_t> & out) const {
    CptText t;
    t.assign(text);
    std::vector<Span> spans, tmp;
    pretokenize(pre_type_, t, spans, tmp);

    const int32_t n_tok = n_tokens();
    struct Sym {
        int32_t id, prev, next;
        uint32_t start, len;  // byte range within the word
    };
    struct Cand {
        int32_t rank, left, lid, rid, merged;
    };
    // min-heap on (rank, left)
    auto cand_after = [](const Cand & a, const Cand & b) { return a.rank > b.rank || (a.rank == b.rank && a.left > b.left); };

    std::string word, mapped;
    std::vector<Sym> syms;
    std::vector<Cand> heap;

    auto push_pair = [&](int32_t left) {
        if (left < 0) return;
        const int32_t right = syms[left].next;
        if (right < 0) return;
        const uint64_t key = ((uint64_t) (uint32_t) syms[left].id << 32) | (uint32_t) syms[right].id;
        auto it = merges_.find(key);
        if (it == merges_.end()) return;
        heap.push_back({it->second.first, left, syms[left].id, syms[right].id, it->second.second});
        std::push_heap(heap.begin(), heap.end(), cand_after);
    };

    for (const Span & s : spans) {
        word.clear();
        for (uint32_t i = s.b; i < s.e; ++i) uni::append_utf8(word, t.cp[i]);
        const uint32_t nb = (uint32_t) word.size();
        if (nb == 0) continue;

        if (ignore_merges_) {
            mapped.clear();
            for (unsigned char c : word) mapped += uni::byte_to_utf8(c);
            auto it = token_to_id_.find(mapped);
            if (it != token_to_id_.end()) {
                out.push_back(it->second);
                continue;
            }
        }

        syms.resize(nb);
        for (uint32_t i = 0; i < nb; ++i) {
            syms[i] = {byte_ids_[(unsigned char) word[i]], (int32_t) i - 1, i + 1 < nb ? (int32_t) i + 1 : -1, i, 1};
        }
        heap.clear();
        for (uint32_t i = 0; i + 1 < nb; ++i) push_pair((int32_t) i);

        while (!heap.empty()) {
            std::pop_heap(heap.begin(), heap.end(), cand_after);
            const Cand c = heap.back();
            heap.pop_back();
            Sym & l = syms[c.left];
            if (l.len == 0 || l.id != c.lid || l.next < 0) continue;
            Sym & r = syms[l.next];
            if (r.id != c.rid) continue;
            // merge r into l
            l.id = c.merged;
            l.len += r.len;
            r.len = 0;
            l.next = r.next;
            if (r.next >= 0) syms[r.next].prev = c.left;
            push_pair(l.prev);
            push_pair(c.left);
        }

        for (int32_t i = 0; i >= 0; i = syms[i].next) {
            const Sym & sy = syms[i];
            if (sy.id >= 0 && sy.id < n_tok) {
                out.push_back(sy.id);
                continue;
            }
            // not a vocab token: one token per byte
            for (uint32_t k = sy.start; k < sy.start + sy.len; ++k) {
                const int32_t bid = byte_ids_[(unsigned char) word[k]];
                if (bid >= 0 && bid < n_tok) out.push_back(bid);
            }
        }
    }
}

void Vocab::tokenize_spm(const std::string & text, std::vector<int32_t> & out) const {
    if (text.empty()) return;
    struct Sym {
        int32_t prev, next;
        uint32_t start, len;
    };
    struct Cand {
        float score;
        int32_t left, right;
        uint32_t size;
    };
    // max-heap on score, then the leftmost
    auto cand_before = [](const Cand & a, const Cand & b) { return a.score < b.score || (a.score == b.score && a.left > b.left); };

    std::vector<Sym> syms;
    syms.reserve(text.size());
    static const uint8_t k_len_by_nibble[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    for (size_t off = 0; off < text.size();) {
        const size_t len = std::min<size_t>(k_len_by_nibble[(unsigned char) text[off] >> 4], text.size() - off);
        const int32_t idx = (int32_t) syms.size();
        syms.push_back({idx - 1, off + len < text.size() ? idx + 1 : -1, (uint32_t) off, (uint32_t) len});
        off += len;
    }

    std::vector<Cand> heap;
    auto try_pair = [&](int32_t left, int32_t right) {
        if (left < 0 || right < 0) return;
        const uint32_t size = syms[left].len + syms[right].len;
        auto it = token_to_id_.find(std::string(text, syms[left].start, size));
        if (it == token_to_id_.end()) return;
        heap.push_back({scores_[it->second], left, right, size});
        std::push_heap(heap.begin(), heap.end(), cand_before);
    };
    for (int32_t i = 1; i < (int32_t) syms.size(); ++i) try_pair(i - 1, i);

    while (!heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), cand_before);
        const Cand c = heap.back();
        heap.pop_back();
        Sym & l = syms[c.left];
        Sym & r = syms[c.right];
        if (l.len == 0 || r.len == 0 || l.len + r.len != c.size) continue;
        l.len += r.len;
        r.len = 0;
        l.next = r.next;
        if (r.next >= 0) syms[r.next].prev = c.left;
        try_pair(l.prev, c.left);
        try_pair(c.left, l.next);
    }

    for (int32_t i = 0; i >= 0; i = syms[i].next) {
        const Sym & s = syms[i];
        auto it = token_to_id_.find(std::string(text, s.start, s.len));
        if (it != token_to_id_.end()) {
            out.push_back(it->second);
            continue;
        }
        for (uint32_t k = s.start; k < s.start + s.len; ++k) {
            const int32_t id = byte_ids_[(unsigned char) text[k]];
            if (id >= 0) out.push_back(id);
            else if (unk_ >= 0) out.push_back(unk_);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Detokenization
// ---------------------------------------------------------------------------------------------

std::string Vocab::token_to_piece(int32_t id, bool render_special) const {
    if (id < 0 || id >= n_tokens()) {
        throw std::runtime_error("token_to_piece: invalid token id " + std::to_string(id) + " (vocab size " +
                                 std::to_string(n_tokens()) + ")");
    }
    const TokenAttr a = attrs_[id];
    if (!render_special && (a == TokenAttr::control || a == TokenAttr::unknown)) return std::string();
    return pieces_[id];
}

std::string Vocab::detokenize(const std::vector<int32_t> & ids, bool render_special) const {
    std::string out;
    // SentencePiece-style vocabs prefix the text with a space when tokenizing; drop it again
    // from the first token (the first one after a leading BOS).
    bool strip_space = add_space_prefix_;
    for (size_t i = 0; i < ids.size(); ++i) {
        std::string piece = token_to_piece(ids[i], render_special);
        if (strip_space) {
            if (i == 0 && ids[i] == bos_) {
                out += piece;
                continue;
            }
            strip_space = false;
            if (!piece.empty() && piece[0] == ' ') piece.erase(0, 1);
        }
        out += piece;
    }
    if (clean_spaces_) out = clean_up_spaces(out);
    return out;
}

bool Vocab::is_eog(int32_t id) const {
    return id >= 0 && std::binary_search(eog_ids_.begin(), eog_ids_.end(), id);
}

}  // namespace obc
