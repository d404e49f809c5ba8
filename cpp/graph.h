// The forward graph of a llama / qwen2 decoder for one micro-batch.
#pragma once

#include "kv_cache.h"
#include "model.h"
#include "obc_ops.h"

#include <ggml.h>

#include <vector>

namespace obc {

struct GraphSpec {
    int32_t n_tokens = 0;       // tokens in the micro-batch
    int32_t n_kv = 0;           // used slots after the micro-batch is written
    int32_t n_out = 1;          // logits rows to produce: the last n_out tokens; 0 for none
    bool flash_attn = false;
    int32_t capture_first = 0, capture_count = 0;   // queries (after RoPE) to hand back, per layer
    bool head_masks = false;    // one mask per layer and KV head (a cache with holes), else one for all
};

struct ForwardGraph {
    ggml_cgraph * gf = nullptr;
    ggml_tensor * tokens = nullptr;      // I32 [n_tokens]
    ggml_tensor * positions = nullptr;   // I32 [n_tokens]
    ggml_tensor * slots = nullptr;       // I64 [n_tokens]: the cache slot each token's K and V rows go to
    ggml_tensor * mask = nullptr;        // F16 [n_kv, n_tokens], or null with head_masks
    std::vector<ggml_tensor *> layer_masks;   // head_masks: per layer F16 [n_kv, n_tokens, 1, n_head_kv]
    ggml_tensor * logits = nullptr;      // F32 [n_vocab, n_out]
    std::vector<ggml_tensor *> captured_q;    // per layer F32 [head_dim, n_head, capture_count]
};

ForwardGraph build_forward(ggml_context * ctx, const Model & model, const KVCache & kv, const GraphSpec & spec);

}  // namespace obc
