// GGUF model loading: hyper-parameters from the metadata, weights into a backend buffer.
#pragma once

#include "vocab.h"

#include <ggml.h>
#include <ggml-backend.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace obc {

enum class Arch { llama, qwen2, qwen3 };

struct HParams {
    Arch arch = Arch::llama;
    std::string arch_name;
    int32_t n_vocab = 0;
    int32_t n_ctx_train = 0;
    int32_t n_embd = 0;
    int32_t n_layer = 0;
    int32_t n_head = 0;
    int32_t n_head_kv = 0;
    int32_t head_dim = 0;
    int32_t n_ff = 0;
    int32_t n_rot = 0;
    float rms_eps = 1e-5f;
    float rope_freq_base = 10000.0f;
    float rope_freq_scale = 1.0f;
    int32_t rope_mode = 0;          // GGML_ROPE_TYPE_NORMAL for llama, NEOX for qwen2
    int32_t n_ctx_orig = 0;         // original context for YaRN-style scaling
};

struct Layer {
    ggml_tensor * attn_norm = nullptr;
    ggml_tensor * wq = nullptr, * wk = nullptr, * wv = nullptr, * wo = nullptr;
    ggml_tensor * bq = nullptr, * bk = nullptr, * bv = nullptr, * bo = nullptr;
    ggml_tensor * q_norm = nullptr, * k_norm = nullptr;   // qwen3: per-head RMSNorm weights [head_dim]
    ggml_tensor * ffn_norm = nullptr;
    ggml_tensor * ffn_gate = nullptr, * ffn_up = nullptr, * ffn_down = nullptr;

    // Every weight of the layer (null where the architecture has none), for code that moves them all.
    std::array<ggml_tensor **, 15> slots() {
        return {&attn_norm, &wq, &wk, &wv, &wo, &bq, &bk, &bv, &bo, &q_norm, &k_norm, &ffn_norm, &ffn_gate, &ffn_up, &ffn_down};
    }
};

struct ModelParams {
    // Repeating layers whose weights go to the first GPU that ggml's backend registry knows (the
    // last n_gpu_layers ones); more than n_layer also moves the output head. Ignored, with
    // gpu_layers() == 0, when ggml was built without a GPU backend.
    int32_t n_gpu_layers = 0;
};

class Model {
public:
    // Throws std::runtime_error with a message naming the file and the problem (the metadata key
    // or tensor at fault). Every value the graph depends on is checked before anything is
    // allocated, so that no file can reach a GGML_ASSERT or an absurd allocation later.
    static std::unique_ptr<Model> load(const std::string & path, const ModelParams & params = {});
    ~Model();
    Model(const Model &) = delete;
    Model & operator=(const Model &) = delete;

    HParams hp;
    Vocab vocab;
    std::string path;
    std::string chat_template;       // tokenizer.chat_template, empty when absent
    std::string name;                // general.name

    ggml_tensor * tok_embd = nullptr;
    ggml_tensor * output_norm = nullptr;
    ggml_tensor * output = nullptr;  // == tok_embd when tied
    ggml_tensor * rope_freqs = nullptr;  // llama3-style per-dimension frequency factors
    std::vector<Layer> layers;

    // The GPU holding the offloaded weights (null when nothing is offloaded). A Model keeps no
    // backend, only read-only weights: each Context computes through backends of its own.
    ggml_backend_dev_t gpu_device() const { return gpu_dev_; }
    int32_t gpu_layers() const { return gpu_layers_; }             // layers whose weights are on the GPU
    size_t weight_bytes() const;
    std::string describe() const;
    // A warning when n_ctx positions go past the training context (what the model saw, and
    // what its rope scaling was made for), as llama.cpp gives; "" otherwise.
    std::string context_warning(int32_t n_ctx) const;
    // A GGUF metadata value as text (strings as they are, numbers in decimal, arrays refused);
    // false when the key is missing or holds an array.
    bool meta_value(const std::string & key, std::string & out) const;

private:
    Model() = default;
    ggml_context * ctx_meta_ = nullptr;   // tensor metadata, owned by gguf
    struct gguf_context * gguf_ = nullptr;
    ggml_backend_dev_t gpu_dev_ = nullptr;
    int32_t gpu_layers_ = 0;
    std::vector<ggml_context *> ctx_weights_;
    std::vector<ggml_backend_buffer_t> buffers_;
};

}  // namespace obc
