"""Tokenizer parity with llama.cpp on real Llama 3 and Qwen2 vocabularies (Qwen3 uses Qwen2's
pre-tokenizer): llama.cpp's own tokenizer test files, ggml-vocab-{llama-bpe,qwen2}.gguf with their
.inp/.out pairs (47 texts each: whitespace runs, digits, code, emoji, Cyrillic, CJK, ...). They are
taken from the llama-cpp-python 0.3.36 sdist on PyPI (vendor/llama.cpp/models/), downloaded once
into the cache, not copied into this repository; without the package index the test skips."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pyobcache import _core
from pyobcache.registry import cache_dir

SDIST = "llama-cpp-python==0.3.36"
VOCABS = ["llama-bpe", "qwen2"]
SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    root = cache_dir().parent / "vocab" / SDIST.replace("==", "-")
    want = [f"ggml-vocab-{v}.gguf{ext}" for v in VOCABS for ext in ("", ".inp", ".out")]
    if all((root / w).is_file() for w in want):
        return root
    tmp = tmp_path_factory.mktemp("sdist")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
                        str(tmp), SDIST], capture_output=True, text=True, timeout=600)
    sdists = list(tmp.glob("*.tar.gz"))
    if r.returncode != 0 or not sdists:
        pytest.skip(f"cannot download the {SDIST} sdist for its vocabulary files: {r.stderr.strip()[-200:]}")
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdists[0]) as tar:
        for member in tar:
            name = os.path.basename(member.name)
            if name in want and member.name.endswith("vendor/llama.cpp/models/" + name) and member.isfile():
                with tar.extractfile(member) as src:
                    (root / (name + ".part")).write_bytes(src.read())
                (root / (name + ".part")).replace(root / name)
    missing = [w for w in want if not (root / w).is_file()]
    assert not missing, f"the sdist lacks {missing}"
    return root


@pytest.mark.parametrize("vocab", VOCABS)
def test_tokenizer_matches_llamacpp_test_files(vocab_dir, vocab):
    v = _core.Vocab.load(str(vocab_dir / f"ggml-vocab-{vocab}.gguf"))
    assert v.pre == vocab
    texts = (vocab_dir / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)
    expected = (vocab_dir / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
    # Both files end with a separator: the last, empty entries pair up.
    assert len(texts) == len(expected) and len(texts) > 40
    bad = []
    for text, line in zip(texts[:-1], expected[:-1]):
        want = [int(x) for x in line.split()]
        got = v.tokenize(text, False, False)
        if got != want:
            bad.append((text, got, want))
    assert not bad, f"{len(bad)} of {len(texts) - 1} texts differ, first: {bad[0]!r}"
