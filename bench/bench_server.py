"""The HTTP server under load: N concurrent streaming chat clients for a fixed time.

    python bench/bench_server.py --clients 1 4 16 --seconds 60 --out bench/results/server_load_smollm2.json

Starts ``python -m pyobcache serve`` on a free loopback port, then for each N runs N threads
that each send streaming chat requests with the official ``openai`` client back to back until
the time is up. It records the completion tokens per second over all clients, the time to first
token (p50, p99), the request latency and the errors.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai

QUESTIONS = ["Name three colours.", "What is the capital of Italy?", "Give me a word that rhymes with cat.",
             "Say something about the weather.", "What do bees make?", "Count from one to five."]


def percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def client_loop(base: str, stop_at: float, idx: int, max_tokens: int, out: list, errors: list) -> None:
    c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
    i = 0
    while time.time() < stop_at:
        q = QUESTIONS[(idx + i) % len(QUESTIONS)]
        i += 1
        t0 = time.perf_counter()
        ttft, n_tokens = None, 0
        try:
            stream = c.chat.completions.create(model="m", messages=[{"role": "user", "content": q}],
                                               max_tokens=max_tokens, temperature=0.8, seed=idx * 1000 + i,
                                               stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and ttft is None:
                    ttft = time.perf_counter() - t0
                if getattr(chunk, "usage", None):
                    n_tokens = chunk.usage.completion_tokens
            out.append(dict(ttft_s=ttft, latency_s=time.perf_counter() - t0, tokens=n_tokens, end=time.time()))
        except Exception as e:   # every error is counted, none is expected
            errors.append(repr(e))


def run_level(base: str, n: int, seconds: float, max_tokens: int) -> dict:
    out, errors = [], []
    t_start = time.time()
    threads = [threading.Thread(target=client_loop, args=(base, t_start + seconds, i, max_tokens, out, errors))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max([r["end"] for r in out], default=time.time()) - t_start
    ttft = [r["ttft_s"] for r in out if r["ttft_s"] is not None]
    lat = [r["latency_s"] for r in out]
    return dict(clients=n, seconds=seconds, wall_s=wall, requests=len(out), errors=len(errors),
                error_samples=errors[:3], completion_tokens=sum(r["tokens"] for r in out),
                tokens_per_s=sum(r["tokens"] for r in out) / wall if wall > 0 else 0.0,
                ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
                latency_p50_s=percentile(lat, 50), latency_p99_s=percentile(lat, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--kv-budget", type=int, default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pyobcache", "serve", "-m", a.model, "--port", str(port), "-t", str(a.threads),
           "-c", "2048", "-np", str(a.parallel)]
    if a.kv_budget:
        cmd += ["--kv-budget", str(a.kv_budget)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        levels = []
        for n in a.clients:
            r = run_level(base, n, a.seconds, a.max_tokens)
            print(json.dumps(r), flush=True)
            levels.append(r)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    res = dict(model=a.model, server_threads=a.threads, parallel=a.parallel, max_tokens=a.max_tokens,
               kv_budget=a.kv_budget, cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"), levels=levels)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
