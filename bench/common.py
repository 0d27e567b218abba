"""Shared helpers of the benchmark scripts: machine description, peak memory, JSON output.

Every bench script writes ``bench/results/<name>.json`` with the machine, the date, the
command and its figures (``write_result``). Peak memory of a piece of work is measured in
a child process (``run_measured``) so that each figure is that work's own peak RSS.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["mem_total_gb"] = round(int(fh.readline().split()[1]) / 1024**2, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        info["loadavg_1min_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def write_result(name: str, figures: dict, notes: str = "") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    doc = {
        "name": name,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "figures": figures,
    }
    if notes:
        doc["notes"] = notes
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    tmp.replace(out)
    print(json.dumps(figures, indent=2))
    return out


def run_measured(code: str, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run Python ``code`` in a fresh interpreter; return wall seconds, peak RSS (MB), stdout.

    The child's last stdout line, if it is JSON, is parsed into ``result``.
    """
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"wall_s": wall, "stdout": proc.stdout}
    lines = [l for l in proc.stdout.strip().splitlines() if l.strip()]
    if lines:
        try:
            out["result"] = json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    # ru_maxrss of RUSAGE_CHILDREN is the max over all children so far; the child reports
    # its own peak instead when it prints {"peak_rss_mb": ...}.
    out["children_max_rss_mb"] = ru.ru_maxrss / 1024
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}
