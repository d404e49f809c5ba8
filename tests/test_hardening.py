"""Hostile input (issue 11): files, parameters, threads and signals that must give clear errors,
never a crash, silent garbage or a shell command."""

import math
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import pyobcache
from gguf_factory import TinySpec, write_tiny_gguf

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import gguf_edit as ge  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory):
    p = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(p, TinySpec(n_ctx=1024))
    return p.read_bytes()


@pytest.fixture(scope="module")
def tiny(tiny_bytes, tmp_path_factory):
    p = tmp_path_factory.mktemp("tinym") / "tiny.gguf"
    p.write_bytes(tiny_bytes)
    return pyobcache.Model(str(p), n_ctx=1024, n_threads=1)


def _edited(tmp_path, data, edit):
    g = ge.parse(data)
    edit(g)
    p = tmp_path / "edited.gguf"
    p.write_bytes(ge.serialize(g))
    return str(p)


# --- 1. loader: every value the graph needs is checked before anything is allocated ------------

A = "llama."
LOADER_CASES = [
    ("eps NaN", lambda g: g.set(A + "attention.layer_norm_rms_epsilon", ge.F32, math.nan), "layer_norm_rms_epsilon"),
    ("eps negative", lambda g: g.set(A + "attention.layer_norm_rms_epsilon", ge.F32, -1e-5), "layer_norm_rms_epsilon"),
    ("eps wrong type", lambda g: g.set(A + "attention.layer_norm_rms_epsilon", ge.STRING, b"x"), "expected a float"),
    ("rope odd", lambda g: g.set(A + "rope.dimension_count", ge.U32, 15), "odd"),
    ("rope > head_dim", lambda g: g.set(A + "rope.dimension_count", ge.U32, 32), "rope.dimension_count"),
    ("rope 2^31", lambda g: g.set(A + "rope.dimension_count", ge.U32, 2**31), "rope.dimension_count"),
    ("rope freq base 0", lambda g: g.set(A + "rope.freq_base", ge.F32, 0.0), "rope.freq_base"),
    ("heads 0", lambda g: g.set(A + "attention.head_count", ge.U32, 0), "attention.head_count"),
    ("heads not dividing", lambda g: g.set(A + "attention.head_count_kv", ge.U32, 3), "head counts"),
    ("head_dim huge", lambda g: g.set(A + "attention.key_length", ge.U32, 1 << 20), "key_length"),
    ("block_count 5e7", lambda g: g.set(A + "block_count", ge.U32, 50_000_000), "block_count"),
    ("context 2^40", lambda g: g.set(A + "context_length", ge.U64, 2**40), "context_length"),
    ("context negative", lambda g: g.set(A + "context_length", ge.I32, -4), "context_length"),
    ("name not UTF-8", lambda g: g.set("general.name", ge.STRING, b"bad \xff\xfe name"), "general.name"),
    ("template not UTF-8", lambda g: g.set("tokenizer.chat_template", ge.STRING, b"\xc3("), "chat_template"),
    ("arch not UTF-8", lambda g: g.set("general.architecture", ge.STRING, b"ll\xffama"), "architecture"),
    ("pre not UTF-8", lambda g: g.set("tokenizer.ggml.pre", ge.STRING, b"smol\xfflm"), "pre-tokenizer"),
    ("matrix F32 -> I32", lambda g: setattr(g.tensor("blk.0.attn_q.weight"), "type", 26), "type i32"),
    ("norm F32 -> I32", lambda g: setattr(g.tensor("blk.1.ffn_norm.weight"), "type", 26), "must be F32"),
    ("embedding F32 -> I32", lambda g: setattr(g.tensor("token_embd.weight"), "type", 26), "token_embd.weight"),
    ("matrix 3-D", lambda g: setattr(g.tensor("blk.0.attn_k.weight"), "dims", [64, 16, 2]), "blk.0.attn_k.weight"),
]


