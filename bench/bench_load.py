"""Speed on a machine that is doing other things: pyobcache and llama.cpp side by side, idle and
under a controlled background load of CPU-bound processes that this benchmark starts and stops.

    python bench/bench_load.py -m smollm2-135m -t 2 --loads 0 1 2 --out bench/results/load_smollm2.json
    python bench/bench_load.py -m qwen2.5-coder-1.5b --pp 0 --loads 0 1 2
    python bench/bench_load.py --pyobcache-args adaptive_threads=0   # pin the thread count as llama.cpp does

Each engine runs in a subprocess of its own (llama-cpp-python cannot share a process with our
ggml), one after the other, while `--loads N` busy loops (`while 1: pass`) run beside it. Every
figure is the median of --reps runs: pp N is prompt tokens/s, tg N is tokens/s of N single-token
decode steps after an 8-token prompt; with --runs R every row is measured R times, interleaved with
the others, and the table shows the medians of the runs. A run that does not finish within --timeout seconds is
recorded as such. Each row also reports the CPU seconds the engine burnt per decoded token: a
thread pool whose workers spin while one of them is descheduled burns CPU without progress, and
that figure shows it.
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
sys.path.insert(0, str(HERE))

# One engine's measurement; runs in its own interpreter and prints one JSON line.
WORKER = r"""
import json, resource, statistics, sys, time
cfg = json.loads(sys.argv[1])

def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

tokens = cfg["tokens"]
out = {}
if cfg["engine"] == "llamacpp":
    from llama_cpp import Llama
    llm = Llama(cfg["model"], n_ctx=cfg["n_ctx"], n_batch=512, n_ubatch=512, n_threads=cfg["threads"],
                n_threads_batch=cfg["threads"], flash_attn=False, verbose=False)
    def prefill(ids):
        llm.reset(); llm.eval(ids)
    def step(tok):
        llm.eval([tok])
    def rewind(n):
        llm.n_tokens = n
else:
    import pyobcache
    m = pyobcache.Model(cfg["model"], n_ctx=cfg["n_ctx"], n_threads=cfg["threads"], **cfg["pyobcache_args"])
    s = m._new_session(8, cfg["tg"] * cfg["reps"] + 1, None)
    def prefill(ids):
        m.logits(ids)
    s.prefill(tokens[:8])
    def step(tok):
        s.decode([tok])
    def rewind(n):
        pass   # a Session only appends; its depth grows by tg per repetition, which is small
prefill(tokens[:32])    # warm-up
for n in cfg["pp"]:
    ts = []
    for _ in range(cfg["reps"]):
        t = time.perf_counter(); prefill(tokens[:n]); ts.append(time.perf_counter() - t)
    out[f"pp{n}"] = n / statistics.median(ts)
if cfg["tg"]:
    if cfg["engine"] == "llamacpp":
        prefill(tokens[:8])
    ts, cs = [], []
    for r in range(cfg["reps"]):
        rewind(8)
        c, t = cpu_s(), time.perf_counter()
        for i in range(cfg["tg"]):
            step(tokens[(8 + r * cfg["tg"] + i) % len(tokens)])
        ts.append(time.perf_counter() - t); cs.append(cpu_s() - c)
    out[f"tg{cfg['tg']}"] = cfg["tg"] / statistics.median(ts)
    out["cpu_s_per_token"] = statistics.median(cs) / cfg["tg"]
print(json.dumps(out))
"""


def busy_loops(n: int):
    return [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]


def stop(procs) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def run_engine(python: str, cfg: dict, timeout: float):
    t = time.perf_counter()
    try:
        r = subprocess.run([python, "-c", WORKER, json.dumps(cfg)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:g} s"}
    if r.returncode != 0 or not r.stdout.strip():
        lines = r.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {r.returncode}"}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(time.perf_counter() - t, 1)
    return res


def parse_kv_args(items):
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        out[k] = int(v) if v.lstrip("-").isdigit() else v
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--pp", type=int, nargs="*", default=[512], help="prompt sizes (0 or none: skip)")
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=None, help="default: the physical cores, as both engines choose")
    ap.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="background busy loops per row")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runs", type=int, default=1,
                    help="measure every row this many times, interleaved, and report the medians (the machine is noisy)")
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--engines", nargs="+", default=["pyobcache", "llamacpp"], choices=["pyobcache", "llamacpp"])
    ap.add_argument("--pyobcache-args", nargs="*", default=[], help="Model keywords for pyobcache, e.g. adaptive_threads=0")
    ap.add_argument("--llamacpp-python", default=sys.executable, help="interpreter with llama-cpp-python")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import pyobcache
    from bench_speed import corpus_tokens

    path = str(pyobcache.fetch(a.model)) if a.model in pyobcache.REGISTRY else a.model
    threads = a.threads or pyobcache._core.default_thread_count()
    pp = [n for n in a.pp if n > 0]
    n_ctx = max(pp + [8 + a.tg * a.reps + 8, 64]) + 8
    m = pyobcache.Model(path, n_ctx=n_ctx, n_threads=1)
    tokens = corpus_tokens(m, n_ctx)
    del m
    base = dict(model=path, n_ctx=n_ctx, threads=threads, pp=pp, tg=a.tg, reps=a.reps, tokens=tokens,
                pyobcache_args=parse_kv_args(a.pyobcache_args))
    results = {"model": a.model, "threads": threads, "reps": a.reps, "cpus": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "pyobcache_args": base["pyobcache_args"], "rows": []}
    runs = {}
    for run in range(a.runs):
        for load in a.loads:
            for engine in a.engines:
                procs = busy_loops(load)
                try:
                    time.sleep(0.5)
                    res = run_engine(a.llamacpp_python if engine == "llamacpp" else sys.executable,
                                     dict(base, engine=engine), a.timeout)
                finally:
                    stop(procs)
                runs.setdefault((engine, load), []).append(res)
                print(json.dumps({"run": run, "engine": engine, "load": load, **res}), file=sys.stderr)
    for (engine, load), rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        row = {"engine": engine, "load": load, "runs": rs}
        if not ok:
            row["error"] = rs[0]["error"]
        else:
            row.update({k: statistics.median(r[k] for r in ok) for k in ok[0] if k != "wall_s"})
            if len(ok) < len(rs):
                row["failed_runs"] = len(rs) - len(ok)
        results["rows"].append(row)

    cols = [f"pp{n}" for n in pp] + ([f"tg{a.tg}", "cpu_s_per_token"] if a.tg else [])
    print(f"\n{a.model}, {threads} threads, {os.cpu_count()} CPUs, median of {a.reps} (tokens/s)")
    print(f"{'engine':12s}{'busy':>6s}" + "".join(f"{c:>16s}" for c in cols) + f"{'vs idle':>10s}")
    idle = {r["engine"]: r for r in results["rows"] if r["load"] == 0 and "error" not in r}
    for r in results["rows"]:
        if "error" in r:
            print(f"{r['engine']:12s}{r['load']:6d}  {r['error']}")
            continue
        key = f"tg{a.tg}" if a.tg else cols[0]
        ratio = r[key] / idle[r["engine"]][key] if r["engine"] in idle else float("nan")
        r["decode_vs_idle" if a.tg else "pp_vs_idle"] = round(ratio, 3)
        print(f"{r['engine']:12s}{r['load']:6d}" + "".join(f"{r[c]:16.3f}" for c in cols) + f"{ratio:10.2f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
