// Tokenizer built from a GGUF vocabulary: byte-level BPE (gpt2-style, with the
// pre-tokenizer named by tokenizer.ggml.pre) and SentencePiece-style "llama" vocabs.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

struct gguf_context;

namespace obc {

enum class TokenAttr : uint8_t { normal, control, user_defined, unknown, byte, unused };

class Vocab {
public:
    // Reads tokenizer.ggml.* keys. Throws std::runtime_error with a clear message
    // for a missing/unsupported tokenizer model or pre-tokenizer.
    static Vocab from_gguf(const gguf_context * ctx);
    // The vocabulary of a GGUF file, which may hold no tensors (llama.cpp's ggml-vocab-*.gguf).
    static Vocab from_file(const std::string & path);

    // add_special: prepend BOS / append EOS as the metadata says (add_bos_token, add_eos_token).
    // parse_special: text such as "<|im_start|>" matching a control/user-defined token becomes
    // that token instead of being split as plain text.
    std::vector<int32_t> tokenize(const std::string & text, bool add_special, bool parse_special) const;

    // The bytes one token stands for. Control tokens render as their text only when render_special.
    std::string token_to_piece(int32_t id, bool render_special = false) const;
    std::string detokenize(const std::vector<int32_t> & ids, bool render_special = false) const;

    int32_t n_tokens() const { return (int32_t) tokens_.size(); }
    int32_t bos() const { return bos_; }
    int32_t eos() const { return eos_; }
    bool add_bos() const { return add_bos_; }
    bool add_eos() const { return add_eos_; }
    // End of generation: EOS, EOT (e.g. <|im_end|>, <|endoftext|>) and any token the metadata marks so.
    bool is_eog(int32_t id) const;
    TokenAttr attr(int32_t id) const { return attrs_.at(id); }
    int32_t eot() const { return eot_; }
    int32_t unk() const { return unk_; }
    int32_t pad() const { return pad_; }
    const std::string & token_text(int32_t id) const { return tokens_.at(id); }
    const std::string & model() const { return model_; }      // "gpt2" | "llama"
    const std::string & pre() const { return pre_; }          // e.g. "smollm", "qwen2", "llama-bpe"

private:
    struct Fragment;

    std::string model_, pre_;
    std::vector<std::string> tokens_;
    std::vector<float> scores_;
    std::vector<TokenAttr> attrs_;
    std::unordered_map<std::string, int32_t> token_to_id_;
    // Byte-level BPE merges keyed by the symbol ids of the pair: (left << 32 | right) ->
    // {rank, id of the merged symbol}. Symbol ids are token ids; merge parts/results that
    // are not in the vocab get ids >= n_tokens() (they fall back to per-byte tokens).
    std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;
    std::vector<int32_t> eog_ids_;                            // sorted
    std::vector<int32_t> special_ids_;                        // control + user-defined + unknown, longest text first
    std::vector<std::string> pieces_;                         // decoded bytes of every token (special ones: their text)
    int32_t byte_ids_[256] = {};                              // gpt2: symbol id of each byte; llama: <0xXX> token (-1: none)
    int32_t bos_ = -1, eos_ = -1, eot_ = -1, eom_ = -1, unk_ = -1, pad_ = -1;
    bool add_bos_ = false, add_eos_ = false, add_space_prefix_ = false;
    bool clean_spaces_ = false, ignore_merges_ = false;
    int pre_type_ = 0;

    std::vector<Fragment> partition_special(const std::string & text, bool parse_special) const;
    void tokenize_bpe(const std::string & text, std::vector<int32_t> & out) const;
    void tokenize_spm(const std::string & text, std::vector<int32_t> & out) const;
};

}  // namespace obc
