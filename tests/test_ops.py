"""Tests of the ggml-ext ops (obc_saliency, obc_compact) through pyobcache._core.

saliency() runs the fused CPU custom ops; it is compared with the float64 NumPy reference in
obc_reference.py (and, for a few cases, with saliency_composed(), the same scores built from stock
ggml ops).

Tolerance. Every score is a sum of non-negative terms computed in fp32. The logits and softmax
carry relative errors of order 1e-6..1e-5 (rounding of z = q.k, the exp polynomial ~2e-7, the fp32
sums), which do not grow with n_kv or the window beyond the fp32 accumulation. The fused kernels
compute ||v_j - o_i||^2 directly, but two forms can still cancel and so carry an absolute rather
than relative error: OBC-VK's ||v||^2 + z (||v||^2 - ||o||^2 + ||v - o||^2) + z^2 ||v - o||^2, and
the stock-ggml composition, which expands ||v - o||^2 = ||v||^2 - 2 v.o + ||o||^2 to use mul_mat
(when query i attends almost only to token j, o_i ~ v_j and that difference cancels). Their error
is at most about gamma_D * (1 + |z|)^2 (||v_j||^2 + ||o_i||^2) per term, with gamma_D = D * 2^-24
< 1e-5 for D <= 160 (the worst-case bound of an fp32 dot product; typical errors are ~sqrt(D)
times smaller). So we require, per KV head h:

  * max_j |ours_j - ref_j| <= 1e-4 * max_j |ref_j|     (the contract's relative error),
  * elementwise |ours_j - ref_j| <= 1e-3 |ref_j| + 1e-6 max|ref| + 1e-5 C_j, where
    C_j = sum_{g,i} A_ij^2 (1 + |z_ij|)^2 (||v_j||^2 + ||o_i||^2) bounds the magnitude of the
    cancelling terms (C = 0 for attn and v). This catches local slips (masking, indexing) that
    the per-head check would hide in small scores;
  * tokens that no query can see score exactly 0.

Top-k: eviction keeps the k highest scores, so the kept sets must agree wherever the reference
separates its k-th and (k+1)-th largest scores by more than the error allowed near them. Near the
boundary we allow a relative error of 1e-4 per score (observed: ~1e-5 at worst, ~3e-7 typical),
i.e. delta_j = 1e-4 |ref_j| + 1e-20 max|ref| (a floor for scores that underflow in fp32). As
ref - delta and ref + delta are monotone in ref, no flip can cross the boundary when
srt[k-1] - delta(srt[k-1]) > srt[k] + delta(srt[k]); the test checks that gap first, skips the
(near-)ties, and only then asserts that the kept index sets agree. It also requires that at least
half of the boundaries were checked, so that the check is not vacuous. (The per-head tolerance,
1e-4 of the maximum, would be useless here: the scores are heavy-tailed, and at n_kv = 8192 the
boundary values are far below 1e-4 of the maximum.)
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import pyobcache._core as core  # must import: a broken extension fails every test here
from obc_reference import POOLS, SCORES, attention_ref, saliency_ref, select_keep_ref

REL_TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Inputs


def make_inputs(rng, n_head, n_head_kv, n_win, n_kv, head_dim, *, evicted=False, logit_std=2.5):
    """Random window queries and cache with a realistic spread of attention.

    Queries and keys share a few common directions, so some tokens are attended far more than
    others (heavy hitters), and the logits have a standard deviation of about `logit_std`.
    Positions: the window is the last n_win positions; with `evicted`, each KV head keeps a
    different sorted subset of an older, longer history (as after an eviction), and a few cached
    tokens lie in the future of the first window queries (causal masking inside the window).
    """
    d = head_dim
    basis = rng.standard_normal((4, d))
    q = rng.standard_normal((n_head, n_win, d)) + rng.standard_normal((n_head, n_win, 4)) @ basis
    k = rng.standard_normal((n_head_kv, n_kv, d))
    k += (rng.standard_normal((n_head_kv, n_kv, 4)) * rng.exponential(0.6, (n_head_kv, n_kv, 1))) @ basis
    v = rng.standard_normal((n_head_kv, n_kv, d)) * rng.uniform(0.5, 1.5, (n_head_kv, n_kv, 1))
    # scale q so that z = q.k / sqrt(d) has the requested spread
    z_std = np.std(np.einsum("wd,nd->wn", q[0, : min(n_win, 8)], k[0, : min(n_kv, 512)])) / np.sqrt(d)
    q *= logit_std / max(z_std, 1e-6)

    if not evicted:
        total = n_kv
        pos_k = np.tile(np.arange(n_kv, dtype=np.int32), (n_head_kv, 1))
    else:
        total = 3 * n_kv + n_win
        pos_k = np.empty((n_head_kv, n_kv), dtype=np.int32)
        for h in range(n_head_kv):
            pos_k[h] = np.sort(rng.choice(total, size=n_kv, replace=False))
    pos_q = np.arange(total - n_win, total, dtype=np.int32)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return f32(q), f32(k), f32(v), pos_q, np.ascontiguousarray(pos_k)


# ---------------------------------------------------------------------------------------------
# Checks


def cancellation_scale(q, k, v, pos_q, pos_k, scale=None):
    """C_j of the module docstring, (n_head_kv, n_kv): sum over the group's query heads and the
    window of A^2 (1 + |z|)^2 (||v_j||^2 + ||o_i||^2), in float64."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    n_head, _, d = q.shape
    n_head_kv = k.shape[0]
    G = n_head // n_head_kv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros(k.shape[:2])
    for h in range(n_head_kv):
        z, A, _ = attention_ref(q[h * G:(h + 1) * G], k[h], pos_q, pos_k[h], scale)
        o = np.einsum("gwn,nd->gwd", A, v[h])
        mag = (v[h] ** 2).sum(-1)[None, None, :] + (o ** 2).sum(-1)[..., None]
        out[h] = (A * A * (1.0 + np.abs(z)) ** 2 * mag).sum(axis=(0, 1))
    return out


