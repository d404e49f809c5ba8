"""KV-cache eviction configuration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from . import _core

__all__ = ["KVConfig", "kv_methods"]

_SCORES = {
    "none": _core.ScoreKind.none, "attn": _core.ScoreKind.attn, "v": _core.ScoreKind.v, "k": _core.ScoreKind.k,
    "vk": _core.ScoreKind.vk, "vk-nocross": _core.ScoreKind.vk_nocross,
}
_WINDOWS = {"last": _core.Window.last, "latest": _core.Window.latest, "all": _core.Window.all}
_POOLINGS = {"none": _core.Pooling.none, "max": _core.Pooling.max, "avg": _core.Pooling.avg}
_MODES = {"prefill": _core.EvictMode.prefill, "chunked": _core.EvictMode.chunked, "decode": _core.EvictMode.decode}


def kv_methods() -> list[str]:
    """The names of every eviction method (each a configuration of score, window, pooling, budget)."""
    return list(_core.kv_method_names())


def _i32(name: str, value) -> int:
    # The engine's fields are int32: say which value does not fit instead of nanobind's TypeError.
    v = int(value)
    if not -2**31 <= v < 2**31:
        raise ValueError(f"{name} must fit in 32 bits, got {value}")
    return v


def _pick(table: dict, value: str, what: str):
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"unknown {what} '{value}'; choose one of: {', '.join(table)}") from None


@dataclass(frozen=True)
class KVConfig:
    """A bounded KV cache and how tokens are evicted from it.

    ``method`` names a configuration (see :func:`kv_methods`), for example ``"obc-k+snapkv"`` (the
    default: OBCache's key score over SnapKV's window of the last prompt queries, max-pooled),
    ``"obc-vk"`` (the joint key-value score on H2O's window) or ``"snapkv"``. The other fields
    override a part of it; ``None`` keeps the method's default.

    Give the size as ``budget`` (tokens kept per layer and KV head) or ``ratio`` (a fraction of
    the prompt). ``evict`` chooses when eviction runs: ``"prefill"`` once after the prompt (the
    paper's setting), ``"chunked"`` after each prompt chunk so that memory stays bounded by
    budget + chunk, or ``"decode"`` also while generating, once the cache exceeds budget + slack.

    GQA models: ``group_pool`` combines the scores of the query heads that share a KV head
    (``"sum"``, ``"mean"``, ``"max"``, ``"norm-sum"``: each head's scores scaled to sum 1 first,
    ``"pre-mean"``: attention weights and logits averaged over the group before scoring).
    ``gqa="expand"`` instead keeps one cache per query head, as the paper's reference code does:
    each query head ranks its own tokens, at n_head / n_head_kv times the KV memory.
    ``head_budget="adaptive"`` (AdaKV, eviction after prefill) lets the heads of a layer share its
    ``budget * n_heads`` slots by score, each head keeping at least ``head_floor`` of its share.
    This cache pads every head to the longest one: ``last_stats.kv_bytes_used`` is that padded
    size, ``kv_bytes_kept`` what the kept tokens alone take.

    A KVConfig is immutable (it is checked once, when built): derive variants with
    :meth:`replace` (``dataclasses.replace`` semantics).
    """

    method: str = _core.DEFAULT_KV_METHOD
    budget: Optional[int] = None
    ratio: Optional[float] = None
    n_recent: Optional[int] = None
    n_sink: Optional[int] = None
    window: Optional[int] = None
    evict: str = "prefill"
    group_pool: str = "sum"
    gqa: str = "native"
    head_budget: str = "uniform"
    head_floor: float = 0.2
    score: Optional[str] = None
    query_window: Optional[str] = None
    pooling: Optional[str] = None
    kernel: int = 7
    p: float = 2.0
    slack: int = 32

    def __post_init__(self) -> None:
        # Frozen: the checked engine copy can never go stale behind a changed field.
        object.__setattr__(self, "_core", self.to_core())

    def to_core(self) -> "_core.KVConfig":
        if not isinstance(self.method, str):
            raise ValueError("method must be a string")
        c = _core.kv_config_for_method(self.method)
        try:
            c.gqa = _core.parse_gqa_mode(str(self.gqa))
        except ValueError as e:   # the engine owns these names
            raise ValueError(str(e)) from None
        if self.method == "full":
            return c
        if self.budget is None and self.ratio is None:
            raise ValueError("a KVConfig needs a budget (tokens) or a ratio of the prompt")
        if self.budget is not None and self.ratio is not None:
            raise ValueError("give either budget or ratio, not both")
        if self.budget is not None:
            if int(self.budget) <= 0:
                raise ValueError(f"budget must be a positive number of tokens, got {self.budget}")
            c.budget = _i32("budget", self.budget)
        if self.ratio is not None:
            if not (0.0 < float(self.ratio) <= 1.0):
                raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
            c.ratio = float(self.ratio)
        if self.n_recent is not None:
            if self.n_recent < 0:
                raise ValueError("n_recent must be >= 0")
            c.n_recent = _i32("n_recent", self.n_recent)
        if self.n_sink is not None:
            if self.n_sink < 0:
                raise ValueError("n_sink must be >= 0")
            c.n_sink = _i32("n_sink", self.n_sink)
        if self.window is not None:
            c.window_size = _i32("window", self.window)
        if self.score is not None:
            c.score = _pick(_SCORES, self.score, "score")
        if self.query_window is not None:
            c.window = _pick(_WINDOWS, self.query_window, "query window")
        if self.pooling is not None:
            c.pooling = _pick(_POOLINGS, self.pooling, "pooling")
        c.mode = _pick(_MODES, self.evict, "eviction mode")
        try:
            c.group_pool = _core.parse_group_pool(str(self.group_pool))
            c.head_budget = _core.parse_head_budget(str(self.head_budget))
        except ValueError as e:
            raise ValueError(str(e)) from None
        c.head_floor = float(self.head_floor)
        c.kernel = _i32("kernel", self.kernel)
        c.p = float(self.p)
        c.slack = _i32("slack", self.slack)
        return _core.finalize_kv_config(c)

    def describe(self) -> str:
        return repr(self._core)

    def replace(self, **changes) -> "KVConfig":
        return dataclasses.replace(self, **changes)


