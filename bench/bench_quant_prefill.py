"""Prefill time of one long prompt per KV cache type, each type in its own process at once
(one thread each), so that a quantized cache's prefill can be set beside f16's.

    python bench/bench_quant_prefill.py -m qwen2.5-coder-1.5b --length 4090 --types f16 q8_0 [--out FILE.json]
"""
import argparse
import json
import subprocess
import sys
import time


def one(model: str, length: int, kv_type: str, threads: int) -> None:
    import pyobcache
    from pyobcache import KVConfig
    m = pyobcache.Model(model, n_ctx=length + 64, n_threads=threads)
    ids = (m.tokenize("The quick brown fox jumps over the lazy dog. ") * (length // 8 + 1))[:length]
    t0 = time.perf_counter()
    m.logits(ids, kv=KVConfig("full", type_k=kv_type, type_v=kv_type))
    print(json.dumps({"type": kv_type, "n_prompt": len(ids), "prefill_s": round(time.perf_counter() - t0, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=4090)
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one(a.model, a.length, a.one, a.threads)
    procs = [subprocess.Popen([sys.executable, __file__, "-m", a.model, "--length", str(a.length), "-t", str(a.threads),
                               "--one", t], stdout=subprocess.PIPE, text=True) for t in a.types]
    rows = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            sys.exit(f"a prefill failed (exit {p.returncode})")
        print(out.strip())
        rows.append(json.loads(out.strip().splitlines()[-1]))
    if a.out:
        import pyobcache
        with open(a.out, "w") as f:
            json.dump({"bench": "quant_prefill", "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                       "pyobcache_file": pyobcache.__file__, "threads": a.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
