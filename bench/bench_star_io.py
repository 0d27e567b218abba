"""STAR I/O at a million particles: starfile vs deephemnma.core.star (read, write, streaming).

Builds a realistic RELION 3.1 particle file (one optics group, 25 particle columns like
relion31.star: coordinates, micrograph and image names, CTF, angles, origins in Å, class
and subset numbers, ...), then measures each operation in a fresh child process (its wall
time and its own peak RSS), median of --repeats runs:

- read:   ``starfile.read(path)``  vs  ``deephemnma.core.star.read_star(path)``
- write:  ``starfile.write({optics, particles}, path)``  vs  ``deephemnma.core.star.write_star``
  (the child first loads the table with read_star; the peak RSS reported for a write is
  the growth of the peak above that loaded baseline, obtained by resetting the kernel's
  peak counter through /proc/self/clear_refs; the loaded baseline is reported too)
- stream: ``deephemnma.core.star.iter_particles(path, 100_000)`` summing a column (bounded memory)

Peak RSS is the child's ``VmHWM`` (/proc/self/status); ``ru_maxrss`` from getrusage is
printed too but can include the forked parent's image at exec time.

Temporary files live in a temporary directory that is deleted at the end.

    python bench/bench_star_io.py [--rows 1000000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from common import run_measured, write_result  # noqa: E402

_PRELUDE = f"""
import json, os, resource, sys, time
sys.path.insert(0, {str(REPO)!r})

def _status(key):
    with open('/proc/self/status') as fh:
        for line in fh:
            if line.startswith(key + ':'):
                return int(line.split()[1]) / 1024
    return float('nan')

def _reset_peak():
    try:
        with open('/proc/self/clear_refs', 'w') as fh:
            fh.write('5')
        return True
    except OSError:
        return False

def _peak():
    # VmHWM: peak RSS of this process image. getrusage's ru_maxrss (also printed) can include
    # the RSS of the forked parent image at exec time, so it is an upper bound only.
    return _status('VmHWM')

def _rusage_peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

CHILD = {
    "starfile_read": """
import starfile
t = time.perf_counter(); d = starfile.read(PATH); dt = time.perf_counter() - t
print(json.dumps({"s": dt, "peak_rss_mb": _peak(), "ru_maxrss_mb": _rusage_peak(), "rows": len(d["particles"])}))
""",
    "ours_read": """
from deephemnma.core.star import read_star
t = time.perf_counter(); s = read_star(PATH); dt = time.perf_counter() - t
print(json.dumps({"s": dt, "peak_rss_mb": _peak(), "ru_maxrss_mb": _rusage_peak(), "rows": len(s.particles)}))
""",
    "starfile_write": """
import starfile
from deephemnma.core.star import read_star
s = read_star(PATH)
base = _status('VmRSS'); ok = _reset_peak()
t = time.perf_counter(); starfile.write({"optics": s.optics, "particles": s.particles}, OUT, overwrite=True)
dt = time.perf_counter() - t
peak = _status('VmHWM') if ok else _peak()
print(json.dumps({"s": dt, "peak_rss_mb": peak, "baseline_rss_mb": base, "peak_over_baseline_mb": peak - base,
                  "peak_reset": ok, "bytes": os.path.getsize(OUT)}))
""",
    "ours_write": """
from deephemnma.core.star import read_star, write_star
s = read_star(PATH)
base = _status('VmRSS'); ok = _reset_peak()
t = time.perf_counter(); write_star(OUT, s.particles, s.optics); dt = time.perf_counter() - t
peak = _status('VmHWM') if ok else _peak()
print(json.dumps({"s": dt, "peak_rss_mb": peak, "baseline_rss_mb": base, "peak_over_baseline_mb": peak - base,
                  "peak_reset": ok, "bytes": os.path.getsize(OUT)}))
""",
    "ours_stream": """
from deephemnma.core.star import iter_particles
t = time.perf_counter(); n = 0; acc = 0.0
for chunk in iter_particles(PATH, 100_000):
    n += len(chunk); acc += float(chunk["rlnDefocusU"].sum())
dt = time.perf_counter() - t
print(json.dumps({"s": dt, "peak_rss_mb": _peak(), "ru_maxrss_mb": _rusage_peak(), "rows": n}))
""",
}


