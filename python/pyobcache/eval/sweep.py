"""Sweeps of eviction methods x budgets x modes over RULER tasks or fidelity documents.

Every finished cell is appended to ``cells.jsonl`` in the output folder as soon as it is done,
so an interrupted sweep resumes where it stopped. Each prompt is prefilled once for all its
after-prefill cells (see :class:`pyobcache.snapshot.PrefillSnapshot`); the chunked and decode
modes need their own prefill per cell, so they are meant for a few cells.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import _core
from ..kv import KVConfig, kv_methods, spec_kwargs
from ..model import Model
from .haystack import Page

__all__ = ["PAPER_METHODS", "SweepConfig", "Budget", "parse_budget", "run_sweep", "load_cells"]

# The 12 methods of the paper (three selection schemes, each with its accumulated-attention score
# and the three OBC scores) plus StreamingLLM as the score-free baseline.
PAPER_METHODS = ["h2o", "obc-v", "obc-k", "obc-vk",
                 "tova", "obc-v+tova", "obc-k+tova", "obc-vk+tova",
                 "snapkv", "obc-v+snapkv", "obc-k+snapkv", "obc-vk+snapkv",
                 "streamingllm"]


@dataclass(frozen=True)
class Budget:
    label: str                # "5%" or "256"
    ratio: Optional[float]
    tokens: Optional[int]


def parse_budget(text: str) -> Budget:
    """"5%" or "0.05" is a ratio of the prompt; an integer such as "256" is tokens per head."""
    t = str(text).strip()
    try:
        if t.endswith("%"):
            r = float(t[:-1]) / 100
        elif "." in t:
            r = float(t)
        else:
            n = int(t)
            if n <= 0:
                raise ValueError
            return Budget(str(n), None, n)
    except ValueError:
        raise ValueError(f"a budget is a ratio such as 0.05 or 5%, or a token count such as 256; got '{text}'") from None
    if not 0 < r <= 1:
        raise ValueError(f"a budget ratio must be in (0, 1]; got '{text}'")
    return Budget(f"{r * 100:g}%", r, None)


@dataclass
class SweepConfig:
    kind: str                                     # "ruler" or "fidelity"
    model: str = "smollm2-135m"
    methods: List[str] = field(default_factory=lambda: list(PAPER_METHODS))
    budgets: List[str] = field(default_factory=lambda: ["2%", "5%", "10%", "20%", "50%"])
    modes: List[str] = field(default_factory=lambda: ["prefill"])
    lengths: List[int] = field(default_factory=lambda: [4096])
    tasks: List[str] = field(default_factory=lambda: ["niah_single_number", "niah_single_uuid", "niah_multikey",
                                                      "niah_multivalue", "vt"])
    samples: int = 10                             # per task and length (ruler) / documents (fidelity)
    continuation: int = 256                       # teacher-forced tokens (fidelity)
    n_recent: int = 16                            # the paper's recent window; -1 keeps each method's default
    seed: int = 0
    threads: Optional[int] = None
    n_batch: int = 512

    def check(self) -> None:
        if self.kind not in ("ruler", "fidelity"):
            raise ValueError("kind must be 'ruler' or 'fidelity'")
        known = set(kv_methods())
        for m in self.methods:
            if parse_method(m)[0] not in known:
                raise ValueError(f"unknown method '{m}'; known: {', '.join(sorted(known))}")
        for b in self.budgets:
            parse_budget(b)
        for mode in self.modes:
            if mode not in ("prefill", "chunked", "decode"):
                raise ValueError(f"unknown eviction mode '{mode}'")
        if self.samples < 1 or any(n < 128 for n in self.lengths):
            raise ValueError("need at least one sample and lengths of at least 128 tokens")
        if self.kind == "ruler":
            from .tasks import TASKS
            for t in self.tasks:
                if t not in TASKS:
                    raise ValueError(f"unknown task '{t}'; known: {', '.join(TASKS)}")


def kv_for(cfg: SweepConfig, method: str, budget: Budget, mode: str) -> KVConfig:
    """The KVConfig of one cell. ``method`` is a method name, optionally with overrides after
    colons: ``"obc-vk+snapkv:group_pool=norm-sum:gqa=expand"``. The sweep's ``n_recent`` applies
    to the methods that keep recent tokens: not to StreamingLLM, whose recent window is the
    budget, nor to TOVA, whose window is the latest query and which keeps none (as in the paper)."""
    name, overrides = parse_method(method)
    n_recent = None
    base_recent = _core.kv_config_for_method(name).n_recent
    if cfg.n_recent >= 0 and name != "streamingllm" and base_recent != 0:
        n_recent = cfg.n_recent
    kw = dict(method=name, budget=budget.tokens, ratio=budget.ratio, evict=mode, n_recent=n_recent)
    kw.update(overrides)
    return KVConfig(**kw)


def parse_method(text: str) -> Tuple[str, Dict[str, object]]:
    """``"obc-vk+snapkv:group_pool=max"`` -> (``"obc-vk+snapkv"``, ``{"group_pool": "max"}``): a KV spec
    string (``:`` or ``,`` between the parts), read by the engine's one reader of them."""
    kw = spec_kwargs(text)
    owned = sorted(set(kw) & {"budget", "ratio", "compression_ratio", "evict"})
    if owned:
        raise ValueError(f"a method override is key=value with a key other than budget, ratio and evict (the "
                         f"sweep's own columns); got {', '.join(owned)} in '{text}'")
    return kw.pop("method"), kw


