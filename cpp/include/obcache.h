/* pyobcache's C API: load a GGUF model, generate with a bounded, OBCache-evicted KV cache.
 *
 * Errors. Every function that can fail returns NULL or a negative value; obc_last_error() then
 * says why. NULL handles, negative sizes, an output pointer that is NULL while its size is
 * positive, and out-of-range parameters (NaN sampling values included) are errors, never crashes.
 *
 * Ownership and lifetimes.
 * - obc_model_load() returns a model the caller owns; obc_model_free() releases it.
 * - obc_context_new() returns a context the caller owns; obc_context_free() releases it. A context
 *   borrows its model: free every context of a model before the model. obc_model_free() refuses
 *   (returns -1, frees nothing) while contexts of that model are alive.
 * - Handles are checked against the live ones: passing a freed handle (use after free, double
 *   free) returns an error instead of touching freed memory. (A handle value that a later
 *   allocation happens to reuse cannot be told apart; do not keep freed handles.)
 * - Strings in obc_context_params (kv_method, kv_evict, kv_spec, type_k, type_v, cpu_mask) are
 *   copied by obc_context_new(); the caller keeps ownership of its buffers. Every other pointer
 *   argument is borrowed for the call.
 * - obc_last_error() returns a string owned by the library, per thread, valid until that thread's
 *   next call into the API.
 * - The piece passed to an obc_token_callback is valid only during the callback.
 *
 * Threads. A model is read-only after loading and may be shared: contexts of one model run in
 * different threads at once (each context has its own compute backend). One context runs one
 * call at a time; a call on a context that is busy in another thread fails with an error. */
#ifndef OBCACHE_H
#define OBCACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct obc_model obc_model;
typedef struct obc_context obc_context;
typedef struct obc_sampler obc_sampler;

typedef struct obc_context_params {
    int32_t n_ctx;         /* context size in tokens (0: 4096; negative: error) */
    int32_t n_batch;       /* prompt micro-batch (0: 512; negative: error) */
    int32_t n_threads;     /* the most CPU threads a graph uses; 0: the physical performance cores;
                              more than the CPUs this process may run on is clamped */
    bool adaptive_threads; /* use fewer threads while other processes keep the CPUs busy (default on) */
    int32_t poll;          /* 0-100: how long idle workers spin for the next graph before sleeping (0) */
    int32_t prio;          /* thread priority: -1 low, 0 normal, 1 medium, 2 high, 3 realtime */
    const char * cpu_mask; /* hex mask of the CPUs to run on, e.g. "0x3"; NULL or "": inherited.
                              Copied by obc_context_new. */
    bool cpu_strict;       /* pin each thread to one CPU of cpu_mask */
    int32_t flash_attn;    /* attention path: -1 chosen per request (flash attention when the prompt
                              dominates or eviction keeps the cache short), 0 mul_mat + soft_max,
                              1 ggml_flash_attn_ext */
    /* KV eviction; kv_method NULL or "" means the full cache. */
    const char * kv_method;  /* e.g. "obc-vk", "snapkv", "obc-v+snapkv", "h2o", "streamingllm" */
    int32_t kv_budget;       /* tokens kept per layer and head */
    float kv_ratio;          /* or a fraction of the prompt, when kv_budget is 0 */
    int32_t kv_n_recent;     /* -1: the method's default; other negatives: error */
    int32_t kv_n_sink;       /* -1: the method's default; other negatives: error */
    const char * kv_evict;   /* "prefill" | "chunked" | "decode"; NULL: "prefill" */
    /* Or the whole KV configuration as one string, read as the CLIs' --kv and Python's
     * KVConfig.from_spec read it: "obc-vk+snapkv,budget=512,evict=chunked,group_pool=sum". With
     * kv_spec set, kv_method, kv_budget and kv_ratio must be unset. NULL or "": the fields. */
    const char * kv_spec;
    /* What the KV cache stores keys and values in, as llama.cpp's -ctk / -ctv: "f16" (NULL or ""),
     * "q8_0" (about half the bytes), "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "bf16", "f32".
     * With or without eviction; they apply after kv_spec. A quantized type_v needs flash attention
     * (flash_attn 1 or -1; 0 is an error). A quantized type_k is stored rotated (keys and queries
     * times one Hadamard matrix) and minus each head's mean key of the first micro-batch:
     * attention and the eviction scores are unchanged, the quantization error smaller (q4_0 keys
     * work on Qwen2.5, which they break in llama.cpp). Copied by obc_context_new(). */
    const char * type_k;
    const char * type_v;
} obc_context_params;

