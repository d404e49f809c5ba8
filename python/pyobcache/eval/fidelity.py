"""Fidelity on natural text: prefill a long document, compress the cache to the budget, then
teacher-force a continuation and compare its next-token distributions with the full cache's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from ..kv import KVConfig
from .haystack import Page

__all__ = ["Document", "make_documents", "continuation_logits"]


@dataclass
class Document:
    index: int
    start_page: str
    ids: List[int]          # prompt
    continuation: List[int]


def make_documents(model, pages: Sequence[Page], n_docs: int, length: int, n_cont: int) -> List[Document]:
    """n_docs documents of length + n_cont tokens: consecutive pages of the corpus, starting at
    n_docs evenly spaced pages (so they come from different parts of the documentation)."""
    docs = []
    for d in range(n_docs):
        first = d * len(pages) // n_docs
        text, p = "", first
        ids: List[int] = []
        while len(ids) < length + n_cont:
            if p - first >= len(pages):
                raise ValueError(f"the corpus is too short for a {length + n_cont}-token document")
            text += ("\n\n" if text else "") + f"{pages[p % len(pages)].text}"
            ids = model.tokenize(text)
            p += 1
        docs.append(Document(d, pages[first].path, ids[:length], ids[length:length + n_cont]))
    return docs


def continuation_logits(model, ids: Sequence[int], continuation: Sequence[int], kv: KVConfig) -> np.ndarray:
    """Teacher-forced next-token logits along continuation from a fresh prefill with kv (for the
    chunked and decode modes, which cannot start from a shared snapshot). Both modes also evict
    while generating, so the continuation goes one token at a time, as generation does."""
    session = model._new_session(len(ids), len(continuation), kv)
    session.prefill(list(ids))
    rows = [session.logits()[-1].copy()]
    for t in continuation[:-1]:
        session.decode([int(t)])
        rows.append(session.logits()[-1].copy())
    return np.stack(rows)
