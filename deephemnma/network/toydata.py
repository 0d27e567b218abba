"""A small labelled particle set with known answers, for the network's tests and benchmarks.

A random asymmetric "molecule" of Gaussian atoms is deformed along a few smooth synthetic
"normal modes" (unit-norm 3N vectors, numbered from 7 as in the paper), rotated uniformly
on SO(3), shifted and projected analytically (:func:`deephemnma.core.projection.project_gaussians`),
then white Gaussian noise is added. The STAR file carries the ground truth as the HEMNMA
labels (``rlnAngleRot/Tilt/Psi``, ``rlnOriginXAngst/YAngst``, ``dhnmaAmplitudeNNN``).

This is not the paper's benchmark (``deephemnma simulate`` is): it exists so that the
network can be trained and checked in seconds to minutes on a CPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core import geometry
from ..core.projection import project_gaussians
from .targets import amplitude_column


def toy_molecule(n_atoms: int = 24, radius: float = 30.0, n_modes: int = 3, seed: int = 0):
    """(coords (N, 3) Å, modes (K, N, 3) unit-norm 3N vectors) of a random asymmetric molecule."""
    rng = np.random.default_rng([seed, 11])
    coords = rng.normal(size=(n_atoms, 3)) * radius / 2
    coords[: n_atoms // 3, 0] += radius * 0.6  # an arm: no accidental symmetry
    coords -= coords.mean(0)
    modes = []
    for k in range(n_modes):  # smooth fields: rigid-ish motions of the arm and hinge bending
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        w = np.exp(-((coords - coords[rng.integers(n_atoms)]) ** 2).sum(1) / (2 * radius**2))[:, None]
        field = np.cross(axis, coords) * w + rng.normal(size=3) * w * radius / 3
        field -= field.mean(0)
        modes.append(field / np.linalg.norm(field))
    return coords, np.stack(modes)


def make_toy_particles(out_dir: str | Path, n: int = 512, box: int = 64, pixel_size: float = 2.0,
                       snr: float = 1.0, amplitude_scale: float = 60.0, max_shift_px: float = 3.0,
                       n_modes: int = 3, seed: int = 0, name: str = "particles",
                       stack_size: int | None = None, max_angle_deg: float | None = None) -> Path:
    """Write ``out_dir/name.star`` (+ ``name_NNN.mrcs`` stacks) with ``n`` labelled particles.

    Amplitudes follow the paper's helix for the first three modes (q7 = −s·r, q8 = s·sin πr,
    q9 = s·cos πr, r ~ U(0, 1), s = ``amplitude_scale``), then uniform in ±s. SNR is the
    variance of the noise-free images over the noise variance. Orientations are uniform on
    SO(3), or with ``max_angle_deg`` within that angle of the identity (uniform axis, uniform
    angle): an easier problem for quick learning checks. Returns the STAR path.
    """
    import mrcfile
    import starfile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 22])
    coords, modes = toy_molecule(n_modes=n_modes, seed=seed)
    r = rng.uniform(0, 1, n)
    amp = rng.uniform(-amplitude_scale, amplitude_scale, (n, n_modes))
    helix = [-amplitude_scale * r, amplitude_scale * np.sin(np.pi * r), amplitude_scale * np.cos(np.pi * r)]
    for k in range(min(3, n_modes)):
        amp[:, k] = helix[k]
    if max_angle_deg is None:
        angles = geometry.random_euler(n, rng)
    else:
        axis = rng.normal(size=(n, 3))
        axis /= np.linalg.norm(axis, axis=1, keepdims=True)
        half = np.deg2rad(rng.uniform(0, max_angle_deg, n)) / 2
        angles = geometry.quaternion_to_euler(np.concatenate([np.cos(half)[:, None], np.sin(half)[:, None] * axis], 1))
    shifts_px = rng.uniform(-max_shift_px, max_shift_px, (n, 2))
    deformed = coords[None] + np.einsum("nk,kaj->naj", amp, modes)
    A = geometry.euler_to_matrix(angles)
    imgs = []
    for s in range(0, n, 256):
        imgs.append(project_gaussians(torch.as_tensor(deformed[s:s + 256]), torch.ones(len(coords)), 4.0,
                                      torch.as_tensor(A[s:s + 256]), box, pixel_size,
                                      origins_px=torch.as_tensor(shifts_px[s:s + 256])).float().numpy())
    clean = np.concatenate(imgs)
    sig = clean.std()
    noisy = (clean + rng.normal(size=clean.shape) * sig / np.sqrt(snr)).astype(np.float32)
    stack_size = stack_size or n
    names = []
    for j, s in enumerate(range(0, n, stack_size)):
        fname = f"{name}_{j:03d}.mrcs"
        with mrcfile.new(out / fname, overwrite=True) as m:
            m.set_data(noisy[s:s + stack_size])
            m.set_image_stack()
            m.voxel_size = pixel_size
        names += [f"{i + 1:06d}@{fname}" for i in range(min(stack_size, n - s))]
    particles = pd.DataFrame({
        "rlnImageName": names,
        "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
        "rlnOriginXAngst": shifts_px[:, 0] * pixel_size, "rlnOriginYAngst": shifts_px[:, 1] * pixel_size,
        "rlnOpticsGroup": np.ones(n, dtype=int),
    })
    for k in range(n_modes):
        particles[amplitude_column(7 + k)] = amp[:, k]
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [200.0],
                           "rlnSphericalAberration": [2.0], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [pixel_size], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    path = out / f"{name}.star"
    starfile.write({"optics": optics, "particles": particles}, path, overwrite=True)
    return path
