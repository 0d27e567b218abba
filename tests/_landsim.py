"""Small synthetic data sets for the landscape / reconstruction tests (helper "land").

Particles are drawn with the ANALYTIC Gaussian-atom projector (``project_gaussians``), an
independent forward model from the Fourier-slice back-projection under test, modulated by a
RELION CTF, and written as a RELION 3.1 STAR + MRC stack with ``starfile``/``mrcfile``.
The true map is the same atoms rasterised into voxels (``density.atoms_to_volume``).
"""
from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch

from deephemnma.core.ctf import CTFParams, apply_ctf, compute_ctf
from deephemnma.core.geometry import matrix_to_euler, random_rotations
from deephemnma.core.projection import project_gaussians


def blob_model(n_atoms=30, scale=6.0, seed=0):
    rng = np.random.default_rng(seed)
    coords = rng.normal(scale=scale, size=(n_atoms, 3))
    weights = rng.uniform(0.5, 2.0, n_atoms)
    return coords, weights


def simulate_particles(tmp: Path, n=400, box=32, pix=1.5, sigma=2.0, seed=1, ctf=True, shift_px=3.0,
                       coords=None, weights=None, name="particles", premultiply=False):
    """Write ``name``.star + ``name``.mrcs in ``tmp``; return dict with paths, truth and poses."""
    if coords is None:
        coords, weights = blob_model()
    rng = np.random.default_rng(seed)
    R = random_rotations(n, rng)
    origins = rng.uniform(-shift_px, shift_px, (n, 2))
    imgs = project_gaussians(coords, weights, sigma, torch.tensor(R), box, pix, torch.tensor(origins)).float()
    defocus = rng.uniform(8000, 20000, n)
    if ctf:
        params = CTFParams(defocus, defocus * 1.02, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0)
        c = compute_ctf(params, box, pix)
        imgs = apply_ctf(imgs, c)
        if premultiply:
            imgs = apply_ctf(imgs, c)
    imgs = imgs.numpy().astype(np.float32)
    stack = tmp / f"{name}.mrcs"
    with mrcfile.new(stack, overwrite=True) as m:
        m.set_data(imgs)
        m.set_image_stack()
        m.voxel_size = pix
    eul = matrix_to_euler(R)
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{stack.name}" for i in range(n)],
        "rlnAngleRot": eul[:, 0], "rlnAngleTilt": eul[:, 1], "rlnAnglePsi": eul[:, 2],
        "rlnOriginXAngst": origins[:, 0] * pix, "rlnOriginYAngst": origins[:, 1] * pix,
        "rlnDefocusU": defocus, "rlnDefocusV": defocus * 1.02, "rlnDefocusAngle": np.full(n, 30.0),
        "rlnOpticsGroup": np.ones(n, dtype=int),
    })
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [pix], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    if premultiply:
        optics["rlnCtfDataAreCtfPremultiplied"] = [1]
    star = tmp / f"{name}.star"
    starfile.write({"optics": optics, "particles": particles}, star)
    return dict(star=star, stack=stack, coords=coords, weights=weights, sigma=sigma, box=box, pix=pix,
                rotations=R, origins=origins, images=imgs)


def gaussian_table(n, dims=3, seed=0, scale=(300.0, 150.0, 60.0), modes=(7, 8, 9)):
    """A particle table with amplitude columns drawn from a correlated Gaussian."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, dims)) * np.asarray(scale[:dims])
    Q, _ = np.linalg.qr(rng.standard_normal((dims, dims)))
    amps = z @ Q.T
    df = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)],
                       "rlnOpticsGroup": np.ones(n, dtype=int)})
    for j, m in enumerate(modes[:dims]):
        df[f"dhnmaAmplitude{m:03d}"] = amps[:, j]
    return df


def optics_table(pix=1.0, box=64):
    return pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                         "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                         "rlnImagePixelSize": [pix], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
