"""Prefill and decode speed of pyobcache, side by side with llama.cpp (llama-cpp-python) in one run.

    python bench/bench_speed.py -m smollm2-135m --pp 512 2048 --tg-depth 0 4096 -t 2
    python bench/bench_speed.py -m smollm2-135m --llamacpp-python /path/to/venv/bin/python --rounds 3

pp N: prompt tokens/s for an N-token prompt. tg D: tokens/s of 64 single-token decode steps
after a D-token prompt. Each figure is the median of --reps runs. llama.cpp runs in the same
process when ``llama_cpp`` imports, otherwise in the interpreter given by --llamacpp-python
(a venv where llama-cpp-python is installed), for both of its attention paths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Runs inside the llama-cpp-python interpreter; prints one JSON line.
LLAMACPP_WORKER = r"""
import json, sys, time, statistics
from llama_cpp import Llama
cfg = json.loads(sys.argv[1])
out = {}
for fa in cfg["flash_attn"]:
    llm = Llama(cfg["model"], n_ctx=cfg["n_ctx"], n_batch=512, n_ubatch=512, n_threads=cfg["threads"],
                n_threads_batch=cfg["threads"], flash_attn=fa, verbose=False)
    tokens = cfg["tokens"]
    res = {}
    llm.eval(tokens[:32]); llm.reset()
    for n in cfg["pp"]:
        ts = []
        for _ in range(cfg["reps"]):
            llm.reset()
            t = time.perf_counter(); llm.eval(tokens[:n]); ts.append(time.perf_counter() - t)
        res[f"pp{n}"] = n / statistics.median(ts)
    for d in cfg["tg_depth"]:
        # Prefill the depth once; each repetition decodes from there (eval drops what follows n_tokens).
        llm.reset()
        llm.eval(tokens[:max(d, 1)])
        ts = []
        for _ in range(cfg["reps"]):
            llm.n_tokens = max(d, 1)
            t = time.perf_counter()
            for i in range(cfg["tg"]):
                llm.eval([tokens[(d + i) % len(tokens)]])
            ts.append(time.perf_counter() - t)
        res[f"tg{cfg['tg']}@{d}"] = cfg["tg"] / statistics.median(ts)
    out["fa_on" if fa else "fa_off"] = res
    del llm
print(json.dumps(out))
"""


def run_llamacpp(python: str, cfg: dict):
    """Runs LLAMACPP_WORKER under `python`; returns its results, or None (and says why) when it fails."""
    r = subprocess.run([python, "-c", LLAMACPP_WORKER, json.dumps(cfg)], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        lines = r.stderr.strip().splitlines()
        print(f"llama.cpp not measured: {lines[-1] if lines else 'no output'}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def write_json(path, obj) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1) + "\n")


def corpus_tokens(model, n: int) -> list:
    """Natural text tokens: this repository's own sources, repeated as needed."""
    text = ""
    for p in sorted((HERE.parent / "cpp").glob("*.cpp")) + sorted((HERE.parent / "python" / "pyobcache").glob("*.py")):
        text += p.read_text(errors="replace")
    ids = model.tokenize(text, add_special=False)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def bench_pyobcache(model, tokens, pp, depths, tg, reps, kv=None):
    import pyobcache  # noqa: F401

    res = {}
    model.logits(tokens[:32], kv=kv)   # warm-up: first touch of the weights, thread start-up
    for n in pp:
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            model.logits(tokens[:n], kv=kv)
            ts.append(time.perf_counter() - t)
        res[f"pp{n}"] = n / statistics.median(ts)
    for d in depths:
        res[f"tg{tg}@{d}"] = decode_rate(model, tokens, d, tg, reps, kv)
    return res


