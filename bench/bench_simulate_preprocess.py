"""Simulation and preprocessing throughput per core, and peak memory versus the particle count.

Reference: adenylate kinase chain A, 1,656 heavy atoms (../shared/data/adenylate_kinase/4ake.pdb,
or the demo's ak_open_4ake.pdb), with three synthetic smooth modes as 7, 8, 9 (the figures
do not depend on what the modes are). Every measurement runs in a fresh child process on
ONE thread (``torch.set_num_threads(1)``), so "per second" is per core:

- simulate, 256² × 0.325 Å (the paper's setting): the ``rotated_grid`` projector (render
  only, and end to end: calibration + rendering + CTF + noise + writing noisy and clean
  stacks + STAR files); the ``fourier_slice`` projector (a D³ volume per particle; seconds
  per particle: oversample 1 at 256², 2 at 128²); and 128² × 0.65 Å (a quick demo setting);
- preprocess, 256² → 128² (phase flip, antialias, Fourier crop, normalisation, split,
  chunk STARs and stacks) on a synthetic input of random images with CTF columns;
- peak memory for N = 2,000 and N = 20,000: simulate at 64² × 1.3 Å (so that 20,000
  particles take about a minute) and preprocess at 256² → 128² (5 GB of input stacks). Peak
  RSS is the child's VmHWM; since input stacks are memory-mapped, resident file pages
  count in it, so the peak of anonymous memory (RssAnon, sampled every 20 ms) is reported
  too — that is the memory the process actually needs.

The machine is shared (2 cores, other jobs running): figures are noisy; re-run on a quiet
machine for clean numbers. Temporary files go to a temporary directory, deleted at the end.

    python bench/bench_simulate_preprocess.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from common import run_measured, write_result  # noqa: E402

PRELUDE = f"""
import json, os, sys, threading, time
sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'tests')!r})
os.environ['OMP_NUM_THREADS'] = '1'
import numpy as np, torch
torch.set_num_threads(1)

def status(key):
    with open('/proc/self/status') as fh:
        for line in fh:
            if line.startswith(key + ':'):
                return int(line.split()[1]) / 1024
    return float('nan')

PEAK_ANON = [0.0]
def _sample():
    while True:
        PEAK_ANON[0] = max(PEAK_ANON[0], status('RssAnon'))
        time.sleep(0.02)
threading.Thread(target=_sample, daemon=True).start()

def finish(d):
    d['peak_rss_mb'] = status('VmHWM'); d['peak_anon_mb'] = max(PEAK_ANON[0], status('RssAnon'))
    print(json.dumps(d))
"""


def find_pdb() -> Path:
    for p in (REPO.parent / "shared/data/adenylate_kinase/4ake.pdb", Path("/work/shared/data/adenylate_kinase/4ake.pdb"),
              Path.home() / ".cache/deephemnma/ak_open_4ake.pdb"):
        if p.is_file():
            return p
    raise SystemExit("no adenylate-kinase PDB found (../shared/data/adenylate_kinase/4ake.pdb)")


def reference_code(pdb: Path) -> str:
    return f"""
from _sim_helpers import ak_heavy_atoms, toy_reference
xyz, el = ak_heavy_atoms({str(pdb)!r})
REF = toy_reference(xyz, el, n_modes=3)
"""


def settings_code(**kw) -> str:
    return f"""
from deephemnma.core.config import validate_config
from deephemnma.simulate import Settings
S = Settings.from_config(validate_config({{'simulate': {kw!r}}}))
"""


def bench_render(pdb, box, px, projector, n, oversample=2) -> dict:
    code = PRELUDE + reference_code(pdb) + settings_code(box=box, pixel_size=px, projector=projector,
                                                         oversample=oversample, batch_size=16) + f"""
from deephemnma import simulate as sim
prof = sim.profiles_for(REF, S)
params = sim.sample_parameters(S, REF, {n}, np.random.default_rng(0))
noise = sim.NoiseModel(1.0, 1.0, 1.4, 1.0, 0.5, 10.0)
sim.render(REF, prof, params.iloc[:2], S, noise, np.random.default_rng(1))  # warm-up
t = time.perf_counter()
for a in range(0, {n}, S.batch_size):
    sim.render(REF, prof, params.iloc[a:a + S.batch_size], S, noise, np.random.default_rng(a))
dt = time.perf_counter() - t
finish({{'seconds': dt, 'n': {n}, 'particles_per_s': {n} / dt, 'seconds_per_particle': dt / {n}}})
"""
    return run_measured(code)["result"]


def bench_simulate_dataset(pdb, out, n, box, px, calib=64) -> dict:
    code = PRELUDE + reference_code(pdb) + settings_code(box=box, pixel_size=px, n_particles=n, chunk_size=1000,
                                                         snr_calibration=calib) + f"""
