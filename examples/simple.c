/* The whole loop through the C API, with the caller's own decode and sampling (as llama.cpp's
 * examples/simple): load a GGUF model, tokenize, decode the prompt into a bounded,
 * OBCache-evicted KV cache, then sample and decode one token at a time, streaming the text.
 *
 *   simple MODEL.gguf "prompt" [KV_SPEC]      e.g. KV_SPEC = "obc-vk+snapkv,budget=256,evict=decode"
 *
 * (obc_generate does the same loop in one call.) Build (plain CMake, see README):
 * cmake --build build && ./build/examples/simple model.gguf "Hi"
 */
#include "obcache.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char * what, obc_model * model, obc_context * ctx, obc_sampler * sampler) {
    fprintf(stderr, "\nerror: %s: %s\n", what, obc_last_error());
    obc_sampler_free(sampler);
    obc_context_free(ctx);
    obc_model_free(model);
    return 1;
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT [KV_SPEC]\n", argv[0]);
        return 2;
    }
    obc_model * model = obc_model_load(argv[1]);
    if (!model) return fail("load", NULL, NULL, NULL);

    /* The prompt's tokens (asking for the size first). */
    const int32_t need = -obc_tokenize(model, argv[2], 1, NULL, 0);
    int32_t * ids = malloc(sizeof(int32_t) * (size_t) (need > 0 ? need : 1));
    if (need <= 0 || !ids || obc_tokenize(model, argv[2], 1, ids, need) != need) return fail("tokenize", model, NULL, NULL);

    obc_context_params cp = obc_context_default_params();
    cp.n_ctx = 4096;
    cp.kv_spec = argc > 3 ? argv[3] : NULL; /* copied by obc_context_new */
    obc_context * ctx = obc_context_new(model, cp);
    if (!ctx) return fail("context", model, NULL, NULL);

    /* The sampler chain, stage by stage in the caller's order: here greedy. For sampling, e.g.
     * obc_sampler_add_top_k(s, 40), _top_p(s, 0.95f), _temp(s, 0.8f), then _dist(s, seed). */
    obc_sampler * sampler = obc_sampler_chain_new();
    if (!sampler || obc_sampler_add_greedy(sampler) != 0) return fail("sampler", model, ctx, sampler);

    fputs(argv[2], stdout);
    if (obc_decode(ctx, ids, need) != 0) return fail("decode", model, ctx, sampler);
    free(ids);
    const int32_t n_vocab = obc_model_n_vocab(model);
    int n_gen = 0;
    for (; n_gen < 64; ++n_gen) {
        const float * logits = obc_get_logits(ctx);
        const int32_t tok = logits ? obc_sampler_sample(sampler, logits, n_vocab) : -1;
        if (tok < 0) return fail("sample", model, ctx, sampler);
        if (obc_token_is_eog(model, tok)) break;
        obc_sampler_accept(sampler, tok);
        char piece[256];
        const int32_t len = obc_token_to_piece(model, tok, 0, piece, (int32_t) sizeof piece);
        if (len > 0) fwrite(piece, 1, (size_t) (len < (int32_t) sizeof piece ? len : (int32_t) sizeof piece), stdout);
        fflush(stdout);
        if (obc_decode(ctx, &tok, 1) != 0) return fail("decode", model, ctx, sampler);
    }
    printf("\n");
    fprintf(stderr, "generated %d tokens; %d positions; KV cache %.2f MiB used of %.2f MiB allocated\n", n_gen,
            obc_conversation_n_past(ctx), obc_kv_bytes_used(ctx) / 1048576.0, obc_kv_bytes_allocated(ctx) / 1048576.0);

    obc_sampler_free(sampler);
    obc_context_free(ctx);
    obc_model_free(model);
    return 0;
}
