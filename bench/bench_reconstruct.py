"""Reconstruction throughput: particles per second per core at 128² and 256².

For each box size a stack of synthetic particles (random images: the cost does not depend on
the content) with random poses, shifts and CTFs is written as RELION STAR + MRC, then
``reconstruct_star`` runs in a fresh single-threaded child process (``--threads 1``
equivalent). Figures: insertion throughput (reading, CTF, re-centring, trilinear or nearest
insertion; particles / s / core), the fixed cost of finishing (half maps, FSC, full map), and
the child's peak memory. Repeated ``--repeats`` times; the median is reported.

    python bench/bench_reconstruct.py [--boxes 128 256] [--n 1000 300] [--repeats 3] [--quick]
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

CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from deephemnma.core.star import read_star
from deephemnma.reconstruct import ReconstructSettings, reconstruct_star
rec = reconstruct_star(read_star(sys.argv[1]), ReconstructSettings(mask="none", interpolation=sys.argv[2],
                       device="cpu", batch_size=128), seed=0)
print(json.dumps({"n": rec.n_particles, "insert_s": rec.info["insert_seconds"], "finish_s": rec.info["finish_seconds"],
                  "read_s": rec.info["read_seconds"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_data(tmp: Path, box: int, n: int, seed: int = 0) -> Path:
    import mrcfile
    import numpy as np
    import pandas as pd
    import starfile

    from deephemnma.core.geometry import random_euler

    rng = np.random.default_rng(seed)
    stack = tmp / f"p{box}.mrcs"
    with mrcfile.new_mmap(stack, shape=(n, box, box), mrc_mode=2, overwrite=True) as m:
        for s in range(0, n, 256):
            k = min(256, n - s)
            m.data[s:s + k] = rng.standard_normal((k, box, box)).astype(np.float32)
    eul = random_euler(n, rng)
    df = pd.DataFrame({"rlnImageName": [f"{i + 1}@{stack.name}" for i in range(n)],
                       "rlnAngleRot": eul[:, 0], "rlnAngleTilt": eul[:, 1], "rlnAnglePsi": eul[:, 2],
                       "rlnOriginXAngst": rng.uniform(-5, 5, n), "rlnOriginYAngst": rng.uniform(-5, 5, n),
                       "rlnDefocusU": rng.uniform(5000, 20000, n), "rlnDefocusV": rng.uniform(5000, 20000, n),
                       "rlnDefocusAngle": rng.uniform(0, 180, n), "rlnOpticsGroup": 1})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [1.0], "rlnImageSize": [box],
                           "rlnImageDimensionality": [2]})
    star = tmp / f"p{box}.star"
    starfile.write({"optics": optics, "particles": df}, star)
    return star


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 300], help="particles per box size")
    ap.add_argument("--interpolation", nargs="+", default=["trilinear", "nearest"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small run (64², 200 particles, 1 repeat)")
    args = ap.parse_args()
    if args.quick:
        args.boxes, args.n, args.repeats = [64], [200], 1
    figures = {}
    with tempfile.TemporaryDirectory() as d:
        for box, n in zip(args.boxes, args.n):
            star = make_data(Path(d), box, n)
            for interp in args.interpolation:
                runs = []
                for _ in range(args.repeats):
                    r = run_measured(CHILD.replace("sys.argv[1]", repr(str(star))).replace("sys.argv[2]", repr(interp)),
                                     env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
                    runs.append(r["result"])
                rate = statistics.median(x["n"] / x["insert_s"] for x in runs)
                figures[f"box{box}_{interp}"] = {
                    "particles": n, "particles_per_s_per_core": round(rate, 1),
                    "insert_s_median": statistics.median(x["insert_s"] for x in runs),
                    "read_s_median": statistics.median(x["read_s"] for x in runs),
                    "finish_s_median": statistics.median(x["finish_s"] for x in runs),
                    "peak_rss_mb": round(max(x["peak_rss_mb"] for x in runs)),
                    "runs": runs,
                }
                print(f"box {box} {interp}: {rate:.1f} particles/s/core, finishing "
                      f"{figures[f'box{box}_{interp}']['finish_s_median']:.1f} s, peak "
                      f"{figures[f'box{box}_{interp}']['peak_rss_mb']} MB", flush=True)
    write_result("reconstruct", figures,
                 notes="single-threaded child per run; oversample 2, float32 sums, batch 128, CPU; "
                       "insertion throughput excludes the fixed finishing cost (inversions, FSC)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