typedef struct obc_sampling_params {
    float temperature;     /* <= 0: greedy; must be finite */
    int32_t top_k;         /* 0: off; negative: error */
    float top_p;           /* in (0, 1] */
    float min_p;           /* in [0, 1] */
    float repeat_penalty;  /* positive and finite; 1: off */
    uint64_t seed;         /* 0xFFFFFFFF: seeded from the clock */
    int32_t max_new_tokens;
    /* The caller's sampler chain (obc_sampler_chain_new), or NULL. When set, the generate calls
     * sample with it, in place (it records the prompt and the generated tokens), and ignore the
     * fields above but max_new_tokens. It must not be freed or used elsewhere during the call. */
    struct obc_sampler * sampler;
} obc_sampling_params;

/* Called with each piece of generated text (UTF-8); return non-zero to stop. */
typedef int (*obc_token_callback)(const char * piece, size_t len, void * user);
/* Polled often during obc_generate (between prompt micro-batches and between the nodes of each
 * graph); return non-zero to cancel: obc_generate then returns -1 with the error "interrupted".
 * Called on the generating thread; keep it cheap (e.g. read an atomic flag). */
typedef int (*obc_abort_callback)(void * user);
/* Called during a prompt's prefill after each micro-batch (n_batch tokens), with the prompt tokens
 * done so far and the total; for progress bars. Called on the generating thread. */
typedef void (*obc_progress_callback)(int32_t done, int32_t total, void * user);

/* The last error of this thread (never NULL; "" after a call that succeeded). */
const char * obc_last_error(void);

obc_context_params obc_context_default_params(void);
obc_sampling_params obc_sampling_default_params(void);

typedef struct obc_model_params {
    int32_t n_gpu_layers;  /* the last n repeating layers go to the first GPU ggml knows; more than
                              n_layer also moves the output head; 0: none. Ignored (everything on the
                              CPU) when ggml has no GPU backend. Negative: error. */
} obc_model_params;

obc_model_params obc_model_default_params(void);

/* Loads a GGUF file; NULL on error (missing, corrupt, unsupported or out-of-range metadata, bad
 * params). The CPU threads are a context's (obc_context_params.n_threads): loading computes nothing. */
obc_model * obc_model_load_from_file(const char * path, obc_model_params params);
/* obc_model_load_from_file with obc_model_default_params(). */
obc_model * obc_model_load(const char * path);
/* Layers whose weights were offloaded to a GPU (0 on a CPU-only build), or -1 for an invalid handle. */
int32_t obc_model_n_gpu_layers(const obc_model * model);
/* Frees the model: 0, or -1 (nothing freed) when the handle is not a live model or contexts of
 * it are still alive. NULL is a no-op returning 0. */
int32_t obc_model_free(obc_model * model);
/* Vocabulary size, or -1 for an invalid handle. */
int32_t obc_model_n_vocab(const obc_model * model);

