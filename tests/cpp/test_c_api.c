/* Misuse of the C API (obcache.h) must give errors, not crashes, and two contexts of one model
 * in two threads must give the serial results.
 *
 *   test_c_api MODEL.gguf        exit 0 when every check passes; prints each failure
 */
#define _GNU_SOURCE   /* sched_getaffinity */
#include "obcache.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond, what)                                                                  \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "FAIL %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, what, \
                    obc_last_error());                                                     \
            ++failures;                                                                    \
        }                                                                                  \
    } while (0)

typedef struct {
    char text[8192];
    size_t len;
} sink;

static int collect(const char * piece, size_t len, void * user) {
    sink * s = (sink *) user;
    if (s->len + len < sizeof(s->text)) {
        memcpy(s->text + s->len, piece, len);
        s->len += len;
        s->text[s->len] = 0;
    }
    return 0;
}

typedef struct {
    obc_context * ctx;
    const char * prompt;
    sink out;
    int32_t rc;
} job;

typedef struct {
    int calls;
    int32_t last_done, total;
} progress_log;

static void on_progress(int32_t done, int32_t total, void * user) {
    progress_log * p = (progress_log *) user;
    ++p->calls;
    p->last_done = done;
    p->total = total;
}

static obc_sampling_params greedy(int32_t n) {
    obc_sampling_params sp = obc_sampling_default_params();
    sp.temperature = 0.0f;
    sp.max_new_tokens = n;
    return sp;
}

static void * run_job(void * arg) {
    job * j = (job *) arg;
    j->out.len = 0;
    j->out.text[0] = 0;
    j->rc = obc_generate(j->ctx, j->prompt, greedy(16), collect, &j->out);
    return NULL;
}

