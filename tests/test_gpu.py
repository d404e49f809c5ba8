"""The engine on the GPU against the CPU: greedy tokens of SmolLM2 with the full cache and with
OBC-VK eviction. Skips where pyobcache runs on a ggml without a GPU backend (CI, the CPU wheel)."""

import warnings

import pytest

import pyobcache

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gpu_model(smollm2_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = pyobcache.Model(smollm2_path, n_ctx=2048, n_threads=2, n_gpu_layers=999)
    if m._m.gpu_layers == 0:
        pytest.skip("this ggml has no GPU backend")
    return m


def test_full_cache_greedy_matches_cpu(gpu_model, smollm2):
    assert gpu_model._m.gpu_layers == gpu_model._m.n_layer
    want = smollm2.generate(PROMPT, max_new_tokens=32, temperature=0)
    got = gpu_model.generate(PROMPT, max_new_tokens=32, temperature=0)
    # Kernels differ (cuBLAS, tf32), so the texts may part after a near-tie: compare a prefix.
    assert got[:40] == want[:40]


def test_obc_vk_eviction_greedy_matches_cpu(gpu_model, smollm2):
    filler = ("The history of the region is long and varied. Farmers grew wheat and barley in the valleys, "
              "while traders carried salt and cloth along the rivers to the coast. ") * 30
    prompt = filler + PROMPT
    kv = pyobcache.KVConfig(method="obc-vk", budget=128)
    want = smollm2.generate(prompt, max_new_tokens=16, temperature=0, kv=kv)
    got = gpu_model.generate(prompt, max_new_tokens=16, temperature=0, kv=kv)
    assert gpu_model.last_stats.kept_per_layer == [128] * gpu_model._m.n_layer
    assert got[:20] == want[:20]
