"""KV-cache eviction: configurations, identity at a large budget, the kept tokens against a NumPy
re-implementation, bounded memory in every mode (SmolLM2)."""

import numpy as np
import pytest

import pyobcache
from obc_reference import saliency_ref

PAPER_METHODS = ["h2o", "tova", "snapkv"] + [f"obc-{s}{b}" for s in ("v", "k", "vk") for b in ("", "+tova", "+snapkv")]
ALL_METHODS = PAPER_METHODS + ["streamingllm", "obc-vk-nocross"]

FILLER = ("The history of the region is long and varied. Farmers grew wheat and barley in the valleys, "
          "while traders carried salt and cloth along the rivers to the coast. ")


def long_prompt(model, n_tokens, question="The capital of France is"):
    text = FILLER * (n_tokens // 30 + 1)
    ids = model.tokenize(text)[: n_tokens - len(model.tokenize(" " + question))]
    return ids + model.tokenize(" " + question)


def test_method_names():
    names = pyobcache.kv_methods()
    for m in ALL_METHODS:
        assert m in names
    assert len([m for m in PAPER_METHODS if m in names]) == 12


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="nope", budget=64), "unknown KV method"),
    (dict(method="obc-vk"), "budget"),
    (dict(method="obc-vk", budget=64, ratio=0.5), "either"),
    (dict(method="obc-vk", ratio=0.0), "ratio"),
    (dict(method="obc-vk", ratio=1.5), "ratio"),
    (dict(method="obc-vk", budget=-3), "budget"),
    (dict(method="obc-vk", budget=10, n_recent=8, n_sink=4), "smaller than n_recent \\+ n_sink"),
    (dict(method="snapkv", budget=64, evict="sometimes"), "eviction mode"),
    (dict(method="snapkv", budget=64, pooling="median"), "pooling"),
    (dict(method="snapkv", budget=64, group_pool="min"), "group pooling"),
    (dict(method="obc-v", budget=64, p=3.0), "p must be 1 or 2"),
    (dict(method="snapkv", budget=64, kernel=4), "kernel"),
])
def test_impossible_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pyobcache.KVConfig(**kwargs)


def test_ratio_too_small_for_prompt(smollm2):
    kv = pyobcache.KVConfig(method="snapkv", ratio=0.01, n_recent=16)
    with pytest.raises(ValueError, match="smaller than n_recent"):
        smollm2.generate("short prompt here", max_new_tokens=2, kv=kv)


def test_method_parts():
    d = pyobcache.KVConfig(method="obc-vk+snapkv", budget=128).describe()
    assert "score=vk" in d and "pooling=max" in d and "window=last" in d
    d = pyobcache.KVConfig(method="obc-k+tova", budget=128).describe()
    assert "score=k" in d and "window=latest" in d and "n_recent=0" in d
    d = pyobcache.KVConfig(method="obc-v", budget=128, p=1.0, pooling="avg").describe()
    assert "score=v(p=1)" in d and "window=last(16)" in d and "pooling=avg" in d
    # H2O sums over the last 16 prompt queries (the paper's code); all queries is h2o-fullhist
    d = pyobcache.KVConfig(method="obc-v+h2o-fullhist", budget=128).describe()
    assert "score=v(p=2)" in d and "window=all" in d and "pooling=none" in d


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("evict", ["prefill", "chunked", "decode"])
def test_identity_at_large_budget(smollm2, method, evict):
    ids = long_prompt(smollm2, 120)
    ref = smollm2.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True)
    ref_ids = smollm2.last_tokens
    kv = pyobcache.KVConfig(method=method, budget=200, evict=evict)
    out = smollm2.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True, kv=kv)
    assert smollm2.last_tokens == ref_ids and out == ref
    assert smollm2.last_stats.evictions == 0


