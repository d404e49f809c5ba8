"""Decode at a budget against decode at a short context of the same size (issue 13's question:
what does eviction cost per generated token once the cache is small?).

    python bench/bench_decode_budget.py -m smollm2-135m --long 8192 --budget 512 --reps 3 --out FILE

Rows, each the median of --reps interleaved runs of --tg single-token decode steps:
- the full cache after a prompt of budget + 32 tokens (the slots a budget-512 cache holds);
- eviction to --budget after a --long prompt, chunked (scores accumulate with every generated token
  and the cache is compacted every `slack` tokens) and after prefill (no decode-time work), for
  obc-vk and snapkv.
The scoring and compaction time spent during the decode steps is reported beside the speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import corpus_tokens, write_json  # noqa: E402


def run(m, toks, n_prompt, kv, tg):
    s = m._new_session(n_prompt, tg + 1, kv)
    s.prefill(toks[:n_prompt])
    st0 = s.stats()
    t = time.perf_counter()
    for i in range(tg):
        s.decode([toks[n_prompt + i]])
    dt = time.perf_counter() - t
    st = s.stats()
    return {"tokens_per_s": tg / dt, "score_ms": st["score_ms"] - st0["score_ms"],
            "compact_ms": st["compact_ms"] - st0["compact_ms"], "slots_used": s.n_used}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--long", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--tg", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import pyobcache

    m = pyobcache.Model(a.model, n_ctx=a.long + a.tg + 8, n_threads=a.threads)
    toks = corpus_tokens(m, a.long + a.tg + 8)
    KV = pyobcache.KVConfig
    rows = {
        f"full cache, {a.budget + 32}-token prompt": (a.budget + 32, None),
        f"obc-vk chunked, budget {a.budget} after {a.long}": (a.long, KV(method="obc-vk", budget=a.budget, evict="chunked")),
        f"snapkv chunked, budget {a.budget} after {a.long}": (a.long, KV(method="snapkv", budget=a.budget, evict="chunked")),
        f"obc-vk after prefill, budget {a.budget} after {a.long}": (a.long, KV(method="obc-vk", budget=a.budget)),
    }
    runs = {k: [] for k in rows}
    for _ in range(a.reps):
        for label, (n, kv) in rows.items():
            runs[label].append(run(m, toks, n, kv, a.tg))
    out = {"model": a.model, "threads": m.n_threads, "tg": a.tg, "reps": a.reps, "date": time.strftime("%Y-%m-%d %H:%M"),
           "rows": {}}
    base = None
    for label, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        base = base or med["tokens_per_s"]
        med["vs_short_full"] = med["tokens_per_s"] / base
        out["rows"][label] = {**med, "runs": rs}
        print(f"{label:48s} {med['tokens_per_s']:7.1f} tok/s ({med['vs_short_full']:.2f}x)  scoring {med['score_ms']:6.1f} ms"
              f"  compaction {med['compact_ms']:5.1f} ms over {a.tg} tokens")
    write_json(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
