"""Perplexity and KL divergence of next-token distributions, in float64."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["log_softmax", "perplexity", "mean_kl"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def perplexity(logp: np.ndarray, targets: Sequence[int]) -> float:
    """exp of the mean negative log-likelihood of targets; row i of logp predicts targets[i]."""
    t = np.asarray(targets, dtype=np.int64)
    if logp.shape[0] != len(t):
        raise ValueError("one row of log-probabilities per target expected")
    return float(np.exp(-logp[np.arange(len(t)), t].mean()))


def mean_kl(logp_ref: np.ndarray, logp: np.ndarray) -> float:
    """Mean over positions of KL(ref || other) = sum_v p_ref (log p_ref - log p)."""
    if logp_ref.shape != logp.shape:
        raise ValueError(f"shape mismatch {logp_ref.shape} vs {logp.shape}")
    kl = (np.exp(logp_ref) * (logp_ref - logp)).sum(axis=-1)
    return float(np.maximum(kl, 0.0).mean())