def decode_rate(model, tokens, depth, tg, reps, kv=None):
    """Median tokens/s of `reps` runs of `tg` single-token decodes after one prefill of `depth`."""
    n = max(depth, 1)
    s = model._new_session(n, tg * reps + 1, kv)
    s.prefill(tokens[:n])
    ts = []
    for r in range(reps):
        t = time.perf_counter()
        for i in range(tg):
            s.decode([tokens[(n + r * tg + i) % len(tokens)]])
        ts.append(time.perf_counter() - t)
    return tg / statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--pp", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--tg-depth", type=int, nargs="*", default=[0, 4096])
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole comparison, pyobcache and llama.cpp alternating; figures are medians "
                         "over rounds, and each round's ratio is paired (a loaded machine drifts between runs)")
    ap.add_argument("--flash-attn", choices=["off", "on", "both"], default="both", help="pyobcache's attention paths")
    ap.add_argument("--matmul", choices=["obc", "ggml", "both"], default="obc",
                    help="pyobcache's weight products: obc_mul_mat's own Q4_K/Q6_K kernels over plain weights (the "
                         "default), or ggml's alone (OBC_TILED_MATMUL=0: Q4_K repacked, Q6_K by ggml's dot products)")
    ap.add_argument("--llamacpp-python", default=None, help="interpreter with llama-cpp-python, if not this one")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)

    import pyobcache

    path = str(pyobcache.fetch(a.model)) if a.model in pyobcache.REGISTRY else a.model
    threads = a.threads or pyobcache._core.default_thread_count()
    n_ctx = max(a.pp + [d + a.tg * a.reps + 2 for d in a.tg_depth]) + 8
    fas = {"off": [False], "on": [True], "both": [False, True]}[a.flash_attn]
    matmuls = {"obc": ["obc"], "ggml": ["ggml"], "both": ["obc", "ggml"]}[a.matmul]

    results = {"model": a.model, "threads": threads, "reps": a.reps, "rounds": a.rounds,
               "machine": platform.processor() or platform.machine(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "pyobcache": {}, "llamacpp": None}
    tokens = None
    py = a.llamacpp_python or sys.executable
    rounds = []   # per round: {"pyobcache": {path: {col: tok/s}}, "llamacpp": {...} or None}
    for r in range(a.rounds):
        ours = {}
        for kernels in matmuls:
            for fa in fas:
                # read when the weights are loaded and when graphs are built
                os.environ.pop("OBC_TILED_MATMUL", None)
                if kernels == "ggml":
                    os.environ["OBC_TILED_MATMUL"] = "0"
                m = pyobcache.Model(path, n_ctx=n_ctx, n_threads=threads, flash_attn=fa)
                tokens = tokens or corpus_tokens(m, n_ctx)
                key = ("fa_on" if fa else "fa_off") + (" ggml matmul" if kernels == "ggml" else "")
                ours[key] = bench_pyobcache(m, tokens, a.pp, a.tg_depth, a.tg, a.reps)
                del m
        os.environ.pop("OBC_TILED_MATMUL", None)
        theirs = None
        if not a.no_llamacpp:
            cfg = dict(model=path, n_ctx=n_ctx, threads=threads, pp=a.pp, tg_depth=a.tg_depth, tg=a.tg, reps=a.reps,
                       tokens=tokens, flash_attn=[False, True])
            theirs = run_llamacpp(py, cfg)
        rounds.append({"pyobcache": ours, "llamacpp": theirs})
        if a.rounds > 1:
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)

    def median_over_rounds(who):
        per = [rd[who] for rd in rounds if rd[who]]
        if not per:
            return None
        return {k: {c: statistics.median(p[k][c] for p in per) for c in per[0][k]} for k in per[0]}

    results["pyobcache"] = median_over_rounds("pyobcache")
    results["llamacpp"] = median_over_rounds("llamacpp")
    if a.rounds > 1:
        results["per_round"] = rounds
    if results["llamacpp"]:
        v = subprocess.run([py, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True)
        results["llamacpp_version"] = v.stdout.strip()

    cols = [f"pp{n}" for n in a.pp] + [f"tg{a.tg}@{d}" for d in a.tg_depth]
    print(f"\n{a.model}, {threads} threads, median of {a.reps}" + (f", then of {a.rounds} rounds" if a.rounds > 1 else "")
          + " (tokens/s)")
    print(f"{'':24s}" + "".join(f"{c:>12s}" for c in cols))
    rows = [(f"pyobcache {k}", v) for k, v in results["pyobcache"].items()]
    if results["llamacpp"]:
        rows += [(f"llama.cpp {k}", v) for k, v in results["llamacpp"].items()]
    for name, r in rows:
        print(f"{name:24s}" + "".join(f"{r[c]:12.2f}" for c in cols))
    if results["llamacpp"]:
        def best(res, c):
            return max(r[c] for r in res.values())
        results["ratio_best"] = {c: best(results["pyobcache"], c) / best(results["llamacpp"], c) for c in cols}
        print(f"{'ratio (best / best)':24s}" + "".join(f"{results['ratio_best'][c]:12.2f}" for c in cols))
        if len(results["pyobcache"]) > 1:
            # one configuration of ours at a time, against llama.cpp's best
            results["ratio_by_config"] = {k: {c: v[c] / best(results["llamacpp"], c) for c in cols}
                                          for k, v in results["pyobcache"].items()}
            for k, v in results["ratio_by_config"].items():
                print(f"{'  ratio ' + k:24s}" + "".join(f"{v[c]:12.2f}" for c in cols))
        paired = [rd for rd in rounds if rd["llamacpp"]]
        if len(paired) > 1:
            # Each round's ratio compares runs made minutes apart, under the same background load.
            ratios = {c: sorted(best(rd["pyobcache"], c) / best(rd["llamacpp"], c) for rd in paired) for c in cols}
            results["ratio_best_per_round"] = ratios
            results["ratio_best_paired_median"] = {c: statistics.median(v) for c, v in ratios.items()}
            print(f"{'paired ratio, median':24s}" + "".join(f"{results['ratio_best_paired_median'][c]:12.2f}" for c in cols))
            print(f"{'  min .. max':24s}" + "".join(f"{min(v):6.2f}..{max(v):4.2f}" for v in ratios.values()))
    write_json(a.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