from deephemnma import simulate as sim
t = time.perf_counter()
m = sim.simulate_dataset(REF, S, {str(out)!r}, workers=1)
dt = time.perf_counter() - t
finish({{'seconds': dt, 'n': {n}, 'particles_per_s': {n} / dt, 'snr_measured': m['snr_measured']}})
"""
    return run_measured(code)["result"]


def make_preprocess_input(out: Path, n: int, box: int = 256, per_stack: int = 1000) -> Path:
    code = PRELUDE + f"""
import pandas as pd
from deephemnma.core.mrc import write_stack
from deephemnma.core.star import write_star
out = __import__('pathlib').Path({str(out)!r}); out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
names = []
for k, a in enumerate(range(0, {n}, {per_stack})):
    m = min({per_stack}, {n} - a)
    write_stack(out / f'stack_{{k:03d}}.mrcs', rng.standard_normal((m, {box}, {box}), dtype=np.float32), 0.325, chunk=250)
    names += [f'{{i + 1:06d}}@stack_{{k:03d}}.mrcs' for i in range(m)]
p = pd.DataFrame({{'rlnImageName': names, 'rlnDefocusU': rng.uniform(4000, 6000, {n}),
                   'rlnOriginXAngst': rng.uniform(-1.6, 1.6, {n}), 'rlnOpticsGroup': 1}})
p['rlnDefocusV'] = p['rlnDefocusU'] - 100.0
p['rlnDefocusAngle'] = 30.0
o = pd.DataFrame({{'rlnOpticsGroup': [1], 'rlnOpticsGroupName': ['opticsGroup1'], 'rlnAmplitudeContrast': [0.1],
                   'rlnSphericalAberration': [2.0], 'rlnVoltage': [200.0], 'rlnImagePixelSize': [0.325],
                   'rlnImageSize': [{box}], 'rlnImageDimensionality': [2]}})
write_star(out / 'particles.star', p, o)
finish({{'n': {n}}})
"""
    run_measured(code)
    return out / "particles.star"


def bench_preprocess(star: Path, out: Path, n: int) -> dict:
    code = PRELUDE + f"""
from deephemnma.core.config import validate_config
from deephemnma.preprocess import PreprocessSettings, preprocess_dataset
s = PreprocessSettings.from_config(validate_config({{'preprocess': {{'box': 128, 'set1_size': 1000,
                                                                   'chunk_size': 1000}}}}))
t = time.perf_counter()
m = preprocess_dataset({str(star)!r}, {str(out)!r}, s, workers=1)
dt = time.perf_counter() - t
finish({{'seconds': dt, 'n': {n}, 'particles_per_s': {n} / dt}})
"""
    return run_measured(code)["result"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the script)")
    args = ap.parse_args()
    pdb = find_pdb()
    q = args.quick
    tmp = Path(tempfile.mkdtemp(prefix="bench_simprep_"))
    figures: dict = {"reference": {"pdb": str(pdb), "atoms": 1656, "modes": "3 synthetic smooth modes"}}
    try:
        figures["simulate_render_256_rotated_grid"] = bench_render(pdb, 256, 0.325, "rotated_grid", 32 if q else 128)
        figures["simulate_render_128_rotated_grid"] = bench_render(pdb, 128, 0.65, "rotated_grid", 32 if q else 128)
        figures["simulate_render_256_fourier_slice_os1"] = bench_render(pdb, 256, 0.325, "fourier_slice", 2, oversample=1)
        if not q:  # (oversample 2 at 256² needs a 512³ transform per particle: ~5 GB, not run here)
            figures["simulate_render_128_fourier_slice_os2"] = bench_render(pdb, 128, 0.65, "fourier_slice", 4)
        figures["simulate_end_to_end_256"] = bench_simulate_dataset(pdb, tmp / "sim256", 64 if q else 256, 256, 0.325)
        for n in ((200, 2000) if q else (2000, 20000)):
            figures[f"simulate_memory_64px_N{n}"] = bench_simulate_dataset(pdb, tmp / f"sim64_{n}", n, 64, 1.3)
            shutil.rmtree(tmp / f"sim64_{n}", ignore_errors=True)
        for n in ((200, 2000) if q else (2000, 20000)):
            star = make_preprocess_input(tmp / f"in_{n}", n)
            figures[f"preprocess_256_to_128_N{n}"] = bench_preprocess(star, tmp / f"prep_{n}", n)
            shutil.rmtree(tmp / f"in_{n}", ignore_errors=True)
            shutil.rmtree(tmp / f"prep_{n}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    notes = ("One thread per child process (per-core figures). Taken on a shared 2-core machine with other "
             "jobs running: noisy. peak_rss_mb = VmHWM (includes resident pages of memory-mapped stacks); "
             "peak_anon_mb = peak RssAnon sampled every 20 ms (the memory actually needed).")
    write_result("simulate_preprocess" + ("_quick" if q else ""), figures, notes)


if __name__ == "__main__":
    main()