def check_close(ours, ref, what="", cancel=None):
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape, what
    assert np.all(np.isfinite(ours)), f"{what}: non-finite scores"
    for h in range(ref.shape[0]):
        scale = np.max(np.abs(ref[h]))
        err = np.abs(ours[h].astype(np.float64) - ref[h])
        if scale == 0.0:
            assert np.all(ours[h] == 0.0), f"{what} head {h}: expected all zeros"
            continue
        rel = err.max() / scale
        assert rel <= REL_TOL, f"{what} head {h}: max error {rel:.3g} of the head's max score"
        bound = 1e-3 * np.abs(ref[h]) + 1e-6 * scale
        if cancel is not None:
            bound = bound + 1e-5 * cancel[h]
        bad = err > bound
        assert not bad.any(), (
            f"{what} head {h}: {bad.sum()} elementwise mismatches, e.g. token {np.argmax(bad)}: "
            f"{ours[h][np.argmax(bad)]} vs {ref[h][np.argmax(bad)]}"
        )
        exact0 = ref[h] == 0.0
        assert np.all(ours[h][exact0] == 0.0), f"{what} head {h}: masked tokens must score 0"


def check_scores(ours, q, k, v, pos_q, pos_k, score, p=2.0, pool="sum", scale=None, what=""):
    """Compare with the float64 reference; returns the reference."""
    ref = saliency_ref(q, k, v, pos_q, pos_k, score, p=p, group_pool=pool, scale=scale)
    cancel = cancellation_scale(q, k, v, pos_q, pos_k, scale) if score in ("k", "vk", "vk-nocross") else None
    check_close(ours, ref, what or f"{score} p={p} {pool}", cancel)
    return ref


TOPK_REL = 1e-4


def check_topk(ours, ref, fracs=(0.1, 0.25, 0.5)):
    """Identical top-k sets wherever the reference gap at the k boundary exceeds the allowed error."""
    checked = total = 0
    for h in range(ref.shape[0]):
        scale = np.max(np.abs(ref[h]))
        if scale == 0.0:
            continue
        order = np.argsort(-ref[h], kind="stable")
        srt = ref[h][order]
        for frac in fracs:
            k = max(1, int(frac * ref.shape[1]))
            if k >= ref.shape[1]:
                continue
            total += 1
            lo = srt[k - 1] * (1.0 - TOPK_REL) - 1e-20 * scale
            hi = srt[k] * (1.0 + TOPK_REL) + 1e-20 * scale
            if lo <= hi:
                continue  # (near) tie at the boundary: either choice is correct
            checked += 1
            ours_top = np.argpartition(-ours[h], k - 1)[:k]
            assert set(ours_top.tolist()) == set(order[:k].tolist()), f"head {h}, k={k}: different kept sets"
    return checked, total


def run_case(rng, n_head, n_head_kv, n_win, n_kv, head_dim, score, p=2.0, pool="sum", evicted=False, **kw):
    q, k, v, pq, pk = make_inputs(rng, n_head, n_head_kv, n_win, n_kv, head_dim, evicted=evicted)
    ours = core.saliency(q, k, v, pq, pk, score, p=p, group_pool=pool, **kw)
    what = f"{score} p={p} {pool} H={n_head}/{n_head_kv} W={n_win} N={n_kv} D={head_dim}"
    ref = check_scores(ours, q, k, v, pq, pk, score, p=p, pool=pool, scale=kw.get("scale"), what=what)
    return ours, ref


# ---------------------------------------------------------------------------------------------
# Saliency: grid of small and medium shapes

