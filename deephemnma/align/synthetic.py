"""Stand-in test data for the alignment: a small reference with normal modes, and particle
images simulated through a *voxel volume* (not through the alignment's analytic projector).

* :func:`toy_reference` — a compact random chain of atoms (two lobes joined by a hinge, so
  that the low modes are domain motions) and its lowest non-rigid anisotropic-network-model
  modes (springs between atoms closer than ``cutoff``), numbered from 7 and of unit norm over
  3N, as ``deephemnma nma`` writes them.
* :func:`anm_modes` — the ANM modes of any coordinates.
* :func:`simulate_images` — per particle: deform, rasterise the atoms as voxel integrals of
  narrow 3-D Gaussians into a D³ volume, project it by the Fourier-slice theorem
  (:class:`deephemnma.projection.FourierSliceProjector`) at the particle's orientation and
  origin, apply the CTF, add white noise before and after it at a target SNR, optionally
  phase flip. The alignment model (wider Gaussians, analytic projection) therefore does not
  match the data exactly, as with real data.
* :func:`write_dataset` — the images as an MRC stack, a particles STAR (RELION 3.1, CTF
  columns, optics with ``rlnCtfDataArePhaseFlipped``) and a ground-truth STAR with the pose
  and amplitude columns the alignment writes.

The benchmark uses ``deephemnma simulate`` (the paper's recipe) when available; this module
keeps the tests independent of it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import erf

from .. import geometry
from ..ctf import CTFParams, compute_ctf
from ..projection import FourierSliceProjector


def anm_modes(coords: np.ndarray, n_modes: int, cutoff: float = 10.0, gamma: float = 1.0) -> np.ndarray:
    """Lowest ``n_modes`` non-rigid ANM modes (n_modes, N, 3), unit norm over 3N, sign fixed
    so that the largest component is positive."""
    x = np.asarray(coords, dtype=np.float64)
    n = len(x)
    d = x[:, None, :] - x[None, :, :]
    r2 = (d ** 2).sum(-1)
    contact = (r2 < cutoff ** 2) & (r2 > 0)
    H = np.zeros((n, n, 3, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        blk = -gamma * d[..., :, None] * d[..., None, :] / np.where(contact, r2, 1.0)[..., None, None]
    blk[~contact] = 0
    H += blk
    H[np.arange(n), np.arange(n)] = -blk.sum(1)
    H = H.transpose(0, 2, 1, 3).reshape(3 * n, 3 * n)
    vals, vecs = np.linalg.eigh(H)
    v = vecs[:, 6: 6 + n_modes].T.reshape(n_modes, n, 3)
    v /= np.linalg.norm(v.reshape(n_modes, -1), axis=1)[:, None, None]
    for k in range(n_modes):
        flat = v[k].reshape(-1)
        if flat[np.argmax(np.abs(flat))] < 0:
            v[k] = -v[k]
    return v


def toy_reference(n_atoms: int = 300, n_modes: int = 3, seed: int = 0, spacing: float = 3.8,
                  cutoff: float = 10.0) -> dict:
    """A two-lobed random chain of ``n_atoms`` (a Cα-like trace, ``spacing`` Å between
    neighbours) and its ANM modes 7… as a mode-set mapping (coords, weights, sigma, elements,
    mode_numbers, vectors)."""
    rng = np.random.default_rng(seed)
    pts = []
    half = n_atoms // 2
    for lobe, centre in ((0, np.array([-9.0, 0.0, 0.0])), (1, np.array([9.0, 2.0, 0.0]))):
        m = half if lobe == 0 else n_atoms - half
        p = centre + rng.normal(scale=1.0, size=3)
        radius = spacing * (m ** (1 / 3)) * 0.75
        for _ in range(m):
            for _try in range(100):
                step = rng.normal(size=3)
                step *= spacing / np.linalg.norm(step)
                q = p + step
                if np.linalg.norm(q - centre) < radius and (not pts or np.min(np.linalg.norm(np.asarray(pts) - q, axis=1)) > 0.7 * spacing):
                    break
            pts.append(q)
            p = q
    x = np.asarray(pts)
    x -= x.mean(0)
    vec = anm_modes(x, n_modes, cutoff=cutoff)
    return {
        "coords": x, "weights": np.full(n_atoms, 6.0), "sigma": np.full(n_atoms, 1.0),
        "elements": np.array(["C"] * n_atoms), "mode_numbers": np.arange(7, 7 + n_modes), "vectors": vec,
    }


def rasterise(coords: np.ndarray, weights: np.ndarray, sigma: float, box: int, pixel_size: float) -> np.ndarray:
    """Voxel integrals (box³, [z, y, x]) of 3-D Gaussians of width ``sigma`` Å centred at
    ``coords`` (Å relative to the voxel box//2)."""
    edges = (np.arange(box + 1) - box // 2 - 0.5) * pixel_size  # voxel boundaries in Å

    def profile(c):  # (N, box) integral over each voxel of a 1-D unit Gaussian
        z = (edges[None, :] - c[:, None]) / (sigma * math.sqrt(2))
        return 0.5 * np.diff(erf(z), axis=1)

    gx, gy, gz = profile(coords[:, 0]), profile(coords[:, 1]), profile(coords[:, 2])
    w = np.asarray(weights, dtype=np.float64)
    yx = np.einsum("ny,nx->nyx", gy * w[:, None], gx).reshape(len(coords), -1)
    return (gz.T @ yx).reshape(box, box, box) / pixel_size ** 3


def simulate_images(reference: dict, n: int, box: int, pixel_size: float, *, seed: int = 0,
                    amplitudes: np.ndarray | None = None, amplitude_std: float = 60.0,
                    shift_range: float = 2.0, defocus: float = 5000.0, voltage: float = 200.0, cs: float = 2.0,
                    amp_contrast: float = 0.1, ctf: bool = True, snr: float | None = 0.1,
                    noise_before_ctf: float = 0.5, phase_flip: bool = True, atom_sigma: float = 0.5,
                    oversample: int = 2) -> tuple[np.ndarray, pd.DataFrame]:
    """Images (n, box, box) float32 and their ground truth (Euler °, origins Å, amplitudes,
    defocus) — see the module docstring. ``shift_range`` in pixels (uniform per axis)."""
    rng = np.random.default_rng(seed)
    x0 = np.asarray(reference["coords"], dtype=np.float64)
    x0 = x0 - x0.mean(0)
    V = np.asarray(reference["vectors"], dtype=np.float64)
    w = np.asarray(reference["weights"], dtype=np.float64)
    M = len(V)
    rot = geometry.random_rotations(n, rng)
    euler = geometry.matrix_to_euler(rot)
    origins = rng.uniform(-shift_range, shift_range, size=(n, 2)) * pixel_size
    if amplitudes is None:
        amplitudes = rng.normal(scale=amplitude_std, size=(n, M))
    amplitudes = np.asarray(amplitudes, dtype=np.float64).reshape(n, M)
    imgs = np.empty((n, box, box), dtype=np.float32)
    for i in range(n):
        X = x0 + np.einsum("m,mnj->nj", amplitudes[i], V)
        vol = rasterise(X, w, atom_sigma, box, pixel_size)
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
    # normalise the background (outside 0.9 of the half box) to mean 0, std 1, as preprocess does
    bg = ~_disc(box, 0.9 * box / 2)
    mu = out[:, bg].mean(1)[:, None, None]
    sd = out[:, bg].std(1)[:, None, None].clamp_min(1e-12)
    out = ((out - mu) / sd).to(torch.float32).numpy()
    truth = pd.DataFrame({
        "rlnAngleRot": euler[:, 0], "rlnAngleTilt": euler[:, 1], "rlnAnglePsi": euler[:, 2],
        "rlnOriginXAngst": origins[:, 0], "rlnOriginYAngst": origins[:, 1],
        "rlnDefocusU": params.defocus_u, "rlnDefocusV": params.defocus_v, "rlnDefocusAngle": params.defocus_angle,
    })
    from ..star import amplitude_column

    for k, m in enumerate(np.asarray(reference["mode_numbers"]).reshape(-1)):
        truth[amplitude_column(int(m))] = amplitudes[:, k]
    return out, truth


def _disc(box: int, radius: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(box) - box // 2, torch.arange(box) - box // 2, indexing="ij")
    return (x * x + y * y) <= radius * radius


def write_dataset(out_dir, images: np.ndarray, truth: pd.DataFrame, pixel_size: float, *, voltage: float = 200.0,
                  cs: float = 2.0, amp_contrast: float = 0.1, phase_flipped: bool = True, ctf: bool = True,
                  stack_name: str = "particles.mrcs") -> tuple[Path, Path]:
    """Write ``particles.star`` (+ stack) and ``ground_truth.star`` into ``out_dir``."""
    from ..mrc import write_stack
    from ..star import write_star

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
