"""A long chat in one session: KV bytes, RSS and time per turn, against re-prefilling the history.

    python bench/bench_session.py --turns 50 --budget 512 --evict decode --out bench/results/session_smollm2.json
    python bench/bench_session.py --recall --out bench/results/session_recall_smollm2.json

The first form chats for ``--turns`` turns in a session with a bounded cache and records, after
every turn, the KV bytes allocated and used, the process RSS and the turn's wall time; every
``--baseline-every`` turns it also times what a stateless chat() pays for the same turn, which
re-prefills the whole history with the full cache. ``--recall`` gives a fact at turn 1, chats
about other things, and asks for the fact at the last turn, for several eviction methods.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import pyobcache
from pyobcache import KVConfig

TOPICS = ["the sea", "mountains", "bread", "trains", "the moon", "rain", "bicycles", "tea", "owls", "winter",
          "maps", "clocks", "gardens", "rivers", "music", "books", "bridges", "snow", "cats", "stars"]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def long_chat(m: pyobcache.Model, a) -> dict:
    kv = KVConfig(method=a.method, budget=a.budget, evict=a.evict)
    s = m.session(kv=kv)
    rows = []
    for t in range(1, a.turns + 1):
        msg = f"Tell me one short fact about {TOPICS[(t - 1) % len(TOPICS)]}."
        t0 = time.perf_counter()
        s.chat(msg, temperature=0, max_new_tokens=a.max_new)
        dt = time.perf_counter() - t0
        st = s.stats
        row = dict(turn=t, turn_s=dt, prompt_tokens=s.last_stats.prompt_tokens,
                   generated=s.last_stats.generated_tokens, n_past=st.n_past,
                   kv_bytes_allocated=st.kv_bytes_allocated, kv_bytes_used=st.kv_bytes_used,
                   kv_bytes_full=st.kv_bytes_full, rss_mib=rss_mib())
        if a.baseline_every and t % a.baseline_every == 0:
            # What a stateless chat() costs for the same turn: the whole history again, full cache.
            t0 = time.perf_counter()
            m.chat(s.messages[:-1], temperature=0, max_new_tokens=a.max_new)
            row["rechat_s"] = time.perf_counter() - t0
            row["rechat_prompt_tokens"] = m.last_stats.prompt_tokens
            row["rechat_generated"] = m.last_stats.generated_tokens
        rows.append(row)
        print(json.dumps(row), flush=True)
    return dict(config=kv.describe(), turns=rows)


def recall(m: pyobcache.Model, a) -> dict:
    fact = "My locker code is 4719."
    question = "What is my locker code? Answer with the number."
    configs = [None] + [KVConfig(method=name, budget=a.budget, evict=a.evict)
                        for name in ("obc-k+snapkv", "obc-vk+snapkv", "snapkv", "h2o", "tova", "streamingllm")]
    out = []
    for kv in configs:
        s = m.session(kv=kv)
        s.chat(fact, temperature=0, max_new_tokens=a.max_new)
        for t in range(2, a.turns):
            s.chat(f"Tell me one short fact about {TOPICS[(t - 2) % len(TOPICS)]}.", temperature=0,
                   max_new_tokens=a.max_new)
        answer = s.chat(question, temperature=0, max_new_tokens=16)
        row = dict(method=kv.method if kv else "full", turns=a.turns, n_past=s.n_past,
                   kv_bytes_used=s.stats.kv_bytes_used, kv_bytes_full=s.stats.kv_bytes_full, answer=answer,
                   recalled="4719" in answer)
        out.append(row)
        print(json.dumps(row), flush=True)
    return dict(fact=fact, question=question, budget=a.budget, evict=a.evict, results=out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--turns", type=int, default=50)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--evict", default="decode")
    ap.add_argument("--method", default=KVConfig.method)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--baseline-every", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--recall", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    m = pyobcache.Model(a.model, n_ctx=8192, n_threads=a.threads)
    res = recall(m, a) if a.recall else long_chat(m, a)
    if not a.recall:
        rows = res["turns"]
        tens = [r for r in rows if r["turn"] % 10 == 0]
        res["every_10_turns"] = [{k: r[k] for k in ("turn", "n_past", "kv_bytes_used", "kv_bytes_allocated", "rss_mib",
                                                    "turn_s")} for r in tens]
        res["median_turn_s_first_10"] = statistics.median(r["turn_s"] for r in rows[:10])
        res["median_turn_s_last_10"] = statistics.median(r["turn_s"] for r in rows[-10:])
        base = [r for r in rows if "rechat_s" in r]
        if base:
            res["rechat_s_first"] = base[0]["rechat_s"]
            res["rechat_s_last"] = base[-1]["rechat_s"]
    res.update(model=a.model, threads=a.threads, machine=platform.machine(), cpus=os.cpu_count(),
               date=time.strftime("%Y-%m-%d"))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
