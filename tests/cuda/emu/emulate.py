#!/usr/bin/env python3
"""Build and run tests/cuda/test_obc_ops_cuda.cu on the CPU through cuda_emu.h (no GPU needed).

It rewrites ggml-ext/obc_ops_cuda.cu and the test into C++ (kernel launches become emu::launch,
dynamic shared memory emu::dyn_smem()), compiles them with the CPU op (the test's reference) and
runs the test's --quick shapes. It checks the kernels' indexing and arithmetic, and the placement of
barriers to a degree (cuda_emu.h says what it cannot check).

Usage: python3 tests/cuda/emu/emulate.py [--build-dir DIR] [--asan] [--jobs N] [-- test args...]
Needs g++ and the libggml package (pip install libggml-python) in the running Python.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)<<<(.*?)>>>\(")
DYN_SMEM = re.compile(r"extern __shared__ (\w+) (\w+)\[\];")


def to_cpp(src: str) -> str:
    src = src.replace("#include <cuda_runtime.h>", '#include "cuda_emu.h"')
    src = src.replace("#include <cuda_fp16.h>", '#include "cuda_emu.h"')
    src = DYN_SMEM.sub(r"\1 * \2 = reinterpret_cast<\1 *>(::emu::dyn_smem());", src)
    return LAUNCH.sub(r"::emu::launch(\1, \2, ", src)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", type=Path)
    ap.add_argument("--asan", action="store_true", help="build with AddressSanitizer")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("args", nargs="*", help="arguments of the test program (default: --quick)")
    a = ap.parse_args()

    import libggml  # the headers and libraries of the ggml the project builds against

    g = Path(libggml.__file__).parent
    libdirs = [d for d in (g / "lib64", g / "lib") if d.is_dir()]
    bd = a.build_dir or Path(tempfile.mkdtemp(prefix="obc-cuda-emu-"))
    bd.mkdir(parents=True, exist_ok=True)
    (bd / "cuda_emu.h").write_text((Path(__file__).parent / "cuda_emu.h").read_text())
    gen = {
        "obc_ops_cuda.cpp": ROOT / "ggml-ext" / "obc_ops_cuda.cu",
        "test_obc_ops_cuda.cpp": ROOT / "tests" / "cuda" / "test_obc_ops_cuda.cu",
    }
    for name, path in gen.items():
        (bd / name).write_text(f'#line 1 "{path}"\n' + to_cpp(path.read_text()))
    sources = [bd / n for n in gen] + [ROOT / "ggml-ext" / f for f in ("obc_ops_cpu.cpp", "obc_select_cpu.cpp", "obc_ops_ref.cpp")]

    flags = ["-std=c++17", "-O1", "-g", "-I", str(bd), "-I", str(ROOT / "ggml-ext"), "-I", str(g / "include")]
    if a.asan:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    objs = []
    procs = []
    for s in sources:
        o = bd / (s.stem + ".o")
        objs.append(o)
        if o.exists() and o.stat().st_mtime > s.stat().st_mtime and s.parent != bd:
            continue  # the CPU op rarely changes: reuse its object
        procs.append(subprocess.Popen(["g++", *flags, "-c", str(s), "-o", str(o)]))
        if len(procs) >= a.jobs:
            if procs.pop(0).wait() != 0:
                return 2
    if any(p.wait() != 0 for p in procs):
        return 2
    exe = bd / "test_obc_ops_cuda_emu"
    link = ["g++", *flags, *map(str, objs), "-o", str(exe)]
    for d in libdirs:
        link += ["-L", str(d), f"-Wl,-rpath,{d}"]
    link += ["-lggml", "-lggml-base", "-lggml-cpu", "-lpthread"]
    if subprocess.call(link) != 0:
        return 2
    env = dict(os.environ, ASAN_OPTIONS="detect_stack_use_after_return=0:detect_leaks=0")
    return subprocess.call([str(exe), *(a.args or ["--quick"])], env=env)


if __name__ == "__main__":
    sys.exit(main())
