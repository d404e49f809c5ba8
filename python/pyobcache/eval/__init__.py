"""Evaluation of KV eviction on real models: RULER-style synthetic tasks and fidelity on
natural text (perplexity, KL to the full cache), swept over methods x budgets x modes.

Run it from the command line (``python -m pyobcache eval --preset quick``) or from Python::

    from pyobcache.eval import SweepConfig, run_sweep, write_report
    run_sweep(SweepConfig(kind="fidelity", lengths=[4096], samples=5), "out/fid")
    write_report("out/fid")
"""

from .report import write_report
from .sweep import PAPER_METHODS, SweepConfig, run_sweep
from .tasks import TASKS, make_sample, score_all, score_part

__all__ = ["SweepConfig", "run_sweep", "write_report", "PAPER_METHODS", "TASKS", "make_sample", "score_all",
           "score_part"]
