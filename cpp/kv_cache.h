// The engine's KV cache: per layer K and V tensors of fixed capacity, one cache per KV head.
// Slots are physical rows; positions are tracked per (layer, head, slot), separately from slots,
// so that eviction can keep different tokens per head and compact survivors to the front.
#pragma once

#include "model.h"
#include "obc_ops.h"

#include <climits>
#include <cstdint>
#include <string>
#include <vector>

namespace obc {

// The types a KV cache may store K and V in (llama.cpp's -ctk / -ctv set): f32, f16, bf16,
// q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1, named as ggml_type_name() names them.
const std::vector<ggml_type> & kv_cache_types();
// The type of a name in that list; throws std::invalid_argument naming the key and the choices.
ggml_type parse_kv_cache_type(const std::string & key, const std::string & name);
// A quantized V is stored by token rows, which only ggml_flash_attn_ext reads (as in llama.cpp):
// the mul_mat attention path needs V transposed, one element per token in a row.
inline bool kv_type_needs_flash_attn(ggml_type type_v) { return ggml_is_quantized(type_v); }
// n values of a row stored in type t (n a multiple of its block size) as floats.
void kv_row_to_float(ggml_type t, const void * row, float * out, int64_t n);

class KVCache {
public:
    // v_trans: V stored as [capacity, head_dim, n_head_kv] (fast mul_mat attention) instead of
    // [head_dim, capacity, n_head_kv] (needed by ggml_flash_attn_ext).
    // with_scores: also keep an F32 running-score tensor [capacity, n_head_kv] per layer, in host
    // memory wherever K and V live, which compaction moves along with K and V.
    // n_heads: cache heads; 0 for the model's n_head_kv, or n_head for a cache per query head
    // (KV repeated to every query head, as the paper's reference code evicts).
    // type_k, type_v: one of kv_cache_types(); a quantized type needs head_dim to be a multiple of
    // its block size, and a quantized V needs v_trans false. Throws std::invalid_argument otherwise.
    KVCache(const HParams & hp, int32_t capacity, bool v_trans, ggml_backend_t backend, bool with_scores = false,
            int32_t n_heads = 0, ggml_type type_k = GGML_TYPE_F16, ggml_type type_v = GGML_TYPE_F16);
    ~KVCache();
    KVCache(const KVCache &) = delete;
    KVCache & operator=(const KVCache &) = delete;

    void clear();

    int32_t capacity() const { return capacity_; }
    int32_t n_used() const { return n_used_; }     // slots holding tokens, equal for every head
    int32_t n_past() const { return n_past_; }     // next absolute position
    int32_t n_layer() const { return (int32_t) k_.size(); }
    int32_t n_head_kv() const { return n_head_kv_; }        // cache heads (n_head with a cache per query head)
    int32_t n_head_kv_model() const { return n_head_kv_model_; }
    int32_t head_dim() const { return head_dim_; }
    bool v_trans() const { return v_trans_; }
    ggml_type type_k() const { return k_[0]->type; }
    ggml_type type_v() const { return v_[0]->type; }

    ggml_tensor * k(int il) const { return k_[il]; }
    // A quantized K is stored rotated by an orthonormal block-Hadamard matrix R [head_dim, head_dim]
    // (F32, symmetric, on the cache's backend), and the queries are rotated by it too: q.k = Rq.Rk, so
    // attention and every score are unchanged, but a head's few large channels are spread over the
    // block, where q4_0's one scale per 32 values no longer has to cover them. Null for a float K.
    ggml_tensor * k_rotation() const { return k_rot_; }
    // A quantized K is also stored minus one constant vector c per layer and cache head, in the
    // rotated space: the mean key of the first micro-batch the empty cache takes, fixed until
    // clear(). Softmax does not see a constant added to every logit of a query, so attention is
    // unchanged, but a head whose keys share a large common part (Qwen2.5's K bias, ~50 times the
    // spread of its keys in some heads) no longer spends q4_0's 4 bits on it. The saliency op
    // adds c back (obc_saliency's k_offset) so that z_ij and every score are unchanged too.
    // F32 [head_dim, n_head_kv, n_layer] on the cache's backend; null for a float K.
    ggml_tensor * k_offsets() const { return k_off_; }
    // The graph of the next micro-batch computes c (and writes it to k_offsets()) when this is true.
    bool k_offsets_pending() const { return k_off_ && k_off_host_.empty(); }
    // Called once that graph has run: c is read back and fixed.
    void k_offsets_written();
    // c of one layer as host floats [n_head_kv][head_dim]; null for a float K or before it is set.
    const float * k_offset_host(int il) const {
        return k_off_host_.empty() ? nullptr : k_off_host_.data() + (size_t) il * n_head_kv_ * head_dim_;
    }
    // All of c ([layer][head][head_dim]), empty while unset, and its restoring (an empty vector
    // makes it unset), for saving and restoring a cache.
    const std::vector<float> & k_offsets_values() const { return k_off_host_; }
    void set_k_offsets(const std::vector<float> & c);
    ggml_tensor * v(int il) const { return v_[il]; }
    // Running scores of (layer, head), capacity floats, in host memory; null without scores.
    float * scores(int il, int h) const {
        return s_.empty() ? nullptr : (float *) s_[il]->data + (size_t) h * capacity_;
    }