typedef enum obc_model_meta_key {
    OBC_META_N_CTX_TRAIN, /* the training context */
    OBC_META_N_EMBD,
    OBC_META_N_LAYER,
    OBC_META_N_HEAD,
    OBC_META_N_HEAD_KV,
    OBC_META_HEAD_DIM,
    OBC_META_N_VOCAB,
    OBC_META_BOS,         /* the BOS token id, -1 when there is none */
    OBC_META_EOS,         /* the EOS token id, -1 when there is none */
    OBC_META_ADD_BOS,     /* 1 when prompts start with BOS (obc_tokenize's add_special) */
    OBC_META_EOT,         /* the end-of-turn token id (e.g. <|im_end|>), -1 when there is none */
    OBC_META_UNK,         /* the unknown token id, -1 when there is none */
    OBC_META_PAD          /* the padding token id, -1 when there is none */
} obc_model_meta_key;
/* A model fact (above); -1 on error (invalid handle or key). */
int32_t obc_model_meta(const obc_model * model, obc_model_meta_key key);
/* A GGUF metadata value as text, e.g. "general.architecture", "general.name" or
 * "tokenizer.chat_template" (the Jinja chat template): writes at most n_max - 1 bytes and a NUL to
 * out and returns the value's full length, or -1 (invalid handle, missing key, an array value,
 * out NULL with n_max > 0). out may be NULL with n_max 0 to ask for the length. */
int32_t obc_model_meta_str(const obc_model * model, const char * key, char * out, int32_t n_max);

/* Writes the tokens of text to out (n_max entries). Returns the number written, or -(needed)
 * when n_max is too small (out may be NULL with n_max 0 to ask for the size), or INT32_MIN on
 * error (invalid handle, NULL text, n_max < 0, out NULL with n_max > 0). */
int32_t obc_tokenize(const obc_model * model, const char * text, int32_t add_special, int32_t * out, int32_t n_max);
/* Writes at most n_max bytes of the text of ids (not NUL-terminated); returns its full length, or
 * -1 on error (invalid handle or token id, n_ids or n_max negative, a NULL pointer with a positive
 * size). out may be NULL with n_max 0 to ask for the length. */
int32_t obc_detokenize(const obc_model * model, const int32_t * ids, int32_t n_ids, char * out, int32_t n_max);

/* Writes at most n_max bytes of the text token stands for (not NUL-terminated) and returns its
 * full length, or -1 (invalid handle or token id, n_max negative, out NULL with n_max > 0). Control
 * tokens (<|im_start|>, ...) give their text only with render_special != 0, else "". */
int32_t obc_token_to_piece(const obc_model * model, int32_t token, int32_t render_special, char * out, int32_t n_max);

/* What kind of token an id is (the GGUF's tokenizer.ggml.token_type). */
typedef enum obc_token_attr {
    OBC_TOKEN_NORMAL,
    OBC_TOKEN_CONTROL,       /* BOS, EOS, chat-template markers: not text */
    OBC_TOKEN_USER_DEFINED,
    OBC_TOKEN_UNKNOWN,
    OBC_TOKEN_BYTE,          /* a raw byte (<0x0A>) of a SentencePiece vocabulary */
    OBC_TOKEN_UNUSED
} obc_token_attr;
/* The token's kind, or -1 for an invalid handle or token id. */
int32_t obc_token_get_attr(const obc_model * model, int32_t token);

/* A context for generating with model (which must outlive it); NULL on error (invalid handle,
 * impossible KV configuration, negative sizes). */
obc_context * obc_context_new(obc_model * model, obc_context_params params);
/* Frees the context: 0, or -1 (nothing freed) when the handle is not a live context or it is
 * generating in another thread. NULL is a no-op returning 0. */
int32_t obc_context_free(obc_context * ctx);
/* Drops the KV cache of the last generation (the next obc_generate starts afresh anyway). */
void obc_context_reset(obc_context * ctx);
/* Installs (or, with cb NULL, removes) the cancel callback of ctx. */
int32_t obc_context_set_abort_callback(obc_context * ctx, obc_abort_callback cb, void * user);
/* Installs (or, with cb NULL, removes) the prefill progress callback of ctx. */
int32_t obc_context_set_progress_callback(obc_context * ctx, obc_progress_callback cb, void * user);

/* Generates from the prompt text; returns the number of generated tokens or -1. */
int32_t obc_generate(obc_context * ctx, const char * prompt, obc_sampling_params params, obc_token_callback cb,
                     void * user);

/* KV cache bytes of the last generation: allocated, and used by the tokens it holds now
 * (0 before the first generation or for an invalid handle). */
size_t obc_kv_bytes_allocated(const obc_context * ctx);
size_t obc_kv_bytes_used(const obc_context * ctx);

