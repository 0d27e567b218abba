"""Shared test fixtures.

``shared_data``: ../shared/data (reference files written by other cryo-EM software);
tests that need it skip with a stated reason where it is absent.
``run_cli``: run ``python -m deephemnma ...`` in a subprocess with this checkout first
on PYTHONPATH and return the CompletedProcess.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA_CANDIDATES = [
    Path(os.environ["DEEPHEMNMA_SHARED_DATA"]) if os.environ.get("DEEPHEMNMA_SHARED_DATA") else None,
    REPO.parent / "shared" / "data",
    Path("/work/shared/data"),
]


def find_shared_data() -> Path | None:
    for cand in SHARED_DATA_CANDIDATES:
        if cand is not None and (cand / "README.md").is_file():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = find_shared_data()
    if path is None:
        pytest.skip("reference data folder ../shared/data is absent (set DEEPHEMNMA_SHARED_DATA to point at it)")
    return path


@pytest.fixture(scope="session")
def peer_dir(shared_data) -> Path:
    return shared_data / "peer_cryodrgn"


@pytest.fixture(scope="session")
def ak_dir(shared_data) -> Path:
    return shared_data / "adenylate_kinase"


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("DEEPHEMNMA_THREADS", "1")
    return env


@pytest.fixture
def run_cli():
    def _run(*args, cwd=None, check=False, timeout=600):
        proc = subprocess.run(
            [sys.executable, "-m", "deephemnma", *map(str, args)],
            cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"deephemnma {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    return _run


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (use with ``pytestmark``): the timings and results of
    a one-core run, and no oversubscription."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
