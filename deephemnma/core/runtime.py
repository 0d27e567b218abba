"""Process-wide runtime settings: thread counts and determinism."""
from __future__ import annotations

import os
import sys

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def default_threads() -> int:
    """Threads granted by the scheduler (SLURM, Snakemake) or, failing that, usable cores."""
    for var in ("DEEPHEMNMA_THREADS", "SLURM_CPUS_PER_TASK"):
        if os.environ.get(var, "").isdigit():
            return max(1, int(os.environ[var]))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def set_threads(n: int | None) -> int:
    """Limit BLAS/OpenMP/torch threads to ``n`` (default: :func:`default_threads`)."""
    n = int(n) if n else default_threads()
    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(n)
    return n


def training_engine(engine: str, ranks: int) -> str:
    """The workflow's training engine: ``auto`` is ``single`` for one rank, else Horovod where
    ``horovod.torch`` is installed and torch DDP otherwise (no import of torch here)."""
    if engine != "auto":
        return engine
    if int(ranks) <= 1:
        return "single"
    import importlib.util

    try:
        found = importlib.util.find_spec("horovod.torch") is not None
    except (ImportError, ValueError):
        found = False
    return "horovod" if found else "ddp"