def _pool(s, pooling, kernel=7):
    if pooling == "none":
        return s
    r = kernel // 2
    pad = np.concatenate([np.full(r, -np.inf if pooling == "max" else 0.0), s, np.full(r, -np.inf if pooling == "max" else 0.0)])
    win = np.lib.stride_tricks.sliding_window_view(pad, kernel)
    return win.max(-1) if pooling == "max" else win.sum(-1) / kernel


def _select(s, budget, n_sink, n_recent, pooling):
    """Returns (kept slots, margin): the score gap at the selection boundary, to skip near-ties."""
    n = len(s)
    # pooled over the slots before the protected recent tokens only, as the paper's code does
    pooled = _pool(s[:n - n_recent], pooling)
    cand = np.arange(n_sink, n - n_recent)
    order = cand[np.lexsort((cand, -pooled[cand]))]
    n_pick = budget - n_sink - n_recent
    keep = np.sort(np.concatenate([np.arange(n_sink), order[:n_pick], np.arange(n - n_recent, n)]))
    # Max pooling makes plateaus of exactly equal values, which both sides break by position; what
    # could flip a choice is a different value close to the boundary value.
    b = pooled[order[n_pick - 1]]
    vals = pooled[cand]
    above, below = vals[vals > b], vals[vals < b]
    gaps = [g for g in ((above.min() - b) if above.size else None, (b - below.max()) if below.size else None) if g is not None]
    margin = min(gaps) / max(abs(b), 1e-30) if gaps else 1.0
    return keep, margin


@pytest.mark.parametrize("method, score, pooling", [
    ("h2o", "attn", "none"), ("h2o-fullhist", "attn", "none"), ("tova", "attn", "none"), ("snapkv", "attn", "max"),
    ("obc-v", "v", "none"), ("obc-k+snapkv", "k", "max"), ("obc-vk", "vk", "none"),
    ("obc-vk+tova", "vk", "none"), ("obc-v+snapkv", "v", "max"), ("obc-vk-nocross", "vk-nocross", "none"),
])
def test_kept_indices_match_numpy(smollm2_path, method, score, pooling):
    # A small micro-batch makes the prompt span several, so score accumulation across them is covered.
    m = pyobcache.Model(smollm2_path, n_ctx=1024, n_threads=2, n_batch=96)
    ids = long_prompt(m, 300)
    kv = pyobcache.KVConfig(method=method, budget=64, group_pool="sum")
    tr = m.inspect_eviction(ids, kv, capture=True)
    cfg = kv._core
    checked = 0
    for layer in range(0, 30, 3):
        q = np.transpose(tr.q[layer], (1, 0, 2))              # (n_head, n_q, hd)
        k, v = tr.k[layer], tr.v[layer]
        n_kv = k.shape[1]
        assert n_kv == len(ids)
        pos_k = np.tile(np.arange(n_kv), (k.shape[0], 1))
        ref = saliency_ref(q, k, v, np.asarray(tr.pos_q), pos_k, score, p=2.0)
        for h in range(k.shape[0]):
            want, margin = _select(ref[h], 64, cfg.n_sink, cfg.n_recent, pooling)
            if margin < 1e-3:
                continue   # a near-tie at the boundary: either choice is right
            assert tr.kept[layer][h] == list(want), (method, layer, h)
            checked += 1
    assert checked >= 20


def test_window_sizes_follow_method(smollm2_path):
    m = pyobcache.Model(smollm2_path, n_ctx=1024, n_threads=2)
    ids = long_prompt(m, 200)
    n_q = {meth: len(m.inspect_eviction(ids, pyobcache.KVConfig(method=meth, budget=64), capture=True).pos_q)
           for meth in ("h2o", "h2o-fullhist", "tova", "snapkv")}
    assert n_q == {"h2o": 16, "h2o-fullhist": 200, "tova": 1, "snapkv": 16}
    tr = m.inspect_eviction(ids, pyobcache.KVConfig(method="snapkv", budget=64, n_recent=8, window=32), capture=True)
    assert tr.pos_q == list(range(168, 200))