static int abort_after(void * user) {
    int * calls = (int *) user;
    return ++*calls > 3;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf\n", argv[0]);
        return 2;
    }
    /* NULL and size misuse */
    CHECK(obc_model_load(NULL) == NULL, "load(NULL)");
    CHECK(obc_model_load("/no/such/file.gguf") == NULL && strstr(obc_last_error(), "not found"), "load(missing)");
    obc_model * m = obc_model_load(argv[1]);
    if (!m) {
        fprintf(stderr, "cannot load %s: %s\n", argv[1], obc_last_error());
        return 1;
    }
    int32_t ids[64];
    CHECK(obc_tokenize(NULL, "hi", 1, ids, 64) == INT32_MIN, "tokenize(model NULL)");
    CHECK(obc_tokenize(m, NULL, 1, ids, 64) == INT32_MIN, "tokenize(text NULL)");
    CHECK(obc_tokenize(m, "hello world", 1, NULL, 64) == INT32_MIN && strstr(obc_last_error(), "out is NULL"),
          "tokenize(out NULL, n_max > 0)");
    CHECK(obc_tokenize(m, "hello world", 1, ids, -1) == INT32_MIN, "tokenize(n_max < 0)");
    const int32_t need = -obc_tokenize(m, "hello world", 1, NULL, 0);
    CHECK(need > 0 && obc_tokenize(m, "hello world", 1, ids, 64) == need, "tokenize size query");
    char buf[64];
    CHECK(obc_detokenize(m, ids, -1, buf, 64) == -1, "detokenize(n_ids < 0)");
    CHECK(obc_detokenize(m, NULL, 3, buf, 64) == -1, "detokenize(ids NULL)");
    CHECK(obc_detokenize(m, ids, need, NULL, 64) == -1, "detokenize(out NULL, n_max > 0)");
    CHECK(obc_detokenize(m, ids, need, NULL, 0) > 0, "detokenize length query");
    const int32_t bad_id = obc_model_n_vocab(m) + 5;
    CHECK(obc_detokenize(m, &bad_id, 1, buf, 64) == -1, "detokenize(id out of range)");
    CHECK(obc_model_n_vocab(NULL) == -1, "n_vocab(NULL)");

    obc_context_params cp = obc_context_default_params();
    cp.n_threads = 1;
    cp.n_ctx = -5;
    CHECK(obc_context_new(m, cp) == NULL, "context_new(n_ctx < 0)");
    cp.n_ctx = 1024;
    cp.kv_method = "obc-vk";
    cp.kv_budget = 64;
    cp.kv_n_recent = -7;
    CHECK(obc_context_new(m, cp) == NULL && strstr(obc_last_error(), "n_recent"), "context_new(n_recent -7)");
    cp.kv_n_recent = -1;
    cp.kv_evict = "sideways";
    CHECK(obc_context_new(m, cp) == NULL, "context_new(bad evict mode)");
    cp.kv_evict = NULL;
    CHECK(obc_context_new(NULL, cp) == NULL, "context_new(model NULL)");
    /* the caller's own loop (obc_decode, obc_get_logits, a sampler) gives obc_generate's tokens */
    {
        obc_context_params cl = obc_context_default_params();
        cl.n_threads = 1;
        cl.n_ctx = 512;
        obc_context * c1 = obc_context_new(m, cl);
        obc_context * c2 = obc_context_new(m, cl);
        sink ref = {{0}, 0};
        CHECK(obc_generate(c1, "The capital of France is", greedy(12), collect, &ref) >= 1, "generate for the loop");
        obc_sampling_params g = greedy(0);
        obc_sampler * smp = obc_sampler_new(g);
        CHECK(smp != NULL, "sampler_new");
        CHECK(obc_get_logits(c2) == NULL && strstr(obc_last_error(), "decode"), "no logits before decode");
        int32_t pids[64];
        const int32_t np = obc_tokenize(m, "The capital of France is", 1, pids, 64);
        CHECK(obc_decode(c2, NULL, 3) == -1 && obc_decode(c2, pids, 0) == -1, "decode(NULL / 0 tokens)");
        const int32_t bad = obc_model_n_vocab(m);
        CHECK(obc_decode(c2, &bad, 1) == -1 && strstr(obc_last_error(), "vocabulary"), "decode(bad id)");
        CHECK(obc_decode(c2, pids, np) == 0, "decode the prompt");
        char text[1024] = {0};
        size_t used = 0;
        for (int i = 0; i < 12; ++i) {
            const float * lg = obc_get_logits(c2);
            const int32_t t = lg ? obc_sampler_sample(smp, lg, obc_model_n_vocab(m)) : -1;
            CHECK(t >= 0, "sample");
            if (t < 0 || obc_token_is_eog(m, t) == 1) break;
            obc_sampler_accept(smp, t);
            const int32_t len = obc_detokenize(m, &t, 1, text + used, (int32_t) (sizeof text - used - 1));
            if (len > 0) used += (size_t) len;
            CHECK(obc_decode(c2, &t, 1) == 0, "decode a sampled token");
        }
        CHECK(strcmp(text, ref.text) == 0, "own loop == obc_generate");
        /* logits follow only an obc_decode: after an append the last token waits, undecoded */
        CHECK(obc_conversation_append(c2, " and", 0) > 0 && obc_get_logits(c2) == NULL, "no stale logits after append");
        CHECK(obc_decode(c2, pids, 1) == 0 && obc_get_logits(c2) != NULL, "logits again after decode");
        const float few[4] = {0};
        CHECK(obc_sampler_sample(smp, NULL, 10) == -1 && obc_sampler_sample(smp, few, 0) == -1, "sample(NULL / 0)");
        CHECK(obc_token_is_eog(m, -1) == -1, "is_eog(-1)");
        g.temperature = NAN;
        CHECK(obc_sampler_new(g) == NULL && strstr(obc_last_error(), "temperature"), "sampler_new(NaN)");
        CHECK(obc_sampler_free(smp) == 0 && obc_sampler_free(smp) == -1, "sampler double free");
        CHECK(obc_sampler_accept(smp, 1) == -1, "accept on a freed sampler");
        obc_context_free(c1);
        obc_context_free(c2);
    }

    /* model load parameters, tokens and their kinds */
    {
        obc_model_params mp = obc_model_default_params();
        CHECK(mp.n_gpu_layers == 0 && obc_model_n_gpu_layers(m) == 0 && obc_model_n_gpu_layers(NULL) == -1,
              "model params: nothing offloaded by default");
        mp.n_gpu_layers = -2;
        CHECK(obc_model_load_from_file(argv[1], mp) == NULL && strstr(obc_last_error(), "n_gpu_layers"),
              "load_from_file(n_gpu_layers < 0)");
        const int32_t bos = obc_model_meta(m, OBC_META_BOS);
        char piece[64];
        CHECK(obc_token_get_attr(m, bos) == OBC_TOKEN_CONTROL && obc_token_to_piece(m, bos, 0, piece, 64) == 0 &&
                  obc_token_to_piece(m, bos, 1, piece, 64) > 0 && piece[0] == '<',
              "a control token renders only with render_special");
        int32_t hello[8];
        CHECK(obc_tokenize(m, "hello", 0, hello, 8) == 1 && obc_token_get_attr(m, hello[0]) == OBC_TOKEN_NORMAL &&
                  obc_token_to_piece(m, hello[0], 0, piece, 64) == 5 && memcmp(piece, "hello", 5) == 0,
              "token_to_piece of a normal token");
        CHECK(obc_token_to_piece(m, hello[0], 0, NULL, 0) == 5 && obc_token_to_piece(m, hello[0], 0, NULL, 4) == -1 &&
                  obc_token_to_piece(m, -1, 0, piece, 64) == -1 && obc_token_get_attr(m, obc_model_n_vocab(m)) == -1,
              "token_to_piece / get_attr misuse");
        CHECK(obc_model_meta(m, OBC_META_EOT) >= -1 && obc_model_meta(m, OBC_META_PAD) >= -1 &&
                  obc_model_meta(m, (obc_model_meta_key) 99) == -1,
              "meta EOT / PAD / unknown key");
    }

    /* every token's logits, the flash_attn choice, and sampler chains the caller orders */
    {
        obc_context_params cl = obc_context_default_params();
        cl.n_threads = 1;
        cl.n_ctx = 512;
        cl.flash_attn = 2;
        CHECK(obc_context_new(m, cl) == NULL && strstr(obc_last_error(), "flash_attn"), "context_new(flash_attn 2)");
        cl.flash_attn = 0;
        obc_context * ca = obc_context_new(m, cl);
        obc_context * cb = obc_context_new(m, cl);
        int32_t pids[64];
        const int32_t np = obc_tokenize(m, "The capital of France is", 1, pids, 64);
        const int32_t nv = obc_model_n_vocab(m);
        CHECK(obc_decode_all(ca, pids, np) == 0, "decode_all");
        const float * last = obc_get_logits_ith(ca, -1);
        CHECK(last != NULL && last == obc_get_logits(ca) && obc_get_logits_ith(ca, np - 1) == last, "ith(-1) is the last row");
        CHECK(obc_get_logits_ith(ca, np) == NULL && obc_get_logits_ith(ca, -np - 1) == NULL, "ith out of range");
        /* row i of one batch equals the logits after decoding the first i + 1 tokens alone */
        int rows_ok = 1;
        for (int32_t i = 0; i < np; i += np - 1) {
            obc_context * solo = obc_context_new(m, cl);
            const float * row = obc_get_logits_ith(ca, i);
            const float * ref = solo && obc_decode(solo, pids, i + 1) == 0 ? obc_get_logits(solo) : NULL;
            for (int32_t v = 0; row && ref && v < nv; ++v) rows_ok = rows_ok && fabsf(row[v] - ref[v]) <= 1e-2f * (1.0f + fabsf(ref[v]));
            rows_ok = rows_ok && row && ref;
            obc_context_free(solo);
        }
        CHECK(rows_ok, "decode_all rows match separate decodes");
        CHECK(obc_decode(ca, pids, 2) == 0 && obc_get_logits_ith(ca, 0) == NULL && obc_get_logits_ith(ca, -1) != NULL,
              "obc_decode keeps only the last row");

        obc_sampler * chain = obc_sampler_chain_new();
        CHECK(chain != NULL && obc_sampler_sample(chain, last, nv) == -1 && strstr(obc_last_error(), "greedy or dist"),
              "an empty chain cannot pick");
        CHECK(obc_sampler_add_top_p(chain, 0.0f) == -1 && strstr(obc_last_error(), "top_p"), "add_top_p(0)");
        CHECK(obc_sampler_add_temp(chain, NAN) == -1 && obc_sampler_add_top_k(chain, -1) == -1 &&
                  obc_sampler_add_penalties(chain, -1, 1.1f) == -1 && obc_sampler_add_min_p(chain, 2.0f) == -1,
              "stage values are checked");
        CHECK(obc_sampler_add_top_k(chain, 1) == 0 && obc_sampler_add_dist(chain, 7) == 0, "top_k 1 + dist");
        CHECK(obc_sampler_add_greedy(chain) == -1 && strstr(obc_last_error(), "already ends"), "nothing after the pick");
        obc_sampler * dflt = obc_sampler_new(greedy(0));
        const int32_t top = obc_sampler_sample(dflt, last, nv);
        CHECK(top >= 0 && obc_sampler_sample(chain, last, nv) == top, "top_k 1 + dist picks the argmax");
        obc_sampler * warm = obc_sampler_chain_new();
        CHECK(obc_sampler_add_temp(warm, 0.7f) == 0 && obc_sampler_add_top_k(warm, 5) == 0 && obc_sampler_add_dist(warm, 3) == 0,
              "a chain in the caller's order");
        int32_t picks[8], repeat[8];
        for (int i = 0; i < 8; ++i) picks[i] = obc_sampler_sample(warm, last, nv);
        CHECK(obc_sampler_reset(warm) == 0, "reset");
        for (int i = 0; i < 8; ++i) repeat[i] = obc_sampler_sample(warm, last, nv);
        CHECK(memcmp(picks, repeat, sizeof picks) == 0, "a seeded chain repeats after reset");
        /* the convenience generate with the caller's chain: greedy chain == greedy fields */
        obc_sampler * g = obc_sampler_chain_new();
        obc_sampler_add_greedy(g);
        sink a = {{0}, 0}, b = {{0}, 0};
        obc_sampling_params with_chain = greedy(10);
        with_chain.temperature = 1.5f;   /* ignored with a chain */
        with_chain.sampler = g;
        CHECK(obc_generate(cb, "The capital of France is", greedy(10), collect, &a) >= 1 &&
                  obc_generate(cb, "The capital of France is", with_chain, collect, &b) >= 1 && strcmp(a.text, b.text) == 0,
              "generate with a greedy chain == greedy generate");
        obc_sampling_params in_new = greedy(0);
        in_new.sampler = g;
        CHECK(obc_sampler_new(in_new) == NULL, "sampler_new refuses params.sampler");
        obc_sampler_free(chain);
        obc_sampler_free(dflt);
        obc_sampler_free(warm);
        CHECK(obc_sampler_free(g) == 0, "free the chain");
        with_chain.sampler = g;
        CHECK(obc_generate(cb, "Hi", with_chain, collect, &b) == -1 && strstr(obc_last_error(), "sampler"),
              "generate with a freed chain is an error");
        obc_context_free(ca);
        obc_context_free(cb);
    }

    /* model facts and metadata strings */
    CHECK(obc_model_meta(m, OBC_META_N_LAYER) == 30 && obc_model_meta(m, OBC_META_N_HEAD) == 9 &&
          obc_model_meta(m, OBC_META_N_HEAD_KV) == 3 && obc_model_meta(m, OBC_META_HEAD_DIM) == 64 &&
          obc_model_meta(m, OBC_META_N_CTX_TRAIN) == 8192 && obc_model_meta(m, OBC_META_N_VOCAB) == obc_model_n_vocab(m),
          "model meta (SmolLM2-135M)");
    CHECK(obc_model_meta(m, OBC_META_EOS) >= 0 && obc_model_meta(NULL, OBC_META_EOS) == -1 &&
          obc_model_meta(m, (obc_model_meta_key) 99) == -1, "special tokens, bad handle and key");
    {
        char arch[16];
        CHECK(obc_model_meta_str(m, "general.architecture", arch, sizeof arch) == 5 && strcmp(arch, "llama") == 0, "meta_str arch");
        const int32_t tl = obc_model_meta_str(m, "tokenizer.chat_template", NULL, 0);
        CHECK(tl > 20, "chat template length");
        char small[4];
        CHECK(obc_model_meta_str(m, "general.architecture", small, sizeof small) == 5 && strcmp(small, "lla") == 0, "meta_str truncates");
        CHECK(obc_model_meta_str(m, "no.such.key", arch, sizeof arch) == -1 && strstr(obc_last_error(), "no.such.key"), "meta_str missing");
        CHECK(obc_model_meta_str(m, "tokenizer.ggml.tokens", arch, sizeof arch) == -1, "meta_str of an array");
        CHECK(obc_model_meta_str(m, "general.architecture", NULL, 8) == -1, "meta_str(out NULL, n_max > 0)");
    }
    int32_t pids_for_stats[60];
    for (int i = 0; i < 60; ++i) pids_for_stats[i] = 300 + 7 * i;
    static char long_prompt_for_stats[2048];
    long_prompt_for_stats[0] = 0;
    for (int i = 0; i < 20; ++i) strcat(long_prompt_for_stats, "the cat sat on the mat. ");

    /* the KV configuration as one spec string, read by the same function as the CLIs' --kv */
    {
        obc_context_params cs = obc_context_default_params();
        cs.n_threads = 1;
        cs.kv_spec = "snapkv,budget=48,evict=decode,group_pool=max";
        obc_context * csx = obc_context_new(m, cs);
        CHECK(csx != NULL && obc_generate(csx, long_prompt_for_stats, greedy(2), NULL, NULL) == 2, "context from kv_spec");
        obc_kv_stats st;
        CHECK(obc_kv_stats_get(csx, NULL) == -1, "kv_stats_get(NULL)");
        CHECK(obc_kv_stats_get(csx, &st) == 0 && st.budget == 48 && st.n_layer == obc_model_meta(m, OBC_META_N_LAYER) &&
              st.kept_per_layer && st.kept_per_layer[0] <= 48 + 32 && st.evictions >= 1 &&
              st.bytes_used < st.bytes_full && st.tokens_seen > 100, "kv stats after eviction");
        obc_context_free(csx);
        /* one token at a time is generation: compaction every slack (32) tokens, not every token */
        cs.kv_spec = "snapkv,budget=48,evict=decode";
        obc_context * cd = obc_context_new(m, cs);
        CHECK(cd != NULL && obc_decode(cd, pids_for_stats, 60) == 0, "decode a prompt");
        for (int i = 0; i < 96; ++i) obc_decode(cd, &pids_for_stats[i % 60], 1);
        CHECK(obc_kv_stats_get(cd, &st) == 0 && st.evictions >= 2 && st.evictions <= 5, "decode-mode slack for single tokens");
        obc_context_free(cd);
        /* a spec with kvpress's compression_ratio, and the evict field after it */
        cs.kv_spec = "snapkv,compression_ratio=0.9";
        cs.kv_evict = "chunked";
        cd = obc_context_new(m, cs);
        CHECK(cd != NULL, "spec with compression_ratio and kv_evict");
        obc_context_free(cd);
        cs.kv_evict = NULL;
        cs.kv_spec = "snapkv,budget=48,colour=red";
        CHECK(obc_context_new(m, cs) == NULL && strstr(obc_last_error(), "unknown KV option 'colour'"), "kv_spec bad option");
        cs.kv_spec = "snapkv,budget=48";
        cs.kv_method = "obc-vk";
        CHECK(obc_context_new(m, cs) == NULL && strstr(obc_last_error(), "not both"), "kv_spec and kv_method");
    }
    /* the cache's types, as llama.cpp's -ctk / -ctv: q8_0 rows take 34 bytes per 32 values, f16 64 */
    {
        obc_context_params ct = obc_context_default_params();
        ct.n_threads = 1;
        obc_context * c16 = obc_context_new(m, ct);
        obc_kv_stats s16, s8;
        CHECK(c16 && obc_generate(c16, long_prompt_for_stats, greedy(2), NULL, NULL) == 2 && obc_kv_stats_get(c16, &s16) == 0,
              "f16 cache");
        char tk[] = "q8_0", tv[] = "q8_0";
        ct.type_k = tk;
        ct.type_v = tv;
        ct.kv_spec = "snapkv,budget=48";
        obc_context * c8 = obc_context_new(m, ct);
        tk[0] = tv[0] = 'x';   /* copied by obc_context_new */
        CHECK(c8 && obc_generate(c8, long_prompt_for_stats, greedy(2), NULL, NULL) == 2 && obc_kv_stats_get(c8, &s8) == 0,
              "q8_0 cache with eviction");
        CHECK(s8.bytes_full * 64 == s16.bytes_full * 34 && s8.evictions >= 1, "q8_0 bytes are 34/64 of f16's");
        obc_context_free(c16);
        obc_context_free(c8);
        ct.kv_spec = NULL;
        ct.type_k = "q3";
        CHECK(obc_context_new(m, ct) == NULL && strstr(obc_last_error(), "type_k must be one of"), "bad type_k");
        ct.type_k = NULL;
        ct.type_v = "q4_0";
        ct.flash_attn = 0;
        obc_context * cx = obc_context_new(m, ct);
        CHECK(cx == NULL || (obc_generate(cx, "hi", greedy(1), NULL, NULL) == -1 &&
                             strstr(obc_last_error(), "needs flash attention")), "quantized V without flash attention");
        obc_context_free(cx);
    }
    /* thread options: checked at creation; the mask string is copied */
    cp.poll = 101;
    CHECK(obc_context_new(m, cp) == NULL && strstr(obc_last_error(), "poll"), "context_new(poll 101)");
    cp.poll = 0;
    cp.prio = 7;
    CHECK(obc_context_new(m, cp) == NULL && strstr(obc_last_error(), "prio"), "context_new(prio 7)");
    cp.prio = 0;
    cp.cpu_mask = "0xZZ";
    CHECK(obc_context_new(m, cp) == NULL && strstr(obc_last_error(), "cpu_mask"), "context_new(bad cpu_mask)");
    cp.cpu_mask = NULL;
    cp.cpu_strict = true;
    CHECK(obc_context_new(m, cp) == NULL && strstr(obc_last_error(), "cpu_strict"), "context_new(cpu_strict, no mask)");
    cp.cpu_strict = false;
    {
        /* a mask of the first CPU this process may run on */
        cpu_set_t aff;
        CPU_ZERO(&aff);
        int first = 0;
        if (sched_getaffinity(0, sizeof aff, &aff) == 0)
            while (first < 63 && !CPU_ISSET(first, &aff)) ++first;
        char mask[24];
        snprintf(mask, sizeof mask, "0x%llx", 1ULL << first);
        cp.cpu_mask = mask;
        obc_context * cm = obc_context_new(m, cp);
        memset(mask, 'Z', sizeof mask - 1);   /* the context keeps its own copy */
        CHECK(cm != NULL && obc_generate(cm, "the cat", greedy(2), NULL, NULL) == 2, "generate with a one-CPU mask");
        obc_context_free(cm);
        cp.cpu_mask = NULL;
    }
    CHECK(obc_generate(NULL, "x", greedy(1), NULL, NULL) == -1, "generate(ctx NULL)");

    /* sampling values at the boundary */
    obc_context * c0 = obc_context_new(m, cp);
    CHECK(c0 != NULL, "context_new");
    obc_sampling_params sp = greedy(2);
    sp.temperature = NAN;
    CHECK(obc_generate(c0, "the cat", sp, NULL, NULL) == -1 && strstr(obc_last_error(), "temperature"), "NaN temperature");
    sp = greedy(2);
    sp.top_k = -5;
    CHECK(obc_generate(c0, "the cat", sp, NULL, NULL) == -1 && strstr(obc_last_error(), "top_k"), "top_k < 0");
    sp = greedy(-1);
    CHECK(obc_generate(c0, "the cat", sp, NULL, NULL) == -1, "max_new_tokens < 0");

    /* lifetimes: no freeing a model under live contexts; double frees are errors */
    CHECK(obc_model_free(m) == -1 && strstr(obc_last_error(), "context"), "model_free with a live context");
    CHECK(obc_context_free(c0) == 0, "context_free");
    CHECK(obc_context_free(c0) == -1, "double context_free");
    CHECK(obc_generate(c0, "x", greedy(1), NULL, NULL) == -1 && strstr(obc_last_error(), "not a live"),
          "generate on a freed context");
    CHECK(obc_context_free(NULL) == 0, "context_free(NULL)");

    /* cancel through the abort callback */
    cp.kv_method = NULL;
    obc_context * ca = obc_context_new(m, cp);
    int calls = 0;
    CHECK(obc_context_set_abort_callback(ca, abort_after, &calls) == 0, "set_abort_callback");
    CHECK(obc_generate(ca, "the cat sat on the mat", greedy(50), NULL, NULL) == -1 &&
              strstr(obc_last_error(), "interrupted"), "abort callback cancels");
    obc_context_set_abort_callback(ca, NULL, NULL);
    CHECK(obc_generate(ca, "the cat", greedy(2), NULL, NULL) >= 0, "generate after removing the callback");
    obc_context_free(ca);

    /* two contexts of one model, in two threads at once: the serial results */
    static char long_prompt[4096];
    long_prompt[0] = 0;
    for (int i = 0; i < 40; ++i) strcat(long_prompt, "the cat sat on the mat. ");
    obc_context_params cf = obc_context_default_params();
    cf.n_threads = 1;
    cf.n_ctx = 1024;
    obc_context_params ce = cf;
    ce.kv_method = "snapkv";
    ce.kv_budget = 48;
    ce.kv_evict = "decode";
    job jobs[2] = {{obc_context_new(m, cf), long_prompt, {{0}, 0}, 0}, {obc_context_new(m, ce), long_prompt, {{0}, 0}, 0}};
    CHECK(jobs[0].ctx && jobs[1].ctx, "two contexts");
    char serial[2][8192];
    for (int i = 0; i < 2; ++i) {
        run_job(&jobs[i]);
        CHECK(jobs[i].rc == 16, "serial generate");
        memcpy(serial[i], jobs[i].out.text, sizeof(serial[i]));
    }
    for (int round = 0; round < 3; ++round) {
        pthread_t th[2];
        for (int i = 0; i < 2; ++i) pthread_create(&th[i], NULL, run_job, &jobs[i]);
        for (int i = 0; i < 2; ++i) pthread_join(th[i], NULL);
        for (int i = 0; i < 2; ++i) CHECK(jobs[i].rc == 16 && strcmp(jobs[i].out.text, serial[i]) == 0, "threaded == serial");
    }
    for (int i = 0; i < 2; ++i) obc_context_free(jobs[i].ctx);

    /* prefill progress: one report per micro-batch, ending at the whole prompt */
    obc_context_params cpg = cf;
    cpg.n_batch = 64;
    obc_context * cg = obc_context_new(m, cpg);
    progress_log pl = {0, 0, 0};
    CHECK(obc_context_set_progress_callback(NULL, on_progress, &pl) == -1, "set_progress_callback(NULL)");
    CHECK(obc_context_set_progress_callback(cg, on_progress, &pl) == 0, "set_progress_callback");
    CHECK(obc_generate(cg, long_prompt, greedy(2), NULL, NULL) == 2, "generate with progress");
    CHECK(pl.calls >= 3 && pl.last_done == pl.total && pl.total > 128 && pl.calls == (pl.total + 63) / 64,
          "progress reports each micro-batch up to the prompt's length");
    CHECK(obc_context_set_progress_callback(cg, NULL, NULL) == 0, "remove the progress callback");
    pl.calls = 0;
    CHECK(obc_generate(cg, long_prompt, greedy(2), NULL, NULL) == 2 && pl.calls == 0, "no progress once removed");
    obc_context_free(cg);

    const int32_t pids_for_evict[3] = {100, 200, 300};
    /* Conversations: the cache carries over, save/load resumes exactly, bad files are errors. */
    obc_context_params cc = obc_context_default_params();
    cc.n_threads = 1;
    cc.n_ctx = 2048;
    cc.kv_method = "snapkv";
    cc.kv_budget = 40;
    cc.kv_evict = "decode";
    obc_context * cv = obc_context_new(m, cc);
    CHECK(cv != NULL, "conversation context");
    CHECK(obc_conversation_append(cv, NULL, 0) == -1, "append(NULL)");
    CHECK(obc_conversation_n_past(NULL) == -1, "n_past(NULL)");
    CHECK(strcmp(obc_finish_reason(cv), "") == 0, "no finish reason yet");
    const int32_t p1 = obc_conversation_append(cv, long_prompt, 0);
    CHECK(p1 > 200, "append a long text");
    sink a = {{0}, 0}, b = {{0}, 0};
    CHECK(obc_conversation_generate(cv, " The cat", 0, greedy(8), collect, &a) == 8, "conversation generate");
    CHECK(strcmp(obc_finish_reason(cv), "length") == 0, "finish reason length");
    CHECK(obc_conversation_n_past(cv) > p1 + 8 && obc_kv_bytes_used(cv) < obc_kv_bytes_allocated(cv),
          "positions grow past the budget, memory does not");
    {
        /* the state in memory: the same bytes as the file; loading it resumes */
        const int64_t need = obc_conversation_save_buffer(cv, NULL, 0);
        uint8_t * buf = malloc((size_t) need);
        CHECK(need > 1000 && buf && obc_conversation_save_buffer(cv, buf, (size_t) need) == need, "save_buffer");
        CHECK(obc_conversation_save_buffer(cv, NULL, 8) == -1, "save_buffer(out NULL, n_max > 0)");
        obc_context * cb = obc_context_new(m, cc);
        CHECK(obc_conversation_load_buffer(cb, buf, (size_t) need) == 0 &&
              obc_conversation_n_past(cb) == obc_conversation_n_past(cv), "load_buffer resumes");
        buf[need / 2] ^= 0x55;
        buf[20] ^= 0x55;
        CHECK(obc_conversation_load_buffer(cb, buf, (size_t) need / 2) == -1, "load_buffer(truncated)");
        CHECK(obc_conversation_load_buffer(cb, NULL, 10) == -1, "load_buffer(NULL)");
        /* evict now: down to 16 per head, by the scores it has */
        CHECK(obc_kv_evict(cb, 16) == 0 && obc_kv_bytes_used(cb) < obc_kv_bytes_used(cv), "kv_evict(16)");
        free(buf);
        obc_context_free(cb);
        obc_context_params cfull = obc_context_default_params();
        cfull.n_threads = 1;
        obc_context * cf2 = obc_context_new(m, cfull);
        CHECK(obc_kv_evict(cf2, 8) == -1 && strstr(obc_last_error(), "nothing"), "kv_evict before decoding");
        CHECK(obc_decode(cf2, pids_for_evict, 3) == 0 && obc_kv_evict(cf2, 8) == -1 && strstr(obc_last_error(), "full cache"),
              "kv_evict on a full cache");
        obc_context_free(cf2);
    }
    const size_t allocated = obc_kv_bytes_allocated(cv);
    const char * state = "test_c_api_conversation.obcs";
    CHECK(obc_conversation_save(cv, state) == 0, "conversation save");
    obc_context * cw = obc_context_new(m, cc);
    CHECK(obc_conversation_load(cw, state) == 0, "conversation load");
    CHECK(obc_conversation_n_past(cw) == obc_conversation_n_past(cv), "loaded positions");
    a.len = 0;
    CHECK(obc_conversation_generate(cv, " and the dog", 0, greedy(8), collect, &a) == 8, "continue original");
    CHECK(obc_conversation_generate(cw, " and the dog", 0, greedy(8), collect, &b) == 8, "continue loaded");
    CHECK(strcmp(a.text, b.text) == 0, "loaded conversation continues identically");
    CHECK(obc_kv_bytes_allocated(cv) == allocated, "allocation never grows");
    FILE * f = fopen(state, "r+b");
    if (f) {
        fseek(f, 40, SEEK_SET);
        fputc(0x7f, f);   /* inside the header: a corrupted size or model field */
        fclose(f);
    }
    CHECK(obc_conversation_load(cw, state) == -1 && strstr(obc_last_error(), "invalid session state"), "corrupt state");
    CHECK(obc_conversation_load(cw, "/no/such/state") == -1, "missing state");
    remove(state);
    cc.kv_budget = 0;
    cc.kv_ratio = 0.5f;
    obc_context * cr = obc_context_new(m, cc);
    CHECK(cr && obc_conversation_append(cr, "hi", 0) == -1 && strstr(obc_last_error(), "budget"), "ratio conversation");
    obc_context_free(cr);
    obc_context_free(cv);
    obc_context_free(cw);

    CHECK(obc_model_free(m) == 0, "model_free");
    CHECK(obc_model_free(m) == -1, "double model_free");
    CHECK(obc_model_free(NULL) == 0, "model_free(NULL)");
    if (failures == 0) printf("test_c_api: all checks passed\n");
    return failures == 0 ? 0 : 1;
}
