"""Writes tiny random-weight GGUF models (llama, qwen2 and qwen3 layouts, Llama 3's rope_freqs) with
the gguf package, and a float64 NumPy forward pass of the same architecture to check the engine's
graph against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["the", "cat", "sat", "on", "mat", "hello", "world"]


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    alpha = byte_alphabet()
    tokens = list(alpha)
    merges = []
    sp = alpha[ord(" ")]

    def add_word(w: str) -> None:
        # Merge left to right: ((a b) c) ..., so every intermediate symbol exists.
        cur = w[0]
        for ch in w[1:]:
            merges.append(f"{cur} {ch}")
            cur = cur + ch
            if cur not in tokens:
                tokens.append(cur)

    for w in WORDS:
        add_word(w)
        add_word(sp + w)
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for s in SPECIALS:
        tokens.append(s)
        types.append(gguf.TokenType.CONTROL)
    return tokens, [int(t) for t in types], merges


@dataclass
class TinySpec:
    arch: str = "llama"
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 96
    n_ctx: int = 512
    rope_base: float = 10000.0
    eps: float = 1e-5
    tied: bool = False
    wtype: str = "F32"   # F32, F16, Q8_0, Q4_0, ...
    seed: int = 0
    head_dim: int = 0               # 0: n_embd // n_head (Qwen3 and Gemma-style models differ)
    llama3_rope_factor: float = 0.0  # > 0: Llama 3.x rope scaling, written as rope_freqs.weight
    # qwen2: a K bias of about this size on the lowest-frequency RoPE channels (the last 4 of each
    # half of a head, which barely turn over a short context), as Qwen2.5-1.5B's first layer has
    # (up to 354 on its dims 58-63 and 121-127, against keys of unit spread). 0: none.
    k_bias_low_freq: float = 0.0

    @property
    def hd(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


def llama3_rope_freqs(hd: int, base: float, factor: float, low_freq_factor: float = 1.0,
                      high_freq_factor: float = 4.0, original_ctx: int = 8192) -> np.ndarray:
    """Llama 3.x's rope scaling as per-frequency divisors (what rope_freqs.weight holds): long
    wavelengths are slowed by `factor`, short ones kept, the band between interpolated."""
    freqs = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    wavelen = 2 * np.pi / freqs
    low_wavelen, high_wavelen = original_ctx / low_freq_factor, original_ctx / high_freq_factor
    smooth = (original_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    div = np.where(wavelen < high_wavelen, 1.0,
                   np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return div.astype(np.float32)


def make_weights(spec: TinySpec, n_vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    E, hd = spec.n_embd, spec.hd
    Q, KV = hd * spec.n_head, hd * spec.n_head_kv

    def w(rows, cols, scale=None):
        return (rng.standard_normal((rows, cols)) * (scale or 1.0 / np.sqrt(cols))).astype(np.float32)

    W = {"token_embd.weight": w(n_vocab, E, 1.0), "output_norm.weight": (1 + 0.1 * rng.standard_normal(E)).astype(np.float32)}
    if not spec.tied:
        W["output.weight"] = w(n_vocab, E)
    for l in range(spec.n_layer):
        p = f"blk.{l}."
        W[p + "attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(E)).astype(np.float32)
        W[p + "attn_q.weight"] = w(Q, E)
        W[p + "attn_k.weight"] = w(KV, E)
        W[p + "attn_v.weight"] = w(KV, E)
        W[p + "attn_output.weight"] = w(E, Q)
        if spec.arch == "qwen2":
            W[p + "attn_q.bias"] = (0.1 * rng.standard_normal(Q)).astype(np.float32)
            W[p + "attn_k.bias"] = (0.1 * rng.standard_normal(KV)).astype(np.float32)
            if spec.k_bias_low_freq:
                low = [d for d in range(hd) if d % (hd // 2) >= hd // 2 - 4]
                for h in range(spec.n_head_kv):
                    for i, d in enumerate(low):
                        W[p + "attn_k.bias"][h * hd + d] += spec.k_bias_low_freq * (1.0 if (i + h) % 3 else -1.0)
            W[p + "attn_v.bias"] = (0.1 * rng.standard_normal(KV)).astype(np.float32)
        if spec.arch == "qwen3":
            W[p + "attn_q_norm.weight"] = (1 + 0.1 * rng.standard_normal(hd)).astype(np.float32)
            W[p + "attn_k_norm.weight"] = (1 + 0.1 * rng.standard_normal(hd)).astype(np.float32)
        W[p + "ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(E)).astype(np.float32)
        W[p + "ffn_gate.weight"] = w(spec.n_ff, E)
        W[p + "ffn_up.weight"] = w(spec.n_ff, E)
        W[p + "ffn_down.weight"] = w(E, spec.n_ff)
    if spec.llama3_rope_factor > 0:
        W["rope_freqs.weight"] = llama3_rope_freqs(hd, spec.rope_base, spec.llama3_rope_factor)
    return W


@dataclass
class Vocab:
    tokens: list
    types: list
    merges: list
    bos: int
    eos: int
    model: str = "gpt2"
    pre: str = "smollm"


def the_tiny_vocab(tokenizer_model: str = "gpt2", pre: str = "smollm") -> Vocab:
    tokens, types, merges = tiny_vocab()
    return Vocab(tokens, types, merges, len(tokens) - 3, len(tokens) - 1, tokenizer_model, pre)


def vocab_of(gguf_path: str, pre: str | None = None) -> Vocab:
    """The BPE vocabulary of a real GGUF (tokens, types, merges, BOS/EOS), to write into random
    models at real vocabulary size; `pre` replaces its pre-tokenizer name."""
    r = gguf.GGUFReader(gguf_path)

    def field(name):
        f = r.fields[name]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data] if f.types[0] == gguf.GGUFValueType.ARRAY and \
            f.types[-1] == gguf.GGUFValueType.STRING else [int(f.parts[i][0]) for i in f.data]

    scalar = lambda name: int(r.fields[name].parts[r.fields[name].data[0]][0])   # noqa: E731
    text = lambda name: bytes(r.fields[name].parts[r.fields[name].data[0]]).decode()   # noqa: E731
    return Vocab(field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type"), field("tokenizer.ggml.merges"),
                 scalar("tokenizer.ggml.bos_token_id"), scalar("tokenizer.ggml.eos_token_id"),
                 text("tokenizer.ggml.model"), pre or text("tokenizer.ggml.pre"))


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Rows of x (a multiple of 256 values each) as Q6_K bytes, (rows, 210 * n / 256) uint8.

    gguf-py dequantizes Q6_K but cannot quantize it. A plain encoder from the format: per 16 values
    a signed 8-bit scale, per 256 an fp16 d, values q + 32 in 0..63, split into a low nibble (ql)
    and two high bits (qh) in the order ggml's dequantizer reads them.
    """
    rows, n = x.shape
    assert n % 256 == 0
    b = x.astype(np.float64).reshape(rows * n // 256, 16, 16)
    sub = np.abs(b).max(axis=2) / 31.0                       # each sub-block's step
    d = (sub.max(axis=1) / 127.0).astype(np.float16)
    df = d.astype(np.float64)[:, None]
    sc = np.clip(np.round(np.divide(sub, df, out=np.zeros_like(sub), where=df > 0)), -128, 127).astype(np.int8)
    step = (df * sc)[:, :, None]
    q = np.clip(np.round(np.divide(b, step, out=np.zeros_like(b), where=step > 0)), -32, 31).astype(np.int64) + 32
    q = q.reshape(-1, 2, 4, 32)                               # [block, half, c, l]: value 128 half + 32 c + l
    ql = np.concatenate([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4),
                         (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], axis=2).reshape(-1, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)).reshape(-1, 64)
    blocks = np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), sc.view(np.uint8),
                             d.reshape(-1, 1).view(np.uint8)], axis=1)
    return blocks.reshape(rows, -1)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Rows of x (a multiple of 256 values each) as Q4_K bytes, (rows, 144 * n / 256) uint8.

    Per 32 values a 6-bit scale and a 6-bit min, per 256 the fp16 d and dmin they multiply, values
    0..15 with value = d * scale * q - dmin * min; the 6-bit pairs packed in 12 bytes and the
    nibbles in the order ggml's dequantizer reads them (gguf-py cannot quantize Q4_K either).
    """
    rows, n = x.shape
    assert n % 256 == 0
    b = x.astype(np.float64).reshape(rows * n // 256, 8, 32)
    lo = np.minimum(b.min(axis=2), 0.0)
    step = (b.max(axis=2) - lo) / 15.0
    d = (step.max(axis=1) / 63.0).astype(np.float16)
    dmin = ((-lo).max(axis=1) / 63.0).astype(np.float16)
    df, dmf = d.astype(np.float64)[:, None], dmin.astype(np.float64)[:, None]
    sc = np.clip(np.round(np.divide(step, df, out=np.zeros_like(step), where=df > 0)), 0, 63).astype(np.int64)
    mn = np.clip(np.round(np.divide(-lo, dmf, out=np.zeros_like(lo), where=dmf > 0)), 0, 63).astype(np.int64)
    unit = (df * sc)[:, :, None]
    q = np.round(np.divide(b + (dmf * mn)[:, :, None], unit, out=np.zeros_like(b), where=unit > 0))
    q = np.clip(q, 0, 15).astype(np.int64).reshape(-1, 4, 2, 32)   # [block, g, half, l]: value 64 g + 32 half + l
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    packed = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8),
                             packed.astype(np.uint8), qs.astype(np.uint8)], axis=1)
    return blocks.reshape(rows, -1)


def write_tiny_gguf(path: Path, spec: TinySpec = TinySpec(), arch_name: str | None = None,
                    tokenizer_model: str = "gpt2", pre: str = "smollm", drop: tuple[str, ...] = (),
                    vocab: Vocab | None = None, chat_template: str | None = None) -> dict:
    """Writes the model; returns its weights as stored (after quantization round trip)."""
    v = vocab or the_tiny_vocab(tokenizer_model, pre)
    W = make_weights(spec, len(v.tokens))
    arch = arch_name or spec.arch
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_name(f"tiny-{arch}")
    wr.add_context_length(spec.n_ctx)
    wr.add_embedding_length(spec.n_embd)
    wr.add_block_count(spec.n_layer)
    wr.add_feed_forward_length(spec.n_ff)
    wr.add_head_count(spec.n_head)
    wr.add_head_count_kv(spec.n_head_kv)
    wr.add_layer_norm_rms_eps(spec.eps)
    wr.add_rope_freq_base(spec.rope_base)
    if spec.head_dim:
        wr.add_key_length(spec.head_dim)
        wr.add_value_length(spec.head_dim)
    wr.add_tokenizer_model(v.model)
    wr.add_tokenizer_pre(v.pre)
    wr.add_token_list(v.tokens)
    wr.add_token_types(v.types)
    wr.add_token_merges(v.merges)
    wr.add_bos_token_id(v.bos)
    wr.add_eos_token_id(v.eos)
    wr.add_add_bos_token(False)
    if chat_template is not None:
        wr.add_chat_template(chat_template)
    stored = {}
    qtype = getattr(gguf.GGMLQuantizationType, spec.wtype)
    for name, t in W.items():
        if name in drop:
            continue
        if t.ndim == 2 and qtype not in (gguf.GGMLQuantizationType.F32,):
            if qtype == gguf.GGMLQuantizationType.F16:
                wr.add_tensor(name, t.astype(np.float16))
                stored[name] = t.astype(np.float16).astype(np.float64)
            else:
                own = {gguf.GGMLQuantizationType.Q6_K: quantize_q6_k, gguf.GGMLQuantizationType.Q4_K: quantize_q4_k}
                q = own[qtype](t) if qtype in own else gguf.quants.quantize(t, qtype)
                wr.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
                stored[name] = gguf.quants.dequantize(q, qtype).astype(np.float64)
        else:
            wr.add_tensor(name, t)
            stored[name] = t.astype(np.float64)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return stored


def _rope(x: np.ndarray, pos: np.ndarray, base: float, neox: bool, freq_div=None) -> np.ndarray:
    """x: [T, H, hd]. llama GGUFs rotate adjacent pairs; qwen2/qwen3 (NEOX) rotate the two halves.
    freq_div: rope_freqs.weight, a divisor per frequency."""
    T, H, hd = x.shape
    inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    if freq_div is not None:
        inv = inv / freq_div
    ang = pos[:, None].astype(np.float64) * inv[None, :]          # [T, hd/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = np.empty_like(x)
    if neox:
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        out[..., : hd // 2] = a * cos - b * sin
        out[..., hd // 2:] = a * sin + b * cos
    else:
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
    return out


def reference_logits(W: dict, spec: TinySpec, ids: list[int]) -> np.ndarray:
    """Float64 forward pass; returns logits [T, n_vocab]."""
    E, H, Hkv = spec.n_embd, spec.n_head, spec.n_head_kv
    hd = spec.hd
    T = len(ids)
    pos = np.arange(T)
    x = W["token_embd.weight"][ids]

    def rms(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + spec.eps) * w

    neox = spec.arch in ("qwen2", "qwen3")
    freq_div = W.get("rope_freqs.weight")
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(spec.n_layer):
        p = f"blk.{l}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = h @ W[p + "attn_q.weight"].T + W.get(p + "attn_q.bias", 0)
        k = h @ W[p + "attn_k.weight"].T + W.get(p + "attn_k.bias", 0)
        v = h @ W[p + "attn_v.weight"].T + W.get(p + "attn_v.bias", 0)
        q, k = q.reshape(T, H, hd), k.reshape(T, Hkv, hd)
        if p + "attn_q_norm.weight" in W:   # qwen3: RMSNorm of each head before RoPE
            q, k = rms(q, W[p + "attn_q_norm.weight"]), rms(k, W[p + "attn_k_norm.weight"])
        q = _rope(q, pos, spec.rope_base, neox, freq_div)
        k = _rope(k, pos, spec.rope_base, neox, freq_div)
        v = v.reshape(T, Hkv, hd)
        out = np.empty((T, H, hd))
        for hh in range(H):
            g = hh // (H // Hkv)
            s = q[:, hh] @ k[:, g].T / np.sqrt(hd) + mask
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            out[:, hh] = a @ v[:, g]
        x = x + out.reshape(T, H * hd) @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        gate = h @ W[p + "ffn_gate.weight"].T
        up = h @ W[p + "ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ W[p + "ffn_down.weight"].T
    x = rms(x, W["output_norm.weight"])
    out_w = W.get("output.weight", W["token_embd.weight"])
    return x @ out_w.T
