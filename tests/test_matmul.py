"""obc_mul_mat: pyobcache's CPU kernel for Q6_K and Q4_K weights over a batch of tokens
(ggml-ext/obc_matmul_cpu.cpp).

The authority is ggml_mul_mat on the same stored weights: the kernel uses the same Q8_K activations
and exact integer block sums, so only the fp32 accumulation over blocks may differ (today Q6_K agrees
bit for bit, Q4_K to ~5e-7 of the largest output, as its mins term is a second fp32 product). Where the kernel does not apply (fewer than 8 columns, no AVX2, switched off),
obc_mul_mat must be ggml_mul_mat itself.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import pyobcache
import pyobcache._core as core
from gguf_factory import reference_logits


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


TILED_HERE = _cpu_has_avx2() and not os.environ.get("OBC_CPU_BASELINE")


def _product(M, K, N, seed, n_threads=1, ggml_only=False, w_type="q6_K"):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((M, K)).astype(np.float32)
    x = rng.standard_normal((N, K)).astype(np.float32)
    y, tiled = core.mul_mat(w, x, w_type, n_threads, ggml_only)
    return w, x, y, tiled


@pytest.mark.parametrize("w_type,noise", [("q6_K", 0.03), ("q4_K", 0.1)])
@pytest.mark.parametrize("M,K,N", [(8, 256, 8), (37, 1536, 33), (64, 512, 100), (3, 2304, 9)])
def test_product_equals_ggml(M, K, N, w_type, noise):
    w, x, ours, tiled = _product(M, K, N, seed=M + N, w_type=w_type)
    _, _, ref, ref_tiled = _product(M, K, N, seed=M + N, ggml_only=True, w_type=w_type)
    assert tiled == TILED_HERE and not ref_tiled
    assert ours.shape == (N, M)
    # same integer sums; fp32 accumulation over K / 256 blocks in a possibly different order
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    # and it is a product of these matrices: on Gaussian data Q6_K weights carry ~2% noise, Q4_K ~7%
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    rel = np.linalg.norm(ours - exact) / np.linalg.norm(exact)
    assert rel < noise, rel


@pytest.mark.parametrize("w_type", ["q6_K", "q4_K"])
def test_threads_split_rows_without_changing_results(w_type):
    _, _, one, tiled = _product(45, 768, 70, seed=5, n_threads=1, w_type=w_type)
    for n in (2, 3, 7):
        _, _, many, _ = _product(45, 768, 70, seed=5, n_threads=n, w_type=w_type)
        assert np.array_equal(one, many), n
    assert tiled == TILED_HERE


def test_few_columns_and_other_types_are_ggml_mul_mat():
    for M, K, N, t in [(16, 512, 7, "q6_K"), (16, 512, 1, "q6_K"), (16, 512, 32, "q5_K"), (16, 512, 32, "q8_0")]:
        _, _, ours, tiled = _product(M, K, N, seed=1, w_type=t)
        _, _, ref, _ = _product(M, K, N, seed=1, ggml_only=True, w_type=t)
        assert not tiled, (N, t)
        assert np.array_equal(ours, ref)


@pytest.mark.parametrize("N", [1, 2, 3, 5, 7])
def test_q4k_few_columns_read_the_blocks_directly(N):
    # decode: Q4_K rows straight from their blocks (no staging row), for any number of columns
    w, x, ours, tiled = _product(29, 1280, N, seed=N, w_type="q4_K")
    _, _, ref, _ = _product(29, 1280, N, seed=N, ggml_only=True, w_type="q4_K")
    assert tiled == TILED_HERE
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    _, _, many, _ = _product(29, 1280, N, seed=N, n_threads=3, w_type="q4_K")
    assert np.array_equal(ours, many)


@pytest.mark.parametrize("var,value", [("OBC_TILED_MATMUL", "0"), ("OBC_CPU_BASELINE", "1")])
def test_the_switches_turn_the_kernel_off(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    _, _, _, tiled = _product(16, 512, 32, seed=2)
    assert not tiled


def test_bad_arguments():
    w = np.zeros((4, 256), np.float32)
    with pytest.raises(ValueError, match="x must have shape"):
        core.mul_mat(w, np.zeros((8, 128), np.float32))
    with pytest.raises(ValueError, match="whole blocks of 256"):
        core.mul_mat(np.zeros((4, 100), np.float32), np.zeros((8, 100), np.float32))
    with pytest.raises(ValueError, match="unknown weight type"):
        core.mul_mat(w, np.zeros((8, 256), np.float32), "q9_9")


@pytest.mark.parametrize("wtype", ["Q6_K", "Q4_K"])
def test_a_k_quant_model_prefills_as_with_ggml(tiny_model, monkeypatch, wtype):
    # K-quant rows hold 256 values: a model whose every matrix is Q6_K or Q4_K, prefilled in
    # micro-batches of 32 and 8 tokens (both >= 8 columns) and decoded (1 column), must give the
    # logits of ggml's own kernels (OBC_TILED_MATMUL=0: Q4_K then repacked by ggml, as llama.cpp
    # does), which are the float64 forward of the stored weights up to activation rounding.
    # (tied: the output matrix is the token embedding, in plain memory for get_rows either way)
    path, W, spec = tiny_model(arch="qwen2", n_embd=256, n_head=4, n_head_kv=2, n_ff=512, wtype=wtype, tied=True)
    ids = [(7 * i + 3) % 250 for i in range(40)]

    def run():
        m = pyobcache.Model(path, n_ctx=256, n_threads=2, n_batch=32)
        logits = m.logits(ids, all_tokens=True)
        nodes = m._session.timings()["graph_nodes"]   # of the last graph, 8 tokens
        text = m.generate(ids, max_new_tokens=6, temperature=0, ignore_eos=True)
        return logits, nodes, text

    ours, nodes, text = run()
    monkeypatch.setenv("OBC_TILED_MATMUL", "0")
    ggml, ggml_nodes, ggml_text = run()
    # the kernel adds a node (the Q8_K activations) to each product it takes: the layers' 7 (the
    # loader keeps Q4_K weights out of ggml's repacked buffers for it) and the output's
    assert nodes - ggml_nodes == (7 * spec.n_layer + 1 if TILED_HERE else 0)
    ref = reference_logits(W, spec, ids)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    ggml_err = np.abs(ggml - ref).max() / np.abs(ref).max()
    assert err < 6e-2
    if TILED_HERE and wtype == "Q4_K":
        # Q4_K's products differ from ggml's by float rounding (~5e-7), but the next layer
        # requantizes its input to Q8_K, where such a difference can move a value across a rounding
        # boundary: the logits then differ by activation-quantization noise. They must be as close
        # to the float64 forward as ggml's.
        assert err <= 1.25 * ggml_err + 1e-3, (err, ggml_err)
    else:
        np.testing.assert_allclose(ours, ggml, rtol=0, atol=1e-5 * np.abs(ggml).max())
        assert text == ggml_text
