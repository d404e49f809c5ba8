"""The OpenAI-compatible server, started as users start it and driven by the official openai client."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

KEY = "sk-test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pyobcache", "serve", "-m", smollm2_path, "--port", str(port),
                             "-t", "2", "-c", "2048", "--api-key", KEY, "--alias", "smollm2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("the server exited: " + proc.stdout.read())
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("the server did not start")
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    h = httpx.get(server + "/health").json()
    assert h["status"] == "ok" and h["slots_idle"] == 1


def test_completion(client):
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat(client):
    pieces, finish = [], None
    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Name three colours."}],
                                            max_tokens=24, temperature=0, stream=True)
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        c = chunk.choices[0]
        if c.delta.content:
            pieces.append(c.delta.content)
        finish = c.finish_reason or finish
    text = "".join(pieces)
    assert len(pieces) > 3 and text.strip()
    assert finish in ("stop", "length")
    # The same request without streaming gives the same text.
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Name three colours."}],
                                       max_tokens=24, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"


def test_kv_override_reports_bounded_bytes(client):
    doc = " ".join(f"The code for box {i} is {i * 7 % 100}." for i in range(60))
    messages = [{"role": "user", "content": doc + " What is the code for box 3?"}]
    full = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
    kv = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0,
                                        extra_body={"kv": {"method": "obc-k+snapkv", "budget": 64}})
    assert full.usage.prompt_tokens == kv.usage.prompt_tokens > 300
    assert kv.usage.kv_bytes_used < full.usage.kv_bytes_used / 3
    assert full.usage.kv_bytes_used == full.usage.kv_bytes_full


def test_a_chat_client_resending_its_history_runs_in_bounded_memory(client):
    kv = {"method": "obc-k+snapkv", "budget": 64, "evict": "decode"}
    messages, used, cached, prompt = [], [], [], []
    for topic in ("the sea", "trains", "bread", "owls", "rain", "maps"):
        messages.append({"role": "user", "content": f"Tell me one fact about {topic}."})
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                           extra_body={"kv": kv})
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        used.append(r.usage.kv_bytes_used)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        prompt.append(r.usage.prompt_tokens)
    assert cached[0] == 0 and all(c > 0 for c in cached[1:])      # each turn continued the last
    assert all(p - c < 60 for p, c in zip(prompt[1:], cached[1:]))  # and prefilled only its new tokens
    assert prompt[-1] > 3 * 64 and max(used) < r.usage.kv_bytes_full / 2


def test_bad_requests_get_openai_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[], max_tokens=4)
    assert "messages" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="kv"):
        client.completions.create(model="smollm2", prompt="hi", max_tokens=4,
                                  extra_body={"kv": {"method": "no-such-method", "budget": 8}})
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.completions.create(model="smollm2", prompt="hi", max_tokens=4, extra_body={"top_k": -3})
    with pytest.raises(openai.BadRequestError, match="n_ctx|context"):
        client.completions.create(model="smollm2", prompt="word " * 3000, max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "error" in r.json()


def test_disconnect_stops_the_generation(server):
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0.8, "seed": 1,
            "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server + "/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            n = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    json.loads(line[6:])
                    n += 1
                    if n == 5:
                        break
    # Generating the rest would take far longer than this: the slot frees because it stopped.
    deadline = time.time() + 15
    while time.time() < deadline:
        if httpx.get(server + "/health").json()["slots_processing"] == 0:
            break
        time.sleep(0.2)
    assert httpx.get(server + "/health").json()["slots_processing"] == 0


def test_tokenize_detokenize(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    toks = httpx.post(server + "/tokenize", json={"content": "Hello world"}, headers=headers).json()["tokens"]
    assert toks == [19556, 905]
    assert httpx.post(server + "/detokenize", json={"tokens": toks}, headers=headers).json()["content"] == "Hello world"
    assert httpx.post(server + "/detokenize", json={"tokens": [10**9]}, headers=headers).status_code == 400


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's socket table")
def test_server_binds_loopback_by_default(server):
    port = int(server.rsplit(":", 1)[1])
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    listening = [r[1] for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == port]
    assert listening == ["0100007F:%04X" % port]   # 127.0.0.1 only, not 0.0.0.0
