/* pyobcache's C API: load a GGUF model, generate with a bounded, OBCache-evicted KV cache.
 * Every function that can fail returns NULL or a negative value; obc_last_error() then says why.
 * Objects are not thread-safe; use one context per thread. */
#ifndef OBCACHE_H
#define OBCACHE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct obc_model obc_model;
typedef struct obc_context obc_context;

typedef struct obc_context_params {
    int32_t n_ctx;         /* context size in tokens (0: 4096) */
    int32_t n_batch;       /* prompt micro-batch (0: 512) */
    int32_t n_threads;     /* 0: physical cores */
    /* KV eviction; kv_method NULL or "" means the full cache. */
    const char * kv_method;  /* e.g. "obc-vk", "snapkv", "obc-v+snapkv", "h2o", "streamingllm" */
    int32_t kv_budget;       /* tokens kept per layer and head */
    float kv_ratio;          /* or a fraction of the prompt, when kv_budget is 0 */
    int32_t kv_n_recent;     /* -1: the method's default */
    int32_t kv_n_sink;       /* -1: the method's default */
    const char * kv_evict;   /* "prefill" | "chunked" | "decode"; NULL: "prefill" */
} obc_context_params;

typedef struct obc_sampling_params {
    float temperature;     /* <= 0: greedy */
    int32_t top_k;
    float top_p;
    float min_p;
    float repeat_penalty;
    uint64_t seed;
    int32_t max_new_tokens;
} obc_sampling_params;

/* Called with each piece of generated text (UTF-8); return non-zero to stop. */
typedef int (*obc_token_callback)(const char * piece, size_t len, void * user);

const char * obc_last_error(void);

obc_context_params obc_context_default_params(void);
obc_sampling_params obc_sampling_default_params(void);

obc_model * obc_model_load(const char * path);
void obc_model_free(obc_model * model);
int32_t obc_model_n_vocab(const obc_model * model);

/* Returns the number of tokens written, or -(needed) when out is too small, or INT32_MIN on error. */
int32_t obc_tokenize(const obc_model * model, const char * text, int32_t add_special, int32_t * out, int32_t n_max);
/* Writes at most n_max bytes of the text of ids (not NUL-terminated); returns its full length or -1. */
int32_t obc_detokenize(const obc_model * model, const int32_t * ids, int32_t n_ids, char * out, int32_t n_max);

obc_context * obc_context_new(obc_model * model, obc_context_params params);
void obc_context_free(obc_context * ctx);
void obc_context_reset(obc_context * ctx);

/* Generates from the prompt text; returns the number of generated tokens or -1. */
int32_t obc_generate(obc_context * ctx, const char * prompt, obc_sampling_params params, obc_token_callback cb,
                     void * user);

/* KV cache bytes: allocated, and used by the tokens it holds now. */
size_t obc_kv_bytes_allocated(const obc_context * ctx);
size_t obc_kv_bytes_used(const obc_context * ctx);

#ifdef __cplusplus
}
#endif

#endif /* OBCACHE_H */