# (n_head, n_head_kv, n_win, n_kv, head_dim): GQA ratios 1, 3 and 7, head dims 64 and 128,
# windows 1, 16 and 64, n_kv below, at and across tile boundaries (64 tokens).
SHAPES = [
    (4, 4, 16, 300, 64),     # GQA 1
    (6, 2, 1, 257, 128),     # GQA 3, single query
    (7, 1, 64, 640, 64),     # GQA 7, MQA, wide window
    (9, 3, 16, 1000, 128),   # GQA 3
    (14, 2, 1, 130, 64),     # GQA 7, single query
    (3, 3, 64, 64, 128),     # GQA 1, exactly one tile, window as long as the cache
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-{}_W{}_N{}_D{}".format(*s))
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("pool", POOLS)
def test_saliency_grid(shape, score, pool):
    rng = np.random.default_rng(zlib.crc32(repr((shape, score, pool)).encode()))
    run_case(rng, *shape, score=score, pool=pool, evicted=(shape[2] > 1))


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "H{}-{}_W{}_N{}_D{}".format(*s))
@pytest.mark.parametrize("p", [1.0, 1.5])
def test_saliency_v_p(shape, p):
    """OBC-V with p = 1 (|v| norm) and a general p (the powf path)."""
    rng = np.random.default_rng(7)
    for pool in POOLS:
        run_case(rng, *shape, score="v", p=p, pool=pool, evicted=True)


@pytest.mark.parametrize("score", ["k", "vk", "vk-nocross"])
def test_p_does_not_affect_k_scores(score):
    """p only enters OBC-V; vk-nocross always uses S_V with p = 2."""
    rng = np.random.default_rng(3)
    q, k, v, pq, pk = make_inputs(rng, 6, 2, 16, 200, 64)
    a = core.saliency(q, k, v, pq, pk, score, p=1.0)
    b = core.saliency(q, k, v, pq, pk, score, p=2.0)
    np.testing.assert_array_equal(a, b)


def test_reference_direct_matches_expanded():
    """The reference's expanded ||v - o||^2 forms agree with the literal formulas (float64)."""
    rng = np.random.default_rng(11)
    q, k, v, pq, pk = make_inputs(rng, 6, 2, 8, 100, 64, evicted=True)
    for score in SCORES:
        a = saliency_ref(q, k, v, pq, pk, score)
        b = saliency_ref(q, k, v, pq, pk, score, direct=True)
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * np.abs(b).max())


# ---------------------------------------------------------------------------------------------
# Saliency: long caches and top-k


LARGE = [
    (8, 8, 16, 8192, 128),   # GQA 1
    (21, 3, 64, 8192, 64),   # GQA 7, wide window
    (9, 3, 16, 4100, 64),    # GQA 3, partial last tile
]


@pytest.mark.parametrize("shape", LARGE, ids=lambda s: "H{}-{}_W{}_N{}_D{}".format(*s))
def test_saliency_large_topk(shape):
    rng = np.random.default_rng(shape[3] + shape[0])
    q, k, v, pq, pk = make_inputs(rng, *shape, evicted=True)
    checked = total = 0
    for score in SCORES:
        ours = core.saliency(q, k, v, pq, pk, score, n_threads=2)
        ref = check_scores(ours, q, k, v, pq, pk, score, what=f"{score} {shape}")
        c, t = check_topk(ours, ref)
        checked += c
        total += t
    assert checked >= 0.5 * total, f"top-k check ran on only {checked} of {total} boundaries"


def test_topk_on_grid_cases():
    rng = np.random.default_rng(5)
    checked = total = 0
    for shape in SHAPES:
        for score in SCORES:
            ours, ref = run_case(rng, *shape, score=score, evicted=True)
            c, t = check_topk(ours, ref)
            checked += c
            total += t
    assert checked >= 0.5 * total, f"top-k check ran on only {checked} of {total} boundaries"


# ---------------------------------------------------------------------------------------------
# Masking


def test_masking_per_head_positions():
    """Per-head positions after an eviction; tokens newer than every window query score 0, and a
    window query older than every cached token of a head contributes nothing to that head."""
    rng = np.random.default_rng(17)
    n_head, n_head_kv, n_win, n_kv, d = 6, 3, 8, 200, 64
    q, k, v, _, _ = make_inputs(rng, n_head, n_head_kv, n_win, n_kv, d)
    pos_q = np.arange(1000, 1000 + n_win, dtype=np.int32)
    pos_k = np.empty((n_head_kv, n_kv), dtype=np.int32)
    pos_k[0] = np.sort(rng.choice(1000, n_kv, replace=False))  # all visible
    # some visible to the later window queries only, two newer than the whole window
    pos_k[1, :-2] = np.sort(rng.choice(np.arange(500, 1008), n_kv - 2, replace=False))
    pos_k[1, -2:] = [1008, 1009]
    # window queries 0..2 see nothing of head 2
    pos_k[2] = np.sort(rng.choice(np.arange(1003, 1400), n_kv, replace=False))
    for score in SCORES:
        for pool in POOLS:
            ours = core.saliency(q, k, v, pos_q, pos_k, score, group_pool=pool)
            check_scores(ours, q, k, v, pos_q, pos_k, score, pool=pool)
            future = pos_k > pos_q[-1]
            assert future[1].any() and future[2].any()
            assert np.all(ours[future] == 0.0)
            assert np.all(ours[~future] > 0.0)


