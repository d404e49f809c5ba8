"""The forward graph against a float64 NumPy implementation, on tiny random-weight models."""

import numpy as np
import pytest

import pyobcache
from gguf_factory import reference_logits


def _check(path, W, spec, ids, tol, flash_attn=False):
    m = pyobcache.Model(path, n_ctx=256, n_threads=2, n_batch=7, flash_attn=flash_attn)
    got = m.logits(ids, all_tokens=True)
    ref = reference_logits(W, spec, ids)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < tol, f"relative error {err:.2e}"
    return m


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("n_head,n_head_kv", [(4, 4), (4, 2), (4, 1)])
def test_forward_matches_numpy(tiny_model, arch, n_head, n_head_kv, flash_attn):
    path, W, spec = tiny_model(arch=arch, n_head=n_head, n_head_kv=n_head_kv)
    ids = [(7 * i + 3) % 250 for i in range(40)]   # spans several micro-batches of 7
    _check(path, W, spec, ids, 2e-3 if not flash_attn else 5e-3, flash_attn)   # the KV cache is F16


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("kw", [
    # Qwen3: per-head q/k RMSNorm before NEOX rope, no biases, and head_dim != n_embd / n_head
    # (Qwen3-0.6B: 1024 / 16 heads, head_dim 128).
    dict(arch="qwen3", n_embd=64, n_head=4, n_head_kv=2, head_dim=32),
    dict(arch="qwen3", n_embd=64, n_head=4, n_head_kv=1),
    # Llama 3.x: rope scaling as rope_freqs.weight (factor 32, as Llama 3.2), head_dim 2x too.
    dict(arch="llama", n_head=4, n_head_kv=2, llama3_rope_factor=32.0, rope_base=500000.0),
    dict(arch="llama", n_embd=64, n_head=2, n_head_kv=1, head_dim=64, llama3_rope_factor=8.0, rope_base=500000.0),
], ids=["qwen3-hd32", "qwen3-mqa", "llama3-rope", "llama3-hd64"])
def test_new_architectures_match_numpy(tiny_model, kw, flash_attn):
    path, W, spec = tiny_model(**kw)
    assert ("rope_freqs.weight" in W) == (spec.llama3_rope_factor > 0)
    ids = [(7 * i + 3) % 250 for i in range(40)]
    m = _check(path, W, spec, ids, 2e-3 if not flash_attn else 5e-3, flash_attn)
    assert m.hparams["head_dim"] == spec.hd and m.arch == spec.arch


def test_tied_output(tiny_model):
    path, W, spec = tiny_model(tied=True)
    _check(path, W, spec, list(range(10, 30)), 2e-3)


@pytest.mark.parametrize("wtype", ["F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "BF16"])
def test_weight_types(tiny_model, wtype):
    # The reference uses the de-quantized weights, so only activation rounding differs.
    path, W, spec = tiny_model(wtype=wtype)
    tol = {"F16": 2e-3, "BF16": 1e-2}.get(wtype, 6e-2)
    _check(path, W, spec, list(range(20, 45)), tol)


def test_incremental_decode_equals_batch(tiny_model):
    path, W, spec = tiny_model(arch="qwen2")
    m = pyobcache.Model(path, n_ctx=256, n_threads=2)
    ids = list(range(30, 60))
    batch = m.logits(ids, all_tokens=True)
    # Greedy generation token by token reproduces the batch forward's argmax chain.
    out = m.generate(ids[:10], max_new_tokens=5, temperature=0, ignore_eos=True)
    assert isinstance(out, str)
    assert np.argmax(batch[-1]) == np.argmax(m.logits(ids)[None, :], axis=1)[0]
