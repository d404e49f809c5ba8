"""pyobcache.Llama: llama_cpp.Llama's methods and response shapes, field by field."""

import importlib.util
import json
import subprocess
import sys

import pytest

import pyobcache
from pyobcache import KVConfig

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return pyobcache.Llama(smollm2_path, n_ctx=512, n_threads=2, verbose=False)


_REFERENCE_SCRIPT = r"""
import json, sys
import llama_cpp
path, requests = sys.argv[1], json.loads(sys.stdin.read())
llm = llama_cpp.Llama(path, n_ctx=512, n_threads=2, verbose=False, logits_all=True)
out = []
for method, kwargs, stream in requests:
    r = getattr(llm, method)(stream=stream, **kwargs)
    out.append(list(r) if stream else r)
print(json.dumps(out, default=float))
"""


@pytest.fixture(scope="module")
def reference(smollm2_path):
    """llama_cpp.Llama's answers to the same requests. It runs in a subprocess: llama_cpp links its
    own ggml, which cannot share a process with the ggml pyobcache loaded."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    reqs = [(m, kw, False) for m, kw in REQUESTS] + [(m, kw, True) for m, kw in STREAMED]
    p = subprocess.run([sys.executable, "-c", _REFERENCE_SCRIPT, smollm2_path], input=json.dumps(reqs),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    answers = json.loads(p.stdout.strip().splitlines()[-1])
    return {(m, json.dumps(kw, sort_keys=True), st): a for (m, kw, st), a in zip(reqs, answers)}


def _shape(x):
    """The keys and value types of a response, recursively (numbers as one type: llama_cpp
    returns numpy float32 logprobs)."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_shape(x[0])] if x else []
    if x is None:
        return None
    if isinstance(x, bool):
        return "bool"
    try:
        float(x)
        return "str" if isinstance(x, str) else "number"
    except (TypeError, ValueError):
        return type(x).__name__