def kv_bytes(model: Model, kept: int, layout: "Layout") -> int:
    """K and V bytes of a cache holding ``kept`` tokens per head in every layer, in its types."""
    hp = model.hparams
    heads = hp["n_head"] if layout.gqa == "expand" else hp["n_head_kv"]
    row = _core.kv_row_bytes(layout.type_k, hp["head_dim"]) + _core.kv_row_bytes(layout.type_v, hp["head_dim"])
    return int(kept) * hp["n_layer"] * heads * row


@dataclass(frozen=True)
class Layout:
    """What one prefill's cache is: per KV head or per query head, and its K and V types. Cells
    of one layout share a snapshot."""
    gqa: str = "native"
    type_k: str = "f16"
    type_v: str = "f16"


def layout_of(kv: Optional[KVConfig]) -> Layout:
    return Layout() if kv is None else Layout(kv.gqa, kv.type_k, kv.type_v)


def _by_layout(cfg: SweepConfig, cells, with_plain: bool = False) -> Dict[Layout, list]:
    """The after-prefill cells grouped by the cache they evict from; the plain full cache first
    (``with_plain``: its group even without cells, for a reference computed on it)."""
    groups: Dict[Layout, list] = {Layout(): []} if with_plain else {}
    for c in cells:
        groups.setdefault(layout_of(None if c[0] == "full" else kv_for(cfg, c[0], c[1], "prefill")), []).append(c)
    return dict(sorted(groups.items(), key=lambda kv: kv[0] != Layout()))


def _cell_key(d: dict) -> Tuple:
    return (d["kind"], d["task"], d["length"], d["sample"], d["method"], d["budget"], d["mode"])


def load_cells(out: Path) -> List[dict]:
    p = Path(out) / "cells.jsonl"
    if not p.exists():
        return []
    cells = []
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                cells.append(json.loads(line))
            except json.JSONDecodeError:   # a line cut by an interruption: that cell runs again
                pass
    return cells


def _code_version() -> dict:
    import pyobcache

    pkg = Path(pyobcache.__file__).parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*")):
        if f.is_file() and f.suffix in (".py", ".so"):
            h.update(f.relative_to(pkg).as_posix().encode())
            h.update(f.read_bytes())
    info = {"pyobcache": pyobcache.__version__, "package_sha256": h.hexdigest()}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        info.update(git_commit=commit, git_dirty=bool(dirty))
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def _model_sha256(model: Model, name: str) -> str:
    from ..registry import REGISTRY

    if name in REGISTRY:
        return REGISTRY[name].sha256
    h = hashlib.sha256()
    with open(model.path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit="cell", dynamic_ncols=True)
    except ImportError:
        class _Null:
            def update(self, n=1): pass
            def set_postfix_str(self, s): pass
            def close(self): pass
        return _Null()