def test_memory_shrinks_by_budget(smollm2):
    ids = long_prompt(smollm2, 600)
    kv = pyobcache.KVConfig(method="obc-vk+snapkv", budget=100)
    smollm2.generate(ids, max_new_tokens=4, temperature=0, ignore_eos=True, kv=kv)
    s = smollm2.last_stats
    per_token = 30 * 3 * 64 * 2 * 2
    assert s.evictions == 1 and s.budget == 100
    assert s.kept_per_layer == [100 + 3] * 30     # the budget plus the decoded tokens
    assert s.kv_bytes_used == 103 * per_token
    assert s.kv_bytes_full == (600 + 3) * per_token


def test_positions_stay_absolute(smollm2):
    ids = long_prompt(smollm2, 300)
    kv = pyobcache.KVConfig(method="obc-vk", budget=50, n_recent=8)
    tr = smollm2.inspect_eviction(ids, kv)
    for layer in (0, 15, 29):
        for h in range(3):
            pos = tr.positions[layer][h]
            assert len(pos) == 50 and np.all(np.diff(pos) > 0)
            assert list(pos[-8:]) == list(range(292, 300))      # the recent window
            assert pos[0] >= 0 and pos[-1] == 299
    # Heads choose different tokens: memory is per KV head, not shared.
    assert any(list(tr.positions[10][0]) != list(tr.positions[10][h]) for h in (1, 2))


def test_chunked_mode_bounds_the_cache(smollm2_path):
    m = pyobcache.Model(smollm2_path, n_ctx=4096, n_threads=2, n_batch=128)
    ids = long_prompt(m, 1500)
    kv = pyobcache.KVConfig(method="obc-vk+snapkv", budget=256, evict="chunked")
    out = m.generate(ids, max_new_tokens=40, temperature=0, ignore_eos=True, kv=kv)
    s = m.last_stats
    per_slot = 30 * 3 * (64 * 2 * 2 + 4)     # K and V in f16, plus the running score
    assert s.kv_bytes_allocated <= (256 + 128) * per_slot + 4096   # budget + chunk, never the prompt
    assert s.evictions >= 1500 // 128 - 2
    assert max(s.kept_per_layer) <= 256 + 32
    assert len(out) > 0


def test_decode_mode_compacts_with_slack(smollm2):
    ids = long_prompt(smollm2, 200)
    kv = pyobcache.KVConfig(method="obc-vk", budget=64, evict="decode", slack=16)
    smollm2.generate(ids, max_new_tokens=60, temperature=0, ignore_eos=True, kv=kv)
    s = smollm2.last_stats
    # One eviction after the prompt, then one every 16 generated tokens.
    assert s.evictions == 1 + (60 - 1) // 16
    assert 64 <= s.kept_per_layer[0] <= 64 + 16


@pytest.mark.parametrize("method", ["obc-vk+snapkv", "snapkv", "obc-v+snapkv", "streamingllm"])
def test_evicted_cache_still_answers(smollm2, method):
    ids = long_prompt(smollm2, 700)
    kv = pyobcache.KVConfig(method=method, budget=96)
    out = smollm2.generate(ids, max_new_tokens=3, temperature=0, kv=kv)
    assert smollm2.last_stats.evictions == 1
    assert out.startswith(" Paris"), out


def test_scores_are_exposed(smollm2):
    ids = long_prompt(smollm2, 200)
    tr = smollm2.inspect_eviction(ids, pyobcache.KVConfig(method="obc-vk+snapkv", budget=64))
    assert len(tr.scores) == 30 and len(tr.scores[0]) == 3
    s = tr.scores[5][1]
    assert s.shape == (64,) and np.all(s >= 0) and s.max() > 0
    assert len(tr.kept[5][1]) == 64


# --- GQA variants: a cache per query head, group reductions, head-wise budgets ----------------

