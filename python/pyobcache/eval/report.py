"""Tables, CSV and plots from a sweep's cells."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Dict, List, Optional, Sequence, Tuple

from .sweep import load_cells, parse_budget
from .tasks import TASKS

__all__ = ["aggregate", "markdown", "task_matrix", "obc_vs_base", "paired", "sign_test", "bootstrap_ci", "versus",
           "write_csv", "plot", "plot_bytes", "write_report"]

# What each kind of sweep reports, and whether higher is better.
METRICS = {"ruler": [("score", "RULER score (%)", True)],
           "fidelity": [("ppl", "perplexity", False), ("kl", "mean KL to the full cache (nats)", False)]}


def aggregate(cells: Sequence[dict]) -> Dict[Tuple, dict]:
    """Mean of each metric per (kind, task, length, mode, method, budget); RULER tasks also get
    an 'average' task. Scores are in percent."""
    groups: Dict[Tuple, List[dict]] = defaultdict(list)
    for c in cells:
        keys = [(c["kind"], c["task"], c["length"], c["mode"], c["method"], c["budget"])]
        if c["kind"] == "ruler":
            keys.append((c["kind"], "average", c["length"], c["mode"], c["method"], c["budget"]))
        for k in keys:
            groups[k].append(c)
    out = {}
    for k, cs in groups.items():
        row = {"n": len(cs)}
        for metric, _, _ in METRICS[k[0]]:
            vals = [c[metric] for c in cs if c.get(metric) is not None]
            if vals:
                row[metric] = mean(vals) * (100 if metric == "score" else 1)
        out[k] = row
    return out


def _budget_order(label: str) -> Tuple[int, float]:
    if label == "full":
        return (2, 0)
    b = parse_budget(label)
    return (0, b.ratio) if b.ratio is not None else (1, b.tokens)


_FAMILIES = ("h2o", "tova", "snapkv")
_SCORES = ("attn", "obc-v", "obc-k", "obc-vk", "obc-vk-nocross")


def _method_order(method: str) -> Tuple[int, int, str]:
    """Rows grouped by selection scheme, its accumulated-attention base first, then the OBC
    scores on top of it (the order of the paper's tables); anything else after, by name."""
    if method.split(":", 1)[0] not in _FAMILIES and not method.startswith("obc-"):
        return (len(_FAMILIES) + 1, 0, method)
    fam, score = _family(method)
    return (_FAMILIES.index(fam) if fam in _FAMILIES else len(_FAMILIES),
            _SCORES.index(score) if score in _SCORES else len(_SCORES), method)


def _row_label(method: str, mode: str, modes: set) -> str:
    if method == "full":
        return "full cache"
    return f"{method} ({mode})" if len(modes) > 1 else method


def _axes(keys) -> Tuple[List[str], set, List[Tuple[str, str]]]:
    """The budget columns, the eviction modes and the (method, mode) rows of a table's keys, the
    full-cache reference left out."""
    budgets = sorted({k[5] for k in keys if k[5] != "full"}, key=_budget_order)
    modes = {k[3] for k in keys if k[3] != "full"}
    rows = sorted({(k[4], k[3]) for k in keys if k[4] != "full"}, key=lambda r: (r[1], _method_order(r[0])))
    return budgets, modes, rows


def markdown(agg: Dict[Tuple, dict]) -> str:
    """One table per (kind, task, length, metric): method rows (the full cache first, as the
    reference), budget columns; the best value of each column in bold."""
    parts = []
    tables = sorted({(k[0], k[1], k[2]) for k in agg}, key=lambda t: (t[0], t[1] != "average", t[1], t[2]))
    for kind, task, length in tables:
        keys = [k for k in agg if k[:3] == (kind, task, length)]
        budgets, modes, rows = _axes(keys)
        for metric, title, higher in METRICS[kind]:
            ref = agg.get((kind, task, length, "full", "full", "full"), {})
            n = max((agg[k]["n"] for k in keys), default=0)
            row_n = {(m, mode): max(agg[k]["n"] for k in keys if (k[4], k[3]) == (m, mode)) for (m, mode) in rows}
            # Rows that ran on fewer samples get their own n, and the bold best of a column is
            # chosen among the rows with every sample only: a 4-prompt 100 is not a finding.
            uneven = any(v != n for v in row_n.values())
            parts.append(f"#### {title}: {task}, {length} tokens "
                         + (f"(n per row; bold: the best of the rows with n={n})\n" if uneven else f"(n={n} per cell)\n"))
            parts.append("| method | " + ("n | " if uneven else "") + " | ".join(budgets) + " |")
            parts.append("|---|" + ("---|" if uneven else "") + "---|" * len(budgets))
            fmt = (lambda v: f"{v:.1f}") if metric == "score" else (lambda v: f"{v:.3f}" if metric == "kl" else f"{v:.2f}")
            n_cell = (lambda r: f"{r} | ") if uneven else (lambda r: "")
            if metric in ref:
                parts.append("| full cache | " + n_cell(ref["n"]) + " | ".join(fmt(ref[metric]) for _ in budgets) + " |")
            best = {}
            for b in budgets:
                vals = [agg[(kind, task, length, mode, m, b)].get(metric) for (m, mode) in rows
                        if (kind, task, length, mode, m, b) in agg and row_n[(m, mode)] == n]
                vals = [v for v in vals if v is not None]
                if vals:
                    best[b] = max(vals) if higher else min(vals)
            for (m, mode) in rows:
                if mode == "full":   # a full cache in other types ("full:type_k=q8_0"): a reference too
                    v = agg.get((kind, task, length, mode, m, "full"), {}).get(metric)
                    parts.append(f"| {m} | " + n_cell(row_n[(m, mode)])
                                 + " | ".join("" if v is None else fmt(v) for _ in budgets) + " |")
                    continue
                cells = []
                for b in budgets:
                    v = agg.get((kind, task, length, mode, m, b), {}).get(metric)
                    bold = v is not None and b in best and row_n[(m, mode)] == n and fmt(v) == fmt(best[b])
                    cells.append("" if v is None else (f"**{fmt(v)}**" if bold else fmt(v)))
                parts.append(f"| {_row_label(m, mode, modes)} | " + n_cell(row_n[(m, mode)]) + " | ".join(cells) + " |")
            parts.append("")
    return "\n".join(parts)


def task_matrix(agg: Dict[Tuple, dict]) -> str:
    """RULER scores of every task side by side: method rows, task columns, each cell the score at
    every budget ("5% | 10%" order given in the title), one table per (length, mode set)."""
    parts = []
    for length in sorted({k[2] for k in agg if k[0] == "ruler"}):
        keys = [k for k in agg if k[0] == "ruler" and k[2] == length]
        order = list(TASKS)
        task_names = sorted({k[1] for k in keys if k[1] != "average"},
                            key=lambda t: (order.index(t) if t in order else len(order), t))
        budgets, modes, rows = _axes(keys)
        n = max((agg[k]["n"] for k in keys if k[1] != "average"), default=0)
        parts.append(f"#### RULER score (%) per task, {length} tokens, budgets {' | '.join(budgets)} (n={n} per cell)\n")
        parts.append("| method | " + " | ".join(t.replace("niah_", "") for t in task_names) + " |")
        parts.append("|---|" + "---|" * len(task_names))
        full = [agg.get(("ruler", t, length, "full", "full", "full"), {}).get("score") for t in task_names]
        parts.append("| full cache | " + " | ".join("" if v is None else f"{v:.0f}" for v in full) + " |")
        for m, mode in rows:
            cells = []
            for t in task_names:
                vals = [agg.get(("ruler", t, length, mode, m, "full" if mode == "full" else b), {}).get("score")
                        for b in budgets]
                cells.append(" \\| ".join("" if v is None else f"{v:.0f}" for v in vals))
            parts.append(f"| {_row_label(m, mode, modes)} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven between wins and
    losses if either side were equally likely (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


# The metric each kind of sweep is compared on sample by sample, and its label.
_PAIRED = {"ruler": ("score", "RULER score"), "fidelity": ("kl", "KL")}


def paired(cells: Sequence[dict]) -> str:
    """Every OBC variant against its base on the same prompts: on how many samples (RULER: all
    tasks pooled; fidelity: per document, by KL) it is better, equal or worse, with the sign-test
    p-value. Averages hide whether a difference comes from a few prompts or from many."""
    per: Dict[Tuple, Dict[str, Dict[Tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    for c in cells:
        if c["method"] == "full":
            continue
        metric = _PAIRED[c["kind"]][0]
        if c.get(metric) is None:
            continue
        group = (c["kind"], c["length"], c["mode"], c["budget"])
        per[group][c["method"]][(c["task"], c["sample"])] = c[metric]
    lines = []
    for group in sorted(per, key=lambda g: (g[0], g[1], g[2], _budget_order(g[3]))):
        kind, length, mode, budget = group
        by_method = per[group]
        for m, base in _obc_pairs(set(by_method)):
            common = sorted(set(by_method[m]) & set(by_method[base]))
            if not common:
                continue
            metric, what = _PAIRED[kind]
            higher = next(h for name, _, h in METRICS[kind] if name == metric)
            # Positive: the OBC variant did better on that sample.
            gains = [(by_method[m][s] - by_method[base][s]) * (1 if higher else -1) for s in common]
            wins = sum(1 for g in gains if g > 1e-12)
            losses = sum(1 for g in gains if g < -1e-12)
            lines.append(f"- {what}, {length} tokens, eviction {mode}, {budget}: {m} against {base}: better on "
                         f"{wins}, equal on {len(common) - wins - losses}, worse on {losses} of {len(common)} "
                         f"samples (sign test p = {sign_test(wins, losses):.2g})")
    return "\n".join(lines)


def write_csv(cells: Sequence[dict], path: Path) -> None:
    cols = ["kind", "task", "length", "sample", "method", "mode", "budget", "budget_ratio", "budget_tokens",
            "n_prompt", "kept", "kv_bytes", "score", "ppl", "kl", "prediction", "cell_s"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for c in cells:
            w.writerow(c)


_SCORE_STYLE = {"attn": ("tab:gray", "--"), "obc-v": ("tab:blue", "-"), "obc-k": ("tab:orange", "-"),
                "obc-vk": ("tab:green", "-"), "obc-vk-nocross": ("tab:purple", "-")}


def _family(method: str) -> Tuple[str, str]:
    """(selection scheme, score) of a method name: obc-vk+snapkv -> (snapkv, obc-vk), tova -> (tova, attn);
    overrides after a colon (obc-vk+snapkv:gqa=expand) do not change them."""
    method = method.split(":", 1)[0]
    if method in ("h2o", "h2o-fullhist", "tova", "snapkv"):
        return method, "attn"
    if "+" in method:
        score, base = method.split("+", 1)
        return base, score
    return "h2o", method


def plot(agg: Dict[Tuple, dict], path: Path, kind: str, task: str) -> Optional[Path]:
    """Score against budget: one row per (length, metric), one panel per selection scheme (H2O,
    TOVA, SnapKV) holding its accumulated-attention base (grey, dashed) and its OBC variants, with
    StreamingLLM (dotted) and the full cache (black) in every panel. Ratio budgets only (token
    budgets are in the tables)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lengths = sorted({k[2] for k in agg if k[0] == kind and k[1] == task})
    if not lengths:
        return None
    metrics = METRICS[kind]
    methods = {k[4] for k in agg if k[0] == kind and k[1] == task and k[4] not in ("full", "streamingllm")}
    families = [f for f in ("h2o", "tova", "snapkv") if any(_family(m)[0] == f for m in methods)] or ["h2o"]
    rows = [(L, metric) for L in lengths for metric in metrics]
    fig, axes = plt.subplots(len(rows), len(families), figsize=(4.6 * len(families), 3.6 * len(rows)),
                             squeeze=False, sharey="row")
    for r, (L, (metric, title, _)) in enumerate(rows):
        keys = [k for k in agg if k[:3] == (kind, task, L) and metric in agg[k]]
        modes = sorted({k[3] for k in keys if k[3] != "full"})
        ticks = sorted({parse_budget(k[5]).ratio for k in keys if k[5] != "full" and parse_budget(k[5]).ratio})
        for c, fam in enumerate(families):
            ax = axes[r][c]
            for method in sorted({k[4] for k in keys if k[4] != "full"}):
                f, score = _family(method)
                if method != "streamingllm" and f != fam:
                    continue
                color, ls = _SCORE_STYLE.get(score, ("tab:red", "-"))
                if method == "streamingllm":
                    color, ls = "tab:brown", ":"
                for mi, mode in enumerate(modes):
                    pts = sorted((parse_budget(k[5]).ratio, agg[k][metric]) for k in keys
                                 if k[4] == method and k[3] == mode and k[5] != "full" and parse_budget(k[5]).ratio)
                    if pts:
                        ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], ls, color=color,
                                marker="osD^v"[mi % 5], ms=4, lw=1.6 if score != "attn" else 2.2,
                                label=method + (f" ({mode})" if len(modes) > 1 else ""))
            ref = agg.get((kind, task, L, "full", "full", "full"), {}).get(metric)
            if ref is not None:
                ax.axhline(ref, color="black", lw=1, label="full cache")
            ax.set_xscale("log")
            ax.set_xticks([t * 100 for t in ticks])
            ax.set_xticklabels([f"{t * 100:g}%" for t in ticks])
            ax.minorticks_off()
            if metric in ("ppl", "kl"):
                ax.set_yscale("log")
            ax.set_xlabel("KV budget (share of the prompt)")
            if c == 0:
                ax.set_ylabel(title)
            ax.set_title(f"{fam.upper() if fam != 'snapkv' else 'SnapKV'} family, {task}, {L} tokens", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(out: Path) -> dict:
    """Writes summary.json, cells.csv, table.md and plots (PNG) in out from out/cells.jsonl."""
    out = Path(out)
    cells = load_cells(out)
    if not cells:
        raise ValueError(f"{out}: no finished cells")
    agg = aggregate(cells)
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    summary = {"run": run, "results": [dict(zip(("kind", "task", "length", "mode", "method", "budget"), k), **v)
                                       for k, v in sorted(agg.items(), key=lambda kv: str(kv[0]))]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_csv(cells, out / "cells.csv")
    table = markdown(agg)
    if any(k[0] == "ruler" for k in agg):
        table += "\n" + task_matrix(agg)
    table += ("\n#### OBC variants against their base\n\n" + obc_vs_base(agg)
              + "\n\n#### OBC variants against their base, sample by sample\n\n" + paired(cells) + "\n")
    vs = versus(cells)
    if vs:
        table += "\n### Every configuration against SnapKV, sample by sample\n\n" + vs
    (out / "table.md").write_text(table)
    plots = []
    if plot_bytes(cells, out / "plot_ruler_kv_bytes.png"):
        plots.append("plot_ruler_kv_bytes.png")
    for kind, task in sorted({(k[0], k[1]) for k in agg}):
        p = plot(agg, out / f"plot_{kind}_{task}.png", kind, task)
        if p:
            plots.append(p.name)
    summary["plots"] = plots
    return summary


def _obc_pairs(methods) -> List[Tuple[str, str]]:
    """(OBC variant, its base) pairs present among methods: obc-vk -> h2o, obc-v+snapkv -> snapkv,
    and with overrides the base with the same overrides (obc-vk+snapkv:gqa=expand -> snapkv:gqa=expand)."""
    pairs = []
    for m in methods:
        if not m.startswith("obc-"):
            continue
        name, colon, overrides = m.partition(":")
        base = (name.split("+", 1)[1] if "+" in name else "h2o") + colon + overrides
        if base in methods:
            pairs.append((m, base))
    return sorted(pairs, key=lambda p: (p[1], p[0]))


def bootstrap_ci(diffs: Sequence[float], n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> Tuple[float, float]:
    """Percentile interval of the mean of paired differences, resampling the samples (prompts)
    with replacement; seeded, so a report regenerates identically."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def versus(cells: Sequence[dict], reference: str = "snapkv") -> str:
    """Every configuration against one reference method on the same prompts, per budget: the mean
    difference in RULER points with a paired bootstrap 95% interval, and the sign test over the
    prompts where they differ. Rows sorted by the mean difference."""
    per: Dict[Tuple, Dict[str, Dict[Tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    for c in cells:
        if c["kind"] != "ruler" or c["method"] == "full" or c.get("score") is None:
            continue
        per[(c["length"], c["mode"], c["budget"])][c["method"]][(c["task"], c["sample"])] = 100.0 * c["score"]
    parts = []
    for group in sorted(per, key=lambda g: (g[0], g[1], _budget_order(g[2]))):
        length, mode, budget = group
        by = per[group]
        if reference not in by:
            continue
        rows = []
        for m in by:
            if m == reference:
                continue
            common = sorted(set(by[m]) & set(by[reference]))
            if not common:
                continue
            d = [by[m][s] - by[reference][s] for s in common]
            wins, losses = sum(x > 1e-9 for x in d), sum(x < -1e-9 for x in d)
            lo, hi = bootstrap_ci(d)
            rows.append((mean(d), m, len(common), lo, hi, wins, losses))
        if not rows:
            continue
        parts.append(f"#### Against {reference}: {length} tokens, eviction {mode}, budget {budget}\n")
        parts.append("| method | n | mean | difference (points) | 95% interval | better / worse | sign test p |")
        parts.append("|---|---|---|---|---|---|---|")
        ref_mean = mean(by[reference].values())
        for diff, m, n, lo, hi, wins, losses in sorted(rows, key=lambda r: -r[0]):
            parts.append(f"| {m} | {n} | {mean(by[m].values()):.1f} | {diff:+.1f} | [{lo:+.1f}, {hi:+.1f}] | "
                         f"{wins} / {losses} | {sign_test(wins, losses):.2g} |")
        parts.append(f"| {reference} (reference) | {len(by[reference])} | {ref_mean:.1f} | | | | |")
        parts.append("")
    return "\n".join(parts)


def plot_bytes(cells: Sequence[dict], path: Path) -> Optional[Path]:
    """RULER average against the KV bytes each configuration kept (mean over its cells): the
    memory a method really costs, which for gqa=expand is n_head / n_head_kv times its budget's."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts: Dict[Tuple, Dict[str, List[Tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    # Full caches (f16, or quantized as "full:type_k=q8_0"): a reference line in each panel.
    full: Dict[int, Dict[str, List[Tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    samples: Dict[Tuple, set] = defaultdict(set)
    for c in cells:
        if c["kind"] == "ruler" and c.get("kv_bytes") and c.get("score") is not None:
            point = (c["kv_bytes"], 100.0 * c["score"])
            if c["mode"] == "full":
                full[c["length"]][c["method"]].append(point)
                continue
            pts[(c["length"], c["mode"])][(c["method"], c["budget"])].append(point)
            samples[(c["length"], c["mode"], c["method"])].add((c["task"], c["sample"]))
    if not pts:
        return None
    fig, axes = plt.subplots(1, len(pts), figsize=(9.5 * len(pts), 5.2), squeeze=False)
    for ax, (group, by) in zip(axes[0], sorted(pts.items())):
        # A row that ran on a few prompts only (an ablation stopped early) would draw a line as
        # firm as the others': leave it out, and say so.
        n = {m: len(samples[group + (m,)]) for m, _ in by}
        n_min = min(20, max(1, max(n.values()) // 4))
        lines: Dict[str, List[Tuple[float, float]]] = defaultdict(list)
        for (m, b), v in by.items():
            if n[m] >= n_min:
                lines[m].append((mean(x for x, _ in v) / 2 ** 20, mean(y for _, y in v)))
        for i, (m, v) in enumerate(sorted(full[group[0]].items())):
            label = "full cache" if m == "full" else m
            ax.axhline(mean(y for _, y in v), color="black", lw=1, ls=["-", "--", ":", "-."][i % 4],
                       label=f"{label} ({mean(x for x, _ in v) / 2 ** 20:.0f} MiB)")
        for m in sorted(lines, key=_method_order):
            xy = sorted(lines[m])
            f, score = _family(m)
            color, _ = _SCORE_STYLE.get(score, ("tab:red", "-"))
            ls = "--" if "gqa=expand" in m else (":" if "head_budget=adaptive" in m else "-")
            ax.plot([p[0] for p in xy], [p[1] for p in xy], ls, marker="o", ms=3, color=color,
                    label=f"{m} (n={n[m]})", lw=1.3)
        ax.set_xscale("log")
        ax.set_xlabel("KV cache kept (MiB, as allocated)")
        ax.set_ylabel("RULER average (%)")
        left_out = sorted(m for m in n if n[m] < n_min)
        ax.set_title(f"accuracy against KV memory, {group[0]} tokens, eviction {group[1]}"
                     + (f"\n({len(left_out)} rows with fewer than {n_min} prompts left out)" if left_out else ""),
                     fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def obc_vs_base(agg: Dict[Tuple, dict]) -> str:
    """For every OBC variant and budget: better, equal or worse than the method it builds on
    (accumulated attention of H2O, TOVA or SnapKV), on the task average or the fidelity metrics."""
    lines = []
    for kind, task, length, mode in sorted({(k[0], k[1], k[2], k[3]) for k in agg if k[3] != "full"}):
        if kind == "ruler" and task != "average":
            continue
        keys = [k for k in agg if k[:4] == (kind, task, length, mode)]
        methods = {k[4] for k in keys}
        budgets = sorted({k[5] for k in keys}, key=_budget_order)
        for metric, title, higher in METRICS[kind]:
            better = worse = equal = 0
            losses = []
            for m, base in _obc_pairs(methods):
                for b in budgets:
                    a = agg.get((kind, task, length, mode, m, b), {}).get(metric)
                    r = agg.get((kind, task, length, mode, base, b), {}).get(metric)
                    if a is None or r is None:
                        continue
                    if abs(a - r) <= 1e-9 * max(1.0, abs(r)):
                        equal += 1
                    elif (a > r) == higher:
                        better += 1
                    else:
                        worse += 1
                        losses.append(f"{m} vs {base} at {b} ({a:.3g} vs {r:.3g})")
            if better + worse + equal == 0:
                continue
            lines.append(f"- {title}, {task}, {length} tokens, eviction {mode}: OBC better than its base in "
                         f"{better}, equal in {equal}, worse in {worse} of {better + worse + equal} "
                         f"(variant, budget) pairs" + (f"; worse: {'; '.join(losses)}" if losses else ""))
    return "\n".join(lines)
