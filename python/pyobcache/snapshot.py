"""One prefill, many eviction configurations.

Evaluating a method after prefill needs only the full-cache state and that method's scores, so
:meth:`pyobcache.Model.snapshot` prefills a prompt once while accumulating every listed method's
scores side by side, and keeps a host copy of the cache. :meth:`PrefillSnapshot.apply` then puts
the cache back and evicts it for any (method, budget) in milliseconds, and decoding continues
from the end of the prompt. Results equal those of a fresh prefill with that ``KVConfig``
(eviction after prefill).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .kv import KVConfig
from .model import engine_kv

__all__ = ["PrefillSnapshot"]


class PrefillSnapshot:
    """A prefilled prompt that can be evicted many ways. Create it with :meth:`Model.snapshot`."""

    def __init__(self, model, ids: Sequence[int], methods: Sequence[KVConfig], max_new_tokens: int):
        for kv in methods:
            if kv.evict != "prefill":
                raise ValueError(f"a snapshot evaluates eviction after prefill; {kv.method} asks for evict={kv.evict!r}")
        modes = {kv.gqa for kv in methods if kv.method != "full"}
        if len(modes) > 1:
            raise ValueError("one snapshot holds one cache layout: give methods of one gqa mode (native or expand)")
        self.gqa = modes.pop() if modes else "native"
        # The prefill writes the cache in its types, so every method evicts from the same bytes.
        types = {(kv.type_k, kv.type_v) for kv in methods}
        if len(types) > 1:
            raise ValueError("one snapshot holds one cache in one pair of types: give methods of one type_k and type_v")
        self.type_k, self.type_v = types.pop() if types else ("f16", "f16")
        self.model = model
        self.ids = list(ids)
        self.max_new_tokens = int(max_new_tokens)
        self._session = model._new_session(len(self.ids), self.max_new_tokens,
                                           KVConfig(method="full", gqa=self.gqa, type_k=self.type_k, type_v=self.type_v))
        self._session.prefill_snapshot(self.ids, [kv._core for kv in methods if kv.method != "full"])
        # The prompt's next-token logits do not depend on eviction, which happens after them.
        self._first = self._session.logits()[-1].copy()
        self.current: Optional[KVConfig] = None
        self._n_decoded = 0

    @property
    def n_prompt(self) -> int:
        return len(self.ids)

    @property
    def score_ms(self) -> float:
        """Time the prefill spent computing the methods' scores."""
        return float(self._session.snapshot_score_ms())

    @property
    def prompt_ms(self) -> float:
        return float(self._session.timings()["prompt_ms"])

    def apply(self, kv: Optional[KVConfig] = None) -> int:
        """Restores the prefilled cache and evicts it as ``kv`` says (``None``: the full cache).
        Returns the tokens kept per layer and head."""
        self.current = kv
        self._n_decoded = 0
        return int(self._session.apply_snapshot(engine_kv(kv)))

    def scores(self, kv: KVConfig, layer: int, head: int) -> np.ndarray:
        """The prefill's scores of ``kv``'s method for one layer and KV head, one per prompt token."""
        return self._session.snapshot_scores(kv._core, int(layer), int(head))

    def _room(self, n: int) -> None:
        if self._n_decoded + n > self.max_new_tokens:
            raise ValueError(f"the snapshot was made for {self.max_new_tokens} tokens after the prompt; "
                             f"{self._n_decoded + n} asked")
        self._n_decoded += n

    def teacher_force(self, continuation: Sequence[int]) -> np.ndarray:
        """Next-token logits [len(continuation), n_vocab] along ``continuation`` from the applied
        state: row 0 predicts continuation[0] from the prompt alone, row i predicts token i."""
        cont = [int(t) for t in continuation]
        if not cont:
            raise ValueError("empty continuation")
        self.model._check_ids(cont)
        first = self._first[None, :].copy()
        if len(cont) == 1:
            return first
        self._room(len(cont) - 1)
        self._session.decode(cont[:-1], True)
        return np.concatenate([first, self._session.logits()], axis=0)

    def greedy(self, max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list:
        """Greedy decoding from the applied state, up to ``max_new_tokens`` tokens or an
        end-of-generation / ``stop_ids`` token (not included)."""
        stop = set(int(t) for t in stop_ids)
        out = []
        logits = self._first
        for _ in range(int(max_new_tokens)):
            t = int(np.argmax(logits))
            if self.model._m.is_eog(t) or t in stop:
                break
            out.append(t)
            if len(out) == max_new_tokens:
                break
            self._room(1)
            self._session.decode([t], False)
            logits = self._session.logits()[-1]
        return out
