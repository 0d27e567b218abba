"""Landscape + grouping + export for 10⁶ particles: wall time and peak memory (target ≤ 60 s, ≤ 2 GB).

A synthetic particle STAR file (default 10⁶ rows: image name, micrograph, coordinates,
angles, shifts, CTF, optics group, score and 3 amplitude columns drawn on the paper's AK
helix) is written first (not timed). Then, in a fresh child process (peak RSS is its own):
read the STAR file, fit the PCA landscape, write the landscape STAR + model, group
(quasi-uniform bins along PC1, ≥ 900 per group), write every group STAR, dropped.star,
particles.star, groups.csv and groups.json. Per-step times are reported, plus the grouping
time of every method on the same coordinates (in another child).

    python bench/bench_landscape.py [--n 1000000] [--repeats 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import run_measured, write_result  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

PIPELINE = r"""
import json, resource, time
t = {}
t0 = time.perf_counter()
from deephemnma.core.star import read_star, write_star
from deephemnma.landscape import LandscapeSettings, build_landscape
from deephemnma.groups import GroupSettings, assign_groups, summarise_groups, export_groups
from deephemnma.core.star import amplitude_columns, pc_columns
import numpy as np
t["import"] = time.perf_counter() - t0; t0 = time.perf_counter()
star = read_star(__STAR__)
t["read_star"] = time.perf_counter() - t0; t0 = time.perf_counter()
table, optics, model, _ = build_landscape(star.particles, star.optics, LandscapeSettings.from_config({}), 0)
t["pca"] = time.perf_counter() - t0; t0 = time.perf_counter()
write_star(__OUT__ + "/landscape.star", table, optics); model.save(__OUT__ + "/landscape_model.json")
t["write_landscape"] = time.perf_counter() - t0; t0 = time.perf_counter()
Y = table[pc_columns(table)].to_numpy(np.float64)
labels, details = assign_groups(Y, GroupSettings.from_config({"landscape": {"groups": {"method": "bins", "n_bins": 10, "min_size": 900}}}), 0)
amp = amplitude_columns(table)
summary = summarise_groups(labels, Y, table[amp].to_numpy(np.float64), amp)
t["group"] = time.perf_counter() - t0; t0 = time.perf_counter()
doc = export_groups(__OUT__ + "/groups", table, optics, labels, summary, details)
t["export_groups"] = time.perf_counter() - t0
print(json.dumps({"times": t, "n_groups": doc["n_groups"], "n_dropped": doc["n_dropped"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

METHODS = r"""
import json, resource, time
import numpy as np
from deephemnma.groups import GroupSettings, assign_groups
rng = np.random.default_rng(0)
n = __N__
r = rng.uniform(0, 1, n)
Y = np.stack([-200 * r + 100, 120 * np.sin(np.pi * r) - 60], 1) + rng.normal(scale=8, size=(n, 2))
out = {}
for name, s in [("boxes", {"method": "boxes", "boxes": [{"pc1": [-100, 0]}, {"pc1": [0, 100]}]}),
                ("bins", {"method": "bins", "n_bins": 10, "min_size": 900}),
                ("kmeans", {"method": "kmeans", "k": 10, "n_init": 1}),
                ("gmm", {"method": "gmm", "k": 10, "n_init": 1}),
                ("density", {"method": "density"})]:
    t0 = time.perf_counter()
    lab, _ = assign_groups(Y, GroupSettings.from_config({"landscape": {"groups": s}}), 0)
    out[name] = {"seconds": time.perf_counter() - t0, "groups": int(lab.max())}
print(json.dumps({"methods": out, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_table(path: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    import pandas as pd

    from deephemnma.core.star import write_star

    rng = np.random.default_rng(seed)
    r = rng.uniform(0, 1, n)
    df = pd.DataFrame({
        "rlnImageName": [f"{i % 1000 + 1:06d}@Extract/job010/mic{i // 1000:05d}.mrcs" for i in range(n)],
        "rlnMicrographName": [f"MotionCorr/job002/mic{i // 1000:05d}.mrc" for i in range(n)],
        "rlnCoordinateX": rng.uniform(0, 4096, n), "rlnCoordinateY": rng.uniform(0, 4096, n),
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": rng.uniform(0, 180, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.uniform(-5, 5, n), "rlnOriginYAngst": rng.uniform(-5, 5, n),
        "rlnDefocusU": rng.uniform(5000, 20000, n), "rlnDefocusV": rng.uniform(5000, 20000, n),
        "rlnDefocusAngle": rng.uniform(0, 180, n), "rlnOpticsGroup": np.ones(n, dtype=int),
        "dhnmaScore": rng.uniform(0, 1, n),
        "dhnmaAmplitude007": -200 * r + rng.normal(0, 7, n),
        "dhnmaAmplitude008": 200 * np.sin(np.pi * r) + rng.normal(0, 7, n),
        "dhnmaAmplitude009": 200 * np.cos(np.pi * r) + rng.normal(0, 7, n),
    })
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [1.0], "rlnImageSize": [256], "rlnImageDimensionality": [2]})
    write_star(path, df, optics)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="10⁵ particles")
    args = ap.parse_args()
    if args.quick:
        args.n = 100_000
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as d:
        star = Path(d) / "particles.star"
        make_table(star, args.n)
        runs = []
        for k in range(args.repeats):
            out = Path(d) / f"out{k}"
            out.mkdir()
            code = PIPELINE.replace("__STAR__", repr(str(star))).replace("__OUT__", repr(str(out)))
            r = run_measured(code, env=env)
            runs.append({"wall_s": r["wall_s"], **r["result"]})
            print(f"run {k + 1}: {r['wall_s']:.1f} s wall, peak {r['result']['peak_rss_mb']:.0f} MB, "
                  f"steps {r['result']['times']}", flush=True)
        m = run_measured(METHODS.replace("__N__", str(args.n)), env=env)["result"]
    work = [sum(v for k, v in x["times"].items() if k != "import") for x in runs]
    figures = {
        "particles": args.n,
        "pipeline_s_median": statistics.median(work),
        "wall_s_median_incl_interpreter": statistics.median(x["wall_s"] for x in runs),
        "peak_rss_mb_max": round(max(x["peak_rss_mb"] for x in runs)),
        "steps_s": runs[0]["times"],
        "n_groups": runs[0]["n_groups"],
        "grouping_methods_s": {k: round(v["seconds"], 2) for k, v in m["methods"].items()},
        "grouping_methods_peak_rss_mb": round(m["peak_rss_mb"]),
        "targets": {"seconds": 60, "peak_rss_mb": 2048},
    }
    write_result("landscape", figures, notes="single-threaded children; STAR I/O through deephemnma.core.star")
    return 0


if __name__ == "__main__":
    sys.exit(main())