class _Writer:
    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        path = out / "cells.jsonl"
        # A line cut by an interruption must not swallow the next cell.
        cut = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self.f = open(path, "a", encoding="utf-8")
        if cut:
            self.f.write("\n")

    def write(self, d: dict) -> None:
        self.f.write(json.dumps(d) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def _grid(cfg: SweepConfig) -> List[Tuple[str, Budget, str]]:
    grid = [("full", Budget("full", None, None), "full")]
    for mode in cfg.modes:
        for m in cfg.methods:
            if parse_method(m)[0] == "full":   # "full:type_k=q8_0": a full cache in other types, one cell
                if m != "full" and mode == cfg.modes[0]:
                    grid.append((m, Budget("full", None, None), "full"))
                continue
            for b in cfg.budgets:
                grid.append((m, parse_budget(b), mode))
    return grid


def run_sweep(cfg: SweepConfig, out: Path, model: Optional[Model] = None, progress: bool = True,
              pages: Optional[Sequence[Page]] = None) -> dict:
    """Runs every cell not yet in ``out/cells.jsonl`` and writes ``out/run.json`` with what
    identifies the run (code version, model sha256, seeds, corpus) and its wall time. ``model``
    and ``pages`` (the text corpus) default to cfg.model and the Debian documentation prose."""
    from .haystack import corpus_info, load_corpus

    cfg.check()
    out = Path(out)
    t_start = time.time()
    code = _code_version()   # before the work, so that it names the code that did it
    pages = list(pages) if pages is not None else load_corpus()
    n_ctx = max(cfg.lengths) + max(cfg.continuation, 256) + 16
    if model is None:
        model = Model(cfg.model, n_ctx=n_ctx, n_threads=cfg.threads, n_batch=cfg.n_batch)
    elif model.n_ctx < n_ctx:
        raise ValueError(f"the model was opened with n_ctx={model.n_ctx}; this sweep needs {n_ctx}")
    done = {_cell_key(c) for c in load_cells(out)}
    grid = _grid(cfg)
    # Sample by sample across tasks, so that a sweep stopped early has as many samples of each.
    units = [(L, t, i) for L in cfg.lengths for i in range(cfg.samples)
             for t in (cfg.tasks if cfg.kind == "ruler" else ["document"])]
    total = sum(1 for (L, t, i) in units for (m, b, mode) in grid
                if (cfg.kind, t, L, i, m, b.label, mode) not in done)
    bar = _progress(total, f"{cfg.kind} {Path(cfg.model).name}") if progress else None
    writer = _Writer(out)
    stats = {"prefills": 0, "prefill_s": 0.0, "score_s": 0.0, "cells": 0}
    prev = out / "run.json"
    earlier = json.loads(prev.read_text()).get("invocations", []) if prev.exists() else []
    run = {
        "config": asdict(cfg),
        "code": code,
        "model": {"name": cfg.model, "path": model.path, "sha256": _model_sha256(model, cfg.model),
                  "arch": model.arch},
        "corpus": corpus_info(pages),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": model.n_threads},
    }

    def save(finished: bool) -> None:
        # Rewritten after every sample, so that an interrupted sweep still records its time.
        this = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
                "wall_s": round(time.time() - t_start, 1), "finished": finished, "code": code,
                **{k: round(v, 1) if isinstance(v, float) else v for k, v in stats.items()}}
        run.update(this_invocation=this, invocations=earlier + [this],
                   wall_s_total=round(sum(x["wall_s"] for x in earlier) + this["wall_s"], 1))
        tmp = prev.with_suffix(".tmp")
        tmp.write_text(json.dumps(run, indent=2))
        tmp.replace(prev)

    docs_cache: Dict[int, list] = {}
    finished = False
    try:
        for (L, task, i) in units:
            pending = [(m, b, mode) for (m, b, mode) in grid if (cfg.kind, task, L, i, m, b.label, mode) not in done]
            if not pending:
                continue
            if cfg.kind == "ruler":
                _run_ruler_unit(cfg, model, pages, task, L, i, pending, writer, stats, bar)
            else:
                if L not in docs_cache:
                    from .fidelity import make_documents
                    docs_cache[L] = make_documents(model, pages, cfg.samples, L, cfg.continuation)
                _run_fidelity_unit(cfg, model, docs_cache[L][i], L, pending, writer, stats, bar)
            save(False)
        finished = True
    finally:
        writer.close()
        if bar is not None:
            bar.close()
        save(finished)
    return run


def _base(cfg: SweepConfig, task: str, L: int, i: int, m: str, b: Budget, mode: str) -> dict:
    return {"kind": cfg.kind, "task": task, "length": L, "sample": i, "method": m, "budget": b.label,
            "budget_ratio": b.ratio, "budget_tokens": b.tokens, "mode": mode, "seed": cfg.seed}


