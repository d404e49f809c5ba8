"""The CUDA sources without a GPU: they must compile wherever nvcc exists (CI has no GPU, so this
is what stops a broken kernel from landing), and their kernels must compute the right results when
run on the CPU through the emulator in tests/cuda/emu. On a GPU machine the same checks run for real
in the test_obc_ops_cuda program (bench/gpu/run_h200.sh builds and runs it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = ["ggml-ext/obc_ops_cuda.cu", "tests/cuda/test_obc_ops_cuda.cu", "bench/gpu/bench_obc_ops_cuda.cu"]


def ggml_include() -> Path:
    libggml = pytest.importorskip("libggml")
    inc = Path(libggml.__file__).parent / "include"
    if not (inc / "ggml.h").is_file():
        pytest.skip(f"no ggml headers in {inc}")
    return inc


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("src", CUDA_SOURCES)
def test_cuda_source_compiles(src, tmp_path):
    out = tmp_path / (Path(src).stem + ".o")
    cmd = ["nvcc", "-arch=sm_90", "-O3", "-std=c++17", "-c", str(ROOT / src), "-I", str(ROOT / "ggml-ext"),
           "-I", str(ggml_include()), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    assert out.stat().st_size > 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_cuda_kernels_emulated(tmp_path):
    ggml_include()
    cmd = [sys.executable, str(ROOT / "tests" / "cuda" / "emu" / "emulate.py"), "--build-dir", str(tmp_path), "--jobs", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0 and " 0 failures" in r.stdout, f"{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
