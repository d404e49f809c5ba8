#!/usr/bin/env python3
"""Resident memory over many generate calls with eviction: it must stay flat (no leak per call).

  python bench/bench_rss.py [--calls 1000] [--out bench/results/rss_smollm2.json]

SmolLM2-135M, prompts of ~100 tokens against a budget of 32 tokens per head (so every call
evicts), the three eviction modes in turn, 2 new tokens each, 1 thread. Prints the RSS after
warm-up and every 100 calls, and the growth from the first checkpoint to the last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyobcache


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    m = pyobcache.Model("smollm2-135m", n_ctx=512, n_threads=1, n_batch=64)
    configs = [pyobcache.KVConfig(method=meth, budget=32, evict=mode)
               for mode in ("prefill", "chunked", "decode") for meth in ("obc-vk+snapkv", "obc-vk", "tova")]
    words = "The history of the region is long and varied, with many rulers and wars over the centuries".split()
    t0 = time.monotonic()
    points = []
    for i in range(a.warmup + a.calls):
        # A different prompt each call (90-110 tokens), so nothing is served from a cache of any kind.
        text = " ".join(words[(i + k) % len(words)] for k in range(80 + i % 20))
        kv = configs[i % len(configs)]
        m.generate(text, max_new_tokens=2, temperature=0.7, seed=i, ignore_eos=True, kv=kv)
        assert m.last_stats.evictions > 0, (kv, m.last_stats)
        done = i + 1 - a.warmup
        if done == 0 or (done > 0 and done % 100 == 0):
            points.append({"calls": done, "rss_mib": round(rss_mib(), 2), "elapsed_s": round(time.monotonic() - t0, 1)})
            print(f"after {done:5d} calls: RSS {points[-1]['rss_mib']:8.2f} MiB  ({points[-1]['elapsed_s']} s)", flush=True)
    growth = points[-1]["rss_mib"] - points[0]["rss_mib"]
    print(f"RSS growth over {a.calls} calls: {growth:+.2f} MiB")
    if a.out:
        Path(a.out).write_text(json.dumps({"model": "smollm2-135m", "calls": a.calls, "warmup": a.warmup,
                                           "budget": 32, "methods": sorted({c.method for c in configs}),
                                           "modes": ["prefill", "chunked", "decode"], "points": points,
                                           "growth_mib": round(growth, 2)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