@pytest.mark.parametrize("what, edit, msg", LOADER_CASES, ids=[c[0] for c in LOADER_CASES])
def test_loader_rejects_bad_metadata(tiny_bytes, tmp_path, what, edit, msg):
    path = _edited(tmp_path, tiny_bytes, edit)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        pyobcache.Model(path, n_ctx=64, n_threads=1)
    assert "cannot load model" in str(e.value) and msg.lower() in str(e.value).lower(), str(e.value)
    assert time.monotonic() - t0 < 10   # refused up front, not after allocating by the bad value


def test_loader_edit_roundtrip_still_loads(tiny_bytes, tmp_path):
    # The editor itself must not break files: an edit to a harmless key still loads and runs.
    path = _edited(tmp_path, tiny_bytes, lambda g: g.set("general.name", ge.STRING, "ünïcode ok".encode()))
    m = pyobcache.Model(path, n_ctx=64, n_threads=1)
    assert m._m.name == "ünïcode ok"
    assert m.generate("the cat", max_new_tokens=2, temperature=0) is not None


# --- 2. threads: one Model from several threads gives the serial results ----------------------

def test_one_model_four_threads_equals_serial(tiny):
    prompts = ["the cat sat on the mat " * k for k in (3, 5, 7, 9)]
    kv = pyobcache.KVConfig(method="obc-vk", budget=20, evict="decode")
    serial = [(tiny.logits(p), tiny.generate(p, max_new_tokens=6, temperature=0, ignore_eos=True),
               tiny.generate(p, max_new_tokens=6, temperature=0, ignore_eos=True, kv=kv)) for p in prompts]
    results = [[None] * 4 for _ in range(3)]
    errors = []

    def work(i):
        try:
            for r in range(3):   # several rounds, so that the calls really overlap
                results[r][i] = (tiny.logits(prompts[i]),
                                 tiny.generate(prompts[i], max_new_tokens=6, temperature=0, ignore_eos=True),
                                 tiny.generate(prompts[i], max_new_tokens=6, temperature=0, ignore_eos=True, kv=kv))
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in range(3):
        for i in range(4):
            logits, text, text_kv = results[r][i]
            assert np.isfinite(logits).all()
            np.testing.assert_array_equal(logits, serial[i][0])
            assert text == serial[i][1] and text_kv == serial[i][2]


# --- 4. Ctrl-C reaches Python during a long prefill -------------------------------------------

INTERRUPT_CHILD = r"""
import sys, time, pyobcache
m = pyobcache.Model(sys.argv[1], n_ctx=8192, n_threads=1, flash_attn=False)
ids = m.tokenize("the cat sat on the mat " * 600)
kv = None if sys.argv[2] == "full" else pyobcache.KVConfig(method="obc-vk", budget=256, evict=sys.argv[2])
print("ready", flush=True)
t0 = time.monotonic()
try:
    m.logits(ids, kv=kv) if kv is None else m.generate(ids, max_new_tokens=4, kv=kv)
    print("finished", time.monotonic() - t0, flush=True)
except KeyboardInterrupt:
    print("interrupted", time.monotonic() - t0, flush=True)
"""


@pytest.fixture(scope="module")
def long_prefill_model(tmp_path_factory):
    # 7k tokens through 4 layers of width 256 take ~7 s on one thread: long enough to interrupt.
    p = tmp_path_factory.mktemp("long") / "long.gguf"
    write_tiny_gguf(p, TinySpec(n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=512, n_ctx=8192))
    return str(p)