/* What the KV cache of the last generation or the conversation holds and what eviction did. */
typedef struct obc_kv_stats {
    int64_t tokens_seen;      /* tokens that went through the cache */
    int64_t evictions;        /* compactions */
    int64_t tokens_evicted;   /* summed over layers and heads */
    int32_t budget;           /* tokens kept per layer and KV head (0: the full cache) */
    size_t bytes_allocated;   /* K and V buffers */
    size_t bytes_used;        /* the slots in use */
    size_t bytes_kept;        /* what the kept tokens alone take (head-wise budgets pad) */
    size_t bytes_full;        /* what the full cache of the sequence would take */
    double score_ms, compact_ms;
    int32_t n_layer;
    const int32_t * kept_per_layer; /* n_layer counts; owned by ctx, valid until its next obc_kv_stats_get */
} obc_kv_stats;
/* Fills out (zeros before any generation); 0 or -1. */
int32_t obc_kv_stats_get(obc_context * ctx, obc_kv_stats * out);

/* Conversations. A context can hold one conversation: a token sequence whose KV cache carries
 * over from call to call, so that each turn prefills only its new tokens. With eviction
 * (kv_method and a kv_budget in tokens; kv_ratio is refused) the cache is allocated once, at
 * kv_budget + max(n_batch, 32) slots, and memory stays bounded however long the conversation
 * grows; positions stay absolute and may reach n_ctx. The first obc_conversation_* call starts
 * the conversation; obc_generate and obc_context_reset end it. Texts are appended as they are:
 * the caller renders its chat template (parse_special != 0 turns texts such as <|im_start|> into
 * their special tokens). A BOS token is added where the model wants one, at the very start. */

/* Appends text without generating. Returns the positions the conversation has reached, or -1. */
int32_t obc_conversation_append(obc_context * ctx, const char * text, int32_t parse_special);
/* Appends text (may be "") and generates a reply, which stays in the conversation (also when the
 * callback stops it). Returns the number of generated tokens, or -1. */
int32_t obc_conversation_generate(obc_context * ctx, const char * text, int32_t parse_special, obc_sampling_params params,
                                  obc_token_callback cb, void * user);
/* Positions the conversation has reached (evicted tokens included), or -1. */
int32_t obc_conversation_n_past(const obc_context * ctx);
/* Why the last generation ended: "eos" (an end-of-generation token, which stays in the
 * conversation), "stop", "length" (max_new_tokens), "context" (n_ctx reached), or "" before any;
 * never NULL. Owned by the context, valid
 * until its next call. */
const char * obc_finish_reason(const obc_context * ctx);
/* Writes the conversation (tokens, KV cache, eviction scores) to path; 0 or -1. */
int32_t obc_conversation_save(obc_context * ctx, const char * path);
/* Replaces ctx's conversation with the one saved at path (by the same model; the file is checked
 * and a bad one is an error, never a crash; a state of more positions than ctx's n_ctx is
 * refused); 0 or -1. */
int32_t obc_conversation_load(obc_context * ctx, const char * path);
/* The same state in memory: writes it to out when n_max is at least its size, and returns its
 * size (call with out NULL and n_max 0 to ask), or -1. */
int64_t obc_conversation_save_buffer(obc_context * ctx, uint8_t * out, size_t n_max);
/* Replaces ctx's conversation with a state from obc_conversation_save_buffer (checked as a file
 * is); the caller keeps data. 0 or -1. */
int32_t obc_conversation_load_buffer(obc_context * ctx, const uint8_t * data, size_t size);
/* Evicts the context's cache to budget tokens per layer and head now, by the scores it has (budget
 * <= 0: its KV budget). An error for a full-cache context or before anything was decoded. 0 or -1. */
int32_t obc_kv_evict(obc_context * ctx, int32_t budget);

/* The caller's own loop, as with llama.cpp's llama_decode / llama_get_logits / llama_sampler
 * (examples/simple.c): obc_decode appends tokens to the context's conversation (the sequence the
 * obc_conversation_* calls use, bounded and evicted as the context's KV configuration says; the
 * first call starts it, obc_generate and obc_context_reset end it), obc_get_logits reads the
 * next-token logits after the last token, and a sampler picks from them. */

