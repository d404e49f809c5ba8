"""Float64 NumPy reference of the OBCache saliency scores (obc_ops.h / pyobcache._core.saliency).

For one KV head h, the window queries i of every query head g that reads h, and the cached
tokens j:

    z_ij = scale * q_i . k_j            (masked when pos_k[j] > pos_q[i])
    A_ij = softmax_j(z_ij)              (masked pairs get A = 0; a query that sees nothing adds 0)
    o_i  = sum_j A_ij v_j

    attn        sum_i A_ij
    v           (sum_i A_ij^p) * ||v_j||_p^p
    k           sum_i A_ij^2 z_ij^2 ||v_j - o_i||^2
    vk          sum_i A_ij^2 ||v_j + z_ij (v_j - o_i)||^2
    vk-nocross  S_V(p=2) + S_K

The window sum is taken per query head g, then the G = n_head / n_head_kv query heads of a KV head
are pooled with sum / mean / max, or norm-sum (each query head's scores scaled to sum 1 over the
tokens, then summed). pre-mean instead averages A_ij, z_ij and o_i over the group first and
applies the formula once to the means. Query head g reads KV head g // G.

Usage: ``from obc_reference import saliency_ref``.
"""

from __future__ import annotations

import numpy as np

SCORES = ("attn", "v", "k", "vk", "vk-nocross")
POOLS = ("sum", "mean", "max", "norm-sum", "pre-mean")


def attention_ref(q, k, pos_q, pos_k, scale):
    """Logits z, probabilities A and the visibility mask of one KV head's group.

    q: (G, W, D), k: (N, D), pos_q: (W,), pos_k: (N,). Returns z, A, keep of shape (G, W, N),
    with z = 0 and A = 0 where masked.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    keep = np.asarray(pos_k)[None, None, :] <= np.asarray(pos_q)[None, :, None]  # (1, W, N)
    keep = np.broadcast_to(keep, (q.shape[0], q.shape[1], k.shape[0]))
    z = scale * np.einsum("gwd,nd->gwn", q, k)
    zm = np.where(keep, z, -np.inf)
    m = zm.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(keep, np.exp(zm - m), 0.0)
    den = e.sum(axis=-1, keepdims=True)
    A = np.divide(e, den, out=np.zeros_like(e), where=den > 0)
    return np.where(keep, z, 0.0), A, keep


def per_query_head_ref(q, k, v, pos_q, pos_k, score, p=2.0, scale=None, direct=False):
    """Window-summed scores of every query head, before group pooling: (n_head, n_kv).

    direct=True evaluates ||v_j - o_i||^2 and ||v_j + z (v_j - o_i)||^2 literally (memory
    O(n_head * n_win * n_kv * head_dim)); the default expands them into dot products in float64.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    pos_q = np.asarray(pos_q)
    pos_k = np.asarray(pos_k)
    n_head, n_win, d = q.shape
    n_head_kv, n_kv, _ = k.shape
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}")
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    G = n_head // n_head_kv
    if scale is None:
        scale = 1.0 / np.sqrt(d)
    out = np.zeros((n_head, n_kv), dtype=np.float64)
    for h in range(n_head_kv):
        qg = q[h * G:(h + 1) * G]
        z, A, _ = attention_ref(qg, k[h], pos_q, pos_k[h], scale)  # (G, W, N)
        vh = v[h]  # (N, D)
        if score == "attn":
            s = A.sum(axis=1)
        elif score == "v":
            vp = (np.abs(vh) ** p).sum(axis=-1)  # (N,)
            s = (A ** p).sum(axis=1) * vp[None, :]
        else:
            o = np.einsum("gwn,nd->gwd", A, vh)  # (G, W, D)
            vn2 = (vh * vh).sum(axis=-1)  # (N,)
            A2 = A * A
            if direct:
                # literal formulas, materialising (G, W, N, D): small shapes only
                dv = vh[None, None, :, :] - o[:, :, None, :]
                diff2 = (dv * dv).sum(axis=-1)
                w = vh[None, None, :, :] + z[..., None] * dv
                vk2 = (w * w).sum(axis=-1)
            else:
                # ||v - o||^2 = ||v||^2 - 2 v.o + ||o||^2 and
                # ||v + z (v - o)||^2 = ||v||^2 + 2 z (||v||^2 - v.o) + z^2 ||v - o||^2, in float64
                vo = np.einsum("gwd,nd->gwn", o, vh)
                on2 = (o * o).sum(axis=-1)[..., None]
                diff2 = np.maximum(vn2[None, None, :] - 2.0 * vo + on2, 0.0)
                vk2 = np.maximum(vn2[None, None, :] + 2.0 * z * (vn2[None, None, :] - vo) + z * z * diff2, 0.0)
            sk = (A2 * z * z * diff2).sum(axis=1)
            if score == "k":
                s = sk
            elif score == "vk-nocross":
                s = (A2.sum(axis=1) * vn2[None, :]) + sk
            else:  # vk
                s = (A2 * vk2).sum(axis=1)
        out[h * G:(h + 1) * G] = s
    return out


