#!/usr/bin/env python3
"""Mutation fuzzer for pyobcache's GGUF loader and the first tokens of generation.

Each case is a seed GGUF (tiny random models from tests/gguf_factory.py, and SmolLM2-135M when it
is cached) with one to three mutations: metadata values, types and counts, dropped or duplicated
keys, tensor types, dims and offsets, dropped tensors, byte flips in the header and the data,
count fields, truncation. A pool of worker processes loads each file and generates 2 tokens with
the full cache and 2 with eviction; a worker that dies by a signal is a crash, one that does not
answer within the timeout a hang. Crashing and hanging files are kept under OUT/crashers.

  python tests/fuzz/fuzz_gguf.py --n 10000 --seed 1 --jobs 1 --out bench/results/fuzz_10k

prints the counts per outcome and per error class and writes OUT/summary.json. Exit status 1
when anything crashed, hung or ran out of memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import gguf_edit as ge  # noqa: E402

# ---------------------------------------------------------------------------------------------
# worker: load + generate, one file per request line, one result line per file
# ---------------------------------------------------------------------------------------------

MEM_LIMIT = 4 << 30   # a loader that allocates by an absurd value fails here instead of swapping


def worker() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))
    import pyobcache

    for line in sys.stdin:
        path = line.rstrip("\n")
        try:
            m = pyobcache.Model(path, n_ctx=96, n_threads=1)
            ids = m.tokenize("The cat sat on the mat.") or [0]
            ids = (ids * 40)[:40]
            m.generate(ids, max_new_tokens=2, temperature=0, ignore_eos=True)
            kv = pyobcache.KVConfig(method="obc-vk+snapkv", budget=24, evict="chunked")
            m.generate(ids, max_new_tokens=2, temperature=0.8, seed=1, ignore_eos=True, kv=kv)
            res = ("loaded", "")
        except MemoryError as e:
            res = ("oom", f"MemoryError: {e}")
        except Exception as e:   # every clean error, by type and message
            res = ("error", f"{type(e).__name__}: {e}")
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# mutations
# ---------------------------------------------------------------------------------------------

INTS = [0, 1, 2, 3, -1, -2, 7, 15, 16, 17, 31, 63, 64, 65, 127, 128, 255, 256, 1023, 1024, 4095, 65535, 65536,
        2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53, 2**63 - 1, 50_000_000]
FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-38, 1e-45, 1e-30, 1e30, 3.4e38, 1.0, 0.5, 2.0, -1e-5]
RANGES = {ge.U8: (0, 255), ge.I8: (-128, 127), ge.U16: (0, 65535), ge.I16: (-32768, 32767), ge.U32: (0, 2**32 - 1),
          ge.I32: (-2**31, 2**31 - 1), ge.U64: (0, 2**64 - 1), ge.I64: (-2**63, 2**63 - 1)}
SCALARS = list(RANGES) + [ge.F32, ge.F64, ge.BOOL, ge.STRING]


def rand_bytes(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.3:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))   # mostly invalid UTF-8
    if pick < 0.45:
        return b""
    if pick < 0.55:
        return b"A" * rng.choice([1000, 100_000])
    return rng.choice([b"llama", b"qwen2", b"gpt2", b"smollm", b"linear", b"llama3", b"yarn", b"none", b"bert",
                       b"\xff\xfe", b"caf\xc3", b"\xed\xa0\x80", b"{{ messages }}", b"{% for %}"])


def rand_value(rng: random.Random, typ: int, old=None):
    if typ in RANGES:
        lo, hi = RANGES[typ]
        cands = [v for v in INTS if lo <= v <= hi] + [lo, hi]
        if isinstance(old, int) and rng.random() < 0.3:
            cands += [v for v in (old + 1, old - 1, old * 2, old // 2, old ^ 1) if lo <= v <= hi]
        return rng.choice(cands)
    if typ == ge.F32:
        v = rng.choice(FLOATS)
        return v if not math.isfinite(v) or abs(v) < 3.4e38 else 3.4e38
    if typ == ge.F64:
        return rng.choice(FLOATS + [1e300, -1e300])
    if typ == ge.BOOL:
        return rng.random() < 0.5
    if typ == ge.STRING:
        return rand_bytes(rng)
    et = rng.choice(SCALARS)
    return (et, [rand_value(rng, et) for _ in range(rng.randrange(0, 5))])


def m_kv_value(g, rng):
    kv = rng.choice(g.kvs)
    if kv[1] == ge.ARRAY:
        et, items = kv[2]
        if not items:
            return "kv-array-empty"
        items = list(items)
        i = rng.randrange(len(items))
        items[i] = rand_value(rng, et, items[i])
        kv[2] = (et, items)
        return "kv-array-item"
    kv[2] = rand_value(rng, kv[1], kv[2])
    return "kv-value"


def m_kv_type(g, rng):
    kv = rng.choice(g.kvs)
    typ = rng.choice(SCALARS + [ge.ARRAY])
    kv[1], kv[2] = typ, rand_value(rng, typ)
    return "kv-type"


def m_kv_drop(g, rng):
    g.kvs.pop(rng.randrange(len(g.kvs)))
    return "kv-drop"


def m_kv_dup(g, rng):
    g.kvs.append(list(rng.choice(g.kvs)))
    return "kv-dup"


def m_array_len(g, rng):
    arrays = [kv for kv in g.kvs if kv[1] == ge.ARRAY]
    if not arrays:
        return m_kv_value(g, rng)
    kv = rng.choice(arrays)
    et, items = kv[2]
    n = len(items)
    new_n = rng.choice([0, 1, n // 2, max(n - 1, 0), n + 1, n + 7])
    items = list(items[:new_n]) + [rand_value(rng, et) for _ in range(max(0, new_n - n))]
    kv[2] = (et, items)
    return "array-len"


def m_arch_key(g, rng):
    # The keys the graph reads, with values chosen to hit the loader's checks.
    try:   # an earlier mutation of the same case may have dropped or retyped it
        arch = g.get("general.architecture").decode(errors="replace")
    except (KeyError, AttributeError):
        arch = "llama"
    key = rng.choice(["context_length", "embedding_length", "block_count", "feed_forward_length",
                      "attention.head_count", "attention.head_count_kv", "attention.key_length",
                      "attention.value_length", "rope.dimension_count", "attention.layer_norm_rms_epsilon",
                      "rope.freq_base", "rope.scaling.type", "rope.scaling.factor",
                      "rope.scaling.original_context_length"])
    full = f"{arch}.{key}"
    if key in ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor"):
        typ = rng.choice([ge.F32, ge.F32, ge.F64, ge.U32])
    elif key == "rope.scaling.type":
        typ = ge.STRING
    else:
        typ = rng.choice([ge.U32, ge.U32, ge.I32, ge.U64, ge.I64, ge.F32])
    g.set(full, typ, rand_value(rng, typ))
    return "arch-key"


def m_tensor_type(g, rng):
    t = rng.choice(g.tensors)
    t.type = rng.choice([0, 1, 2, 3, 6, 7, 8, 10, 12, 14, 16, 24, 25, 26, 27, 28, 29, 30, 39, 40, 41, 100, 2**31])
    return "tensor-type"


def m_tensor_dims(g, rng):
    t = rng.choice(g.tensors)
    d = list(t.dims)
    pick = rng.random()
    if pick < 0.4:
        i = rng.randrange(len(d))
        d[i] = rng.choice([0, 1, 2, d[i] * 2, d[i] // 2, d[i] + 1, 2**31, 2**32, 2**62])
    elif pick < 0.6:
        d = d[::-1]
    elif pick < 0.8:
        d = d + [rng.choice([1, 2, 3])]
    else:
        d = d[:-1] or [0]
    t.dims = d
    return "tensor-dims"


def m_tensor_offset(g, rng):
    t = rng.choice(g.tensors)
    t.offset = rng.choice([0, t.offset + 32, max(t.offset - 32, 0), t.offset + 1, 2**40, 2**64 - 32])
    return "tensor-offset"


def m_tensor_drop(g, rng):
    g.tensors.pop(rng.randrange(len(g.tensors)))
    return "tensor-drop"


def m_tensor_rename(g, rng):
    t = rng.choice(g.tensors)
    t.name = rng.choice([rng.choice(g.tensors).name, t.name + b"x", b"", t.name.replace(b"blk.0", b"blk.99"),
                         bytes(rng.randrange(256) for _ in range(8))])
    return "tensor-rename"


STRUCTURED = [m_kv_value, m_kv_value, m_kv_type, m_kv_drop, m_kv_dup, m_array_len, m_arch_key, m_arch_key,
              m_arch_key, m_tensor_type, m_tensor_type, m_tensor_dims, m_tensor_dims, m_tensor_offset,
              m_tensor_drop, m_tensor_rename]


def raw_mutation(data: bytes, header_len: int, rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    pick = rng.random()
    if pick < 0.3:
        cut = rng.choice([rng.randrange(0, header_len + 1), rng.randrange(0, len(b)), len(b) - rng.randrange(1, 64)])
        return bytes(b[:max(cut, 0)]), "truncate"
    if pick < 0.45:   # n_tensors / n_kv / version
        off = rng.choice([4, 8, 16])
        fmt = "<I" if off == 4 else "<Q"
        struct.pack_into(fmt, b, off, rng.choice([0, 1, 2, 3, 255, 2**31 - 1, 2**32 - 1] +
                                                 ([2**40, 2**63, 2**64 - 1] if fmt == "<Q" else [])))
        return bytes(b), "header-count"
    if pick < 0.85:
        for _ in range(rng.randrange(1, 9)):
            i = rng.randrange(24, header_len)
            b[i] = rng.choice([0x00, 0xFF, 0x7F, 0x80, b[i] ^ (1 << rng.randrange(8)), rng.randrange(256)])
        return bytes(b), "header-bytes"
    for _ in range(rng.randrange(1, 64)):
        i = rng.randrange(header_len, len(b))
        b[i] = rng.randrange(256)
    return bytes(b), "data-bytes"


def mutate(seed: bytes, parsed: ge.Gguf, rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.65:
        g = ge.Gguf(parsed.version, [list(kv) for kv in parsed.kvs],
                    [ge.Tensor(t.name, list(t.dims), t.type, t.offset) for t in parsed.tensors],
                    parsed.alignment, parsed.data)
        try:
            # Stacked edits may leave nothing to pick from (every key or tensor dropped).
            names = [rng.choice(STRUCTURED)(g, rng) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
            return ge.serialize(g), "+".join(names)
        except (IndexError, struct.error, OverflowError):
            pass   # nothing left to edit, or a value the editor cannot write: a raw mutation instead
    return raw_mutation(seed, len(ge.header(parsed)), rng)


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def make_seeds(tmp: Path, smollm2: str) -> list[tuple[str, bytes]]:
    from gguf_factory import TinySpec, write_tiny_gguf

    specs = {"tiny-llama-f32": TinySpec(), "tiny-qwen2-q8_0": TinySpec(arch="qwen2", wtype="Q8_0", n_head_kv=1),
             "tiny-llama-q4_0-tied": TinySpec(wtype="Q4_0", tied=True), "tiny-llama-f16": TinySpec(wtype="F16", seed=3)}
    seeds = []
    for name, spec in specs.items():
        p = tmp / f"{name}.gguf"
        write_tiny_gguf(p, spec)
        seeds.append((name, p.read_bytes()))
    if smollm2 != "none":
        path = smollm2
        if smollm2 == "auto":
            import pyobcache

            cached = pyobcache.cached_path("smollm2-135m")
            path = str(cached) if cached else ""
        if path:
            seeds.append(("smollm2-135m", Path(path).read_bytes()))
    return seeds


def normalise(msg: str) -> str:
    """An error message as a class: file names, quoted values and numbers masked."""
    msg = re.sub(r"cannot load model '[^']*': ", "", msg)
    msg = re.sub(r"'[^']*'", "'_'", msg)
    msg = re.sub(r"(?<![\w.])-?\d+(\.\d+)?(e[-+]?\d+)?(?![\w])", "N", msg)
    return msg[:110]


class Worker:
    def __init__(self):
        self.p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.file = None
        self.t0 = 0.0
        self.timeout = 0.0

    def submit(self, path: str, timeout: float) -> None:
        self.file, self.t0, self.timeout = path, time.monotonic(), timeout
        self.p.stdin.write(path + "\n")
        self.p.stdin.flush()

    def kill(self) -> None:
        try:
            self.p.kill()
        except ProcessLookupError:
            pass
        self.p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="files to try")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per tiny file before it counts as a hang")
    ap.add_argument("--timeout-real", type=float, default=120.0, help="the same for SmolLM2 mutants")
    ap.add_argument("--smollm2", default="auto", help="path, 'auto' (the registry cache) or 'none'")
    ap.add_argument("--real-share", type=float, default=0.05, help="fraction of cases mutating SmolLM2")
    ap.add_argument("--out", default=None, help="folder for summary.json and crashers/ (default: a temp folder)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker()
        return 0

    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="fuzz_gguf_"))
    (out / "crashers").mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="fuzz_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    t_start = time.monotonic()
    try:
        seeds = make_seeds(scratch, a.smollm2)
        parsed = {name: ge.parse(data) for name, data in seeds}
        tiny = [s for s in seeds if s[0] != "smollm2-135m"]
        real = [s for s in seeds if s[0] == "smollm2-135m"]
        rng = random.Random(a.seed)
        outcomes, classes, by_mutation = Counter(), Counter(), Counter()
        findings = []
        workers = [Worker() for _ in range(a.jobs)]
        todo = list(range(a.n))
        busy = {}   # worker -> (case index, seed name, mutation)

        def record(w, case, seed_name, mutation, outcome, detail):
            outcomes[outcome] += 1
            by_mutation[(mutation.split("+")[0], outcome)] += 1
            if outcome == "error":
                classes[normalise(detail)] += 1
            if outcome in ("crash", "hang", "oom"):
                keep = out / "crashers" / f"{case:05d}-{outcome}-{seed_name}.gguf"
                shutil.copy(w.file, keep)
                keep.with_suffix(".txt").write_text(f"{outcome}: {detail}\nmutation: {mutation}\n")
                findings.append({"case": case, "outcome": outcome, "detail": detail, "mutation": mutation,
                                 "file": str(keep)})
            os.unlink(w.file)

        def write_summary(final: bool) -> dict:
            # Rewritten every 250 files, so that a long run stopped early still has its counts.
            summary = {
                "command": " ".join([Path(sys.executable).name] + sys.argv), "finished": final,
                "files": sum(outcomes.values()), "seed": a.seed, "seeds": [s[0] for s in seeds],
                "wall_s": round(time.monotonic() - t_start, 1), "outcomes": dict(outcomes),
                "error_classes": dict(classes.most_common()),
                "by_mutation": {f"{m} -> {o}": n for (m, o), n in sorted(by_mutation.items())}, "findings": findings,
            }
            (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            return summary

        last_written = 0
        while todo or busy:
            n_done = sum(outcomes.values())
            if n_done >= last_written + 250:
                write_summary(False)
                last_written = n_done
            for w in workers:
                if w not in busy and todo:
                    case = todo.pop(0)
                    use_real = real and rng.random() < a.real_share
                    name, data = rng.choice(real if use_real else tiny)
                    blob, mutation = mutate(data, parsed[name], rng)
                    path = scratch / f"case{case:05d}.gguf"
                    path.write_bytes(blob)
                    w.submit(str(path), a.timeout_real if use_real else a.timeout)
                    busy[w] = (case, name, mutation)
            ready, _, _ = select.select([w.p.stdout for w in busy], [], [], 0.5)
            for w in list(busy):
                case, name, mutation = busy[w]
                if w.p.stdout in ready:
                    line = w.p.stdout.readline()
                    if line:
                        outcome, detail = json.loads(line)
                        record(w, case, name, mutation, outcome, detail)
                        del busy[w]
                        continue
                    rc = w.p.wait()
                    record(w, case, name, mutation, "crash", f"worker died with {rc} (signal {-rc})" if rc < 0 else
                           f"worker exited with {rc}")
                elif time.monotonic() - w.t0 > w.timeout:
                    w.kill()
                    record(w, case, name, mutation, "hang", f"no answer in {w.timeout:.0f} s")
                else:
                    continue
                del busy[w]
                workers[workers.index(w)] = Worker()
        for w in workers:
            w.p.stdin.close()
            w.p.wait()
        summary = write_summary(True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"{a.n} files in {summary['wall_s']} s (seeds: {', '.join(summary['seeds'])})")
    for k in ("loaded", "error", "crash", "hang", "oom"):
        print(f"  {k:8s} {outcomes.get(k, 0)}")
    print("clean errors by class:")
    for msg, n in classes.most_common():
        print(f"  {n:6d}  {msg}")
    for f in findings:
        print(f"FINDING {f['outcome']}: case {f['case']} ({f['mutation']}): {f['detail']} -> {f['file']}")
    print(f"summary: {out / 'summary.json'}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
