/* A multi-turn chat through the C API whose KV cache carries over from turn to turn and, with a
 * KV budget, stays bounded however long the conversation grows. Each line of standard input is a
 * user message; the reply streams to standard output, and the memory after the turn to stderr.
 *
 *   chat MODEL.gguf [kv-method [kv-budget [prefill|chunked|decode]]] < questions.txt
 *
 * It renders ChatML (<|im_start|>role ... <|im_end|>), the template of SmolLM2 and Qwen2.5; a
 * model with another template needs its own strings here (the Python API renders the GGUF's own
 * template). Only each turn's new text is appended: the conversation so far is already cached.
 */
#include "obcache.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int print_piece(const char * piece, size_t len, void * user) {
    (void) user;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return 0;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf [KV_METHOD [KV_BUDGET [KV_EVICT]]] < messages\n", argv[0]);
        return 2;
    }
    obc_model * model = obc_model_load(argv[1]);
    if (!model) {
        fprintf(stderr, "error: %s\n", obc_last_error());
        return 1;
    }
    obc_context_params cp = obc_context_default_params();
    cp.n_ctx = 8192;
    if (argc > 2) {
        cp.kv_method = argv[2];
        cp.kv_budget = argc > 3 ? atoi(argv[3]) : 256;
        cp.kv_evict = argc > 4 ? argv[4] : "decode";
    }
    obc_context * ctx = obc_context_new(model, cp);
    if (!ctx) {
        fprintf(stderr, "error: %s\n", obc_last_error());
        obc_model_free(model);
        return 1;
    }
    obc_sampling_params sp = obc_sampling_default_params();
    sp.temperature = 0.0f;
    sp.max_new_tokens = 48;

    char line[4096];
    char turn[4096 + 256];
    int n_turn = 0, status = 0;
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = '\0';
        if (!line[0]) continue;
        /* A reply that ended with <|im_end|> holds it already; one cut by the length limit does not. */
        const char * close = n_turn == 0 ? "" : strcmp(obc_finish_reason(ctx), "eos") == 0 ? "\n" : "<|im_end|>\n";
        snprintf(turn, sizeof turn, "%s<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n", close, line);
        const int32_t n = obc_conversation_generate(ctx, turn, 1, sp, print_piece, NULL);
        if (n < 0) {
            fprintf(stderr, "\nerror: %s\n", obc_last_error());
            status = 1;
            break;
        }
        ++n_turn;
        printf("\n");
        fprintf(stderr, "[turn %d: %d positions, %d tokens generated (%s), KV cache %zu bytes used of %zu allocated]\n",
                n_turn, obc_conversation_n_past(ctx), n, obc_finish_reason(ctx), obc_kv_bytes_used(ctx),
                obc_kv_bytes_allocated(ctx));
    }
    obc_context_free(ctx);
    obc_model_free(model);
    return status;
}