GQA_VARIANTS = [dict(gqa="expand"), dict(group_pool="norm-sum"), dict(group_pool="pre-mean"), dict(group_pool="max"),
                dict(head_budget="adaptive")]


@pytest.mark.parametrize("extra", GQA_VARIANTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_gqa_variants_identity_at_large_budget(smollm2, extra):
    ids = long_prompt(smollm2, 120)
    ref = smollm2.generate(ids, max_new_tokens=10, temperature=0, ignore_eos=True)
    ref_ids = smollm2.last_tokens
    for method in ("obc-vk+snapkv", "snapkv"):
        if method == "snapkv" and extra.get("group_pool") == "pre-mean":
            continue
        smollm2.generate(ids, max_new_tokens=10, temperature=0, ignore_eos=True,
                         kv=pyobcache.KVConfig(method=method, budget=200, **extra))
        assert smollm2.last_tokens == ref_ids, (method, extra)


def test_expand_keeps_one_cache_per_query_head(smollm2):
    """gqa=expand: memory is n_head / n_head_kv times native at the same budget, each query head
    ranks its own tokens (so heads of a group keep different ones), and kv_bytes_full still names
    the model's own full cache."""
    hp = smollm2.hparams
    G = hp["n_head"] // hp["n_head_kv"]
    ids = long_prompt(smollm2, 300)
    smollm2.generate(ids, max_new_tokens=4, temperature=0, kv=pyobcache.KVConfig(method="obc-vk+snapkv", budget=64))
    native = smollm2.last_stats
    kv = pyobcache.KVConfig(method="obc-vk+snapkv", budget=64, gqa="expand")
    smollm2.generate(ids, max_new_tokens=4, temperature=0, kv=kv)
    exp = smollm2.last_stats
    assert exp.kv_bytes_used == G * native.kv_bytes_used
    assert exp.kv_bytes_full == native.kv_bytes_full
    tr = smollm2.inspect_eviction(ids, kv)
    assert len(tr.kept[0]) == hp["n_head"]
    assert any(tr.kept[il][0] != tr.kept[il][1] for il in range(hp["n_layer"]))
    with pytest.raises(ValueError, match="no group to pool"):
        pyobcache.KVConfig(method="obc-vk", budget=64, gqa="expand", group_pool="pre-mean")


def test_expand_selection_matches_numpy(smollm2):
    """With a cache per query head, each head's kept slots are the top of its own scores (the
    float64 reference with a group of one)."""
    ids = long_prompt(smollm2, 300)
    kv = pyobcache.KVConfig(method="obc-vk+snapkv", budget=64, gqa="expand")
    tr = smollm2.inspect_eviction(ids, kv, capture=True)
    cfg = kv._core
    checked = 0
    for layer in range(0, 30, 5):
        q = np.transpose(tr.q[layer], (1, 0, 2))
        k, v = tr.k[layer], tr.v[layer]
        assert k.shape[0] == q.shape[0]    # one cache head per query head
        pos_k = np.tile(np.arange(k.shape[1]), (k.shape[0], 1))
        ref = saliency_ref(q, k, v, np.asarray(tr.pos_q), pos_k, "vk")
        for h in range(k.shape[0]):
            want, margin = _select(ref[h], 64, cfg.n_sink, cfg.n_recent, "max")
            if margin < 1e-3:
                continue
            assert tr.kept[layer][h] == list(want), (layer, h)
            checked += 1
    assert checked >= 20


def test_adaptive_head_budgets(smollm2_path):
    """head_budget=adaptive: every layer keeps budget * n_head_kv tokens in all, each head at least
    its floor; the padded layout's holes are masked (the mul_mat and flash-attention paths, two
    implementations of the per-head masks, agree); floor 1 is the uniform split."""
    m = pyobcache.Model(smollm2_path, n_ctx=1024, n_threads=2, flash_attn=False)
    hp = m.hparams
    ids = long_prompt(m, 300)
    kv = pyobcache.KVConfig(method="obc-vk+snapkv", budget=64, head_budget="adaptive", head_floor=0.25)
    tr = m.inspect_eviction(ids, kv)
    share = 64 - kv._core.n_recent - kv._core.n_sink
    uneven = 0
    for layer in tr.kept:
        counts = [len(k) for k in layer]
        assert sum(counts) == 64 * hp["n_head_kv"]
        assert min(counts) >= 64 - share + int(0.25 * share)
        uneven += len(set(counts)) > 1
    assert uneven >= 10
    a = m.logits(ids, kv=kv)
    m.generate(ids, max_new_tokens=8, temperature=0, kv=kv)
    s = m.last_stats
    assert s.kv_bytes_used > s.kv_bytes_kept    # the padded layout holds holes
    fa = pyobcache.Model(smollm2_path, n_ctx=1024, n_threads=2, flash_attn=True)
    b = fa.logits(ids, kv=kv)
    np.testing.assert_allclose(a, b, atol=0.05 * np.abs(a).max())
    assert np.argmax(a) == np.argmax(b)
    uniform = pyobcache.KVConfig(method="obc-vk+snapkv", budget=64)
    floor1 = pyobcache.KVConfig(method="obc-vk+snapkv", budget=64, head_budget="adaptive", head_floor=1.0)
    assert m.inspect_eviction(ids, floor1).kept == m.inspect_eviction(ids, uniform).kept
    with pytest.raises(ValueError, match="evict=prefill"):
        pyobcache.KVConfig(method="snapkv", budget=64, head_budget="adaptive", evict="decode")


def test_compression_ratio_is_kvpress_complement():
    # kvpress's compression_ratio is the share removed; ratio is the share kept.
    kv = pyobcache.KVConfig(method="snapkv", compression_ratio=0.9)
    assert kv.ratio == pytest.approx(0.1) and kv.compression_ratio is None
    assert kv._core.ratio == pytest.approx(0.1)
    assert kv.replace(method="obc-vk").ratio == pytest.approx(0.1)
    with pytest.raises(ValueError, match="not both"):
        pyobcache.KVConfig(ratio=0.2, compression_ratio=0.8)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pyobcache.KVConfig(compression_ratio=1.0)


def test_spec_string_is_read_by_the_engine():
    # One reader for every door: KVConfig.from_spec, the CLIs' --kv, the C API's kv_spec.
    kv = pyobcache.KVConfig.from_spec("obc-vk+snapkv,budget=512,evict=chunked,group_pool=max,head_floor=0.3")
    assert (kv.method, kv.budget, kv.evict, kv.group_pool, kv.head_floor) == ("obc-vk+snapkv", 512, "chunked", "max", 0.3)
    same = pyobcache.KVConfig(method="obc-vk+snapkv", budget=512, evict="chunked", group_pool="max", head_floor=0.3)
    assert kv.describe() == same.describe() and kv == same
    assert pyobcache.KVConfig.from_spec("snapkv:ratio=0.1:gqa=expand").gqa == "expand"   # the eval labels' ':' too
    assert pyobcache.KVConfig.from_spec("full").method == "full"
    for spec, msg in [("snapkv,budget=64,colour=red", "unknown KV option 'colour'"), ("snapkv", "budget"),
                      ("snapkv,budget=sixty", "budget must be a number"), ("budget=64", "starts with a method"),
                      ("snapkv,budget", "key=value"), ("snapkv,budget=64,evict=later", "eviction mode")]:
        with pytest.raises(ValueError, match=msg):
            pyobcache.KVConfig.from_spec(spec)
    # The engine checks what Python used to: a field's value, named.
    with pytest.raises(ValueError, match="n_recent"):
        pyobcache.KVConfig(method="snapkv", budget=64, n_recent=-2)
    with pytest.raises(ValueError, match="budget"):
        pyobcache.KVConfig(method="snapkv", budget=2**40)
