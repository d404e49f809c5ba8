"""``python -m pyobcache eval``: run a sweep (or a preset), then write its tables and plots.

    python -m pyobcache eval --preset quick --out eval/results/quick
    python -m pyobcache eval --preset smollm2-fidelity --out eval/results/smollm2_fidelity
    python -m pyobcache eval ruler -m qwen2.5-coder-1.5b --lengths 4096 --budgets 5% 10% --samples 10 --out DIR
    python -m pyobcache eval report DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .sweep import PAPER_METHODS, SweepConfig

PRESETS = {
    # End to end in a few minutes on 2 cores with the 135M model.
    "quick": [
        SweepConfig(kind="ruler", model="smollm2-135m", tasks=["niah_single_number", "vt"], lengths=[1024],
                    samples=2, methods=["streamingllm", "h2o", "snapkv", "obc-vk", "obc-vk+snapkv"],
                    budgets=["10%", "20%"]),
        SweepConfig(kind="fidelity", model="smollm2-135m", lengths=[1024], samples=1, continuation=64,
                    methods=["streamingllm", "h2o", "snapkv", "obc-vk", "obc-vk+snapkv"], budgets=["10%", "20%"]),
    ],
    "smollm2-fidelity": [
        SweepConfig(kind="fidelity", model="smollm2-135m", lengths=[4096, 8192], samples=5,
                    methods=list(PAPER_METHODS), budgets=["2%", "5%", "10%", "20%", "50%"]),
    ],
    "qwen-ruler": [
        SweepConfig(kind="ruler", model="qwen2.5-coder-1.5b", lengths=[4096], samples=10,
                    tasks=["niah_single_number", "niah_single_uuid", "niah_multikey", "niah_multivalue", "vt"],
                    methods=list(PAPER_METHODS), budgets=["5%", "10%"]),
    ],
    # Bounded-memory prefill (chunked) and eviction while decoding against eviction after prefill.
    "modes": [
        SweepConfig(kind="fidelity", model="smollm2-135m", lengths=[4096], samples=2,
                    methods=["snapkv", "obc-vk", "obc-vk+snapkv"], budgets=["10%", "20%"],
                    modes=["prefill", "chunked", "decode"]),
    ],
}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pyobcache eval",
                                 description="Evaluate KV eviction methods: RULER-style tasks or fidelity (PPL, KL).")
    ap.add_argument("kind", nargs="?", choices=["ruler", "fidelity", "report"],
                    help="what to run (omit with --preset); 'report' rewrites the tables and plots of --out")
    ap.add_argument("report_dir", nargs="?", help="for 'report': the sweep folder")
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--out", type=Path, help="output folder (resumes what it already holds)")
    ap.add_argument("-m", "--model")
    ap.add_argument("--methods", nargs="+", help="eviction methods (default: the 12 paper methods + streamingllm)")
    ap.add_argument("--budgets", nargs="+", help="ratios such as 5%% or 0.05, or token counts such as 256")
    ap.add_argument("--modes", nargs="+", choices=["prefill", "chunked", "decode"])
    ap.add_argument("--lengths", nargs="+", type=int, help="prompt lengths in tokens")
    ap.add_argument("--tasks", nargs="+", help="RULER tasks")
    ap.add_argument("--samples", type=int, help="samples per task and length, or documents")
    ap.add_argument("--continuation", type=int, help="teacher-forced tokens (fidelity)")
    ap.add_argument("--n-recent", type=int, help="recent tokens always kept (-1: each method's default)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("-t", "--threads", type=int)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    from .report import write_report
    from .sweep import run_sweep

    try:
        if a.kind == "report":
            folder = Path(a.report_dir or a.out or "")
            write_report(folder)
            print((folder / "table.md").read_text())
            return 0
        if bool(a.preset) == bool(a.kind):
            print("error: give either a preset (--preset NAME) or what to run (ruler / fidelity)", file=sys.stderr)
            return 2
        configs = PRESETS[a.preset] if a.preset else [SweepConfig(kind=a.kind)]
        out = a.out or Path("eval/results") / (a.preset or a.kind)
        overrides = {k: getattr(a, k) for k in ("model", "methods", "budgets", "modes", "lengths", "tasks", "samples",
                                                "continuation", "n_recent", "seed", "threads")
                     if getattr(a, k) is not None}
        for cfg in configs:
            cfg = SweepConfig(**{**cfg.__dict__, **overrides})
            folder = out / cfg.kind if len(configs) > 1 else out
            run = run_sweep(cfg, folder, progress=not a.no_progress)
            write_report(folder)
            print(f"\n{cfg.kind} sweep of {cfg.model}: {run['this_invocation']['cells']} cells in "
                  f"{run['this_invocation']['wall_s']:.0f} s ({run['wall_s_total']:.0f} s in all) -> {folder}")
            print((folder / "table.md").read_text())
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
