"""CPU threads: the options are checked at the door, the mask bounds the pool, and adaptive
threads give up the CPUs that other processes keep busy."""

import os
import subprocess
import sys
import time
import warnings

import pytest

import pyobcache
from pyobcache import _core


@pytest.mark.parametrize("kw, msg", [
    (dict(poll=101), r"poll must be in \[0, 100\]"),
    (dict(poll=-1), r"poll must be in \[0, 100\]"),
    (dict(prio=4), "prio must be -1"),
    (dict(prio=-2), "prio must be -1"),
    (dict(cpu_mask="0xg1"), "cpu_mask must be a hex mask"),
    (dict(cpu_mask=""), None),
    (dict(cpu_mask="0x0"), "names no CPU"),
    (dict(cpu_mask="0x" + "f" * 200), "at most"),
    (dict(cpu_strict=True), "cpu_strict needs a cpu_mask"),
])
def test_thread_options_checked_before_loading(kw, msg):
    # A path that does not exist: the thread options are refused first, by name.
    if msg is None:
        with pytest.raises(FileNotFoundError):
            pyobcache.Model("/no/such/model.gguf", **kw)
        return
    with pytest.raises(ValueError, match=msg):
        pyobcache.Model("/no/such/model.gguf", **kw)


def test_cpu_mask_outside_affinity_refused():
    cpu = max(os.sched_getaffinity(0)) + 1
    if cpu >= 512:
        pytest.skip("no CPU id left below ggml's 512 to name")
    with pytest.raises(ValueError, match="may not run on"):
        pyobcache.Model("/no/such/model.gguf", cpu_mask=hex(1 << cpu))


ONE_CPU = hex(1 << min(os.sched_getaffinity(0)))   # a mask of one CPU this process may run on


def test_default_thread_count_bounds():
    hw = _core.hardware_thread_count()
    assert 1 <= _core.default_thread_count() <= hw
    assert _core.resolve_thread_count(_core.ThreadParams()) == _core.default_thread_count()
    assert _core.resolve_thread_count(_core.ThreadParams(n_threads=hw + 5)) == hw
    assert _core.resolve_thread_count(_core.ThreadParams(n_threads=8, cpu_mask=ONE_CPU)) == 1


def test_cpu_mask_bounds_threads_and_generates(smollm2_path, smollm2):
    mask, policy = os.sched_getaffinity(0), os.sched_getscheduler(0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = pyobcache.Model(smollm2_path, n_ctx=256, n_threads=2, cpu_mask=ONE_CPU, flash_attn=False)
    assert m.n_threads == 1
    assert _core.hardware_thread_count() < 2 or any("cpu_mask" in str(x.message) for x in w)
    ref = smollm2.generate("The capital of France is", max_new_tokens=8, temperature=0)
    assert m.generate("The capital of France is", max_new_tokens=8, temperature=0) == ref
    assert m._session.n_threads == 1 and m._session.n_threads_last == 1
    assert _core.threads_in_use() == 0
    low = pyobcache.Model(smollm2_path, n_ctx=256, n_threads=1, prio=-1, flash_attn=False)
    assert low.generate("The capital of France is", max_new_tokens=8, temperature=0) == ref
    # The pool's mask and priority hold for its graphs only: the caller's thread is as it was.
    assert os.sched_getaffinity(0) == mask and os.sched_getscheduler(0) == policy


def _last_threads_after(m, seconds):
    """Generates for `seconds` (several load windows), then the thread count of the last graph."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        m.generate("the cat sat on", max_new_tokens=8, temperature=0)
    return m._session.n_threads_last


@pytest.fixture
def busy_cpus():
    """One busy loop per CPU of this process, for the length of a test."""
    n = _core.hardware_thread_count()
    procs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]
    time.sleep(0.5)
    yield n
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


@pytest.mark.skipif(_core.hardware_thread_count() < 2, reason="needs 2 CPUs")
def test_adaptive_threads_give_way_to_busy_cpus(smollm2_path, busy_cpus):
    adaptive = pyobcache.Model(smollm2_path, n_ctx=256, n_threads=2)
    pinned = pyobcache.Model(smollm2_path, n_ctx=256, n_threads=2, adaptive_threads=False)
    ref = pinned.generate("the cat sat on", max_new_tokens=8, temperature=0)
    # Every CPU runs a busy loop: the adaptive pool keeps one thread, the pinned one all of its.
    assert _last_threads_after(adaptive, 1.5) == 1
    assert _last_threads_after(pinned, 0.5) == 2
    # The thread count does not change what is computed.
    assert adaptive.generate("the cat sat on", max_new_tokens=8, temperature=0) == ref
    assert _core.threads_in_use() == 0


def test_cli_thread_flags(smollm2_path):
    r = subprocess.run([sys.executable, "-m", "pyobcache", "-m", smollm2_path, "-p", "The capital of France is",
                        "-n", "4", "--temp", "0", "-t", "1", "--adaptive-threads", "0", "--poll", "50",
                        "--prio", "0", "-C", ONE_CPU], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    r = subprocess.run([sys.executable, "-m", "pyobcache", "-m", smollm2_path, "-p", "x", "--poll", "500"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "poll must be in [0, 100]" in r.stderr