def default_sigint():
    # A runner started in the background (nohup, `&` in a script) ignores SIGINT, and a Python
    # child then inherits that and installs no KeyboardInterrupt handler: give it the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_latency(cmd, wait_for, delay, **kw):
    """Starts cmd, waits until a stdout/stderr line contains wait_for, sleeps delay, sends SIGINT;
    returns (seconds from the signal to exit, returncode, stdout, stderr)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                         preexec_fn=default_sigint, **kw)
    stream = p.stderr if wait_for.startswith("stderr:") else p.stdout
    first = []
    while True:
        line = stream.readline()
        assert line, f"the child ended before '{wait_for}': {p.communicate()}"
        first.append(line)
        if wait_for.split(":", 1)[-1] in line:
            break
    time.sleep(delay)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    dt = time.monotonic() - t0
    rest = "".join(first)
    return dt, p.returncode, (rest + out) if stream is p.stdout else out, (rest + err) if stream is p.stderr else err


@pytest.mark.parametrize("mode", ["full", "chunked"])
def test_keyboard_interrupt_during_prefill(long_prefill_model, mode):
    dt, rc, out, err = interrupt_latency([sys.executable, "-c", INTERRUPT_CHILD, long_prefill_model, mode],
                                         "ready", 1.0)
    assert "interrupted" in out, out + err
    assert dt < 1.0, f"KeyboardInterrupt took {dt:.2f} s"


# --- 3/4. the CLI: no shell, Ctrl-C ----------------------------------------------------------

def cli():
    exe = Path(sys.executable).parent / "obcache-cli"
    return str(exe)


def test_cli_model_name_is_not_run_through_a_shell(tmp_path):
    evil = "x'; touch PWNED; echo '"
    r = subprocess.run([cli(), "-m", evil, "-p", "hi"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "is not a file" in r.stderr and "python -m pyobcache" in r.stderr
    assert not (tmp_path / "PWNED").exists()
    r = subprocess.run([cli(), "-m", "smollm2-135m", "-p", "hi"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "is not a file" in r.stderr and "--print-path" in r.stderr   # a registry name


def test_no_shell_anywhere_in_the_sources():
    # User text must never reach a shell: no popen/system in the engine, CLI, bindings or example.
    hits = []
    for d in ("cpp", "python", "examples", "ggml-ext"):
        for f in (ROOT / d).rglob("*"):
            if f.suffix in (".cpp", ".c", ".h", ".cu", ".py") and f.is_file():
                text = f.read_text(errors="replace")
                for bad in ("popen(", "system(", "shell=True", "os.system"):
                    if bad in text:
                        hits.append(f"{f.relative_to(ROOT)}: {bad}")
    assert not hits, hits


def test_cli_ctrl_c_during_prefill_prints_timings(long_prefill_model, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("the cat sat on the mat " * 600)
    cmd = [cli(), "-m", long_prefill_model, "-f", str(prompt), "-n", "8", "-c", "8192", "-t", "1", "-fa", "off"]
    dt, rc, out, err = interrupt_latency(cmd, "stderr:kv:", 1.0)
    assert rc == 130, err
    assert dt < 1.0, f"the CLI took {dt:.2f} s to stop"
    assert "prompt:" in err and "generation: 0 tokens" in err and "interrupted by the user" in err
    assert out.endswith("\n")   # the output is ended cleanly, not cut mid-line


def test_cli_ctrl_c_during_generation(long_prefill_model):
    cmd = [cli(), "-m", long_prefill_model, "-p", "the cat", "-n", "100000", "-c", "8192", "-t", "1",
           "--ignore-eos", "--temp", "0"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    time.sleep(3.0)   # load + a few hundred tokens
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    gen = [l for l in err.splitlines() if l.startswith("generation:")]
    assert gen and "finished by interrupt" in gen[0] and not gen[0].startswith("generation: 0 ")


# --- 5. parameters at the boundary -----------------------------------------------------------

@pytest.mark.parametrize("kw, exc, msg", [
    (dict(temperature=math.nan), ValueError, "temperature"),
    (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(top_p=math.nan), ValueError, "top_p"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(min_p=math.nan), ValueError, "min_p"),
    (dict(min_p=-math.inf), ValueError, "min_p"),
    (dict(repeat_penalty=math.nan), ValueError, "repeat_penalty"),
    (dict(repeat_penalty=math.inf), ValueError, "repeat_penalty"),
    (dict(top_k=-5), ValueError, "top_k"),
    (dict(top_k=10**12), ValueError, "top_k"),
    (dict(max_new_tokens=2**31), ValueError, "max_new_tokens"),
    (dict(repeat_last_n=-1), ValueError, "repeat_last_n"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(kv="obc-vk"), TypeError, "KVConfig"),
])
def test_generate_rejects_bad_parameters(tiny, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        tiny.generate("the cat", **{"max_new_tokens": 2, **kw})


def test_top_k_zero_is_off_and_nan_free_sampling_is_unchanged(tiny):
    a = tiny.generate("the cat", max_new_tokens=8, top_k=0, seed=3, ignore_eos=True)
    b = tiny.generate("the cat", max_new_tokens=8, top_k=0, seed=3, ignore_eos=True)
    assert a == b


def test_bytes_prompt_is_rejected(tiny):
    with pytest.raises(TypeError, match="bytes"):
        tiny.generate(b"the cat", max_new_tokens=2)
    with pytest.raises(TypeError, match="bytearray"):
        tiny.logits(bytearray(b"\x01\x02"))  # bytearray too
    with pytest.raises(TypeError, match="integer token ids"):
        tiny.logits([1.5, 2.0])


@pytest.mark.parametrize("kw, msg", [
    (dict(n_ctx=2**31), "n_ctx"), (dict(n_ctx=0), "n_ctx"), (dict(n_batch=2**40), "n_batch"),
    (dict(n_threads=0), "n_threads"), (dict(n_threads=2**31), "n_threads"),
])
def test_model_rejects_bad_sizes(tiny, kw, msg):
    with pytest.raises(ValueError, match=msg):
        pyobcache.Model(tiny.path, **kw)


def test_n_threads_clamped_to_hardware(tiny):
    hw = pyobcache._core.hardware_thread_count()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = pyobcache.Model(tiny.path, n_ctx=64, n_threads=1000)
    assert m.n_threads == hw and any("hardware threads" in str(x.message) for x in w)
    t0 = time.monotonic()
    m.generate("the cat", max_new_tokens=2, temperature=0)
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("kw, msg", [
    (dict(budget=10**10), "budget"), (dict(budget=64, n_recent=2**40), "n_recent"),
    (dict(budget=64, window=-5), "window"), (dict(budget=64, n_sink=-3), "n_sink"),
])
def test_kvconfig_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        pyobcache.KVConfig(method="obc-vk", **kw)


def test_kvconfig_is_frozen():
    kv = pyobcache.KVConfig(method="obc-vk", budget=64)
    with pytest.raises(AttributeError):
        kv.budget = 8
    k8 = kv.replace(budget=8, n_recent=4)
    assert "budget=8" in k8.describe() and "budget=64" in kv.describe()


def test_huge_budgets(tiny):
    ids = tiny.tokenize("the cat sat on the mat " * 40)
    ref = tiny.generate(ids, max_new_tokens=4, temperature=0, ignore_eos=True)
    # Decode mode with a budget near 2^31 overflowed int32 (capacity, compaction trigger).
    kv = pyobcache.KVConfig(method="obc-vk", budget=2**31 - 1, evict="decode")
    assert tiny.generate(ids, max_new_tokens=4, temperature=0, ignore_eos=True, kv=kv) == ref
    assert tiny.last_stats.evictions == 0
    with pytest.raises(ValueError, match="chunked eviction leaves no room"):
        tiny.generate(ids, max_new_tokens=4, kv=pyobcache.KVConfig(method="obc-vk", budget=10**9, evict="chunked"))


def test_select_keep_rejects_negative_counts():
    s = np.zeros(10, dtype=np.float32)
    with pytest.raises(ValueError, match="n_recent"):
        pyobcache._core.select_keep(s, 4, 0, -3, pyobcache._core.Pooling.none, 7)
    c = pyobcache._core.kv_config_for_method("obc-vk")
    c.budget, c.n_recent = 64, -7
    with pytest.raises(ValueError, match="n_recent"):
        pyobcache._core.finalize_kv_config(c)