def saliency_ref(q, k, v, pos_q, pos_k, score, p=2.0, scale=None, group_pool="sum", direct=False):
    """Float64 reference of pyobcache._core.saliency.

    q: (n_head, n_win, head_dim); k, v: (n_head_kv, n_kv, head_dim); pos_q: (n_win,);
    pos_k: (n_head_kv, n_kv). Returns float64 (n_head_kv, n_kv).
    """
    if group_pool not in POOLS:
        raise ValueError(f"unknown group_pool {group_pool!r}")
    if group_pool == "pre-mean":
        return pre_mean_ref(q, k, v, pos_q, pos_k, score, p=p, scale=scale)
    n_head_kv = np.asarray(k).shape[0]
    per = per_query_head_ref(q, k, v, pos_q, pos_k, score, p=p, scale=scale, direct=direct)
    n_head, n_kv = per.shape
    per = per.reshape(n_head_kv, n_head // n_head_kv, n_kv)
    if group_pool == "sum":
        return per.sum(axis=1)
    if group_pool == "mean":
        return per.mean(axis=1)
    if group_pool == "norm-sum":
        tot = per.sum(axis=2, keepdims=True)
        return np.divide(per, tot, out=np.zeros_like(per), where=tot > 0).sum(axis=1)
    return per.max(axis=1)


def pre_mean_ref(q, k, v, pos_q, pos_k, score, p=2.0, scale=None):
    """group_pool="pre-mean": the score formula applied once per KV head to the group means
    Abar = mean_g A, zbar = mean_g z and obar = mean_g o, with direct distances."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    n_head, n_win, d = q.shape
    n_head_kv, n_kv, _ = k.shape
    G = n_head // n_head_kv
    if scale is None:
        scale = 1.0 / np.sqrt(d)
    out = np.zeros((n_head_kv, n_kv), dtype=np.float64)
    for h in range(n_head_kv):
        z, A, _ = attention_ref(q[h * G:(h + 1) * G], k[h], pos_q, pos_k[h], scale)
        vh = v[h]
        o = np.einsum("gwn,nd->gwd", A, vh).mean(axis=0)  # (W, D)
        Ab, zb = A.mean(axis=0), z.mean(axis=0)  # (W, N)
        if score == "attn":
            out[h] = Ab.sum(axis=0)
            continue
        if score == "v":
            out[h] = (Ab ** p).sum(axis=0) * (np.abs(vh) ** p).sum(axis=-1)
            continue
        dv = vh[None, :, :] - o[:, None, :]  # (W, N, D)
        diff2 = (dv * dv).sum(axis=-1)
        vn2 = (vh * vh).sum(axis=-1)
        if score == "k":
            s = Ab ** 2 * zb ** 2 * diff2
        elif score == "vk":
            w = vh[None, :, :] + zb[..., None] * dv
            s = Ab ** 2 * (w * w).sum(axis=-1)
        else:  # vk-nocross
            s = Ab ** 2 * (vn2[None, :] + zb ** 2 * diff2)
        out[h] = s.sum(axis=0)
    return out


def select_keep_ref(scores, budget, n_sink, n_recent, pooling="none", kernel=7):
    """The slots one head keeps (obc_select_keep_host's rule), written plainly: the first n_sink,
    the last n_recent, and the highest pooled scores among the candidates between them, pooled over
    the slots before the recent window only; ties to the earlier slot."""
    n = len(scores)
    if n <= budget:
        return np.arange(n, dtype=np.int32)
    n_sink = min(n_sink, budget)
    n_recent = min(n_recent, budget - n_sink)
    hi = n - n_recent
    s = np.asarray(scores[:hi], dtype=np.float64)
    pooled = s.copy()
    if pooling != "none" and kernel > 1:
        r = kernel // 2
        for j in range(hi):
            win = s[max(0, j - r):min(hi, j + r + 1)]
            pooled[j] = win.max() if pooling == "max" else win.sum() / kernel
        pooled = pooled.astype(np.float32)   # the op pools in float32 (the sum in double)
    cand = np.arange(n_sink, hi)
    order = sorted(cand, key=lambda j: (-pooled[j], j))
    picks = order[:budget - n_sink - n_recent]
    return np.sort(np.concatenate([np.arange(n_sink), np.array(picks, dtype=np.int64), np.arange(hi, n)])).astype(np.int32)