def make_star(path: Path, rows: int, seed: int = 0, chunk: int = 100_000) -> None:
    """A RELION 3.1 particle file written the way RELION formats it (%12.6f, %12d, text)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        fh.write("\n# version 30001\n\ndata_optics\n\nloop_ \n")
        optics_cols = ["rlnOpticsGroup", "rlnOpticsGroupName", "rlnAmplitudeContrast", "rlnSphericalAberration",
                       "rlnVoltage", "rlnImagePixelSize", "rlnMicrographOriginalPixelSize", "rlnImageSize",
                       "rlnImageDimensionality"]
        fh.writelines(f"_{c} #{i} \n" for i, c in enumerate(optics_cols, 1))
        fh.write("           1 opticsGroup1     0.100000     2.700000   300.000000     1.060000     0.530000"
                 "          256            2 \n \n\n# version 30001\n\ndata_particles\n\nloop_ \n")
        cols = ["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit", "rlnClassNumber", "rlnAnglePsi",
                "rlnImageName", "rlnMicrographName", "rlnOpticsGroup", "rlnCtfMaxResolution", "rlnCtfFigureOfMerit",
                "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor", "rlnCtfScalefactor",
                "rlnPhaseShift", "rlnGroupNumber", "rlnAngleRot", "rlnAngleTilt", "rlnOriginXAngst",
                "rlnOriginYAngst", "rlnNormCorrection", "rlnLogLikeliContribution", "rlnRandomSubset",
                "rlnNrOfSignificantSamples"]
        fh.writelines(f"_{c} #{i} \n" for i, c in enumerate(cols, 1))
        per_mic = 200
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            i = np.arange(start, start + n)
            mic = i // per_mic
            defu = 8000 + 20000 * rng.random(n)
            mic_names = np.char.add(np.char.add("MotionCorr/job002/Movies/FoilHole_", mic.astype(str)),
                                    "_Data_21345623_21345625_20200101_120000_fractions.mrc")
            img_names = np.char.add(np.char.add(np.char.zfill((i % per_mic + 1).astype(str), 6), "@Extract/job012/Movies/FoilHole_"),
                                    np.char.add(mic.astype(str), "_Data_21345623_21345625_20200101_120000_fractions.mrcs"))
            fields = [
                np.char.mod("%12.6f", 4096 * rng.random(n)), np.char.mod("%12.6f", 4096 * rng.random(n)),
                np.char.mod("%12.6f", rng.normal(size=n)), np.char.mod("%12d", rng.integers(1, 4, n)),
                np.char.mod("%12.6f", rng.uniform(-180, 180, n)), img_names, mic_names,
                np.char.mod("%12d", np.ones(n, dtype=int)), np.char.mod("%12.6f", rng.uniform(2.5, 8, n)),
                np.char.mod("%12.6f", rng.random(n) * 0.3), np.char.mod("%12.6f", defu),
                np.char.mod("%12.6f", defu - 500 * rng.random(n)), np.char.mod("%12.6f", rng.uniform(-180, 180, n)),
                np.char.mod("%12.6f", np.zeros(n)), np.char.mod("%12.6f", np.ones(n)), np.char.mod("%12.6f", np.zeros(n)),
                np.char.mod("%12d", mic % 300 + 1), np.char.mod("%12.6f", rng.uniform(-180, 180, n)),
                np.char.mod("%12.6f", rng.uniform(0, 180, n)), np.char.mod("%12.6f", rng.normal(0, 3, n)),
                np.char.mod("%12.6f", rng.normal(0, 3, n)), np.char.mod("%12.6f", 0.9 + 0.2 * rng.random(n)),
                np.char.mod("%12.6e", 1e5 + 1e4 * rng.random(n)), np.char.mod("%12d", rng.integers(1, 3, n)),
                np.char.mod("%12d", rng.integers(1, 50, n)),
            ]
            line = fields[0]
            for f in fields[1:]:
                line = np.char.add(np.char.add(line, " "), f)
            fh.write("\n".join(line.tolist()))
            fh.write("\n")
        fh.write("\n")


def measure(kind: str, path: Path, out: Path, repeats: int) -> dict:
    code = _PRELUDE + f"\nPATH = {str(path)!r}\nOUT = {str(out)!r}\n" + CHILD[kind]
    runs = []
    for _ in range(repeats):
        r = run_measured(code, env={"OMP_NUM_THREADS": "1"})
        runs.append(r["result"])
        if out.exists():
            out.unlink()
        print(kind, json.dumps(r["result"]), file=sys.stderr, flush=True)
    fig = {
        "s_median": statistics.median(x["s"] for x in runs),
        "s_all": [round(x["s"], 3) for x in runs],
        "peak_rss_mb_median": statistics.median(x["peak_rss_mb"] for x in runs),
    }
    if "peak_over_baseline_mb" in runs[0]:
        fig["peak_over_baseline_mb_median"] = statistics.median(x["peak_over_baseline_mb"] for x in runs)
        fig["baseline_rss_mb_median"] = statistics.median(x["baseline_rss_mb"] for x in runs)
        fig["peak_reset"] = all(x["peak_reset"] for x in runs)
        fig["output_bytes"] = runs[0]["bytes"]
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-starfile-write", action="store_true", help="skip the slow starfile writer")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_star_io_"))
    try:
        path = tmp / "particles.star"
        t = time.perf_counter()
        # generated in a child so that this process stays small (children inherit its image)
        run_measured(f"import sys; sys.path.insert(0, {str(HERE)!r}); from bench_star_io import make_star; "
                     f"from pathlib import Path; make_star(Path({str(path)!r}), {args.rows})")
        print(f"generated {args.rows} rows, {path.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t:.1f} s",
              file=sys.stderr, flush=True)
        out = tmp / "out.star"
        kinds = ["ours_read", "starfile_read", "ours_write", "starfile_write", "ours_stream"]
        if args.skip_starfile_write:
            kinds.remove("starfile_write")
        figs = {"rows": args.rows, "file_mb": round(path.stat().st_size / 1e6, 1), "repeats": args.repeats}
        for kind in kinds:
            figs[kind] = measure(kind, path, out, args.repeats)
        r = {}
        if "starfile_read" in figs:
            r["read_speedup"] = figs["starfile_read"]["s_median"] / figs["ours_read"]["s_median"]
            r["read_peak_rss_ratio"] = figs["starfile_read"]["peak_rss_mb_median"] / figs["ours_read"]["peak_rss_mb_median"]
        if "starfile_write" in figs:
            r["write_speedup"] = figs["starfile_write"]["s_median"] / figs["ours_write"]["s_median"]
            r["write_peak_over_baseline_ratio"] = (figs["starfile_write"]["peak_over_baseline_mb_median"]
                                                   / max(figs["ours_write"]["peak_over_baseline_mb_median"], 1.0))
        figs["ratios"] = {k: round(v, 2) for k, v in r.items()}
        load = os.getloadavg()[0]
        write_result("star_io", figs, notes=(
            "Wall time and peak RSS (VmHWM) of each operation in a fresh child process (Python start-up and "
            "imports excluded from 's', included in peak RSS). starfile.write uses its default '%.6f' floats; write_star writes the "
            f"shortest exact float text. 1-min load average at the end: {load:.2f} (other jobs may share the machine)."))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
