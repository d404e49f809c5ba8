"""Where one prefill's (or a decode's) time goes, ours against llama.cpp's: a per-op profile by sampling.

    python bench/profile_prefill.py -m qwen2.5-coder-1.5b --tokens 2048 -t 1 \
        --llamacpp-python /path/to/venv/bin/python --out bench/results/profile_prefill.json

Each runtime runs in its own worker process: it loads the model, warms up, then waits. `perf record`
(software cpu-clock event, so it works where hardware counters are not exposed) attaches to the
worker only for the prefill itself, so loading and weight repacking are not in the profile. The
samples are grouped by the ggml kernel they fall in (matmul, activation quantization, attention,
...), which is what both runtimes share: they run ggml's CPU kernels, from different ggml versions.
Needs `perf` (Debian's linux-perf).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Each worker reads a JSON config from argv, loads, defines `step(ids)` (evaluate these tokens after
# what came before) and `toks`, then runs TIMED_PART: it prints "ready", waits for a line on stdin
# (perf attaches meanwhile), runs the phase and prints the seconds it took.
TIMED_PART = r"""
if cfg["phase"] == "decode":
    step(toks[:1]); step(toks[1:2])                                      # the one-token graph is built here
print("ready", flush=True); sys.stdin.readline()
t = time.perf_counter()
if cfg["phase"] == "decode":
    for tok in toks[2:]:
        step([tok])
else:
    step(toks)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "tokens": len(toks) - (2 if cfg["phase"] == "decode" else 0)}), flush=True)
"""

OURS_WORKER = r"""
import json, sys, time
import pyobcache
cfg = json.loads(sys.argv[1])
m = pyobcache.Model(cfg["model"], n_ctx=cfg["n_ctx"], n_threads=cfg["threads"], adaptive_threads=False,
                    flash_attn=cfg["flash_attn"])
toks = json.load(open(cfg["ids"]))
s = m._new_session(len(toks), 1, None); s.prefill(toks[:64])          # warm-up
s = m._new_session(len(toks), 1, None)
prefilled = []
def step(ids):                                                           # the first call prefills
    (s.decode if prefilled else s.prefill)(ids); prefilled.append(True)
""" + TIMED_PART

LLAMACPP_WORKER = r"""
import json, sys, time
from llama_cpp import Llama
cfg = json.loads(sys.argv[1])
llm = Llama(cfg["model"], n_ctx=cfg["n_ctx"], n_batch=512, n_ubatch=512, n_threads=cfg["threads"],
            n_threads_batch=cfg["threads"], flash_attn=cfg["flash_attn"], verbose=False)
