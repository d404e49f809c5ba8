#!/usr/bin/env python3
"""The KV-type table: what each cache type (f16, q8_0, q4_0) costs and saves, with the full cache
and with eviction, on a long prompt.

  python bench/bench_kv_types.py [-m smollm2-135m] [--length 8192] [--reps 3] [-t 2] [--out FILE.json]
      [--llamacpp-python /path/to/venv/bin/python]

Each (type, configuration) runs in its own process, so that its peak RSS is its own: one request
as Model.generate runs it (the prompt, then --reps blocks of --gen greedy tokens, each block timed
for the decode speed at the prompt's depth), then its KV bytes (allocated, used, what the full
cache would take) and the process's peak RSS (ru_maxrss). The processes alternate by type so that
a background load lands on all of them alike. The prompt is the eval corpus's
prose (Python's documentation) cut to --length tokens, with a question at the end.

With --llamacpp-python, llama.cpp's full cache runs beside each type on the same token ids, in
that interpreter (`-ctk`/`-ctv` as type_k/type_v): its flash attention for every type (a quantized V
needs it there too), and for f16 also without it, since its decode at depth is much faster on that
path here. Its KV bytes are computed from the cache it allocates (n_ctx rounded up to 256 slots,
K and V rows of the type's block size); its decode steps are teacher-forced on the same ids.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TYPES = ["f16", "q8_0", "q4_0"]

LLAMACPP_CHILD = r"""
import json, resource, statistics, sys, time
import llama_cpp
cfg = json.loads(sys.argv[1])
ids = json.load(open(cfg["ids"]))
type_id = getattr(llama_cpp, "GGML_TYPE_" + cfg["type"].upper())     # llama_cpp takes ggml type ids
llm = llama_cpp.Llama(cfg["model"], n_ctx=cfg["n_ctx"], n_batch=512, n_ubatch=512, n_threads=cfg["threads"],
                      n_threads_batch=cfg["threads"], flash_attn=cfg["flash_attn"], type_k=type_id,
                      type_v=type_id, verbose=False)
t0 = time.perf_counter(); llm.eval(ids); prefill_s = time.perf_counter() - t0
speeds = []
for r in range(cfg["reps"]):
    t = time.perf_counter()
    for i in range(cfg["gen"]):
        llm.eval([ids[(r * cfg["gen"] + i) % len(ids)]])
    speeds.append(cfg["gen"] / (time.perf_counter() - t))
print(json.dumps({"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
                  "prefill_s": round(prefill_s, 2), "decode_tok_s": [round(x, 2) for x in speeds],
                  "decode_tok_s_median": round(statistics.median(speeds), 2)}))
