"""Qwen3 and Llama 3.x against llama.cpp, on random-weight GGUFs at real shapes with SmolLM2's
vocabulary (tests/data/make_arch_reference.py wrote the reference with llama-cpp-python 0.3.36;
this test needs neither llama.cpp nor the real weights). Eviction runs on both as well."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pyobcache

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_arch_reference import ARCH_SPECS, N_GREEDY, write_model  # noqa: E402

REF = np.load(Path(__file__).parent / "data" / "arch_reference.npz")
# The same bound as the SmolLM2 reference test: llama.cpp's own logits move by up to 0.06
# between its attention paths, and its reference build is AVX-512 where this wheel is AVX2.
LOGIT_TOL = 0.1


@pytest.fixture(scope="module", params=list(ARCH_SPECS))
def arch_model(request, smollm2_path, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp(name) / f"{name}.gguf"
    sha = write_model(name, smollm2_path, path)
    # The file must be the one llama.cpp ran: same seeds, same writer, same vocabulary.
    assert sha == str(REF[f"{name}/gguf_sha256"]), "the random model differs from the reference's (gguf or numpy changed?)"
    return name, str(path)


def test_logits_match_llamacpp(arch_model):
    name, path = arch_model
    spec = json.loads(str(REF[f"{name}/spec"]))
    m = pyobcache.Model(path, n_ctx=512, n_threads=2, flash_attn=False)
    assert m.arch == spec["arch"] and m.hparams["head_dim"] == (spec["head_dim"] or spec["n_embd"] // spec["n_head"])
    ids = [int(x) for x in REF[f"{name}/prompt_ids"]]
    got = m.logits(ids)
    want = REF[f"{name}/last_logits"]
    assert got.shape == want.shape == (49152,)
    err = np.abs(got - want)
    assert err.max() < LOGIT_TOL, f"max |logit - llama.cpp| = {err.max():.4f} at token {int(err.argmax())}"
    assert int(np.argmax(got)) == int(np.argmax(want))


def test_greedy_matches_llamacpp(arch_model):
    name, path = arch_model
    m = pyobcache.Model(path, n_ctx=512, n_threads=2, flash_attn=False)
    ids = [int(x) for x in REF[f"{name}/prompt_ids"]]
    want, gaps = [int(x) for x in REF[f"{name}/greedy_ids"]], REF[f"{name}/top2_gap"]
    m.generate(ids, max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True)
    got = m.last_tokens
    diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if diff is None:
        assert got == want
        return
    # As in the SmolLM2 reference test: a divergence only at a near-tie of either engine.
    row = m.logits(ids + got[:diff])
    top2 = np.sort(row)[-2:]
    ours, theirs = float(top2[1] - top2[0]), float(gaps[diff])
    assert ours < LOGIT_TOL or theirs < 0.1, (
        f"step {diff}: {got[diff]} vs llama.cpp {want[diff]}, top-2 gaps ours {ours:.3f} theirs {theirs:.3f}")


@pytest.mark.parametrize("method", ["obc-vk+snapkv", "obc-k+snapkv", "snapkv", "h2o"])
def test_identity_budget_holds_everything(arch_model, method):
    # A budget that holds the whole sequence keeps every token: the full cache's greedy tokens.
    name, path = arch_model
    m = pyobcache.Model(path, n_ctx=512, n_threads=2)
    ids = [int(x) for x in REF[f"{name}/prompt_ids"]]
    full = m.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True)
    for evict in ("prefill", "chunked", "decode"):
        kv = pyobcache.KVConfig(method=method, budget=400, evict=evict)
        assert m.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True, kv=kv) == full, (method, evict)


def test_eviction_bounds_the_cache(arch_model):
    name, path = arch_model
    m = pyobcache.Model(path, n_ctx=512, n_threads=2)
    ids = [int(x) for x in REF[f"{name}/prompt_ids"]] * 4   # 256 tokens
    m.generate(ids, max_new_tokens=8, temperature=0, kv=pyobcache.KVConfig(method="obc-vk+snapkv", budget=64))
    s = m.last_stats
    # 64 kept after the prompt, then the generated tokens (the last one is never decoded).
    assert s.kept_per_layer == [64 + 7] * len(s.kept_per_layer) and s.kv_bytes_used < s.kv_bytes_full / 3


def test_snapshot_equals_fresh_prefill(arch_model):
    # The eval harness's one-prefill-per-prompt state, restored and evicted, is a fresh prefill's.
    name, path = arch_model
    m = pyobcache.Model(path, n_ctx=512, n_threads=2)
    ids = [int(x) for x in REF[f"{name}/prompt_ids"]] * 2
    kvs = [pyobcache.KVConfig(method=x, budget=32) for x in ("obc-vk+snapkv", "snapkv")]
    snap = m.snapshot(ids, kvs, max_new_tokens=8)
    for kv in kvs:
        snap.apply(kv)
        fresh = m.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True, kv=kv)
        assert m.detokenize(snap.greedy(8)) == fresh, kv.method


def test_cli_evicts_on_new_architectures(arch_model):
    name, path = arch_model
    cli = Path(sys.executable).parent / "obcache-cli"
    prompt = " ".join(["the cat sat on the mat"] * 30)
    r = subprocess.run([str(cli), "-m", path, "-p", prompt, "-n", "8", "--temp", "0", "--kv-method", "obc-vk+snapkv",
                        "--kv-budget", "64"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "evictions" in r.stderr and f"({ARCH_SPECS[name][0].arch}," in r.stderr, r.stderr


def test_unsupported_architectures_name_the_supported_ones(tmp_path):
    from gguf_factory import TinySpec, write_tiny_gguf

    for arch in ("qwen3moe", "gemma3", "phi3"):
        p = tmp_path / f"{arch}.gguf"
        write_tiny_gguf(p, TinySpec(), arch_name=arch)
        with pytest.raises(RuntimeError, match=f"unsupported architecture '{arch}' \\(supported: llama, qwen2, qwen3\\)"):
            pyobcache.Model(str(p))


# Llama 3.x-style template features (written for this test): the date line from strftime_now or
# date_string, and tools serialised with tojson.
LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ date_string }}\n"
    "{% if tools is not none %}{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}<|eot_id|>"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_llama3_template_date_and_tools(tmp_path):
    import datetime

    from gguf_factory import TinySpec, write_tiny_gguf

    p = tmp_path / "llama3-chat.gguf"
    write_tiny_gguf(p, TinySpec(llama3_rope_factor=8.0), chat_template=LLAMA3_STYLE_TEMPLATE)
    m = pyobcache.Model(str(p), n_ctx=256)
    msgs = [{"role": "user", "content": "hi"}]
    today = datetime.datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {today}\n" in m.apply_chat_template(msgs)
    text = m.apply_chat_template(msgs, date_string="26 Jul 2024", tools=[{"name": "get_weather", "note": "<b>é"}])
    assert "Today Date: 26 Jul 2024\n" in text and '{"name": "get_weather", "note": "<b>é"}' in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
