"""KV-cache eviction configuration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from . import _core

__all__ = ["KVConfig", "kv_methods", "kv_cache_types"]

def _option_text(value) -> str:
    if isinstance(value, bool):
        raise ValueError(f"a KV option takes a number or a name, not {value!r}")
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 2**63 else repr(value)   # budget=512.0 is 512
    return str(value)


def spec_kwargs(spec: str) -> dict:
    """A spec string's options as KVConfig keywords, typed as its fields (the engine splits the
    string and names a bad option)."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(KVConfig)}
    pairs = _core.parse_kv_spec(str(spec))
    unknown = [k for k, _ in pairs if k not in fields]
    if unknown:
        _core.kv_config_from_options(pairs)   # raises, naming the option and listing the known ones
    kw = {}
    for key, value in pairs:
        kind = fields[key]
        try:
            kw[key] = float(value) if "float" in kind else int(value) if "int" in kind else value
        except ValueError:
            raise ValueError(f"{key} must be a number, got '{value}' in '{spec}'") from None
    return kw


def kv_cache_types() -> list[str]:
    """The types a KV cache stores K and V in (``type_k`` / ``type_v``), named as llama.cpp's
    ``-ctk`` / ``-ctv`` name them."""
    return list(_core.kv_cache_types())


def kv_methods() -> list[str]:
    """The names of every eviction method (each a configuration of score, window, pooling, budget)."""
    return list(_core.kv_method_names())


@dataclass(frozen=True)
class KVConfig:
    """A bounded KV cache and how tokens are evicted from it.

    ``method`` names a configuration (see :func:`kv_methods`), for example ``"obc-k+snapkv"`` (the
    default: OBCache's key score over SnapKV's window of the last prompt queries, max-pooled),
    ``"obc-vk"`` (the joint key-value score on H2O's window) or ``"snapkv"``. The other fields
    override a part of it; ``None`` keeps the method's default.

    Give the size as ``budget`` (tokens kept per layer and KV head) or ``ratio`` (the fraction of
    the prompt *kept*). kvpress's ``compression_ratio`` is the fraction *removed*: it is accepted
    too, as ``ratio = 1 - compression_ratio``. ``evict`` chooses when eviction runs: ``"prefill"`` once after the prompt (the
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

    ``type_k`` / ``type_v`` choose what the cache stores keys and values in, as llama.cpp's
    ``-ctk`` / ``-ctv``: ``"f16"`` (the default), ``"q8_0"`` (about half the bytes), ``"q4_0"``,
    and the rest of :func:`kv_cache_types`. They apply with ``method="full"`` too, and multiply
    with eviction: ``KVConfig(budget=512, type_k="q8_0", type_v="q8_0")``. A quantized ``type_v``
    runs attention through flash attention (the only path that reads it). A quantized ``type_k`` is
    stored rotated (a Hadamard rotation of keys and queries, exact for attention), as llama.cpp
    does, and minus each head's mean key of the first micro-batch (a constant no softmax sees; the
    eviction scores add it back). That makes q4_0 keys usable on Qwen2.5, whose large K bias breaks
    them in llama.cpp (KL 0.012 against its 4.96).

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
    # kvpress's name: the share of the prompt *removed* (ratio is the share kept).
    compression_ratio: Optional[float] = None
    type_k: str = "f16"
    type_v: str = "f16"

    def __post_init__(self) -> None:
        if self.compression_ratio is not None:
            if self.ratio is not None:
                raise ValueError("give either ratio (the share kept) or compression_ratio (the share removed), not both")
            c = float(self.compression_ratio)
            if not 0.0 <= c < 1.0:
                raise ValueError(f"compression_ratio (the share of the prompt removed) must be in [0, 1), got {c}")
            # Stored as ratio, so that replace() and the engine see one size.
            object.__setattr__(self, "ratio", 1.0 - c)
            object.__setattr__(self, "compression_ratio", None)
        # Frozen: the checked engine copy can never go stale behind a changed field.
        object.__setattr__(self, "_core", self.to_core())

    def to_core(self) -> "_core.KVConfig":
        # The engine reads and checks every field (kv_config_from_options, which the CLIs, the C
        # API and spec strings share); unset fields keep the method's parts.
        if not isinstance(self.method, str):
            raise ValueError("method must be a string")
        options = [("method", self.method)]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("method", "compression_ratio") or value is None:
                continue
            options.append((f.name, _option_text(value)))
        return _core.kv_config_from_options(options)

    @classmethod
    def from_spec(cls, spec: str) -> "KVConfig":
        """A configuration from a spec string, as the CLIs' ``--kv`` and the C API's ``kv_spec``
        take it: ``"obc-vk+snapkv,budget=512,evict=chunked"`` (the method, then key=value options
        named as this class's fields)."""
        return cls(**spec_kwargs(spec))

    def describe(self) -> str:
        return repr(self._core)

    def replace(self, **changes) -> "KVConfig":
        return dataclasses.replace(self, **changes)


