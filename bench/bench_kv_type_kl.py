"""How far each KV cache type moves the next-token distributions from an f16 cache, for pyobcache and
llama.cpp on the same token ids: a quantization that breaks a model in both runtimes is the model's,
one that breaks only ours is a bug.

    python bench/bench_kv_type_kl.py -m qwen2.5-coder-1.5b --tokens 256 --llamacpp-python VENV/bin/python

For each K/V type pair: the mean KL (nats) from the f16 cache's distributions over every prompt
position, and the share of positions whose argmax stays. pyobcache runs with its default micro-batch
(the tiled attention path, over an f32 copy of quantized K and V) and with a 32-token one (quantized
rows read one query at a time), so a disagreement between its two attention paths shows too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import numpy as np

PAIRS = [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q4_0", "f16"), ("f16", "q4_0"), ("q8_0", "q4_0")]

# llama.cpp's side, run in the interpreter that has llama-cpp-python (which need not have pyobcache,
# hence its own log-softmax and KL, as pyobcache.eval.metrics computes them); one JSON line per pair.
LLAMACPP_CHILD = r"""
import json, sys
import numpy as np
import llama_cpp
cfg = json.loads(sys.argv[1])
ids = json.load(open(cfg["ids"]))
TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}
def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
def run(tk, tv):
    m = llama_cpp.Llama(cfg["model"], n_ctx=len(ids) + 16, n_batch=512, n_threads=cfg["threads"],
                        logits_all=True, flash_attn=True, type_k=TYPES[tk], type_v=TYPES[tv], verbose=False)
    m.eval(ids)
    return log_softmax(np.array(m.scores[: len(ids)], dtype=np.float64))
ref = run("f16", "f16")
np.save(cfg["ref_out"], ref)
for tk, tv in cfg["pairs"]:
    x = run(tk, tv)
    kl = float(np.maximum((np.exp(ref) * (ref - x)).sum(-1), 0.0).mean())
    print(json.dumps(dict(type_k=tk, type_v=tv, kl=kl, argmax=float((x.argmax(-1) == ref.argmax(-1)).mean()))),
          flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--llamacpp-python", help="interpreter with llama-cpp-python")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()

    import pyobcache
    from pyobcache import KVConfig
    from pyobcache.eval.haystack import load_corpus
    from pyobcache.eval.metrics import log_softmax, mean_kl

    probe = pyobcache.Model(a.model, n_ctx=a.tokens + 16)
    ids = probe.tokenize(" ".join(p.text for p in load_corpus()[:100]))[: a.tokens]

    def ours(n_batch: int, tk: str, tv: str) -> np.ndarray:
        m = pyobcache.Model(a.model, n_ctx=a.tokens + 16, n_batch=n_batch, n_threads=a.threads, flash_attn=True)
        return log_softmax(m.logits(ids, all_tokens=True, kv=KVConfig("full", type_k=tk, type_v=tv)))

    ref = ours(512, "f16", "f16")
    rows = []
    for tk, tv in PAIRS:
        for n_batch in (512, 32):
            x = ours(n_batch, tk, tv)
            rows.append(dict(runtime="pyobcache", n_batch=n_batch, type_k=tk, type_v=tv, kl=mean_kl(ref, x),
                             argmax=float((x.argmax(-1) == ref.argmax(-1)).mean())))
            print(json.dumps(rows[-1]), flush=True)
    between = None
    if a.llamacpp_python:
        with tempfile.TemporaryDirectory() as d:
            json.dump(ids, open(f"{d}/ids.json", "w"))
            cfg = dict(model=str(probe.path), ids=f"{d}/ids.json", threads=a.threads, pairs=PAIRS,
                       ref_out=f"{d}/ref.npy")
            r = subprocess.run([a.llamacpp_python, "-c", LLAMACPP_CHILD, json.dumps(cfg)], capture_output=True,
                               text=True)
            if r.returncode != 0:
                sys.exit(f"llama.cpp failed:\n{r.stderr}")
            for line in r.stdout.strip().splitlines():
                rows.append(dict(runtime="llama.cpp", **json.loads(line)))
                print(json.dumps(rows[-1]), flush=True)
            theirs = np.load(f"{d}/ref.npy")
            between = dict(kl=mean_kl(theirs, ref), argmax=float((theirs.argmax(-1) == ref.argmax(-1)).mean()))
            print("f16 cache, llama.cpp against pyobcache:", json.dumps(between), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(model=a.model, tokens=len(ids), threads=a.threads, f16_llamacpp_vs_pyobcache=between,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