toks = json.load(open(cfg["ids"]))
llm.eval(toks[:64]); llm.reset()                                          # warm-up
step = llm.eval
""" + TIMED_PART

# Kernel symbol -> op group. The first pattern that matches wins.
GROUPS = [
    ("matmul", r"gemm|gemv|vec_dot|mul_mat|sgemm|tinyBLAS|tinyblas|llamafile"),
    ("quantize activations", r"quantize_row|quantize_mat|quantize_q8|from_float"),
    ("attention", r"flash_attn|soft_max|softmax|expf|vec_mad|exp_f32"),
    ("norm", r"rms_norm|_norm"),
    ("rope", r"rope"),
    ("elementwise/copy", r"_add|_mul\b|_mul_|silu|swiglu|glu|cpy|dup|get_rows|set_rows|cont|scale|fp16_to_fp32|fp32_to_fp16"),
    ("thread sync", r"barrier|gomp|omp_|sched_yield|futex|spin|ggml_graph_compute_thread|sync"),
    ("kernel/other", r"\[k\]|kernel"),
    # ggml-cpu's static functions (the flash-attention tiles among them) have no exported name.
    ("unnamed ggml-cpu code", r"libggml-cpu[^:]*:0x"),
]


def classify(symbol: str) -> str:
    for name, pat in GROUPS:
        if re.search(pat, symbol):
            return name
    return "other"


def profile(python: str, worker: str, cfg: dict, perf: str, workdir: Path, tag: str) -> dict:
    proc = subprocess.Popen([python, "-c", worker, json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"{tag}: the worker did not start ({line!r})")
    data = workdir / f"{tag}.perf.data"
    rec = subprocess.Popen([perf, "record", "-e", "cpu-clock", "-F", "999", "-p", str(proc.pid), "-o", str(data)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)   # let perf attach before the prefill starts
    proc.stdin.write("go\n")
    proc.stdin.flush()
    result = json.loads(proc.stdout.readline())
    rec.send_signal(signal.SIGINT)
    rec.wait(timeout=60)
    proc.stdin.close()
    proc.wait(timeout=60)
    rep = subprocess.run([perf, "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,symbol",
                          "--percent-limit", "0"], capture_output=True, text=True, check=True).stdout
    symbols = []
    for ln in rep.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+(\[.\])\s+(\S+)", ln)
        if m:
            pct, dso, kind, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4)
            # An address perf could not name is reported by the library it is in.
            symbols.append((pct, f"{dso}:{sym}" if sym.startswith("0x") else sym, kind))
    groups: dict = {}
    for pct, sym, kind in symbols:
        g = "kernel/other" if kind == "[k]" else classify(sym)
        groups[g] = groups.get(g, 0.0) + pct
    secs = result["seconds"]
    # The profile includes the second before the go and the time until perf stops: scale shares
    # to the prefill's own seconds, the idle wait being a few samples at most.
    return {"seconds": secs, "tokens": result["tokens"], "tokens_per_s": result["tokens"] / secs,
            "groups_pct": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "groups_s": {g: secs * p / 100 for g, p in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_symbols": [{"pct": p, "symbol": s} for p, s, _ in symbols[:25]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--tokens", type=int, default=2048, help="prompt tokens (prefill), or tokens decoded one by one")
    ap.add_argument("--phase", choices=["prefill", "decode"], default="prefill",
                    help="profile one prefill, or decoding at depth 0 (each token its own step, the same ids)")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--llamacpp-python", default=None, help="interpreter with llama-cpp-python")
    ap.add_argument("--flash-attn", choices=["off", "on"], default="on",
                    help="the attention path of both runtimes (ggml's flash attention, or mul_mat + softmax)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    perf = shutil.which("perf")
    if perf is None:
        print("perf not found (Debian: apt install linux-perf)", file=sys.stderr)
        return 1
    import pyobcache

    sys.path.insert(0, str(HERE))
    from bench_speed import corpus_tokens   # the same natural text as the speed table

    path = str(pyobcache.fetch(a.model)) if a.model in pyobcache.REGISTRY else a.model
    n_ids = a.tokens + (2 if a.phase == "decode" else 0)
    ids = corpus_tokens(pyobcache.Model(path, n_ctx=n_ids + 64), n_ids)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "ids.json").write_text(json.dumps(ids))
        cfg = dict(model=path, n_ctx=n_ids + 64, phase=a.phase, threads=a.threads, ids=str(work / "ids.json"),
                   flash_attn=a.flash_attn == "on")
        out = {"model": a.model, "phase": a.phase, "tokens": a.tokens, "flash_attn": a.flash_attn, "threads": a.threads, "date": time.strftime("%Y-%m-%d %H:%M"),
               "groups": [g for g, _ in GROUPS] + ["other"],
               "pyobcache": profile(sys.executable, OURS_WORKER, cfg, perf, work, "pyobcache")}
        if a.llamacpp_python:
            out["llamacpp"] = profile(a.llamacpp_python, LLAMACPP_WORKER, cfg, perf, work, "llamacpp")

    names = [k for k in ("pyobcache", "llamacpp") if k in out]
    what = f"one {a.tokens}-token prefill" if a.phase == "prefill" else f"{a.tokens} tokens decoded one by one from depth 1"
    print(f"\n{a.model}: {what}, {a.threads} thread(s); seconds per op group")
    print(f"{'':24s}" + "".join(f"{n:>14s}" for n in names))
    print(f"{'total':24s}" + "".join(f"{out[n]['seconds']:14.2f}" for n in names))
    for g in out["groups"]:
        print(f"{g:24s}" + "".join(f"{out[n]['groups_s'].get(g, 0.0):14.2f}" for n in names))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
