"""Parity with llama.cpp's reference data (tests/data/llamacpp_reference.json, made with
llama-cpp-python 0.3.36 built natively without AMX, flash attention off, n_ctx 512)."""

import numpy as np
import pytest

import pyobcache

# llama.cpp's own logits move by up to 0.06 between its attention paths. SmolLM2 (Q4_1/Q8_0)
# matches it to the printed digit; Qwen's K-quant kernels differ by ISA (this wheel is AVX2,
# the reference build AVX-512), which moves its logits by up to ~0.16.
LOGIT_TOL = {"smollm2-135m": 0.1, "qwen2.5-coder-1.5b": 0.25}

MODELS = [
    pytest.param("smollm2-135m", id="smollm2"),
    pytest.param("qwen2.5-coder-1.5b", id="qwen2.5-coder", marks=pytest.mark.slow),
]

_loaded = {}


def _model(name, request):
    if name not in _loaded:
        if name == "smollm2-135m":
            path = request.getfixturevalue("smollm2_path")
        else:
            path = request.getfixturevalue("qwen_path")
        _loaded[name] = pyobcache.Model(path, n_ctx=512, n_threads=2, flash_attn=False)
    return _loaded[name]


@pytest.mark.parametrize("name", MODELS)
def test_tokenization(name, request, llamacpp_reference):
    ref = llamacpp_reference["models"][name]
    m = _model(name, request)
    for text, r in ref["tokenization"].items():
        assert m.tokenize(text, add_special=r["add_bos"]) == r["ids"], repr(text)
        assert m.detokenize(r["ids"]) == text
    for text, r in ref["tokenization_special"].items():
        assert m.tokenize(text, add_special=r["add_bos"], parse_special=True) == r["ids"], repr(text)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_and_logits(name, request, llamacpp_reference):
    ref = llamacpp_reference["models"][name]
    m = _model(name, request)
    for prompt, r in ref["prompts"].items():
        ids = m.tokenize(prompt)
        assert ids == r["prompt_ids"]
        logits = m.logits(ids)
        for tok, want in r["first_step_top5"]:
            assert abs(float(logits[tok]) - want) < LOGIT_TOL[name], (prompt, tok, want, float(logits[tok]))
        m.generate(ids, max_new_tokens=len(r["greedy_ids"]), temperature=0, ignore_eos=True)
        got, want = m.last_tokens, r["greedy_ids"]
        diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if diff is None:
            continue
        # A divergence is acceptable only at a near-tie: llama.cpp's own top-2 gap there is under
        # 0.1, or ours is within the logit tolerance. SmolLM2 must agree on the first 13 ids.
        row = m.logits(ids + got[:diff])
        top2 = np.sort(row)[-2:]
        ours, theirs = float(top2[1] - top2[0]), r["top2_gap"][diff]
        assert ours < LOGIT_TOL[name] or theirs < 0.1, (
            f"{prompt!r} step {diff}: {got[diff]} vs llama.cpp {want[diff]}, top-2 gaps ours {ours:.3f} theirs {theirs:.3f}")
        if name == "smollm2-135m":
            assert diff >= 13
