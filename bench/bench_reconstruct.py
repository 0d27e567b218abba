"""Reconstruction throughput: particles per second per core at 128² and 256².

For each box size a stack of synthetic particles (random images: the cost does not depend on
the content) with random poses, shifts and CTFs is written as RELION STAR + MRC, then
``reconstruct_star`` runs in a fresh single-threaded child process (``--threads 1``
equivalent). Figures: insertion throughput (reading, CTF, re-centring, trilinear or nearest
insertion; particles / s / core), the fixed cost of finishing (half maps, FSC, full map), and
the child's peak memory. Repeated ``--repeats`` times; the median is reported.

``--group-sizes`` instead measures memory and time against the number of particles, as the
workflow's reconstruct jobs meet it (one job per group; the largest group was about 2,000
particles at N = 10⁴ and 20,459 at 10⁵): from a pool of stacks of 1,000 images at 128²
twice the largest size, each size reconstructs a random subset of rows in table order (a
group's rows are scattered over the stacks), with the workflow's settings (trilinear,
oversample 2, batch 256, automatic mask, CTF), one thread, the page cache dropped first
when this process may (root), else warm. Peak RSS must stay flat: the images are read a
batch at a time. Writes bench/results/reconstruct_groups.json.

    python bench/bench_reconstruct.py [--boxes 128 256] [--n 1000 300] [--repeats 3] [--quick]
    python bench/bench_reconstruct.py --group-sizes 2000 20000
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


def make_data(tmp: Path, box: int, n: int, seed: int = 0, per_stack: int | None = None) -> Path:
    import mrcfile
    import numpy as np
    import pandas as pd
    import starfile

    from deephemnma.core.geometry import random_euler

    rng = np.random.default_rng(seed)
    per_stack = per_stack or n
    names = []
    for first in range(0, n, per_stack):
        m_n = min(per_stack, n - first)
        stack = tmp / (f"p{box}.mrcs" if per_stack >= n else f"p{box}_{first // per_stack:04d}.mrcs")
        with mrcfile.new_mmap(stack, shape=(m_n, box, box), mrc_mode=2, overwrite=True) as m:
            for s in range(0, m_n, 256):
                k = min(256, m_n - s)
                m.data[s:s + k] = rng.standard_normal((k, box, box)).astype(np.float32)
        names += [f"{i + 1}@{stack.name}" for i in range(m_n)]
    eul = random_euler(n, rng)
    df = pd.DataFrame({"rlnImageName": names,
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


GROUP_CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
import numpy as np
from deephemnma.core.star import read_star
from deephemnma.reconstruct import ReconstructSettings, reconstruct_star
star = read_star(STAR)
rows = np.sort(np.random.default_rng(SIZE).choice(len(star.particles), SIZE, replace=False))
t0, c0 = time.perf_counter(), time.process_time()
rec = reconstruct_star(star, ReconstructSettings(device="cpu", batch_size=256), seed=0, indices=rows)
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"n": rec.n_particles, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                  "sys_s": ru.ru_stime, "insert_s": rec.info["insert_seconds"], "read_s": rec.info["read_seconds"],
                  "finish_s": rec.info["finish_seconds"], "peak_rss_mb": ru.ru_maxrss / 1024}))
"""


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only): the next reads come from disk."""
    import os

    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def group_sizes(sizes: list[int], box: int = 128) -> int:
    figures = {"box": box, "pool": 2 * max(sizes), "images_per_stack": 1000, "sizes": {}}
    with tempfile.TemporaryDirectory() as d:
        star = make_data(Path(d), box, 2 * max(sizes), per_stack=1000)
        for size in sizes:
            cold = drop_page_cache()
            r = run_measured(GROUP_CHILD.replace("STAR", repr(str(star))).replace("SIZE", str(int(size))),
                             env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})["result"]
            r = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
            r.update(page_cache="cold" if cold else "warm",
                     cpu_ms_per_particle=round(1000 * r["cpu_s"] / size, 3),
                     insert_ms_per_particle=round(1000 * r["insert_s"] / size, 3))
            figures["sizes"][str(size)] = r
            print(f"{size:,} particles ({r['page_cache']} cache): peak {r['peak_rss_mb']:.0f} MB, "
                  f"{r['cpu_ms_per_particle']:.2f} CPU-ms/particle (insertion {r['insert_ms_per_particle']:.2f}), "
                  f"read {r['read_s']:.1f} s, finishing {r['finish_s']:.1f} s", flush=True)
    lo, hi = (figures["sizes"][str(k)] for k in (min(sizes), max(sizes)))
    figures["peak_ratio"] = round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 3)
    figures["cpu_per_particle_ratio"] = round(hi["cpu_ms_per_particle"] / lo["cpu_ms_per_particle"], 3)
    figures["insert_per_particle_ratio"] = round(hi["insert_ms_per_particle"] / lo["insert_ms_per_particle"], 3)
    write_result("reconstruct_groups", figures,
                 notes="one reconstruct job per group size, as the workflow runs it (workflow settings, CPU, one "
                       "thread); ratios: largest size over smallest")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-sizes", type=int, nargs="+", metavar="N",
                    help="measure peak memory and time per particle against the group size instead")
    ap.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 300], help="particles per box size")
    ap.add_argument("--interpolation", nargs="+", default=["trilinear", "nearest"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small run (64², 200 particles, 1 repeat)")
    args = ap.parse_args()
    if args.group_sizes:
        if min(args.group_sizes) < 2:
            ap.error("--group-sizes: at least 2 particles per group")
        return group_sizes(sorted(args.group_sizes))
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
