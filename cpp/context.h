// An inference context: a KV cache, a backend scheduler and the decode loop over micro-batches.
#pragma once

#include "graph.h"
#include "kv_cache.h"
#include "model.h"
#include "threads.h"

#include <ggml-backend.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <vector>

namespace obc {

// Thrown when a context's abort callback asked to stop (Ctrl-C, a cancel button): the work in
// flight was dropped and the context holds only the micro-batches that finished before it.
struct Interrupted : std::runtime_error {
    Interrupted() : std::runtime_error("interrupted") {}
};

// The CLIs report a prefill's progress on stderr for prompts of at least this many tokens.
constexpr int32_t kCliProgressMinTokens = 2048;

struct ContextParams {
    int32_t n_ctx = 4096;       // largest number of positions a sequence may reach
    int32_t n_batch = 512;      // micro-batch size for prompt processing
    ThreadParams threads;       // the CPU thread pool (n_threads 0: default_thread_count())
    int32_t flash_attn = -1;    // -1: choose per request (Session; here: 0 unless type_v needs 1), 0: mul_mat + soft_max,
                                // 1: ggml_flash_attn_ext
    int32_t kv_capacity = 0;    // slots to allocate; 0: n_ctx (eviction configurations allocate less)
    bool kv_scores = false;     // keep running eviction scores beside K and V
    bool kv_per_query_head = false;   // one cache per query head (KV repeated), for gqa=expand
    ggml_type type_k = GGML_TYPE_F16, type_v = GGML_TYPE_F16;   // KV cache types (kv_cache_types())
};

// Receives the eviction-related events of the decode loop.
class DecodeObserver {
public:
    virtual ~DecodeObserver() = default;
    // Before a micro-batch of n tokens (indices [begin, begin+n) of a decode call of n_total tokens)
    // is written: may compact the cache to make room. Returns how many of the micro-batch's last
    // queries to capture (0 for none).
    virtual int32_t before_ubatch(int32_t begin, int32_t n, int32_t n_total) = 0;
    // After the micro-batch ran: the captured queries of every layer, each [n_q][n_head][head_dim]
    // (after RoPE), for the last n_q tokens written to the cache.
    virtual void after_ubatch(const std::vector<std::vector<float>> & q, int32_t n_q) = 0;
    // After the whole decode call.
    virtual void after_decode(int32_t n_total) = 0;
};

class Context {
public:
    Context(const Model & model, const ContextParams & params);
    ~Context();
    Context(const Context &) = delete;
    Context & operator=(const Context &) = delete;

    // Appends tokens to the sequence and runs them through the model in micro-batches.
    // all_logits: keep logits for every token (teacher forcing), else only for the last.
    // A context runs one call at a time: a second thread entering decode() while one runs gets
    // std::logic_error instead of a corrupted cache.
    void decode(const int32_t * tokens, int32_t n, bool all_logits = false);

    const float * logits() const { return logits_.data(); }
    int32_t n_logit_rows() const { return n_logit_rows_; }
    int32_t n_vocab() const { return model_.hp.n_vocab; }

    void reset();
    // The most CPU threads a graph uses, and how many the last graph used (fewer while other
    // processes keep the CPUs busy, see CpuThreads).
    int32_t n_threads() const { return threads_->max_threads(); }
    int32_t n_threads_last() const { return threads_->last_threads(); }
    // For a graph computed on backend_cpu() outside decode(): chooses its thread count and
    // counts those threads as busy for as long as the returned object lives.
    CpuThreads::Use use_cpu_threads() { return CpuThreads::Use(*threads_); }
    int32_t n_ctx() const { return params_.n_ctx; }
    int32_t n_batch() const { return params_.n_batch; }
    bool flash_attn() const { return flash_attn_; }

    KVCache & kv() { return *kv_; }
    const KVCache & kv() const { return *kv_; }
    const Model & model() const { return model_; }

    void set_observer(DecodeObserver * obs) { observer_ = obs; }

    // Polled between micro-batches, between eviction scoring graphs and, through ggml, between
    // the nodes of every graph this context computes; returning true makes the running call
    // throw Interrupted. The callback runs on the calling thread (or ggml's thread 0) and must be
    // cheap. nullptr removes it.
    void set_abort_callback(ggml_abort_callback fn, void * data);
    // Throws Interrupted when the abort callback asks to stop.
    void check_abort() const;

    // Called after each micro-batch of a prompt (a decode() of more than one token) with the
    // tokens of that call done so far and its total, on the decoding thread. Empty: none.
    void set_progress_callback(std::function<void(int32_t done, int32_t total)> fn) { progress_ = std::move(fn); }

    // This context's own backends: compute state (thread pool, work buffer, streams) is never
    // shared between contexts, so contexts of one model can run in different threads at once.
    ggml_backend_t backend_cpu() const { return backend_cpu_; }
    ggml_backend_t backend_gpu() const { return backend_gpu_; }   // null when nothing is offloaded

    // Timings of the work done since the last reset_timings().
    struct Timings {
        double prompt_ms = 0, gen_ms = 0;
        int64_t prompt_tokens = 0, gen_tokens = 0;
        int64_t graphs_built = 0;   // forward graphs built (one-token graphs are reused while their shape holds)
        int64_t graph_nodes = 0;    // nodes of the last graph built (which ops the graph builder chose)
    };
    Timings timings;

private:
    void release();
    void run_ubatch(const int32_t * tokens, int32_t n, bool want_logits, bool all_logits, int32_t n_capture);

    const Model & model_;
    ContextParams params_;
    ggml_backend_t backend_cpu_ = nullptr;
    ggml_backend_t backend_gpu_ = nullptr;
    ggml_abort_callback abort_fn_ = nullptr;
    void * abort_data_ = nullptr;
    std::function<void(int32_t, int32_t)> progress_;
    std::unique_ptr<CpuThreads> threads_;
    bool flash_attn_ = false;
    std::unique_ptr<KVCache> kv_;
    ggml_backend_sched_t sched_ = nullptr;
    std::vector<uint8_t> graph_meta_;
    // The last graph, kept for the next token while its spec holds (GraphSpec::operator==):
    // decoding one token after another then sets inputs and computes, without building the graph
    // or planning its memory again.
    ggml_context * graph_ctx_ = nullptr;
    ForwardGraph graph_;
    GraphSpec graph_spec_;
    bool graph_ready_ = false;
    std::vector<float> logits_;
    int32_t n_logit_rows_ = 0;
    DecodeObserver * observer_ = nullptr;
    std::atomic<bool> busy_{false};
};


}  // namespace obc
