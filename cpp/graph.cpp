#include "graph.h"

#include <ggml-backend.h>

#include <cmath>

namespace obc {

namespace {

ggml_tensor * rms_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, float eps) {
    return ggml_mul(ctx, ggml_rms_norm(ctx, x, eps), w);
}

// Every product with a weight matrix: obc_mul_mat takes ggml_mul_mat's place where our CPU kernel is
// faster (Q6_K weights over a batch of tokens).
ggml_tensor * linear(ggml_context * ctx, ggml_tensor * w, ggml_tensor * b, ggml_tensor * x) {
    ggml_tensor * y = obc_mul_mat(ctx, w, x);
    return b ? ggml_add(ctx, y, b) : y;
}

// ggml-cpu's flash attention runs a tile of 64 queries against a tile of keys only when K and V are
// both f16 or both f32; any other cache type (q8_0, q4_0, bf16, mixed) falls back to one query at a
// time, which made a 4k-token q8_0 prefill 1.8x as slow as f16 (and llama.cpp's 2.6x at 8k). So a
// micro-batch of that many queries attends over an f32 copy of the layer's K and V (dequantized once per
// micro-batch, one layer at a time in the compute buffer), while a decode step reads the quantized rows.
constexpr int64_t kCpuAttentionTileQueries = 64;

bool cpu_attention_wants_float_kv(const ggml_tensor * kc, const ggml_tensor * vc, int64_t n_queries) {
    const bool tiled_types = kc->type == vc->type && (kc->type == GGML_TYPE_F16 || kc->type == GGML_TYPE_F32);
    const bool on_cpu = kc->buffer && ggml_backend_buffer_is_host(kc->buffer);
    return n_queries >= kCpuAttentionTileQueries && !tiled_types && on_cpu;
}

ggml_tensor * as_f32(ggml_context * ctx, ggml_tensor * t) {
    return t->type == GGML_TYPE_F32 ? t : ggml_cast(ctx, t, GGML_TYPE_F32);
}

}  // namespace

