/* The whole loop through the C API: load a GGUF model, tokenize, generate with a bounded,
 * OBCache-evicted KV cache, stream the text, report the memory it used.
 *
 *   simple MODEL.gguf "prompt" [kv-method [kv-budget [prefill|chunked|decode]]]
 *
 * Build (plain CMake, see README): cmake --build build && ./build/examples/simple model.gguf "Hi"
 */
#include "obcache.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int print_piece(const char * piece, size_t len, void * user) {
    int * n_pieces = (int *) user;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    ++*n_pieces;
    return 0; /* non-zero would stop generation */
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT [KV_METHOD [KV_BUDGET [KV_EVICT]]]\n", argv[0]);
        return 2;
    }
    const char * path = argv[1];
    const char * prompt = argv[2];

    obc_model * model = obc_model_load(path);
    if (!model) {
        fprintf(stderr, "error: %s\n", obc_last_error());
        return 1;
    }

    /* Tokenize once to show the API; generation tokenizes the prompt itself. */
    int32_t ids[4096];
    int32_t n = obc_tokenize(model, prompt, 1, ids, 4096);
    if (n < 0) {
        fprintf(stderr, "error: %s\n", n == INT32_MIN ? obc_last_error() : "prompt too long for this example");
        obc_model_free(model);
        return 1;
    }
    fprintf(stderr, "prompt: %d tokens, vocabulary %d\n", n, obc_model_n_vocab(model));

    obc_context_params cp = obc_context_default_params();
    cp.n_ctx = 4096;
    if (argc > 3) {
        cp.kv_method = argv[3];
        cp.kv_budget = argc > 4 ? atoi(argv[4]) : 256;
        cp.kv_evict = argc > 5 ? argv[5] : NULL; /* copied by obc_context_new */
    }
    obc_context * ctx = obc_context_new(model, cp);
    if (!ctx) {
        fprintf(stderr, "error: %s\n", obc_last_error());
        obc_model_free(model);
        return 1;
    }

    obc_sampling_params sp = obc_sampling_default_params();
    sp.temperature = 0.0f; /* greedy */
    sp.max_new_tokens = 64;

    int n_pieces = 0;
    fputs(prompt, stdout);
    const int32_t n_gen = obc_generate(ctx, prompt, sp, print_piece, &n_pieces);
    if (n_gen < 0) {
        fprintf(stderr, "\nerror: %s\n", obc_last_error());
        obc_context_free(ctx);
        obc_model_free(model);
        return 1;
    }
    printf("\n");
    fprintf(stderr, "generated %d tokens in %d pieces; KV cache %.2f MiB used of %.2f MiB allocated\n", n_gen,
            n_pieces, obc_kv_bytes_used(ctx) / 1048576.0, obc_kv_bytes_allocated(ctx) / 1048576.0);

    obc_context_free(ctx);
    obc_model_free(model);
    return 0;
}
