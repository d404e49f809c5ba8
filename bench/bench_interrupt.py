#!/usr/bin/env python3
"""How fast Ctrl-C stops a long prefill: Python's KeyboardInterrupt and obcache-cli's SIGINT.

  python bench/bench_interrupt.py [--tokens 4096] [--runs 5] [--out bench/results/interrupt_smollm2.json]

A child process prefills a ~4k-token SmolLM2 prompt (Model.logits, 2 threads; and once with
obc-vk chunked eviction); SIGINT is sent 2 s into the prefill and the time until the child reports
KeyboardInterrupt is measured from the parent (signal sent -> line received). Then obcache-cli
gets the same prompt and a SIGINT; its exit status and timing lines are recorded.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyobcache

CHILD = r"""
import sys, time, pyobcache
m = pyobcache.Model(sys.argv[1], n_ctx=8192, n_threads=2)
text = open(sys.argv[2]).read()
kv = None if sys.argv[3] == "full" else pyobcache.KVConfig(method="obc-vk", budget=512, evict="chunked")
ids = m.tokenize(text)
print("ready", len(ids), flush=True)
t0 = time.monotonic()
try:
    m.logits(ids, kv=kv) if kv is None else m.generate(ids, max_new_tokens=1, kv=kv)
    print("finished", time.monotonic() - t0, flush=True)
except KeyboardInterrupt:
    print("interrupted", time.monotonic() - t0, flush=True)
"""


def prompt_text(model: pyobcache.Model, n_tokens: int) -> str:
    para = ("The history of the region is long and varied. Many rulers came and went, and each left "
            "roads, walls and songs behind. ")
    text = para
    while len(model.tokenize(text)) < n_tokens:
        text += para
    return text


def python_latency(model_path: str, prompt_file: str, mode: str, delay: float) -> dict:
    p = subprocess.Popen([sys.executable, "-c", CHILD, model_path, prompt_file, mode], stdout=subprocess.PIPE,
                         text=True)
    ready = p.stdout.readline().split()
    time.sleep(delay)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    line = p.stdout.readline()
    dt = time.monotonic() - t0
    p.wait(timeout=60)
    return {"mode": mode, "prompt_tokens": int(ready[1]), "signal_after_s": delay, "child": line.strip(),
            "latency_s": round(dt, 4)}


def cli_run(model_path: str, prompt_file: str, delay: float) -> dict:
    cli = str(Path(sys.executable).parent / "obcache-cli")
    p = subprocess.Popen([cli, "-m", model_path, "-f", prompt_file, "-n", "32", "-c", "8192", "-t", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    while "kv:" not in p.stderr.readline():
        pass
    time.sleep(delay)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    return {"returncode": p.returncode, "exit_s_after_signal": round(time.monotonic() - t0, 4),
            "stderr_tail": err.strip().splitlines()[-5:], "stdout_ends_with_newline": out.endswith("\n")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    path = str(pyobcache.fetch("smollm2-135m", quiet=True))
    m = pyobcache.Model(path, n_ctx=8192, n_threads=1)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(prompt_text(m, a.tokens - 1))
        prompt_file = f.name
    runs = []
    for i in range(a.runs):
        for mode in ("full", "chunked"):
            r = python_latency(path, prompt_file, mode, 2.0 + 0.37 * i)
            runs.append(r)
            print(f"python {mode:8s} {r['prompt_tokens']} tokens: KeyboardInterrupt {r['latency_s'] * 1000:.1f} ms "
                  f"after SIGINT ({r['child']})", flush=True)
    cli = cli_run(path, prompt_file, 2.0)
    print(f"obcache-cli: exit {cli['returncode']} {cli['exit_s_after_signal'] * 1000:.1f} ms after SIGINT; stderr ends:")
    for line in cli["stderr_tail"]:
        print("   ", line)
    lat = [r["latency_s"] for r in runs]
    print(f"KeyboardInterrupt latency: max {max(lat) * 1000:.1f} ms, median {sorted(lat)[len(lat) // 2] * 1000:.1f} ms")
    if a.out:
        Path(a.out).write_text(json.dumps({"model": "smollm2-135m", "threads": 2, "python": runs, "cli": cli,
                                           "max_latency_s": max(lat)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
