"""Small test data for the alignment: a toy reference with real normal modes, and particle
images simulated through a *voxel volume* (not through the alignment's analytic projector).

* :func:`toy_atoms` — a compact random Cα-like chain (two lobes, so that the low modes are
  domain motions) as :class:`deephemnma.core.structure.Atoms`.
* :func:`toy_modes` — writes it as a PDB file and runs the project's normal-mode analysis
  on it (:func:`deephemnma.nma.run_nma`, Cα network): a mode file exactly like
  ``deephemnma nma`` writes.
* :func:`simulate_images` — per particle: deform, rasterise the atoms as voxel integrals of
  *narrower* 3-D Gaussians into a D³ volume, project it by the Fourier-slice theorem
  (:class:`deephemnma.core.projection.FourierSliceProjector`) at the particle's orientation and
  origin, apply the CTF, add white noise before and after it at a target SNR, optionally
  phase flip, normalise the background. The alignment's model (wider Gaussians, analytic
  projection) therefore does not match the data exactly, as with real data.
* :func:`write_dataset` — an MRC stack, a particles STAR (RELION 3.1, CTF columns, optics
  with ``rlnCtfDataArePhaseFlipped``) and a ground-truth STAR with the pose and amplitude
  columns the alignment writes.

The benchmark uses ``deephemnma simulate`` (the paper's recipe); this module keeps the tests
small and independent of it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core import geometry
from ..core.ctf import CTFParams, compute_ctf
from ..core.projection import FourierSliceProjector
from .model import ElasticModel


def toy_atoms(n_atoms: int = 300, seed: int = 0, spacing: float = 3.8):
    """A two-lobed random chain of ``n_atoms`` Cα atoms (``spacing`` Å between neighbours)."""
    from ..core.structure import Atoms

    rng = np.random.default_rng(seed)
    pts: list[np.ndarray] = []
    half = n_atoms // 2
    for lobe, centre in ((0, np.array([-9.0, 0.0, 0.0])), (1, np.array([9.0, 2.0, 0.0]))):
        m = half if lobe == 0 else n_atoms - half
        p = centre + rng.normal(scale=1.0, size=3)
        radius = spacing * (m ** (1 / 3)) * 0.75
        for _ in range(m):
            q = p
            for _try in range(100):
                step = rng.normal(size=3)
                q = p + step * spacing / np.linalg.norm(step)
                if np.linalg.norm(q - centre) < radius and \
                        (not pts or np.min(np.linalg.norm(np.asarray(pts) - q, axis=1)) > 0.7 * spacing):
                    break
            pts.append(q)
            p = q
    x = np.asarray(pts)
    n = len(x)
    return Atoms(coords=x - x.mean(0), element=["C"] * n, atom_name=["CA"] * n, res_name=["ALA"] * n,
                 res_seq=np.arange(1, n + 1), ins_code=[""] * n, chain_id=["A"] * n, weights=np.full(n, 6.0))


def toy_modes(out, n_atoms: int = 300, seed: int = 0, n_modes: int = 6, select=(7, 8, 9)) -> Path:
    """Write ``out`` (a mode file) for :func:`toy_atoms` with the project's NMA (Cα network,
    cutoff 12 Å, ``n_modes`` non-rigid modes computed, ``select`` selected); the PDB goes
    beside it."""
    from ..nma import run_nma
    from ..core.structure import write_structure

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pdb = out.with_suffix(".pdb")
    write_structure(pdb, toy_atoms(n_atoms, seed))
    cfg = {"reference": {"atoms": "ca"}, "nma": {"cutoff": 12.0, "n_modes": 6 + n_modes, "modes": list(select)}}
    run_nma(pdb, out, cfg, summary=out.with_suffix(".json"))
    return out


def simulate_images(model: ElasticModel, n: int, box: int, pixel_size: float, *, seed: int = 0,
                    amplitudes: np.ndarray | None = None, amplitude_std: float = 60.0,
                    shift_range: float = 2.0, defocus: float = 5000.0, voltage: float = 200.0, cs: float = 2.0,
                    amp_contrast: float = 0.1, ctf: bool = True, snr: float | None = 0.1,
                    noise_before_ctf: float = 0.5, phase_flip: bool = True, atom_sigma: float = 0.5,
                    oversample: int = 2) -> tuple[np.ndarray, pd.DataFrame]:
    """Images (n, box, box) float32 and their ground truth (Euler °, origins Å, amplitudes,
    defocus) — see the module docstring. ``shift_range`` in pixels (uniform per axis); the
    atoms are drawn as Gaussians of width ``atom_sigma`` Å whatever the model's widths. With
    ``snr`` None no noise is added (and the background is not normalised)."""
    rng = np.random.default_rng(seed)
    x0, V, w = model.coords, model.vectors, model.weights
    M = model.n_modes
    rot = geometry.random_rotations(n, rng)
    euler = geometry.matrix_to_euler(rot)
    origins = rng.uniform(-shift_range, shift_range, size=(n, 2)) * pixel_size
    if amplitudes is None:
        amplitudes = rng.normal(scale=amplitude_std, size=(n, M))
    amplitudes = np.asarray(amplitudes, dtype=np.float64).reshape(n, M)
    imgs = np.empty((n, box, box), dtype=np.float32)
    for i in range(n):
        vol = ElasticModel(x0, w, atom_sigma, model.mode_numbers, V).volume(amplitudes[i][None], box, pixel_size)
        proj = FourierSliceProjector(vol, oversample=oversample)
        imgs[i] = proj.project(torch.as_tensor(rot[i:i + 1], dtype=torch.float32),
                               torch.as_tensor(origins[i:i + 1] / pixel_size))[0].numpy()
    params = CTFParams(np.full(n, float(defocus)), np.full(n, float(defocus)), 0.0, voltage, cs, amp_contrast,
                       0.0, 0.0, 1.0)
    clean = torch.as_tensor(imgs)
    if ctf:
        c = compute_ctf(params, box, pixel_size)
        F = torch.fft.rfft2(clean)
        signal = torch.fft.irfft2(F * c, s=(box, box))
    else:
        c = None
        signal = clean
    out = signal
    if snr is not None:
        mask = _disc(box, 0.9 * box / 2)
        s_var = float(signal[:, mask].var(dim=1).mean())
        total = s_var / snr
        gen = torch.Generator().manual_seed(int(seed) + 1)
        n1 = torch.randn(clean.shape, generator=gen)
        n2 = torch.randn(clean.shape, generator=gen)
        if c is not None:
            mean_c2 = float((c ** 2).mean())
            s1 = math.sqrt(noise_before_ctf * total / max(mean_c2, 1e-12))
            pre = torch.fft.irfft2(torch.fft.rfft2(n1 * s1) * c, s=(box, box))
        else:
            pre = n1 * math.sqrt(noise_before_ctf * total)
        out = signal + pre + n2 * math.sqrt((1 - noise_before_ctf) * total)
    if ctf and phase_flip:
        out = torch.fft.irfft2(torch.fft.rfft2(out) * torch.sign(c), s=(box, box))
    if snr is not None:  # background (outside 0.9 of the half box) to mean 0, std 1, as preprocess does
        bg = ~_disc(box, 0.9 * box / 2)
        mu = out[:, bg].mean(1)[:, None, None]
        sd = out[:, bg].std(1)[:, None, None].clamp_min(1e-12)
        out = (out - mu) / sd
    out = out.to(torch.float32).numpy()
    truth = pd.DataFrame({
        "rlnAngleRot": euler[:, 0], "rlnAngleTilt": euler[:, 1], "rlnAnglePsi": euler[:, 2],
        "rlnOriginXAngst": origins[:, 0], "rlnOriginYAngst": origins[:, 1],
        "rlnDefocusU": params.defocus_u, "rlnDefocusV": params.defocus_v, "rlnDefocusAngle": params.defocus_angle,
    })
    from ..core.star import amplitude_column

    for k, m in enumerate(model.mode_numbers):
        truth[amplitude_column(int(m))] = amplitudes[:, k]
    return out, truth


def _disc(box: int, radius: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(box) - box // 2, torch.arange(box) - box // 2, indexing="ij")
    return (x * x + y * y) <= radius * radius


def write_dataset(out_dir, images: np.ndarray, truth: pd.DataFrame, pixel_size: float, *, voltage: float = 200.0,
                  cs: float = 2.0, amp_contrast: float = 0.1, phase_flipped: bool = True, ctf: bool = True,
                  stack_name: str = "particles.mrcs") -> tuple[Path, Path]:
    """Write ``particles.star`` (+ stack) and ``ground_truth.star`` into ``out_dir``."""
    from ..core.mrc import write_stack
    from ..core.star import write_star

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_stack(out_dir / stack_name, images, pixel_size)
    n = len(images)
    names = [f"{i + 1:06d}@{stack_name}" for i in range(n)]
    particles = pd.DataFrame({"rlnImageName": names})
    if ctf:
        for col in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
            particles[col] = truth[col].to_numpy()
    particles["rlnOpticsGroup"] = 1
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [voltage],
        "rlnSphericalAberration": [cs], "rlnAmplitudeContrast": [amp_contrast],
        "rlnImagePixelSize": [pixel_size], "rlnImageSize": [images.shape[-1]], "rlnImageDimensionality": [2],
        "rlnCtfDataArePhaseFlipped": [int(bool(phase_flipped and ctf))],
    })
    gt = truth.copy()
    gt.insert(0, "rlnImageName", names)
    gt["rlnOpticsGroup"] = 1
    write_star(out_dir / "particles.star", particles, optics)
    write_star(out_dir / "ground_truth.star", gt, optics)
    return out_dir / "particles.star", out_dir / "ground_truth.star"
