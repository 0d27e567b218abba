"""Conventions proven against an independent implementation: cryoDRGN 4.3.1.

Particles are simulated with the project's conventions (RELION Euler matrix, origins: the
particle's centre at image centre − origin; RELION CTF sign) and written with the project's
STAR and MRC writers. cryoDRGN then reads the STAR (``parse_pose_star``) and reconstructs
(``backproject_voxel``): the map must come back with the right shift sign and handedness.
cryoDRGN's CTF is compared numerically with ours.

cryoDRGN lives in a side environment (``make peer`` → .venv-peer) or wherever
``DEEPHEMNMA_CRYODRGN`` points (a ``cryodrgn`` executable); the tests skip without it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO
from deephemnma.core import star as starmod
from deephemnma.core.ctf import CTFParams, compute_ctf, frequency_grid
from deephemnma.core.geometry import matrix_to_euler, random_rotations
from deephemnma.core.mrc import read_volume, write_stack
from deephemnma.core.projection import FourierSliceProjector

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def cryodrgn_exe() -> Path | None:
    cands = [os.environ.get("DEEPHEMNMA_CRYODRGN"), REPO / ".venv-peer" / "bin" / "cryodrgn", shutil.which("cryodrgn")]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    return None


@pytest.fixture(scope="module")
def cryodrgn():
    exe = cryodrgn_exe()
    if exe is None:
        pytest.skip("cryoDRGN not installed (run 'make peer', or set DEEPHEMNMA_CRYODRGN)")
    return exe


def run(cmd, cwd):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, f"{cmd[0]} {cmd[1]} failed:\n{proc.stderr[-3000:]}"
    return proc


def test_cryodrgn_reconstructs_our_simulation(cryodrgn, peer_dir, tmp_path):
    vol = read_volume(peer_dir / "hand-vol.mrc")  # a hand: chiral, so a mirror error shows
    box, apix, n = vol.data.shape[0], 2.0, 1200
    rng = np.random.default_rng(7)
    R = random_rotations(n, rng)
    origins_px = rng.uniform(-5, 5, (n, 2))
    images = FourierSliceProjector(vol.data, 2).project(torch.tensor(R), torch.tensor(origins_px)).numpy()
    write_stack(tmp_path / "sim.mrcs", images, apix)
    eul = matrix_to_euler(R)
    optics = pd.DataFrame({starmod.OPTICS_GROUP: [1], starmod.OPTICS_GROUP_NAME: ["opticsGroup1"],
                           starmod.VOLTAGE: [300.0], starmod.SPHERICAL_ABERRATION: [2.7],
                           starmod.AMPLITUDE_CONTRAST: [0.1], starmod.IMAGE_PIXEL_SIZE: [apix],
                           starmod.IMAGE_SIZE: [box], starmod.IMAGE_DIMENSIONALITY: [2]})
    scores = {}
    for sign, name in ((1, "ours"), (-1, "flipped")):
        parts = pd.DataFrame({
            starmod.IMAGE_NAME: [f"{i + 1:06d}@sim.mrcs" for i in range(n)],
            starmod.ANGLE_ROT: eul[:, 0], starmod.ANGLE_TILT: eul[:, 1], starmod.ANGLE_PSI: eul[:, 2],
            starmod.ORIGIN_X_ANGST: sign * origins_px[:, 0] * apix, starmod.ORIGIN_Y_ANGST: sign * origins_px[:, 1] * apix,
            starmod.OPTICS_GROUP: 1})
        starmod.write_star(tmp_path / f"{name}.star", parts, optics)
        run([cryodrgn, "parse_pose_star", f"{name}.star", "-o", f"{name}.pkl", "-D", box], tmp_path)
        run([cryodrgn, "backproject_voxel", "sim.mrcs", "--poses", f"{name}.pkl", "-o", f"bp_{name}",
             "--uninvert-data", "--no-half-maps"], tmp_path)
        rec = read_volume(tmp_path / f"bp_{name}" / "backproject.mrc").data
        scores[name] = np.corrcoef(rec.ravel(), vol.data.ravel())[0, 1]
        scores[name + "_mirror"] = np.corrcoef(rec[::-1].ravel(), vol.data.ravel())[0, 1]
    print("\ncryoDRGN map vs truth:", {k: round(float(v), 3) for k, v in scores.items()})
    assert scores["ours"] > 0.75
    assert scores["flipped"] < scores["ours"] - 0.4
    assert scores["ours_mirror"] < 0.3


def test_ctf_is_cryodrgn_negated(cryodrgn, tmp_path):
    """cryoDRGN's CTF is −(RELION's): its CTF(0) = −Q0, ours (RELION) = +Q0."""
    py = cryodrgn.parent / "python"
    code = (
        "import sys, torch, numpy as np\n"
        "from cryodrgn import ctf\n"
        "f = torch.tensor(np.load(sys.argv[1]))\n"
        "c = ctf.compute_ctf(f, *[torch.tensor(v) for v in (15000., 14000., 30., 300., 2.7, 0.07)])\n"
        "np.save(sys.argv[2], c.numpy())\n")
    D, apix = 64, 1.5
    ky, kx = frequency_grid(D, apix, rfft=False, dtype=torch.float64)
    np.save(tmp_path / "f.npy", torch.stack([kx.ravel(), ky.ravel()], -1).numpy())
    run([py, "-c", code, tmp_path / "f.npy", tmp_path / "c.npy"], tmp_path)
    theirs = np.load(tmp_path / "c.npy").reshape(D, D)
    ours = compute_ctf(CTFParams(15000., 14000., 30., 300., 2.7, 0.07, 0., 0., 1.), D, apix, rfft=False,
                       dtype=torch.float64)[0].numpy()
    # equal up to the sign and cryoDRGN's slightly different wavelength constants
    assert np.abs(ours + theirs).max() < 0.01
    assert ours[0, 0] == pytest.approx(0.07, abs=1e-9)
