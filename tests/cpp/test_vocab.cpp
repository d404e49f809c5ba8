// Standalone driver for obc::Vocab.
//
//   test_vocab MODEL.gguf [--bos] [--special] [--render]   < lines
//       Tokenizes each stdin line and prints one JSON object per line:
//         {"ids":[...],"detok_hex":"<hex of detokenize(ids)>"}
//       A line starting with '"' is parsed as a JSON string literal (so it can hold \n, \t,
//       \uXXXX, ...); any other line is taken verbatim (without its newline).
//       --bos: add_special, --special: parse_special, --render: render_special in detokenize.
//   test_vocab MODEL.gguf --detok [--render] < lines of JSON id arrays, e.g. [504,3575]
//       prints {"text_hex":"<hex of detokenize(ids)>","pieces_hex":["<hex of token_to_piece>",...]}
//   test_vocab MODEL.gguf --info        prints model/pre/bos/eos/eog/n_tokens
//   test_vocab MODEL.gguf --selftest    built-in SmolLM2 parity checks (exit code 1 on failure)
//   test_vocab MODEL.gguf --bench       times tokenize/detokenize of ~8k tokens of English

#include "gguf.h"
#include "unicode.h"
#include "vocab.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Minimal JSON string literal parser (the whole line is one literal).
std::string parse_json_string(const std::string & s) {
    std::string out;
    size_t i = 1;
    auto hex4 = [&](size_t at) -> uint32_t {
        if (at + 4 > s.size()) throw std::runtime_error("bad \\u escape");
        return (uint32_t) std::stoul(s.substr(at, 4), nullptr, 16);
    };
    while (i < s.size() && s[i] != '"') {
        char c = s[i++];
        if (c != '\\') {
            out.push_back(c);
            continue;
        }
        if (i >= s.size()) throw std::runtime_error("bad escape");
        c = s[i++];
        switch (c) {
            case 'n': out.push_back('\n'); break;
            case 't': out.push_back('\t'); break;
            case 'r': out.push_back('\r'); break;
            case 'b': out.push_back('\b'); break;
            case 'f': out.push_back('\f'); break;
            case '/': out.push_back('/'); break;
            case '\\': out.push_back('\\'); break;
            case '"': out.push_back('"'); break;
            case 'u': {
                uint32_t cp = hex4(i);
                i += 4;
                if (cp >= 0xD800 && cp < 0xDC00 && i + 6 <= s.size() && s[i] == '\\' && s[i + 1] == 'u') {
                    const uint32_t lo = hex4(i + 2);
                    if (lo >= 0xDC00 && lo < 0xE000) {
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        i += 6;
                    }
                }
                obc::unicode::append_utf8(out, cp);
                break;
            }
            default: throw std::runtime_error("bad escape");
        }
    }
    return out;
}

std::string to_hex(const std::string & s) {
    static const char * d = "0123456789abcdef";
    std::string h;
    for (unsigned char c : s) {
        h.push_back(d[c >> 4]);
        h.push_back(d[c & 15]);
    }
    return h;
}

std::string ids_json(const std::vector<int32_t> & ids) {
    std::string s = "[";
    for (size_t i = 0; i < ids.size(); ++i) {
        if (i) s += ",";
        s += std::to_string(ids[i]);
    }
    return s + "]";
}

struct Case {
    const char * text;
    std::vector<int32_t> ids;
};

int selftest(const obc::Vocab & v) {
    // llama.cpp reference ids for SmolLM2 (pre "smollm"), no BOS.
    const std::vector<Case> cases = {
        {"Hello, world!", {19556, 28, 905, 17}},
        {"  leading spaces and\ttabs\nnewline", {216, 2899, 5600, 284, 197, 100, 7366, 198, 28160}},
        {"\xE6\x95\xB0\xE5\xAD\xA6 and \xC3\xA9mojis \xF0\x9F\x99\x82 123456789",
         {18265, 18753, 116, 284, 26411, 15771, 90, 271, 47526, 216, 33, 34, 35, 36, 37, 38, 39, 40, 41}},
        {"The capital of France is", {504, 3575, 282, 4649, 314}},
    };
    int fails = 0;
    for (const Case & c : cases) {
        const auto ids = v.tokenize(c.text, false, false);
        const std::string back = v.detokenize(ids);
        const bool ok = ids == c.ids && back == c.text;
        if (!ok) ++fails;
        std::printf("%s %s -> %s%s\n", ok ? "PASS" : "FAIL", to_hex(c.text).c_str(), ids_json(ids).c_str(),
                    back == c.text ? "" : " (round trip differs)");
    }
    // special tokens
    {
        const auto ids = v.tokenize("<|im_start|>user\nHi<|im_end|>", false, true);
        const auto ids_plain = v.tokenize("<|im_start|>", false, false);
        const bool ok = ids.size() >= 3 && ids.front() == 1 && ids.back() == 2 && ids_plain.size() > 1 &&
                        v.detokenize(ids, true) == "<|im_start|>user\nHi<|im_end|>" && v.detokenize(ids, false) == "user\nHi" &&
                        v.is_eog(2) && v.is_eog(0) && !v.is_eog(1);
        if (!ok) ++fails;
        std::printf("%s special tokens -> %s / plain %s\n", ok ? "PASS" : "FAIL", ids_json(ids).c_str(),
                    ids_json(ids_plain).c_str());
    }
    // invalid id
    {
        bool threw = false;
        try {
            v.token_to_piece(v.n_tokens());
        } catch (const std::runtime_error &) {
            threw = true;
        }
        if (!threw) ++fails;
        std::printf("%s invalid id throws\n", threw ? "PASS" : "FAIL");
    }
    std::printf("%d failure(s)\n", fails);
    return fails ? 1 : 0;
}