"""


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


def prompt_ids(m, length: int) -> list:
    from pyobcache.eval.haystack import load_corpus

    text = " ".join(p.text for p in load_corpus()[:400])
    return m.tokenize(text)[: length - 16] + m.tokenize(" Question: what is this text about? Answer:")


def llamacpp_rows(a, python: str) -> list:
    """llama.cpp's full cache for each type, on our prompt's token ids, one process per row."""
    import tempfile

    import pyobcache
    from pyobcache import _core

    m = pyobcache.Model(a.model, n_ctx=a.length + 64, n_threads=a.threads)
    hp = m.hparams
    ids = prompt_ids(m, a.length)
    n_ctx = a.length + a.gen * a.reps + 16
    slots = -(-n_ctx // 256) * 256
    rows = []
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(ids, f)
        f.flush()
        for t in a.types:
            for fa in ([False, True] if t == "f16" else [True]):
                cfg = dict(model=str(m.path), n_ctx=n_ctx, threads=a.threads, flash_attn=fa, type=t,
                           ids=f.name, gen=a.gen, reps=a.reps)
                r = subprocess.run([python, "-c", LLAMACPP_CHILD, json.dumps(cfg)], capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(f"llama.cpp {t} failed:\n{r.stderr}")
                row = json.loads(r.stdout.strip().splitlines()[-1])
                kv = 2 * hp["n_layer"] * slots * hp["n_head_kv"] * _core.kv_row_bytes(t, hp["head_dim"])
                row.update(runtime="llama.cpp", model=a.model, type=t, method="full", flash_attn=fa,
                           n_prompt=len(ids), kv_bytes_allocated=int(kv), threads=a.threads)
                rows.append(row)
                print(f"llama.cpp full {t:5s} fa {'on ' if fa else 'off'} KV {kv / 2**20:8.2f} MiB allocated  "
                      f"peak RSS {row['peak_rss_mib']:7.1f} MiB  decode {row['decode_tok_s_median']:6.2f} tok/s "
                      f"{row['decode_tok_s']}", flush=True)
    return rows


def child(a) -> None:
    import pyobcache
    from pyobcache.model import _generation_args

    m = pyobcache.Model(a.model, n_ctx=a.length + a.gen * a.reps + 16, n_threads=a.threads)
    ids = prompt_ids(m, a.length)
    kv = pyobcache.KVConfig(a.method, type_k=a.type, type_v=a.type,
                            **({} if a.method == "full" else {"ratio": a.ratio}))
    # One request, as Model.generate runs it: the prefill, then reps blocks of gen tokens, each
    # block timed (the depth moves by gen * reps tokens, little against the prompt).
    req = m._new_request(ids, _generation_args(a.gen * a.reps + 1, 0.0, 40, 0.95, 0.05, 1.0, 64, None, None, True), kv)
    t0 = time.perf_counter()
    marks = []
    while req.next() is not None:
        n = len(req.generated)
        if n == 1 or (n > 1 and (n - 1) % a.gen == 0 and len(marks) <= a.reps):
            marks.append(time.perf_counter())
    r = req.report()
    speeds = [a.gen / (t2 - t1) for t1, t2 in zip(marks, marks[1:])][: a.reps]
    row = {"model": a.model, "type": a.type, "method": a.method, "ratio": None if a.method == "full" else a.ratio,
           "n_prompt": len(ids), "kv_bytes_allocated": r["kv_bytes_allocated"], "kv_bytes_used": r["kv_bytes_used"],
           "kv_bytes_full": r["kv_bytes_full"], "peak_rss_mib": round(peak_rss_mib(), 1),
           "prefill_s": round(marks[0] - t0, 2), "threads": a.threads,
           "decode_tok_s": [round(x, 2) for x in speeds], "decode_tok_s_median": round(statistics.median(speeds), 2)}
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--gen", type=int, default=32, help="tokens per timed decode")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.1, help="the eviction configuration's budget (share kept)")
    ap.add_argument("--method", default="obc-vk+snapkv")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--out", default=None)
    ap.add_argument("--llamacpp-python", default=None, help="an interpreter with llama-cpp-python: its full cache beside")
    ap.add_argument("--no-pyobcache", action="store_true", help="llama.cpp's rows only")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--type", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return

    rows = []
    for method in () if a.no_pyobcache else ("full", a.method):
        for t in a.types:
            cmd = [sys.executable, __file__, "--child", "-m", a.model, "--length", str(a.length), "--gen", str(a.gen),
                   "--reps", str(a.reps), "--ratio", str(a.ratio), "--method", method, "-t", str(a.threads), "--type", t]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{method} {t} failed:\n{r.stderr}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["runtime"] = "pyobcache"
            rows.append(row)
            print(f"{method:16s} {t:5s} KV {row['kv_bytes_used'] / 2**20:8.2f} MiB used / {row['kv_bytes_allocated'] / 2**20:8.2f} "
                  f"allocated (full {row['kv_bytes_full'] / 2**20:8.2f})  peak RSS {row['peak_rss_mib']:7.1f} MiB  "
                  f"decode {row['decode_tok_s_median']:6.2f} tok/s {row['decode_tok_s']}", flush=True)
    if a.llamacpp_python:
        rows += llamacpp_rows(a, a.llamacpp_python)
    if a.out:
        Path(a.out).write_text(json.dumps({"bench": "kv_types", "date": time.strftime("%Y-%m-%d"),
                                           "command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
