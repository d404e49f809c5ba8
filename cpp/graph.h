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
    int32_t n_kv = 0;           // slots attention reads: at least the used ones after the micro-batch is
                                // written (the rest are masked)
    int32_t n_out = 1;          // logits rows to produce: the last n_out tokens; 0 for none
    bool flash_attn = false;
    int32_t capture_first = 0, capture_count = 0;   // queries (after RoPE) to hand back, per layer
    bool head_masks = false;    // one mask per layer and KV head (a cache with holes), else one for all
    bool set_k_offsets = false; // this micro-batch fixes the quantized K's offsets (KVCache::k_offsets)
    // Where a micro-batch of several tokens starts (a transposed V is copied there, an offset in
    // the graph); one token's rows go where its inputs say, so this is not part of the shape.
    int32_t first_slot = 0;

    // Graphs of one token with equal specs have the same nodes and shapes: the context reuses one
    // for the next token, setting only its inputs (where the rows go and what is masked are inputs).
    bool operator==(const GraphSpec & o) const {
        return n_tokens == o.n_tokens && n_kv == o.n_kv && n_out == o.n_out && flash_attn == o.flash_attn &&
               capture_first == o.capture_first && capture_count == o.capture_count && head_masks == o.head_masks &&
               set_k_offsets == o.set_k_offsets;
    }
};

struct ForwardGraph {
    ggml_cgraph * gf = nullptr;
    ggml_tensor * tokens = nullptr;      // I32 [n_tokens]
    ggml_tensor * positions = nullptr;   // I32 [n_tokens]
    ggml_tensor * slots = nullptr;       // I64 [n_tokens]: the cache slot each token's K and V rows go to
    // A transposed V of one token is written value by value: I64 [head_dim * n_head_kv], the
    // element (d, h) of the token's V goes to (h * head_dim + d) * capacity + slot. Null otherwise.
    ggml_tensor * v_cells = nullptr;
    ggml_tensor * mask = nullptr;        // F16 [n_kv, n_tokens], or null with head_masks
    std::vector<ggml_tensor *> layer_masks;   // head_masks: per layer F16 [n_kv, n_tokens, 1, n_head_kv]
    ggml_tensor * logits = nullptr;      // F32 [n_vocab, n_out]
    std::vector<ggml_tensor *> captured_q;    // per layer F32 [head_dim, n_head, capture_count]
};

ForwardGraph build_forward(ggml_context * ctx, const Model & model, const KVCache & kv, const GraphSpec & spec);

}  // namespace obc