int bench(const obc::Vocab & v) {
    const std::string para =
        "The quick brown fox jumps over the lazy dog. In 1987, researchers at the university published a paper "
        "describing how tokenizers split text into words, numbers and punctuation; it wasn't widely read until "
        "much later, when large language models made byte-pair encoding popular again.\n\n";
    std::string text;
    while (v.tokenize(text, false, false).size() < 8192) text += para;
    const int reps = 20;
    size_t n = 0;
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) n = v.tokenize(text, false, true).size();
    auto t1 = std::chrono::steady_clock::now();
    std::string back;
    const auto ids = v.tokenize(text, false, true);
    for (int r = 0; r < reps; ++r) back = v.detokenize(ids);
    auto t2 = std::chrono::steady_clock::now();
    const double tok_ms = std::chrono::duration<double, std::milli>(t1 - t0).count() / reps;
    const double det_ms = std::chrono::duration<double, std::milli>(t2 - t1).count() / reps;
    std::printf("%zu bytes -> %zu tokens: tokenize %.2f ms, detokenize %.2f ms, round trip %s\n", text.size(), n, tok_ms,
                det_ms, back == text ? "ok" : "DIFFERS");
    return back == text ? 0 : 1;
}

}  // namespace

int main(int argc, char ** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s MODEL.gguf [--bos] [--special] [--render] [--info|--selftest|--bench]\n", argv[0]);
        return 2;
    }
    bool bos = false, special = false, render = false, info = false, self = false, do_bench = false, detok = false;
    for (int i = 2; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--bos")) bos = true;
        else if (!std::strcmp(argv[i], "--special")) special = true;
        else if (!std::strcmp(argv[i], "--render")) render = true;
        else if (!std::strcmp(argv[i], "--info")) info = true;
        else if (!std::strcmp(argv[i], "--selftest")) self = true;
        else if (!std::strcmp(argv[i], "--bench")) do_bench = true;
        else if (!std::strcmp(argv[i], "--detok")) detok = true;
        else {
            std::fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    gguf_init_params params{};
    params.no_alloc = true;
    params.ctx = nullptr;
    gguf_context * g = gguf_init_from_file(argv[1], params);
    if (!g) {
        std::fprintf(stderr, "cannot read %s\n", argv[1]);
        return 2;
    }
    obc::Vocab v;
    try {
        v = obc::Vocab::from_gguf(g);
    } catch (const std::exception & e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        gguf_free(g);
        return 3;
    }
    gguf_free(g);

    if (info) {
        std::vector<int32_t> eog;
        for (int32_t i = 0; i < v.n_tokens(); ++i)
            if (v.is_eog(i)) eog.push_back(i);
        std::printf("{\"model\":\"%s\",\"pre\":\"%s\",\"n_tokens\":%d,\"bos\":%d,\"eos\":%d,\"add_bos\":%s,\"add_eos\":%s,\"eog\":%s}\n",
                    v.model().c_str(), v.pre().c_str(), v.n_tokens(), v.bos(), v.eos(), v.add_bos() ? "true" : "false",
                    v.add_eos() ? "true" : "false", ids_json(eog).c_str());
        return 0;
    }
    if (self) return selftest(v);
    if (do_bench) return bench(v);

    std::string line;
    if (detok) {
        while (std::getline(std::cin, line)) {
            std::vector<int32_t> ids;
            for (size_t i = 0; i < line.size();) {
                if ((line[i] >= '0' && line[i] <= '9') || line[i] == '-') {
                    size_t used = 0;
                    ids.push_back((int32_t) std::stol(line.substr(i), &used));
                    i += used;
                } else {
                    ++i;
                }
            }
            try {
                std::string pieces;
                for (size_t i = 0; i < ids.size(); ++i) pieces += (i ? ",\"" : "\"") + to_hex(v.token_to_piece(ids[i], render)) + "\"";
                std::printf("{\"text_hex\":\"%s\",\"pieces_hex\":[%s]}\n", to_hex(v.detokenize(ids, render)).c_str(), pieces.c_str());
            } catch (const std::exception & e) {
                std::printf("{\"error\":\"%s\"}\n", e.what());
            }
            std::fflush(stdout);
        }
        return 0;
    }
    while (std::getline(std::cin, line)) {
        std::string text;
        try {
            text = (!line.empty() && line[0] == '"') ? parse_json_string(line) : line;
        } catch (const std::exception & e) {
            std::printf("{\"error\":\"%s\"}\n", e.what());
            continue;
        }
        const auto ids = v.tokenize(text, bos, special);
        std::printf("{\"ids\":%s,\"detok_hex\":\"%s\"}\n", ids_json(ids).c_str(), to_hex(v.detokenize(ids, render)).c_str());
        std::fflush(stdout);
    }
    return 0;
}