def _covers(ours, theirs, path="response"):
    """Every key of theirs is in ours with the same shape (ours may add keys, e.g. KV bytes in usage)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), path
        for k, v in theirs.items():
            assert k in ours, f"{path}.{k} missing"
            _covers(ours[k], v, f"{path}.{k}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list), path
        if theirs and ours:
            _covers(ours[0], theirs[0], path + "[0]")
    elif theirs is not None and ours is not None:
        assert ours == theirs, f"{path}: {ours} vs {theirs}"


REQUESTS = [
    ("create_completion", dict(prompt=PROMPT, max_tokens=4, temperature=0)),
    ("create_completion", dict(prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)),
    ("create_completion", dict(prompt=PROMPT, max_tokens=3, temperature=0, stop=["."], echo=True)),
    ("create_chat_completion", dict(messages=CHAT, max_tokens=4, temperature=0)),
    ("create_chat_completion", dict(messages=CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)),
]


STREAMED = [REQUESTS[1], REQUESTS[3]]


@pytest.mark.parametrize("method,kwargs", REQUESTS)
def test_response_shapes_match_llama_cpp(llm, reference, method, kwargs):
    ours = getattr(llm, method)(**kwargs)
    theirs = reference[(method, json.dumps(kwargs, sort_keys=True), False)]
    _covers(_shape(ours), _shape(theirs))
    assert ours["object"] == theirs["object"]
    assert ours["id"].split("-")[0] == theirs["id"].split("-")[0]
    assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"]


@pytest.mark.parametrize("method,kwargs", STREAMED)
def test_stream_chunk_shapes_match_llama_cpp(llm, reference, method, kwargs):
    ours = list(getattr(llm, method)(stream=True, **kwargs))
    theirs = reference[(method, json.dumps(kwargs, sort_keys=True), True)]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        _covers(_shape(a), _shape(b))


def test_same_greedy_text_and_logprobs_as_llama_cpp(llm, reference):
    ours = llm(**REQUESTS[1][1])["choices"][0]
    theirs = reference[("create_completion", json.dumps(REQUESTS[1][1], sort_keys=True), False)]["choices"][0]
    assert ours["text"] == theirs["text"] == " Paris.\n"
    assert ours["logprobs"]["tokens"] == theirs["logprobs"]["tokens"]
    assert ours["logprobs"]["text_offset"] == theirs["logprobs"]["text_offset"]
    for a, b in zip(ours["logprobs"]["token_logprobs"], theirs["logprobs"]["token_logprobs"]):
        assert abs(a - float(b)) < 0.1


def test_completion_fields(llm):
    r = llm(PROMPT, max_tokens=3, temperature=0, logprobs=2)
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-") and isinstance(r["created"], int)
    c = r["choices"][0]
    assert c["text"] == " Paris.\n" and c["index"] == 0 and c["finish_reason"] == "length"
    lp = c["logprobs"]
    assert lp["tokens"] == [" Paris", ".", "\n"]
    assert lp["text_offset"] == [len(PROMPT), len(PROMPT) + 6, len(PROMPT) + 7]
    assert all(t in top for t, top in zip(lp["tokens"], lp["top_logprobs"]))
    assert all(v <= 0 for v in lp["token_logprobs"])
    u = r["usage"]
    assert u["prompt_tokens"] == 5 and u["completion_tokens"] == 3 and u["total_tokens"] == 8
    # A stop string ends the text before it, with finish_reason "stop".
    s = llm(PROMPT, max_tokens=8, temperature=0, stop=["."])["choices"][0]
    assert s["text"] == " Paris" and s["finish_reason"] == "stop"
    e = llm(PROMPT, max_tokens=2, temperature=0, echo=True)["choices"][0]
    assert e["text"].startswith(PROMPT + " Paris")


def test_chat_fields_and_stream(llm):
    r = llm.create_chat_completion(CHAT, max_tokens=4, temperature=0)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    msg = r["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"]
    chunks = list(llm.create_chat_completion(CHAT, max_tokens=4, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_tokenize_on_bytes_and_model_facts(llm):
    assert llm.tokenize(b"Hello world") == [19556, 905]
    assert llm.detokenize([19556, 905]) == b"Hello world"
    assert llm.n_ctx() == 512 and llm.n_vocab() == 49152
    with pytest.raises(TypeError):
        llm.tokenize("a str")


def test_kv_keyword_bounds_the_cache(llm):
    doc = " ".join(f"word{i}" for i in range(100))
    full = llm(doc, max_tokens=2, temperature=0)["usage"]
    kv = llm(doc, max_tokens=2, temperature=0, kv=KVConfig(method="snapkv", budget=32))["usage"]
    assert kv["kv_bytes_used"] < full["kv_bytes_used"] / 4


def test_unsupported_options_are_refused_not_ignored(llm, smollm2_path):
    with pytest.raises(ValueError, match="mirostat"):
        llm(PROMPT, max_tokens=2, mirostat_mode=2)
    with pytest.raises(ValueError, match="frequency_penalty"):
        llm.create_chat_completion(CHAT, max_tokens=2, frequency_penalty=0.5)
    with pytest.raises(ValueError, match="response_format"):
        llm.create_chat_completion(CHAT, max_tokens=2, response_format={"type": "json_object"})
    with pytest.raises(ValueError, match="rope_freq_base"):
        pyobcache.Llama(smollm2_path, rope_freq_base=1e6)
    with pytest.raises(ValueError, match="n_ctx|context window"):
        llm("word " * 600, max_tokens=2)


def test_prompt_cache_continues_a_chat_that_resends_its_history(smollm2_path):
    llm = pyobcache.Llama(smollm2_path, n_ctx=1024, n_threads=2, prompt_cache=1, flash_attn=False)
    plain = pyobcache.Llama(smollm2_path, n_ctx=1024, n_threads=2, flash_attn=False)
    messages = [{"role": "user", "content": "Name a fruit."}]
    r1 = llm.create_chat_completion(messages, max_tokens=12, temperature=0)
    assert r1["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    messages += [r1["choices"][0]["message"], {"role": "user", "content": "And a vegetable?"}]
    r2 = llm.create_chat_completion(messages, max_tokens=12, temperature=0)
    ref = plain.create_chat_completion(messages, max_tokens=12, temperature=0)
    assert r2["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
    # The whole first exchange came from the cache: its prompt and at least the reply's tokens.
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] >= r1["usage"]["total_tokens"] - 1
    # A prompt that does not extend the cached sequence starts afresh.
    r3 = llm.create_chat_completion([{"role": "user", "content": "Something else."}], max_tokens=4, temperature=0)
    assert r3["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # Off per request, and off by default as in llama-cpp-python.
    r4 = llm.create_chat_completion(messages, max_tokens=4, temperature=0, cache_prompt=False)
    assert r4["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert plain.create_chat_completion(messages, max_tokens=4, temperature=0)["usage"][
        "prompt_tokens_details"]["cached_tokens"] == 0
