"""Process-wide runtime settings: thread counts and determinism."""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def one_torch_thread():
    """Run the block with one torch thread (restored afterwards). Torch's elementwise maths
    (sin, cos, exp) and reductions give results that depend on how the work is split over
    threads; stages whose outputs must be the same bytes on any machine and thread count
    (simulate, preprocess, reconstruct on CPU) compute on one thread and get their
    parallelism from processes or from Snakemake's jobs."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


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
