"""Loading GGUF files, and the errors bad ones give."""

import shutil

import pytest

import pyobcache
from gguf_factory import TinySpec, write_tiny_gguf


def test_good_tiny_file(tiny_model):
    path, _, spec = tiny_model(arch="qwen2", n_head=4, n_head_kv=1)
    m = pyobcache.Model(path, n_ctx=128, n_threads=1)
    hp = m.hparams
    assert (hp["arch"], hp["n_layer"], hp["n_head"], hp["n_head_kv"], hp["n_embd"]) == ("qwen2", 2, 4, 1, 64)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        pyobcache.Model(str(tmp_path / "nope.gguf"))


def test_wrong_magic(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(RuntimeError, match="bad magic"):
        pyobcache.Model(str(p))


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(RuntimeError, match="not a GGUF"):
        pyobcache.Model(str(p))


def test_truncated_tensor_data(tiny_model, tmp_path):
    path, _, _ = tiny_model()
    data = open(path, "rb").read()
    p = tmp_path / "trunc.gguf"
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(RuntimeError, match="truncated"):
        pyobcache.Model(str(p))


def test_truncated_header(tiny_model, tmp_path):
    path, _, _ = tiny_model()
    p = tmp_path / "trunc-header.gguf"
    p.write_bytes(open(path, "rb").read()[:300])
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        pyobcache.Model(str(p))


def test_truncated_real_model(smollm2_path, tmp_path):
    p = tmp_path / "smol-trunc.gguf"
    with open(smollm2_path, "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(50_000_000))
    with pytest.raises(RuntimeError, match="truncated"):
        pyobcache.Model(str(p))


def test_unsupported_arch(tmp_path):
    p = tmp_path / "gptneox.gguf"
    write_tiny_gguf(p, TinySpec(), arch_name="gptneox")
    with pytest.raises(RuntimeError, match="unsupported architecture 'gptneox'"):
        pyobcache.Model(str(p))


def test_unsupported_tokenizer(tmp_path):
    p = tmp_path / "tok.gguf"
    write_tiny_gguf(p, TinySpec(), tokenizer_model="bert")
    with pytest.raises(RuntimeError, match="tokenizer"):
        pyobcache.Model(str(p))


def test_unknown_pretokenizer(tmp_path):
    p = tmp_path / "pre.gguf"
    write_tiny_gguf(p, TinySpec(), pre="no-such-pre")
    with pytest.raises(RuntimeError, match="no-such-pre"):
        pyobcache.Model(str(p))


def test_missing_tensor(tmp_path):
    p = tmp_path / "missing.gguf"
    write_tiny_gguf(p, TinySpec(), drop=("blk.1.ffn_up.weight",))
    with pytest.raises(RuntimeError, match="missing tensor 'blk.1.ffn_up.weight'"):
        pyobcache.Model(str(p))


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(RuntimeError, match="not a regular file"):
        pyobcache.Model(str(tmp_path))


def test_registry_names():
    names = [m.name for m in pyobcache.list_models()]
    assert "smollm2-135m" in names and "qwen2.5-coder-1.5b" in names
    with pytest.raises(KeyError, match="unknown model"):
        pyobcache.fetch("no-such-model")


def test_registry_verifies_hash(tmp_path, monkeypatch, smollm2_path):
    # A cached file whose bytes differ from the pinned sha256 is not accepted.
    monkeypatch.setenv("PYOBCACHE_CACHE", str(tmp_path))
    src = pyobcache.REGISTRY["smollm2-135m"]
    bad = tmp_path / src.filename
    shutil.copyfile(smollm2_path, bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xff\xff\xff")
    assert pyobcache.cached_path("smollm2-135m") is None
    shutil.copyfile(smollm2_path, bad)
    assert pyobcache.cached_path("smollm2-135m") == bad