/* Decodes n_tokens tokens (ids checked against the vocabulary; nothing is added: no BOS) and keeps
 * the logits after the last one. 0 or -1. */
int32_t obc_decode(obc_context * ctx, const int32_t * tokens, int32_t n_tokens);
/* The same, keeping the logits after every one of the n_tokens tokens (for scoring a text, or
 * speculative checks): n_tokens * n_vocab floats, so decode long texts in pieces. 0 or -1. */
int32_t obc_decode_all(obc_context * ctx, const int32_t * tokens, int32_t n_tokens);
/* The logits (obc_model_n_vocab floats) after the last decoded token, or NULL (before any decode,
 * after a call that left its last token undecoded, invalid handle). Owned by ctx: valid until the
 * next call on it. */
const float * obc_get_logits(obc_context * ctx);
/* The logits after token i of the last obc_decode_all (negative i counts from the end: -1 is the
 * last token, which obc_decode also keeps), or NULL when that row was not kept or i is out of
 * range. Owned by ctx: valid until the next call on it. */
const float * obc_get_logits_ith(obc_context * ctx, int32_t i);
/* 1 when token ends a generation (EOS, EOT, ...), 0 when not, -1 on error. */
int32_t obc_token_is_eog(const obc_model * model, int32_t token);

/* Samplers. A sampler is a chain of stages run in the order they were added, as llama.cpp's
 * llama_sampler_chain: stages that reshape or narrow the candidate tokens, then one that picks
 * (greedy, or a seeded draw); nothing may follow the picking stage, and a chain without one cannot
 * sample. Owned by the caller: obc_sampler_free. */

/* An empty chain; NULL on error. */
obc_sampler * obc_sampler_chain_new(void);
/* Stage constructors, each appended to chain; 0, or -1 on a bad value (named by obc_last_error)
 * or a chain that already ends with its picking stage. */
int32_t obc_sampler_add_penalties(obc_sampler * chain, int32_t last_n, float repeat_penalty); /* over the last_n accepted tokens; 1: off */
int32_t obc_sampler_add_top_k(obc_sampler * chain, int32_t k);      /* the k most likely; 0: off */
int32_t obc_sampler_add_top_p(obc_sampler * chain, float p);        /* the smallest set of probability >= p, in (0, 1] */
int32_t obc_sampler_add_min_p(obc_sampler * chain, float p);        /* those at least p times the most likely, in [0, 1] */
int32_t obc_sampler_add_temp(obc_sampler * chain, float t);         /* divides the logits by t; t <= 0 keeps only the most likely */
int32_t obc_sampler_add_greedy(obc_sampler * chain);                /* picks the most likely (the lower id on ties) */
int32_t obc_sampler_add_dist(obc_sampler * chain, uint64_t seed);   /* picks by a draw; 0xFFFFFFFF: seeded from the clock */

/* The default chain of params (what obc_generate uses): penalties, then greedy at temperature
 * <= 0, else top-k, top-p, min-p, temperature and a draw seeded by params.seed; max_new_tokens and
 * params.sampler are not used. NULL on a bad value (named by obc_last_error). */
obc_sampler * obc_sampler_new(obc_sampling_params params);
/* The token the chain picks from logits (n_vocab floats), without recording it; -1 on error
 * (a chain with no picking stage included). */
int32_t obc_sampler_sample(obc_sampler * sampler, const float * logits, int32_t n_vocab);
/* Records a token in the repetition history. 0 or -1. */
int32_t obc_sampler_accept(obc_sampler * sampler, int32_t token);
/* Forgets the history and reseeds the draw. 0 or -1. */
int32_t obc_sampler_reset(obc_sampler * sampler);
/* 0, or -1 for a handle that is not a live sampler (double free). NULL is a no-op returning 0. */
int32_t obc_sampler_free(obc_sampler * sampler);

#ifdef __cplusplus
}
#endif

#endif /* OBCACHE_H */