def test_fully_masked_head_is_zero():
    rng = np.random.default_rng(19)
    q, k, v, pq, pk = make_inputs(rng, 4, 2, 4, 100, 64)
    pk = pk.copy()
    pk[1] = pq[-1] + 1 + np.arange(pk.shape[1], dtype=np.int32)
    for score in SCORES:
        ours = core.saliency(q, k, v, pq, pk, score)
        assert np.all(ours[1] == 0.0)
        check_scores(ours, q, k, v, pq, pk, score)


# ---------------------------------------------------------------------------------------------
# Cache layouts: F16, transposed V, strided views (through the ggml CPU backend)


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
@pytest.mark.parametrize("v_trans", [False, True], ids=["v", "vT"])
@pytest.mark.parametrize("pad", [0, 5])
def test_cache_layouts(kv_type, v_trans, pad):
    rng = np.random.default_rng(zlib.crc32(repr((kv_type, v_trans, pad)).encode()))
    for shape in [(6, 2, 16, 200, 64), (7, 1, 3, 129, 128)]:
        q, k, v, pq, pk = make_inputs(rng, *shape, evicted=True)
        if kv_type == "f16":  # the reference sees the values the cache holds
            k = k.astype(np.float16).astype(np.float32)
            v = v.astype(np.float16).astype(np.float32)
        for score in SCORES:
            ours = core.saliency_cache(q, k, v, pq, pk, score, kv_type=kv_type, v_trans=v_trans, pad=pad)
            check_scores(ours, q, k, v, pq, pk, score, what=f"{score} {kv_type} v_trans={v_trans} pad={pad} {shape}")
            if kv_type == "f32" and not v_trans:
                np.testing.assert_array_equal(ours, core.saliency(q, k, v, pq, pk, score))


def test_portable_kernels(monkeypatch):
    """OBC_CPU_BASELINE=1 forces the portable kernels that CPUs without AVX2/FMA run (on x86 the
    AVX2 build is chosen at run time; elsewhere the portable one is the only one)."""
    monkeypatch.setenv("OBC_CPU_BASELINE", "1")
    rng = np.random.default_rng(53)
    for shape in [(6, 2, 16, 200, 64), (7, 1, 3, 129, 128), (4, 4, 1, 70, 40)]:
        q, k, v, pq, pk = make_inputs(rng, *shape, evicted=True)
        k16 = k.astype(np.float16).astype(np.float32)
        v16 = v.astype(np.float16).astype(np.float32)
        for score in SCORES:
            check_scores(core.saliency(q, k, v, pq, pk, score), q, k, v, pq, pk, score, what=f"portable {score}")
            ours = core.saliency_cache(q, k16, v16, pq, pk, score, kv_type="f16", v_trans=True, pad=3)
            check_scores(ours, q, k16, v16, pq, pk, score, what=f"portable f16 vT {score}")


