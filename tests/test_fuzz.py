"""A short seeded run of the GGUF fuzzer (tests/fuzz/fuzz_gguf.py): no mutated file may crash the
process, hang or exhaust memory. The long run's command and results are in tests/fuzz/README.md."""

import json
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).parent / "fuzz" / "fuzz_gguf.py"


def test_fuzz_short_run_has_no_crash_or_hang(tmp_path):
    # 300 files, 2% of them SmolLM2 mutants when the model is cached: about a minute on 2 cores.
    r = subprocess.run([sys.executable, str(FUZZ), "--n", "300", "--seed", "11", "--jobs", "2", "--real-share", "0.02",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text())
    out = summary["outcomes"]
    assert sum(out.values()) == 300, r.stdout + r.stderr
    assert out.get("crash", 0) == 0 and out.get("hang", 0) == 0 and out.get("oom", 0) == 0, r.stdout
    # The mutations must reach past the header: some files load and run, many fail in the loader's own checks.
    assert out.get("loaded", 0) > 10 and out.get("error", 0) > 100
    assert any("out of range" in c or "implies dimension" in c for c in summary["error_classes"])
    assert r.returncode == 0