ForwardGraph build_forward(ggml_context * ctx, const Model & model, const KVCache & kv, const GraphSpec & s) {
    const HParams & hp = model.hp;
    const int64_t T = s.n_tokens, hd = hp.head_dim, H = hp.n_head, Hkv_model = hp.n_head_kv;
    const int64_t Hkv = kv.n_head_kv();   // Hkv_model, or H when the cache has one head per query head
    const float scale = 1.0f / sqrtf((float) hd);

    ForwardGraph g;
    g.gf = ggml_new_graph_custom(ctx, 64 * hp.n_layer + 64, false);
    g.tokens = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, T);
    ggml_set_input(g.tokens);
    g.positions = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, T);
    ggml_set_input(g.positions);
    g.slots = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, T);
    ggml_set_input(g.slots);
    if (kv.v_trans() && T == 1) {
        g.v_cells = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, hd * kv.n_head_kv());
        ggml_set_input(g.v_cells);
    }
    if (!s.head_masks) {
        g.mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, s.n_kv, T);
        ggml_set_input(g.mask);
    }

    ggml_tensor * x = ggml_get_rows(ctx, model.tok_embd, g.tokens);

    for (int il = 0; il < hp.n_layer; ++il) {
        const Layer & L = model.layers[il];
        ggml_tensor * h = rms_norm(ctx, x, L.attn_norm, hp.rms_eps);

        ggml_tensor * q = ggml_reshape_3d(ctx, linear(ctx, L.wq, L.bq, h), hd, H, T);
        ggml_tensor * k = ggml_reshape_3d(ctx, linear(ctx, L.wk, L.bk, h), hd, Hkv_model, T);
        // Qwen3: each head's q and k are RMS-normalised (over head_dim) before RoPE.
        if (L.q_norm) q = rms_norm(ctx, q, L.q_norm, hp.rms_eps);
        if (L.k_norm) k = rms_norm(ctx, k, L.k_norm, hp.rms_eps);
        ggml_tensor * v = ggml_reshape_3d(ctx, linear(ctx, L.wv, L.bv, h), hd, Hkv_model, T);
        q = ggml_rope_ext(ctx, q, g.positions, model.rope_freqs, hp.n_rot, hp.rope_mode, hp.n_ctx_orig,
                          hp.rope_freq_base, hp.rope_freq_scale, 0.0f, 1.0f, 0.0f, 0.0f);
        k = ggml_rope_ext(ctx, k, g.positions, model.rope_freqs, hp.n_rot, hp.rope_mode, hp.n_ctx_orig,
                          hp.rope_freq_base, hp.rope_freq_scale, 0.0f, 1.0f, 0.0f, 0.0f);
        if (ggml_tensor * R = kv.k_rotation()) {   // a quantized K: see KVCache::k_rotation
            q = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, R, ggml_reshape_2d(ctx, q, hd, H * T)), hd, H, T);
            k = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, R, ggml_reshape_2d(ctx, k, hd, Hkv_model * T)), hd, Hkv_model, T);
        }
        if (Hkv != Hkv_model) {
            // A cache per query head: KV head j is repeated to query heads j*G .. j*G+G-1, the
            // heads that read it under ggml_mul_mat's broadcasting.
            const int64_t G = Hkv / Hkv_model;
            k = ggml_reshape_3d(ctx, ggml_repeat_4d(ctx, ggml_reshape_4d(ctx, k, hd, 1, Hkv_model, T), hd, G, Hkv_model, T),
                                hd, Hkv, T);
            v = ggml_reshape_3d(ctx, ggml_repeat_4d(ctx, ggml_reshape_4d(ctx, v, hd, 1, Hkv_model, T), hd, G, Hkv_model, T),
                                hd, Hkv, T);
        }
        if (ggml_tensor * C = kv.k_offsets()) {   // a quantized K is stored minus a constant: see KVCache::k_offsets
            ggml_tensor * stored = ggml_view_3d(ctx, C, hd, Hkv, 1, C->nb[1], C->nb[2], (size_t) il * C->nb[2]);
            ggml_tensor * c = stored;
            if (s.set_k_offsets) {   // the mean over this micro-batch's tokens, [1, hd, Hkv] from [T, hd, Hkv]
                c = ggml_reshape_3d(ctx, ggml_mean(ctx, ggml_cont(ctx, ggml_permute(ctx, k, 1, 2, 0, 3))), hd, Hkv, 1);
                ggml_build_forward_expand(g.gf, ggml_cpy(ctx, c, stored));
            }
            k = ggml_sub(ctx, k, c);
        }

        // Write this micro-batch's K and V into their slots of every head (s.first_slot on). set_rows
        // converts each row to the cache's type (quantizing whole rows); a transposed V takes one
        // value per token in a row, which only a plain copy writes (its types are never quantized).
        ggml_tensor * kc = kv.k(il);
        ggml_tensor * vc = kv.v(il);
        ggml_build_forward_expand(g.gf, ggml_set_rows(ctx, kc, ggml_permute(ctx, k, 0, 2, 1, 3), g.slots));
        if (kv.v_trans() && T == 1) {
            // One value a row, so that where it goes is an input and the graph can serve the next token.
            ggml_tensor * cells = ggml_reshape_2d(ctx, vc, 1, ggml_nelements(vc));
            ggml_build_forward_expand(g.gf, ggml_set_rows(ctx, cells, ggml_reshape_2d(ctx, ggml_cont(ctx, v), 1, hd * Hkv),
                                                          g.v_cells));
        } else if (kv.v_trans()) {
            ggml_tensor * v_dst = ggml_view_3d(ctx, vc, T, hd, Hkv, vc->nb[1], vc->nb[2], s.first_slot * vc->nb[0]);
            ggml_build_forward_expand(g.gf, ggml_cpy(ctx, ggml_permute(ctx, v, 1, 2, 0, 3), v_dst));
        } else {
            ggml_build_forward_expand(g.gf, ggml_set_rows(ctx, vc, ggml_permute(ctx, v, 0, 2, 1, 3), g.slots));
        }

        ggml_tensor * K = ggml_view_3d(ctx, kc, hd, s.n_kv, Hkv, kc->nb[1], kc->nb[2], 0);
        ggml_tensor * V = kv.v_trans() ? ggml_view_3d(ctx, vc, s.n_kv, hd, Hkv, vc->nb[1], vc->nb[2], 0)
                                       : ggml_view_3d(ctx, vc, hd, s.n_kv, Hkv, vc->nb[1], vc->nb[2], 0);
        ggml_tensor * qp = ggml_permute(ctx, q, 0, 2, 1, 3);   // [hd, T, H]
        ggml_tensor * attn;
        if (s.head_masks) {
            // Each KV head has its own mask (its holes). ggml broadcasts a mask over dimension 2 by
            // modulo but K over the heads by division, so the G query heads of a KV head go to
            // dimension 2 and the KV heads to dimension 3, where K, V and the mask match one to one.
            const int64_t G = H / Hkv;
            ggml_tensor * mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, s.n_kv, T, 1, Hkv);
            ggml_set_input(mask);
            g.layer_masks.push_back(mask);
            ggml_tensor * q4 = ggml_permute(ctx, ggml_reshape_4d(ctx, q, hd, G, Hkv, T), 0, 2, 3, 1);   // [hd, T, G, Hkv]
            ggml_tensor * K4 = ggml_view_4d(ctx, kc, hd, s.n_kv, 1, Hkv, kc->nb[1], kc->nb[2], kc->nb[2], 0);
            ggml_tensor * o;   // [hd, G, Hkv, T] once permuted
            if (s.flash_attn) {
                ggml_tensor * V4 = ggml_view_4d(ctx, vc, hd, s.n_kv, 1, Hkv, vc->nb[1], vc->nb[2], vc->nb[2], 0);
                if (cpu_attention_wants_float_kv(kc, vc, T)) K4 = as_f32(ctx, K4), V4 = as_f32(ctx, V4);
                o = ggml_flash_attn_ext(ctx, q4, K4, V4, mask, scale, 0.0f, 0.0f);   // [hd, G, T, Hkv]
                ggml_flash_attn_ext_set_prec(o, GGML_PREC_F32);
                o = ggml_permute(ctx, o, 0, 1, 3, 2);
            } else {
                ggml_tensor * V4 = ggml_view_4d(ctx, vc, s.n_kv, hd, 1, Hkv, vc->nb[1], vc->nb[2], vc->nb[2], 0);
                ggml_tensor * kq = ggml_soft_max_ext(ctx, ggml_mul_mat(ctx, K4, q4), mask, scale, 0.0f);   // [n_kv, T, G, Hkv]
                o = ggml_permute(ctx, ggml_mul_mat(ctx, V4, kq), 0, 3, 1, 2);                            // from [hd, T, G, Hkv]
            }
            attn = ggml_cont_2d(ctx, o, hd * H, T);
        } else if (s.flash_attn) {
            if (cpu_attention_wants_float_kv(kc, vc, T)) K = as_f32(ctx, K), V = as_f32(ctx, V);
            ggml_tensor * o = ggml_flash_attn_ext(ctx, qp, K, V, g.mask, scale, 0.0f, 0.0f);
            ggml_flash_attn_ext_set_prec(o, GGML_PREC_F32);
            attn = ggml_reshape_2d(ctx, o, hd * H, T);
        } else {
            ggml_tensor * kq = ggml_mul_mat(ctx, K, qp);        // [n_kv, T, H]
            kq = ggml_soft_max_ext(ctx, kq, g.mask, scale, 0.0f);
            ggml_tensor * kqv = ggml_mul_mat(ctx, V, kq);       // [hd, T, H]
            attn = ggml_cont_2d(ctx, ggml_permute(ctx, kqv, 0, 2, 1, 3), hd * H, T);
        }

        if (s.capture_count > 0) {
            ggml_tensor * qc = ggml_view_3d(ctx, q, hd, H, s.capture_count, q->nb[1], q->nb[2],
                                            s.capture_first * q->nb[2]);
            qc = ggml_cont(ctx, qc);
            ggml_set_output(qc);
            ggml_build_forward_expand(g.gf, qc);
            g.captured_q.push_back(qc);
        }

        x = ggml_add(ctx, x, linear(ctx, L.wo, L.bo, attn));

        h = rms_norm(ctx, x, L.ffn_norm, hp.rms_eps);
        ggml_tensor * gate = obc_mul_mat(ctx, L.ffn_gate, h);
        ggml_tensor * up = obc_mul_mat(ctx, L.ffn_up, h);
        ggml_tensor * ff = obc_mul_mat(ctx, L.ffn_down, ggml_swiglu_split(ctx, gate, up));
        x = ggml_add(ctx, x, ff);
    }

    if (s.n_out > 0) {
        if (s.n_out < T) x = ggml_view_2d(ctx, x, hp.n_embd, s.n_out, x->nb[1], (T - s.n_out) * x->nb[1]);
        x = rms_norm(ctx, x, model.output_norm, hp.rms_eps);
        g.logits = obc_mul_mat(ctx, model.output, x);
        ggml_set_output(g.logits);
        ggml_build_forward_expand(g.gf, g.logits);
    }
    return g;
}

}  // namespace obc
