"""Writes tests/data/arch_reference.npz: llama.cpp's logits and greedy tokens on random-weight
Qwen3 and Llama 3.x GGUFs, for tests/test_arch_parity.py (which runs without llama.cpp).

    python tests/data/make_arch_reference.py      # needs llama-cpp-python (0.3.36) and SmolLM2 cached

No Qwen3 or Llama 3 GGUF is on the package index, so the models are random weights at real
shapes and small width (ARCH_SPECS), with SmolLM2-135M's vocabulary (49,152 tokens, its BPE merges)
under each architecture's pre-tokenizer name. The test writes the same files from the same seeds
and checks their sha256 against the ones recorded here before comparing.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gguf_factory import TinySpec, vocab_of, write_tiny_gguf  # noqa: E402

N_PROMPT, N_GREEDY = 64, 32

# Shapes in the proportions of the real models, at small width: Qwen3-0.6B (head_dim 128 with
# 16 heads of a 1024 embedding: head_dim != n_embd / n_head; q/k norms; rope base 1e6) and
# Llama 3.2-1B (GQA 4:1, rope base 500000 with the llama3 scaling of factor 32 as rope_freqs). Both
# real models tie their output to the embedding; these do not, because a random tied model only
# repeats its last token, which would make the greedy comparison empty.
ARCH_SPECS = {
    "qwen3": (TinySpec(arch="qwen3", n_embd=128, n_layer=4, n_head=4, n_head_kv=2, head_dim=64, n_ff=384,
                       n_ctx=40960, rope_base=1000000.0, eps=1e-6, tied=False, wtype="F16", seed=3), "qwen2"),
    "llama3": (TinySpec(arch="llama", n_embd=256, n_layer=4, n_head=4, n_head_kv=1, n_ff=512, n_ctx=131072,
                        rope_base=500000.0, eps=1e-5, tied=False, wtype="F16", seed=4, llama3_rope_factor=32.0),
               "llama-bpe"),
}


def write_model(name: str, vocab_source: str, out: Path) -> str:
    """Writes the random model `name`; returns its sha256."""
    spec, pre = ARCH_SPECS[name]
    write_tiny_gguf(out, spec, vocab=vocab_of(vocab_source, pre=pre))
    return hashlib.sha256(out.read_bytes()).hexdigest()


def prompt_ids(name: str, vocab_source: str) -> list:
    """N_PROMPT ordinary (non-control) token ids, from the architecture's own seed."""
    v = vocab_of(vocab_source)
    normal = [i for i, t in enumerate(v.types) if t == 1]
    rng = np.random.default_rng(100 + ARCH_SPECS[name][0].seed)
    return [int(x) for x in rng.choice(normal, N_PROMPT, replace=False)]


def main() -> int:
    import llama_cpp
    from llama_cpp import Llama

    smollm2 = Path.home() / ".cache" / "pyobcache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = {"llama_cpp_version": np.array(llama_cpp.__version__)}
    for name in ARCH_SPECS:
        path = HERE / f"_{name}.gguf"
        sha = write_model(name, str(smollm2), path)
        ids = prompt_ids(name, str(smollm2))
        llm = Llama(str(path), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2, logits_all=True,
                    flash_attn=False, verbose=False)
        llm.eval(ids)
        last = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
        greedy, gaps, row = [], [], last
        for _ in range(N_GREEDY):
            top2 = np.sort(row)[-2:]
            gaps.append(float(top2[1] - top2[0]))
            tok = int(np.argmax(row))
            greedy.append(tok)
            llm.eval([tok])
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        del llm
        path.unlink()
        spec, pre = ARCH_SPECS[name]
        out[f"{name}/spec"] = np.array(json.dumps({**asdict(spec), "pre": pre}))
        out[f"{name}/gguf_sha256"] = np.array(sha)
        out[f"{name}/prompt_ids"] = np.array(ids, dtype=np.int32)
        out[f"{name}/last_logits"] = last
        out[f"{name}/greedy_ids"] = np.array(greedy, dtype=np.int32)
        out[f"{name}/top2_gap"] = np.array(gaps, dtype=np.float32)
        print(name, sha[:12], "greedy", greedy[:8], "min gap", min(gaps))
    np.savez_compressed(HERE / "arch_reference.npz", **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