@pytest.mark.parametrize("weight", [0.6, 0.99, 0.9999])
def test_attention_sink_k_score(weight):
    """Queries that give most of their attention to one token (an attention sink), where o_i ~ v_j
    and ||v_j - o_i||^2 = (1 - A)^2 ||v_j - mean of the others||^2 is tiny: formed from o_i it
    would lose log10(1 / (1 - A)) digits (and the expansion ||v||^2 - 2 v.o + ||o||^2 twice as
    many). The kernels form it without cancellation; OBC-K must stay accurate there."""
    rng = np.random.default_rng(43)
    n_kv, d, sink = 300, 64, 17
    k = rng.standard_normal((1, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((1, n_kv, d)).astype(np.float32)
    base = rng.standard_normal((1, 2, d)) * 0.3
    pq = np.array([n_kv, n_kv], dtype=np.int32)
    pk = np.arange(n_kv, dtype=np.int32)[None, :]

    def sink_weight(c):
        qq = base + c * k[:, [sink], :]
        z = np.einsum("wd,nd->wn", qq[0], k[0].astype(np.float64)) / np.sqrt(d)
        a = np.exp(z - z.max(axis=1, keepdims=True))
        return (a[:, sink] / a.sum(axis=1)).min()

    lo, hi = 0.0, 10.0
    for _ in range(60):  # bisect the query scale for A_sink = weight (for the lesser of the 2 queries)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sink_weight(mid) < weight else (lo, mid)
    assert sink_weight(hi) >= weight
    q = (base + hi * k[:, [sink], :]).astype(np.float32)
    for score in ("k", "vk", "vk-nocross"):
        ours = core.saliency(q, k, v, pq, pk, score)
        ref = check_scores(ours, q, k, v, pq, pk, score)
        assert ref[0, sink] > 0.0
        assert abs(ours[0, sink] - ref[0, sink]) <= 1e-4 * ref[0, sink]


# ---------------------------------------------------------------------------------------------
# Other arguments and properties


@pytest.mark.parametrize("n_win", [50, 43])
def test_many_rows_per_kv_head(n_win):
    """G * n_win = 600 or 516 rows per KV head: stage 2 splits them into chunks of 512, the
    boundary falling inside a query head's window (and, for 516, a last chunk of 4 rows, which
    takes the 8-lane kernels)."""
    rng = np.random.default_rng(47 + n_win)
    for score in SCORES:
        for pool in POOLS:
            run_case(rng, 12, 1, n_win, 150, 64, score=score, pool=pool, evicted=True)


@pytest.mark.parametrize("head_dim", [40, 80, 96])
def test_other_head_dims(head_dim):
    """Head dims that are not multiples of the 16-lane tiles take the padded paths."""
    rng = np.random.default_rng(head_dim)
    for score in SCORES:
        run_case(rng, 6, 2, 5, 150, head_dim, score=score, evicted=True)


def test_explicit_scale():
    rng = np.random.default_rng(23)
    for score in SCORES:
        run_case(rng, 4, 2, 4, 100, 64, score=score, scale=0.05)


def test_threads_do_not_change_results():
    rng = np.random.default_rng(29)
    q, k, v, pq, pk = make_inputs(rng, 12, 4, 16, 777, 64, evicted=True)
    for score in SCORES:
        base = core.saliency(q, k, v, pq, pk, score, n_threads=1)
        for nt in (2, 3, 8):
            np.testing.assert_array_equal(core.saliency(q, k, v, pq, pk, score, n_threads=nt), base)


def test_composed_cross_check():
    """The stock-ggml composition agrees with the fused ops and the reference."""
    rng = np.random.default_rng(31)
    q, k, v, pq, pk = make_inputs(rng, 6, 2, 8, 300, 64, evicted=True)
    for score in SCORES:
        for pool in ("sum", "mean", "max"):   # the pools the composition implements
            for p in ((1.0, 2.0) if score == "v" else (2.0,)):
                comp = core.saliency_composed(q, k, v, pq, pk, score, p=p, group_pool=pool)
                check_scores(comp, q, k, v, pq, pk, score, p=p, pool=pool, what=f"composed {score} {pool} p={p}")
                ours = core.saliency(q, k, v, pq, pk, score, p=p, group_pool=pool)
                check_scores(ours, q, k, v, pq, pk, score, p=p, pool=pool)


def test_composed_refuses_the_pools_it_lacks():
    rng = np.random.default_rng(31)
    q, k, v, pq, pk = make_inputs(rng, 6, 2, 8, 300, 64)
    for pool in ("norm-sum", "pre-mean"):
        with pytest.raises(ValueError, match="sum, mean or max only"):
            core.saliency_composed(q, k, v, pq, pk, "vk", group_pool=pool)


def test_group_reductions_differ_where_heads_disagree():
    """One sharp and one flat query head share a KV head: the sum is dominated by the sharp head,
    norm-sum gives both heads the same total vote and pre-mean scores the averaged attention, so
    the three (each checked against the float64 reference) order the tokens differently."""
    rng = np.random.default_rng(5)
    q, k, v, pq, pk = make_inputs(rng, 2, 1, 4, 200, 64)
    q = q.copy()
    q[0] *= 8.0      # sharp
    q[1] *= 0.05     # nearly uniform
    res = {pool: core.saliency(q, k, v, pq, pk, "vk", group_pool=pool) for pool in ("sum", "norm-sum", "pre-mean")}
    for pool, r in res.items():
        check_scores(r, q, k, v, pq, pk, "vk", pool=pool)
    order = {pool: np.argsort(-r[0], kind="stable") for pool, r in res.items()}
    assert not np.array_equal(order["sum"], order["norm-sum"])
    assert not np.array_equal(order["sum"], order["pre-mean"])
    # norm-sum: every query head contributes exactly 1 to the KV head's total
    np.testing.assert_allclose(res["norm-sum"][0].sum(), 2.0, rtol=1e-5)


def test_bad_arguments():
    rng = np.random.default_rng(37)
    q, k, v, pq, pk = make_inputs(rng, 4, 2, 4, 50, 64)
    with pytest.raises(ValueError):
        core.saliency(q, k, v, pq, pk, "h2o")
    with pytest.raises(ValueError):
        core.saliency(q, k, v, pq, pk, "attn", group_pool="median")
    with pytest.raises(ValueError):
        core.saliency(q, k[:, :40], v, pq, pk, "attn")  # k and v lengths differ
    with pytest.raises(ValueError):
        core.saliency(q, k, v, pq[:3], pk, "attn")  # pos_q length
    with pytest.raises(ValueError):
        core.saliency(q, k, v, pq, pk[:, :10], "attn")  # pos_k shape
    with pytest.raises(ValueError):
        core.saliency(q[:3], k, v, pq, pk, "attn")  # 3 query heads over 2 KV heads
    with pytest.raises(ValueError):
        core.saliency(q[0], k, v, pq, pk, "attn")  # 2-D q
    with pytest.raises(ValueError):
        core.saliency(q, k[..., :32], v[..., :32], pq, pk, "attn")  # head_dim mismatch
    with pytest.raises(ValueError):
        core.saliency(q, k, v, pq, pk, "v", p=0.0)
    with pytest.raises(ValueError):
        core.saliency(q, k, v, pq, pk, "attn", n_threads=0)


# ---------------------------------------------------------------------------------------------
# Compaction


def random_keep(rng, n_head, cap, n_keep):
    return np.stack([np.sort(rng.choice(cap, n_keep, replace=False)) for _ in range(n_head)]).astype(np.int32)


@pytest.mark.parametrize("n_keep", [1, 37, 100, 128])
def test_compact_axis1_rows(n_keep):
    """K cache [d, cap, H] in ggml = NumPy (H, cap, d): whole rows move (axis 1)."""
    rng = np.random.default_rng(n_keep)
    H, cap, d = 3, 128, 64
    cache = rng.standard_normal((H, cap, d)).astype(np.float32)
    idx = random_keep(rng, H, cap, n_keep)
    out = core.compact(cache, idx, 1)
    assert out.shape == cache.shape and out.dtype == np.float32
    expect = np.take_along_axis(cache, idx[:, :, None].astype(np.int64), axis=1)
    np.testing.assert_array_equal(out[:, :n_keep, :], expect)
    np.testing.assert_array_equal(cache, core.compact(cache, np.tile(np.arange(cap, dtype=np.int32), (H, 1)), 1))


@pytest.mark.parametrize("n_keep", [1, 50, 99])
def test_compact_axis0_transposed_v(n_keep):
    """Transposed V [cap, d, H] in ggml = NumPy (H, d, cap): elements move along the last axis."""
    rng = np.random.default_rng(100 + n_keep)
    H, d, cap = 4, 48, 99
    cache = rng.standard_normal((H, d, cap)).astype(np.float32)
    idx = random_keep(rng, H, cap, n_keep)
    out = core.compact(cache, idx, 0)
    expect = np.take_along_axis(cache, np.repeat(idx[:, None, :], d, axis=1).astype(np.int64), axis=2)
    np.testing.assert_array_equal(out[:, :, :n_keep], expect)


@pytest.mark.parametrize("n_keep", [1, 200, 511])
def test_compact_scores_2d(n_keep):
    """Running scores / positions [cap, H] in ggml = NumPy (H, cap), axis 0."""
    rng = np.random.default_rng(200 + n_keep)
    H, cap = 5, 512
    cache = rng.standard_normal((H, cap)).astype(np.float32)
    idx = random_keep(rng, H, cap, n_keep)
    out = core.compact(cache, idx, 0)
    np.testing.assert_array_equal(out[:, :n_keep], np.take_along_axis(cache, idx.astype(np.int64), axis=1))


def test_compact_single_head_2d():
    rng = np.random.default_rng(41)
    cache = rng.standard_normal((1, 64)).astype(np.float32)
    idx = random_keep(rng, 1, 64, 10)
    np.testing.assert_array_equal(core.compact(cache, idx, 0)[:, :10], cache[:, idx[0]])


def test_compact_bad_arguments():
    cache = np.zeros((2, 16, 8), dtype=np.float32)
    with pytest.raises(ValueError):
        core.compact(cache, np.array([[3, 2], [0, 1]], dtype=np.int32), 1)  # not increasing
    with pytest.raises(ValueError):
        core.compact(cache, np.array([[0, 16], [0, 1]], dtype=np.int32), 1)  # out of range
    with pytest.raises(ValueError):
        core.compact(cache, np.array([[0, 1]], dtype=np.int32), 1)  # one row for two heads
    with pytest.raises(ValueError):
        core.compact(cache, np.array([[0, 1], [0, 1]], dtype=np.int32), 2)  # bad axis
    with pytest.raises(ValueError):
        core.compact(np.zeros((2, 16), dtype=np.float32), np.array([[0], [1]], dtype=np.int32), 1)


# ---------------------------------------------------------------------------------------------
# The parity table: every op, on every backend this build and machine have, against the float64
# (or plain NumPy) reference. "composed" is the stock-ggml composition of the saliency, "cpu" and
# "cuda" run obc_runner as the engine does, on a cache in that backend's memory (F16, V
# transposed, a strided view). A backend that is absent here skips; an op a backend does not
# implement must refuse with a clear error, which the table checks too.

PARITY_SHAPES = [(6, 2, 16, 200, 64), (12, 2, 5, 300, 128), (4, 4, 1, 70, 40)]
NOT_IMPLEMENTED = {("cuda", "norm-sum"), ("cuda", "pre-mean"), ("composed", "norm-sum"), ("composed", "pre-mean")}


def need(backend):
    if backend not in core.op_backends():
        pytest.skip(f"this build or machine has no {backend} backend (it has {', '.join(core.op_backends())})")


@pytest.mark.parametrize("backend", ["cpu", "composed", "cuda"])
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("score", SCORES)
def test_parity_saliency(backend, pool, score):
    need("cpu" if backend == "composed" else backend)
    rng = np.random.default_rng(zlib.crc32(repr((backend, pool, score)).encode()))
    # The composition expands ||v - o||^2 and cancels where one query attends to one token (module
    # docstring): a one-query window is outside what it is for.
    for shape in PARITY_SHAPES[:2] if backend == "composed" else PARITY_SHAPES:
        q, k, v, pq, pk = make_inputs(rng, *shape, evicted=True)
        k16, v16 = (x.astype(np.float16).astype(np.float32) for x in (k, v))
        run = (lambda: core.saliency_composed(q, k, v, pq, pk, score, group_pool=pool)) if backend == "composed" else \
            (lambda: core.saliency_cache(q, k16, v16, pq, pk, score, group_pool=pool, kv_type="f16", v_trans=True,
                                         pad=3, backend=backend))
        if (backend, pool) in NOT_IMPLEMENTED:
            with pytest.raises((ValueError, RuntimeError), match="not implemented|only"):
                run()
            return
        ref_k, ref_v = (k, v) if backend == "composed" else (k16, v16)
        check_scores(run(), q, ref_k, ref_v, pq, pk, score, pool=pool, what=f"{backend} {score} {pool} {shape}")


QUANT_KV_TYPES = ["q8_0", "q4_0", "q5_1", "iq4_nl", "bf16"]


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("kv_type", QUANT_KV_TYPES)
@pytest.mark.parametrize("score", SCORES)
def test_parity_saliency_quantized_cache(backend, kv_type, score):
    """The saliency reads K and V stored in a quantized (or bf16) cache, as the engine's cache holds
    them after set_rows: against float64 on the values the cache really holds (what the op must
    get right), and against the unquantized values within a bound derived from the quantization
    error (what the user loses)."""
    need(backend)
    rng = np.random.default_rng(zlib.crc32(repr((backend, kv_type, score)).encode()))
    logit_std = 2.5
    for shape in [(6, 2, 16, 200, 64), (12, 2, 5, 300, 128)]:
        q, k, v, pq, pk = make_inputs(rng, *shape, evicted=True, logit_std=logit_std)
        k32, v32 = k.astype(np.float32), v.astype(np.float32)
        run = lambda: core.saliency_cache(q, k32, v32, pq, pk, score, kv_type=kv_type, pad=3, backend=backend)
        if backend == "cuda" and kv_type != "f16":
            with pytest.raises((ValueError, RuntimeError), match="not implemented on CUDA"):
                run()
            return
        held = [core.kv_round_trip(x.reshape(-1, x.shape[-1]), kv_type).reshape(x.shape) for x in (k32, v32)]
        assert not np.array_equal(held[0], k32), "the round trip must quantize"
        ours = run()
        check_scores(ours, q, *held, pq, pk, score, what=f"{backend} {kv_type} {score} {shape}")
        # First order: the logits move by about logit_std * eps (eps: the inputs' relative error),
        # A by a factor e^dz, so scores quadratic in A and z move by about 2 (1 + logit_std) eps
        # relative; twice that is the bound.
        eps = max(np.linalg.norm(h - x) / np.linalg.norm(x) for h, x in zip(held, (k, v)))
        ref = saliency_ref(q, k, v, pq, pk, score)
        rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        assert rel <= 4 * (1 + logit_std) * eps, f"{kv_type} {score}: relative error {rel:.3g}, eps {eps:.3g}"


@pytest.mark.parametrize("kv_type", ["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("score", ["k", "vk"])
def test_saliency_adds_the_k_offset_back(kv_type, score):
    """A quantized cache holds k - c (a constant per KV head) and hands the op c as k_offset. The
    scores of OBC-K and OBC-VK hold z_ij itself, which a per-query constant moves (softmax does
    not see it): the op must score k, not what the cache holds."""
    rng = np.random.default_rng(zlib.crc32(repr(("k_offset", kv_type, score)).encode()))
    q, k, v, pq, pk = make_inputs(rng, 6, 2, 16, 200, 64, evicted=True)
    c = 30.0 * rng.standard_normal((2, 64))   # a common part ~30 times the keys' own spread
    stored = (k - c[:, None, :]).astype(np.float32)
    v32 = v.astype(np.float32)
    ours = core.saliency_cache(q, stored, v32, pq, pk, score, kv_type=kv_type, pad=3, k_offset=c.astype(np.float32))
    held_k = core.kv_round_trip(stored.reshape(-1, 64), kv_type).reshape(stored.shape) + c.astype(np.float32)[:, None, :]
    held_v = core.kv_round_trip(v32.reshape(-1, 64), kv_type).reshape(v.shape)
    check_scores(ours, q, held_k, held_v, pq, pk, score, what=f"{kv_type} {score} with k_offset")
    # Without the offset the same rows score something else: the test can tell.
    shifted = core.saliency_cache(q, stored, v32, pq, pk, score, kv_type=kv_type, pad=3)
    ref = saliency_ref(q, held_k, held_v, pq, pk, score)
    assert np.linalg.norm(shifted - ref) > 0.1 * np.linalg.norm(ref)
    with pytest.raises(ValueError, match="k_offset"):
        core.saliency_cache(q, stored, v32, pq, pk, score, kv_type=kv_type, k_offset=np.zeros((2, 32), np.float32))


def test_quantized_cache_rows_are_checked():
    q, k, v, pq, pk = make_inputs(np.random.default_rng(3), 4, 4, 1, 70, 40)
    with pytest.raises(ValueError, match="whole blocks"):   # head_dim 40 is not a multiple of 32
        core.saliency_cache(q, k.astype(np.float32), v.astype(np.float32), pq, pk, "vk", kv_type="q8_0")
    with pytest.raises(ValueError, match="transposed v cannot be quantized"):
        core.saliency_cache(q, k.astype(np.float32), v.astype(np.float32), pq, pk, "vk", kv_type="q8_0", v_trans=True)
    with pytest.raises(ValueError, match="kv_type must be one of"):
        core.saliency_cache(q, k.astype(np.float32), v.astype(np.float32), pq, pk, "vk", kv_type="q3_k")


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_parity_compact(backend):
    need(backend)
    rng = np.random.default_rng(7)
    H, cap, d = 3, 96, 40
    for n_keep in (1, 33, 96):
        idx = random_keep(rng, H, cap, n_keep)
        rows = rng.standard_normal((H, cap, d)).astype(np.float32)            # K: axis 1
        out = core.compact(rows, idx, 1, backend=backend)
        np.testing.assert_array_equal(out[:, :n_keep], np.take_along_axis(rows, idx[:, :, None].astype(np.int64), 1))
        np.testing.assert_array_equal(out[:, n_keep:], rows[:, n_keep:])
        vt = rng.standard_normal((H, d, cap)).astype(np.float32)              # transposed V: axis 0
        out = core.compact(vt, idx, 0, backend=backend)
        np.testing.assert_array_equal(out[:, :, :n_keep], np.take_along_axis(vt, idx[:, None, :].astype(np.int64), 2))
    # Quantized rows move whole, as the cache holds them.
    for kv_type in ("q8_0", "q4_0", "bf16"):
        idx = random_keep(rng, H, cap, 33)
        rows = rng.standard_normal((H, cap, 64)).astype(np.float32)
        held = core.kv_round_trip(rows.reshape(-1, 64), kv_type).reshape(rows.shape)
        out = core.compact(rows, idx, 1, backend=backend, kv_type=kv_type)
        np.testing.assert_array_equal(out[:, :33], np.take_along_axis(held, idx[:, :, None].astype(np.int64), 1))
        np.testing.assert_array_equal(out[:, 33:], held[:, 33:])
    with pytest.raises(ValueError, match="axis 0 needs a non-quantized type"):
        core.compact(rng.standard_normal((H, 64, cap)).astype(np.float32), random_keep(rng, H, cap, 8), 0,
                     backend=backend, kv_type="q8_0")
    # A shorter list padded with idx[n] = n (head-wise budgets) leaves those slots in place.
    idx = np.array([[2, 5, 9, 3], [0, 1, 2, 3], [4, 6, 7, 8]], dtype=np.int32)
    rows = rng.standard_normal((3, 12, 4)).astype(np.float32)
    out = core.compact(rows, idx, 1, backend=backend)
    np.testing.assert_array_equal(out[0, :4], rows[0, [2, 5, 9, 3]])
    with pytest.raises(ValueError, match="strictly increasing"):
        core.compact(rows, np.array([[5, 2, 9, 10], [0, 1, 2, 3], [4, 6, 7, 8]], dtype=np.int32), 1, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("pooling", ["none", "max", "avg"])
def test_parity_select_keep(backend, pooling):
    need(backend)
    rng = np.random.default_rng(zlib.crc32(repr((backend, pooling)).encode()))
    for n, H, budget, n_sink, n_recent, kernel in [(300, 2, 64, 4, 16, 7), (50, 3, 49, 0, 0, 5), (40, 1, 64, 2, 8, 7),
                                                    (129, 4, 20, 8, 16, 3), (64, 2, 30, 0, 16, 1)]:
        for dist in ("distinct", "ties"):
            s = rng.standard_normal((H, n)).astype(np.float32)
            if dist == "ties":
                s = np.round(s * 2) / 4
            got = core.select_keep_heads(s, budget, n_sink, n_recent, pooling=pooling, kernel=kernel, backend=backend)
            for h in range(H):
                np.testing.assert_array_equal(got[h], select_keep_ref(s[h], budget, n_sink, n_recent, pooling, kernel),
                                              err_msg=f"{backend} {pooling} n={n} budget={budget} head {h} {dist}")
