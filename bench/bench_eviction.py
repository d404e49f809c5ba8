"""What eviction costs and what it buys, on one model (default SmolLM2-135M).

    python bench/bench_eviction.py --llamacpp-python /path/to/venv/bin/python --out bench/results/eviction.json

1. overhead: for every method, prefill a --overhead-prompt token prompt (eviction after prefill,
   budget --budget) and report the share of prefill time spent scoring and compacting.
2. decode speed: after a --long-prompt token prompt, decode tokens/s with the budget (chunked
   prefill and after-prefill eviction) against the full cache, and against llama.cpp's full cache
   at the same depth with both of its attention paths, in the same run.
3. memory: peak RSS of a process that prefills the long prompt in chunked mode, against one that
   prefills a --short-prompt prompt, each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import corpus_tokens, decode_rate, run_llamacpp, write_json  # noqa: E402

PAPER = ["h2o", "tova", "snapkv"] + [f"obc-{s}{b}" for s in ("v", "k", "vk") for b in ("", "+tova", "+snapkv")]

# Peak RSS from VmHWM: ru_maxrss survives fork + exec on Linux, so a child would report the
# parent's peak.
RSS_WORKER = r"""
import json, sys, time
import pyobcache
def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
cfg = json.loads(sys.argv[1])
m = pyobcache.Model(cfg["model"], n_ctx=cfg["n_ctx"], n_threads=cfg["threads"], n_batch=cfg["n_batch"])
base = hwm_mib()
ids = cfg["tokens"][: cfg["n"]]
kv = pyobcache.KVConfig(method=cfg["method"], budget=cfg["budget"], evict="chunked") if cfg["method"] != "full" else None
t = time.perf_counter()
m.generate(ids, max_new_tokens=16, temperature=0, ignore_eos=True, kv=kv)
wall = time.perf_counter() - t
s = m.last_stats
print(json.dumps(dict(n=cfg["n"], peak_rss_mib=hwm_mib(), rss_after_load_mib=base, kv_bytes_allocated=s.kv_bytes_allocated,
                      prompt_tokens_per_s=s.prompt_tokens_per_s, wall_s=wall)))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--overhead-prompt", type=int, default=4096)
    ap.add_argument("--long-prompt", type=int, default=8192)
    ap.add_argument("--short-prompt", type=int, default=1024)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=PAPER + ["streamingllm"])
    ap.add_argument("--parts", nargs="*", default=["overhead", "decode", "memory"])
    ap.add_argument("--llamacpp-python", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import pyobcache

    path = str(pyobcache.fetch(a.model)) if a.model in pyobcache.REGISTRY else a.model
    threads = a.threads or pyobcache._core.default_thread_count()
    n_ctx = a.long_prompt + a.tg * a.reps + 16
    m = pyobcache.Model(path, n_ctx=n_ctx, n_threads=threads)
    tokens = corpus_tokens(m, n_ctx)
    out = {"model": a.model, "threads": threads, "budget": a.budget, "date": time.strftime("%Y-%m-%d %H:%M")}

    if "overhead" in a.parts:
        ids = tokens[: a.overhead_prompt]
        rows = {}
        for method in ["full"] + a.methods:
            kv = None if method == "full" else pyobcache.KVConfig(method=method, budget=a.budget)
            m.generate(ids, max_new_tokens=1, temperature=0, kv=kv)
            s = m.last_stats
            rows[method] = dict(prefill_ms=s.prompt_ms, score_ms=s.score_ms, compact_ms=s.compact_ms,
                                share=(s.score_ms + s.compact_ms) / s.prompt_ms if s.prompt_ms else 0.0)
        out["overhead"] = {"prompt_tokens": a.overhead_prompt, "rows": rows}
        print(f"\nprefill of {a.overhead_prompt} tokens, budget {a.budget}: time in scoring + compaction")
        print(f"{'method':18s}{'prefill ms':>12s}{'score ms':>10s}{'compact ms':>12s}{'share':>8s}")
        for k, r in rows.items():
            print(f"{k:18s}{r['prefill_ms']:12.0f}{r['score_ms']:10.1f}{r['compact_ms']:12.1f}{100 * r['share']:7.1f}%")

    if "decode" in a.parts:
        d = a.long_prompt
        res = {}
        for name, kv in [("obc-vk chunked", pyobcache.KVConfig(method="obc-vk", budget=a.budget, evict="chunked")),
                         ("obc-vk+snapkv chunked", pyobcache.KVConfig(method="obc-vk+snapkv", budget=a.budget, evict="chunked")),
                         ("obc-vk prefill", pyobcache.KVConfig(method="obc-vk", budget=a.budget)),
                         ("snapkv prefill", pyobcache.KVConfig(method="snapkv", budget=a.budget)),
                         ("full cache", None)]:
            t = time.perf_counter()
            res[f"pyobcache {name}"] = decode_rate(m, tokens, d, a.tg, a.reps, kv)
            print(f"  measured pyobcache {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if a.llamacpp_python is not None:
            cfg = dict(model=path, n_ctx=n_ctx, threads=threads, pp=[], tg_depth=[d], tg=a.tg, reps=a.reps,
                       tokens=tokens, flash_attn=[False, True])
            for fa, v in (run_llamacpp(a.llamacpp_python, cfg) or {}).items():
                res[f"llama.cpp full cache {fa}"] = v[f"tg{a.tg}@{d}"]
        out["decode"] = {"depth": d, "tokens_per_s": res}
        print(f"\ndecode tokens/s after a {d}-token prompt (budget {a.budget}), median of {a.reps}x{a.tg}")
        for k, v in res.items():
            print(f"  {k:34s}{v:10.2f}")
        best_llama = max([v for k, v in res.items() if k.startswith("llama.cpp")], default=None)
        if best_llama:
            out["decode"]["speedup_vs_llamacpp_best"] = res["pyobcache obc-vk chunked"] / best_llama
            print(f"  obc-vk chunked / llama.cpp best full cache: {out['decode']['speedup_vs_llamacpp_best']:.2f}x")

    if "memory" in a.parts:
        rows = []
        for n, method in [(a.short_prompt, "obc-vk"), (a.long_prompt, "obc-vk"), (a.short_prompt, "full"),
                          (a.long_prompt, "full")]:
            cfg = dict(model=path, n_ctx=n + 32, threads=threads, n_batch=512, tokens=tokens, n=n, method=method,
                       budget=a.budget)
            r = subprocess.run([sys.executable, "-c", RSS_WORKER, json.dumps(cfg)], capture_output=True, text=True,
                               check=True)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["method"] = method
            rows.append(row)
        out["memory"] = rows
        print(f"\npeak RSS, chunked prefill with budget {a.budget} (fresh process each)")
        for r in rows:
            print(f"  {r['method']:8s} {r['n']:6d} tokens: peak RSS {r['peak_rss_mib']:8.1f} MiB, KV allocated "
                  f"{r['kv_bytes_allocated'] / 2**20:7.1f} MiB, prefill {r['prompt_tokens_per_s']:7.1f} tokens/s")
    write_json(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