def _run_ruler_unit(cfg, model, pages, task, L, i, pending, writer, stats, bar) -> None:
    from .tasks import make_sample, prompt_ids, score_sample

    sample = make_sample(model, pages, task, L, i, cfg.seed)
    ids = prompt_ids(model, sample)
    snap_cells = [c for c in pending if c[2] in ("full", "prefill")]
    for layout, cells in _by_layout(cfg, snap_cells).items():
        t0 = time.time()
        snap = model.snapshot(ids, [kv_for(cfg, m, b, "prefill") for (m, b, mode) in cells if m != "full"],
                              max_new_tokens=sample.max_new_tokens + 1)
        stats["prefills"] += 1
        stats["prefill_s"] += time.time() - t0
        stats["score_s"] += snap.score_ms / 1000
        for (m, b, mode) in cells:
            t1 = time.time()
            kv = None if m == "full" else kv_for(cfg, m, b, "prefill")
            kept = snap.apply(kv)
            out_ids = snap.greedy(sample.max_new_tokens)
            text = model.detokenize(out_ids)
            _emit(writer, bar, stats, {**_base(cfg, task, L, i, m, b, mode), "n_prompt": len(ids), "kept": kept,
                                       "kv_bytes": kv_bytes(model, kept, layout),
                                       "score": score_sample(sample, text), "prediction": text,
                                       "answers": sample.answers, "cell_s": round(time.time() - t1, 3)})
    for (m, b, mode) in pending:
        if mode in ("full", "prefill"):
            continue
        t1 = time.time()
        kv = kv_for(cfg, m, b, mode)
        text = model.generate(ids, max_new_tokens=sample.max_new_tokens, temperature=0, kv=kv)
        s = model.last_stats
        _emit(writer, bar, stats, {**_base(cfg, task, L, i, m, b, mode), "n_prompt": len(ids),
                                   "kept": max(s.kept_per_layer) if s.kept_per_layer else None,
                                   "kv_bytes_allocated": s.kv_bytes_allocated,
                                   "score": score_sample(sample, text), "prediction": text,
                                   "answers": sample.answers, "cell_s": round(time.time() - t1, 3)})


def _run_fidelity_unit(cfg, model, doc, L, pending, writer, stats, bar) -> None:
    from .fidelity import continuation_logits
    from .metrics import log_softmax, mean_kl, perplexity

    # KL is measured against the plain (f16, per KV head) full cache, whatever the cells' cache is.
    snap_cells = [c for c in pending if c[2] in ("full", "prefill")]
    ref = None
    for layout, cells in _by_layout(cfg, snap_cells, with_plain=True).items():
        t0 = time.time()
        snap = model.snapshot(doc.ids, [kv_for(cfg, m, b, "prefill") for (m, b, mode) in cells if m != "full"],
                              max_new_tokens=len(doc.continuation))
        stats["prefills"] += 1
        stats["prefill_s"] += time.time() - t0
        stats["score_s"] += snap.score_ms / 1000
        if ref is None:
            snap.apply(None)
            ref = log_softmax(snap.teacher_force(doc.continuation))
        for (m, b, mode) in cells:
            t1 = time.time()
            if m == "full":
                logp, kept = ref, len(doc.ids)
            else:
                kept = snap.apply(kv_for(cfg, m, b, "prefill"))
                logp = log_softmax(snap.teacher_force(doc.continuation))
            _emit(writer, bar, stats, {**_base(cfg, "document", L, doc.index, m, b, mode), "n_prompt": len(doc.ids),
                                       "doc_start": doc.start_page, "kept": kept, "kv_bytes": kv_bytes(model, kept, layout),
                                       "ppl": perplexity(logp, doc.continuation), "kl": mean_kl(ref, logp),
                                       "cell_s": round(time.time() - t1, 3)})
    for (m, b, mode) in pending:
        if mode in ("full", "prefill"):
            continue
        t1 = time.time()
        kv = kv_for(cfg, m, b, mode)
        logp = log_softmax(continuation_logits(model, doc.ids, doc.continuation, kv))
        _emit(writer, bar, stats, {**_base(cfg, "document", L, doc.index, m, b, mode), "n_prompt": len(doc.ids),
                                   "doc_start": doc.start_page, "kept": None,
                                   "ppl": perplexity(logp, doc.continuation), "kl": mean_kl(ref, logp),
                                   "cell_s": round(time.time() - t1, 3)})


def _emit(writer, bar, stats, d: dict) -> None:
    writer.write(d)
    stats["cells"] += 1
    if bar is not None:
        bar.update(1)