    // Absolute positions of the used slots of one (layer, head).
    const int32_t * pos(int il, int h) const { return pos_.data() + ((size_t) il * n_head_kv_ + h) * capacity_; }
    int32_t * pos(int il, int h) { return pos_.data() + ((size_t) il * n_head_kv_ + h) * capacity_; }

    // Called once the graph that writes n_tokens new rows at slot n_used() has run.
    void commit(int32_t n_tokens);

    // keep[il][h] lists the slots to keep for (layer, head), strictly increasing. Moves K, V,
    // scores and positions to the front; n_used() becomes the longest list. A head that keeps
    // fewer slots has holes in [its count, n_used()): position kHolePos, masked for every query
    // (head-wise budgets; the memory of the padded layout is n_used() slots for every head).
    void compact(const std::vector<std::vector<std::vector<int32_t>>> & keep);
    static constexpr int32_t kHolePos = INT32_MAX;
    bool has_holes() const { return holes_; }
    // Tokens held, holes excluded, summed over layers and heads.
    int64_t tokens_kept() const;

    // A host copy of everything the cache holds (not the running scores), for evaluating many
    // eviction configurations from one prefill.
    struct Snapshot {
        std::vector<std::vector<uint8_t>> k, v;
        std::vector<int32_t> pos;
        std::vector<float> k_offsets;   // k_offsets_values()
        int32_t n_used = 0, n_past = 0;
        bool holes = false;
    };
    Snapshot snapshot() const;
    void restore(const Snapshot & s);

    // The used slots of one layer in a layout-independent order, for saving a conversation:
    // K and V as [head][slot] rows of head_dim values in the cache's own types (whole quantized
    // rows, ggml_row_size bytes each). set_used() replaces the whole state: the used slots'
    // positions ([layer][head][slot]), then set_layer_rows() fills every layer.
    void get_layer_rows(int il, std::vector<uint8_t> & k, std::vector<uint8_t> & v) const;
    void set_used(int32_t n_used, int32_t n_past, bool holes, const std::vector<int32_t> & pos_used);
    void set_layer_rows(int il, const std::vector<uint8_t> & k, const std::vector<uint8_t> & v);
    // The same rows as floats, [head][slot][head_dim]: the keys as the queries see them (rotated,
    // with the offset added back).
    void get_layer_values(int il, std::vector<float> & k, std::vector<float> & v) const;
    size_t k_row_bytes() const { return ggml_row_size(type_k(), head_dim_); }
    size_t v_row_bytes() const { return ggml_row_size(type_v(), head_dim_); }

    size_t bytes_allocated() const;
    size_t bytes_used() const;
    size_t bytes_per_token() const;   // all layers and heads, K and V

    // Runs the eviction ops on the cache where it lives (host or device memory).
    obc_runner * runner() const { return runner_; }

private:
    void release();

    int32_t capacity_, n_head_kv_, n_head_kv_model_, head_dim_;
    bool v_trans_;
    int32_t n_used_ = 0, n_past_ = 0;
    bool holes_ = false;
    ggml_context * ctx_ = nullptr;
    ggml_backend_buffer_t buf_ = nullptr;
    ggml_context * ctx_s_ = nullptr;
    ggml_backend_buffer_t buf_s_ = nullptr;
    ggml_context * ctx_r_ = nullptr;
    ggml_backend_buffer_t buf_r_ = nullptr;
    ggml_tensor * k_rot_ = nullptr;
    ggml_tensor * k_off_ = nullptr;
    std::vector<float> k_off_host_;   // c on the host once fixed; empty while unset
    ggml_backend_t backend_;
    obc_runner * runner_ = nullptr;
    std::vector<ggml_tensor *> k_, v_, s_;
    std::vector<int32_t> pos_;
};

}  // namespace obc
