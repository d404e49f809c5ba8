"""The native CLI installed with the wheel, `python -m pyobcache`, and the plain CMake build of the
engine library, CLI and C example (what a desktop app embedding the engine does)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli():
    exe = shutil.which("obcache-cli") or str(Path(sys.executable).parent / "obcache-cli")
    assert Path(exe).exists(), "obcache-cli is not installed next to this Python"
    return exe


def test_cli_generates_and_reports_timings(smollm2_path):
    r = subprocess.run([cli(), "-m", smollm2_path, "-p", "The capital of France is", "-n", "8", "--temp", "0", "-t", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris.")
    assert "prompt: 5 tokens" in r.stderr and "tokens/s" in r.stderr


def test_cli_eviction(smollm2_path, tmp_path):
    # The CLI takes paths only (registry names: python -m pyobcache; see test_hardening.py).
    prompt = tmp_path / "p.txt"
    prompt.write_text("The history of the region is long and varied. " * 40 + "The capital of France is")
    r = subprocess.run([cli(), "-m", smollm2_path, "-f", str(prompt), "-n", "4", "--temp", "0", "-t", "2",
                        "--kv-method", "obc-vk+snapkv", "--kv-budget", "64"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 evictions" in r.stderr


def test_a_budget_alone_evicts_with_the_default_method(smollm2_path, tmp_path):
    """--kv-budget without --kv-method uses the engine's default method (not a silent full cache),
    in both CLIs; the Python KVConfig() names the same one."""
    import pyobcache
    default = pyobcache.KVConfig(budget=64).method
    assert default == pyobcache._core.DEFAULT_KV_METHOD
    prompt = tmp_path / "p.txt"
    prompt.write_text("The history of the region is long and varied. " * 40 + "The capital of France is")
    for cmd in ([cli()], [sys.executable, "-m", "pyobcache"]):
        r = subprocess.run(cmd + ["-m", smollm2_path, "-f", str(prompt), "-n", "2", "--temp", "0", "-t", "2",
                                  "--kv-budget", "64"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert f"kv: {default} [" in r.stderr or f"{default} [" in r.stderr, r.stderr


def test_cli_until_context_full(smollm2_path):
    # -n -1 generates until EOS or a full context, and says which ended it.
    for cmd in ([cli(), "-m", smollm2_path], [sys.executable, "-m", "pyobcache", "-m", smollm2_path]):
        r = subprocess.run(cmd + ["-p", "The capital of France is", "-n", "-1", "-c", "24", "--temp", "0",
                                  "--ignore-eos"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "context is full" in r.stderr or "a full context" in r.stderr, r.stderr


@pytest.mark.parametrize("args, msg", [
    (["-p", "x"], "usage"),
    (["-m", "/no/such/model.gguf", "-p", "x"], "file not found"),
    (["-m", "MODEL", "-p", "x", "--bogus"], "unknown argument"),
    (["-m", "MODEL", "-p", "x", "-n", "abc"], "bad value"),
    (["-m", "MODEL", "-p", "x", "--kv-method", "nope", "--kv-budget", "8"], "unknown KV method"),
    (["-m", "MODEL", "-p", "x", "--kv-method", "obc-vk", "--kv-budget", "4"], "smaller than n_recent"),
    (["-m", "MODEL", "-p", "x " * 100, "-c", "16"], "more than the context size"),
    (["-m", "MODEL", "-p", "x", "--poll", "101"], "poll must be in [0, 100]"),
    (["-m", "MODEL", "-p", "x", "-C", "0xQ"], "cpu_mask must be a hex mask"),
    (["-m", "MODEL", "-p", "x", "--adaptive-threads", "2"], "takes 0 or 1"),
])
def test_cli_errors(smollm2_path, args, msg):
    args = [smollm2_path if a == "MODEL" else a for a in args]
    r = subprocess.run([cli()] + args, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert msg in (r.stderr + r.stdout)


def test_python_module_cli(smollm2_path):
    r = subprocess.run([sys.executable, "-m", "pyobcache", "-m", smollm2_path, "-p", "The capital of France is", "-n", "4",
                        "--temp", "0", "-t", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris.")
    r = subprocess.run([sys.executable, "-m", "pyobcache", "list"], capture_output=True, text=True, timeout=60)
    assert "smollm2-135m" in r.stdout and "obc-vk+snapkv" in r.stdout


def test_python_cli_prompt_from_stdin(smollm2_path):
    r = subprocess.run([sys.executable, "-m", "pyobcache", "-m", smollm2_path, "-f", "-", "-n", "4", "--temp", "0",
                        "-t", "2"], input="The capital of France is", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris.")


def test_python_cli_conversation_keeps_its_cache_and_survives_ctrl_c(smollm2_path):
    import signal
    import threading
    import time

    p = subprocess.Popen([sys.executable, "-m", "pyobcache", "-m", smollm2_path, "-cnv", "--kv-budget", "96",
                          "--kv-evict", "decode", "-n", "100", "--temp", "0", "-t", "2", "--ignore-eos"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as a terminal's child has it
    err_lines = []
    reader = threading.Thread(target=lambda: err_lines.extend(iter(p.stderr.readline, "")), daemon=True)
    reader.start()
    p.stdin.write("Write a very long story about a dragon.\n")
    p.stdin.flush()
    out = ""
    while len(out) < 40:           # the reply is streaming
        out += p.stdout.read(1)
    p.send_signal(signal.SIGINT)   # stops this reply, not the conversation
    deadline = time.time() + 60
    while not any("[turn 1:" in line for line in err_lines) and time.time() < deadline:
        time.sleep(0.1)
    assert any("reply interrupted" in line for line in err_lines), err_lines
    p.stdin.write("Thanks.\n/exit\n")
    p.stdin.close()
    p.stdout.read()                # the second reply (100 tokens: well within a pipe's buffer)
    assert p.wait(timeout=300) == 0
    reader.join(timeout=10)
    turns = [line for line in err_lines if line.startswith("[turn ")]
    assert len(turns) == 2, err_lines
    # The second turn appended to the same, bounded cache: positions grew, bytes stayed put.
    assert "MiB used of" in turns[1] and turns[0].split("of ")[1] == turns[1].split("of ")[1]


def test_plain_cmake_build_and_c_api(smollm2_path, tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH")
    import libggml

    prefix = Path(libggml.__file__).parent
    cfg_dir = next(p for p in (prefix / "lib64" / "cmake", prefix / "lib" / "cmake") if p.exists())
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), *gen, f"-DCMAKE_PREFIX_PATH={cfg_dir}"], check=True,
                   capture_output=True, timeout=300)
    r = subprocess.run([cmake, "--build", str(build), "-j", str(os.cpu_count() or 2)], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exe = build / "examples" / "simple"
    r = subprocess.run([str(exe), smollm2_path, "The capital of France is"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris.")
    assert "generated 64 tokens" in r.stderr
    r = subprocess.run([str(exe), str(tmp_path / "missing.gguf"), "hi"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "file not found" in r.stderr
    assert (build / "cpp" / "libobcache.so").exists() and (build / "cpp" / "obcache-cli").exists()
    # C API misuse (NULL, sizes, double free, freeing a model under a live context) gives errors,
    # and two contexts of one model in two threads give the serial results.
    r = subprocess.run([str(build / "cpp" / "test_c_api"), smollm2_path], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    r = subprocess.run([str(exe), smollm2_path, "The history of the region is long. " * 30,
                        "obc-vk+snapkv,budget=64,evict=decode"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "generated 64 tokens" in r.stderr, r.stderr
    used, allocated = (float(x) for x in r.stderr.split("KV cache ")[1].split(" MiB allocated")[0].split(" MiB used of "))
    positions = int(r.stderr.split(" positions")[0].split("; ")[-1])
    # SmolLM2 keeps 23,040 bytes a token: the full cache of the positions reached would be 7 MB.
    assert positions > 300 and used < allocated and used * 2**20 < 0.4 * positions * 23040, r.stderr
    r = subprocess.run([str(exe), smollm2_path, "hi", "snapkv,budget=64,colour=red"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "unknown KV option 'colour'" in r.stderr
    # examples/chat: 20 turns in one bounded conversation through the C API.
    questions = ["My locker code is 4719."] + [f"Tell me one short fact about {t}." for t in (
        "the sea", "mountains", "bread", "trains", "the moon", "rain", "bicycles", "tea", "owls", "winter", "maps",
        "clocks", "gardens", "rivers", "music", "books", "bridges", "snow")] + ["What is my locker code?"]
    r = subprocess.run([str(build / "examples" / "chat"), smollm2_path, "obc-k+snapkv", "256", "decode"],
                       input="\n".join(questions) + "\n", capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    turns = [line for line in r.stderr.splitlines() if line.startswith("[turn ")]
    assert len(turns) == 20
    used = [int(t.split("KV cache ")[1].split()[0]) for t in turns]
    allocated = {int(t.split("used of ")[1].split()[0]) for t in turns}
    positions = int(turns[-1].split(": ")[1].split()[0])
    # Well past what the cache holds (the replies' lengths vary with the thread count the machine's
    # load leaves: 750 to 956 positions measured), in one allocation.
    assert len(allocated) == 1 and positions > 2 * (256 + 32)
    per_token = 30 * 3 * 64 * 2 * 2   # SmolLM2: layers x KV heads x head_dim x (K, V) x f16
    assert max(used) <= (256 + 32 + 48 + 40) * per_token   # budget + slack + one turn


def test_cli_kv_spec_matches_flags(smollm2_path):
    # --kv SPEC and the --kv-* flags are read by the same engine function, in both CLIs.
    prompt = "the cat sat on the mat. " * 30
    lines = []
    for cmd in ([cli(), "-m", smollm2_path], [sys.executable, "-m", "pyobcache", "-m", smollm2_path]):
        for kv in (["--kv", "obc-vk+snapkv,budget=64,evict=chunked,group_pool=max"],
                   ["--kv-method", "obc-vk+snapkv", "--kv-budget", "64", "--kv-evict", "chunked", "--kv-group-pool", "max"],
                   ["--kv", "snapkv,budget=32", "--kv-method", "obc-vk+snapkv", "--kv-budget", "64",
                    "--kv-evict", "chunked", "--kv-group-pool", "max"]):   # the flags win over the spec
            r = subprocess.run(cmd + ["-p", prompt, "-n", "2", "--temp", "0"] + kv, capture_output=True, text=True,
                               timeout=120)
            assert r.returncode == 0, r.stderr
            lines.append(next(x for x in r.stderr.splitlines() if x.startswith("kv: ")).split("]")[0])
    assert len(set(lines)) == 1 and "budget=64" in lines[0] and "group_pool=max" in lines[0], lines


# What python -m pyobcache adds to obcache-cli's flags: a conversation mode, which renders the
# model's Jinja chat template (the C++ CLI has no template engine).
PYTHON_ONLY_FLAGS = {"--chat", "-cnv", "--conversation", "-i", "--interactive", "-sys", "--system-prompt"}


def _cpp_flags_and_defaults():
    import re

    text = subprocess.run([cli(), "--help"], capture_output=True, text=True, timeout=60).stdout
    flags, defaults = set(), {}
    for line in text.splitlines():
        m = re.match(r"\s+((?:-{1,2}[A-Za-z][A-Za-z0-9-]*)(?:, -{1,2}[A-Za-z][A-Za-z0-9-]*)*)(?:\s|$)", line)
        if not m:
            continue
        names = m.group(1).split(", ")
        flags.update(names)
        d = re.search(r"\(default (-?[0-9.]+)", line)
        if d:
            defaults[max(names, key=len)] = float(d.group(1))
    return flags, defaults


def test_both_clis_take_the_same_flags_with_the_same_defaults():
    from pyobcache.__main__ import _generate_parser

    cpp, cpp_defaults = _cpp_flags_and_defaults()
    parser = _generate_parser()
    py = {s for a in parser._actions for s in a.option_strings}
    cpp.discard("--gpu-layers")   # an older spelling of -ngl that obcache-cli still reads
    assert cpp - py == set(), "flags only obcache-cli has"
    assert py - cpp == PYTHON_ONLY_FLAGS, "flags only python -m pyobcache has"
    by_flag = {max(a.option_strings, key=len): a.default for a in parser._actions if a.option_strings}
    assert len(cpp_defaults) >= 10, cpp_defaults
    for flag, value in cpp_defaults.items():
        if by_flag[flag] is None:   # python -m pyobcache leaves it to the engine (the KV options)
            continue
        assert by_flag[flag] == pytest.approx(value), flag
