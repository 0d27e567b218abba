"""Global pose (and coarse conformation) search against a bank of templates.

Grid
----
Projection directions: a Fibonacci lattice on the whole sphere (no symmetry is assumed; a
direction and its opposite give mirror images, not the same image) with ``n_dir ≈ 4π/step²``
points, each turned into (rot, tilt) by the viewing direction ``Aᵀ·ẑ = (sin tilt cos rot,
sin tilt sin rot, cos tilt)``; in-plane angles psi every ``step`` degrees. Optionally each
orientation is combined with a few conformations (a coarse grid of amplitudes), which helps
when the deformations are large compared with the search level's resolution.

Bank
----
The templates (the model deformed by each grid conformation, rotated by each grid
orientation, centred) are projected once per run at the search level and kept as their
in-band Fourier coefficients. A particle's CTF goes on the image side of the correlation
and into the template norm through one matrix product (see :mod:`.levels`), so the same
bank serves every particle. Shifts: every origin on a square grid of one search-level pixel
within ``max_shift`` is tried by phase-ramping the image. All (template, particle, shift)
correlations of a batch are one matrix product.

Result: for each particle, the ``top_k`` best (template, shift) pairs whose orientations are
at least ``2·step`` apart (non-maximum suppression), with their scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core import geometry
from .levels import Level, LevelData
from .model import ElasticModel


def fibonacci_directions(n: int) -> np.ndarray:
    """``n`` nearly uniform unit vectors on the sphere (deterministic)."""
    i = np.arange(n, dtype=np.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (3 - math.sqrt(5)) * i
    r = np.sqrt(np.clip(1 - z * z, 0, None))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], -1)


def orientation_grid(step_deg: float) -> np.ndarray:
    """RELION Euler angles (T, 3) in degrees covering SO(3) with about ``step_deg`` spacing."""
    step = math.radians(step_deg)
    n_dir = max(2, int(round(4 * math.pi / (step * step))))
    n_psi = max(1, int(round(360.0 / step_deg)))
    d = fibonacci_directions(n_dir)
    tilt = np.degrees(np.arccos(np.clip(d[:, 2], -1, 1)))
    rot = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    psi = np.arange(n_psi) * 360.0 / n_psi
    rr = np.repeat(rot, n_psi)
    tt = np.repeat(tilt, n_psi)
    pp = np.tile(psi, n_dir)
    return np.stack([rr, tt, pp], -1)


def amplitude_grid(n_modes: int, points: int, half_range: np.ndarray | float) -> np.ndarray:
    """Conformations (C, M): a grid of ``points`` values per mode over ±``half_range``
    (the zero conformation is always included; ``points`` ≤ 1 gives only zero)."""
    if points <= 1 or n_modes == 0:
        return np.zeros((1, n_modes))
    hr = np.broadcast_to(np.asarray(half_range, dtype=np.float64), (n_modes,))
    axes = [np.linspace(-h, h, points) for h in hr]
    g = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, n_modes)
    if not (np.abs(g).sum(1) == 0).any():
        g = np.concatenate([np.zeros((1, n_modes)), g])
    return g


def shift_grid(max_shift_px: float) -> np.ndarray:
    """Integer origins (S, 2) in pixels with |x|, |y| ≤ max_shift_px (within a disc)."""
    r = int(math.floor(max_shift_px + 1e-9))
    ax = np.arange(-r, r + 1)
    g = np.stack(np.meshgrid(ax, ax, indexing="xy"), -1).reshape(-1, 2).astype(np.float64)
    keep = (g ** 2).sum(1) <= max_shift_px ** 2 + 1e-9
    g = g[keep]
    return g[np.argsort((g ** 2).sum(1), kind="stable")]


@dataclass
class Candidates:
    """Top candidates per particle: ``euler`` (B, K, 3) degrees, ``origins`` (B, K, 2) Å,
    ``amplitudes`` (B, K, M), ``score`` (B, K); ``n`` (B,) valid candidates per particle,
    ``zscore`` (B,) of the best candidate against all of the particle's grid scores."""

    euler: np.ndarray
    origins: np.ndarray
    amplitudes: np.ndarray
    score: np.ndarray
    n: np.ndarray
    zscore: np.ndarray


class TemplateBank:
    """The search templates at one level (see the module docstring)."""

    def __init__(self, model: ElasticModel, level: Level, step_deg: float, conformations: np.ndarray,
                 batch: int = 2048):
        self.level = level
        self.step = float(step_deg)
        self.euler = orientation_grid(step_deg)                  # (O, 3)
        self.rot = geometry.euler_to_matrix(self.euler)          # (O, 3, 3)
        self.conformations = np.asarray(conformations, dtype=np.float64).reshape(-1, model.n_modes)
        d = level.box
        k = _band_index(level)
        self._band = k                                           # (K,) flat rfft indices in band
        mult = _multiplicity_flat(level)[k]                      # (K,)
        C, O = len(self.conformations), len(self.euler)
        T = C * O
        K = len(k)
        # numerator Σ mult·Re(conj(T̂)·Ĵ) = [Re T̂, Im T̂] · [mult Re Ĵ, mult Im Ĵ]: one (T, 2K) matrix
        mat = torch.empty(T, 2 * K)
        R_all = torch.as_tensor(self.rot, dtype=torch.float32)
        # index-0 phase reference of a d² image whose centre is pixel d//2
        ky = torch.fft.fftfreq(d, dtype=torch.float64)
        kx = torch.fft.rfftfreq(d, dtype=torch.float64)
        c = d // 2
        ramp = torch.polar(torch.ones(d, d // 2 + 1, dtype=torch.float64),
                           -2 * math.pi * c * (ky[:, None] + kx[None, :])).reshape(-1)[k].to(torch.complex64)
        fine = 2 * d
        for ci in range(C):
            # the model rasterised at twice the level's sampling, Fourier transformed once and
            # sampled on central slices (cheap per orientation whatever the number of atoms)
            vol = model.volume(self.conformations[ci][None], fine, level.pixel_size / 2, level.blur)
            slicer = _CentralSlices(vol, d)
            for a in range(0, O, batch):
                R = R_all[a: a + batch]
                F = slicer(R).reshape(len(R), -1)[:, k] * ramp
                mat[ci * O + a: ci * O + a + len(R), :K] = F.real
                mat[ci * O + a: ci * O + a + len(R), K:] = F.imag
        self.mat = mat                                           # (T, 2K)
        self.power = mat[:, :K] ** 2 + mat[:, K:] ** 2           # (T, K) |T̂|²
        self.mult = mult                                         # (K,)
        self.n_orient = O

    def __len__(self) -> int:
        return self.mat.shape[0]

    def template_pose(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Euler angles (…, 3) and conformations (…, M) of template indices."""
        t = np.asarray(t)
        return self.euler[t % self.n_orient], self.conformations[t // self.n_orient]

    def search(self, data: LevelData, max_shift: float, top_k: int, block: int = 8) -> Candidates:
        """Best ``top_k`` distinct candidates of each particle of ``data`` (a LevelData at this
        bank's level). ``max_shift`` in Å."""
        level = self.level
        d = level.box
        k = self._band
        shifts = shift_grid(max_shift / level.pixel_size)                       # (S, 2) px
        S = len(shifts)
        ky = torch.fft.fftfreq(d, dtype=torch.float64)
        kx = torch.fft.rfftfreq(d, dtype=torch.float64)
        KY = ky[:, None].expand(d, d // 2 + 1).reshape(-1)[k]
        KX = kx[None, :].expand(d, d // 2 + 1).reshape(-1)[k]
        sh = torch.as_tensor(shifts)
        ramp = torch.polar(torch.ones(S, len(k), dtype=torch.float64),
                           -2 * math.pi * (sh[:, 0:1] * KX[None] + sh[:, 1:2] * KY[None])).to(torch.complex64)
        B = len(data)
        M = self.conformations.shape[1]
        K = max(1, int(top_k))
        out = Candidates(np.zeros((B, K, 3)), np.zeros((B, K, 2)), np.zeros((B, K, M)),
                         np.full((B, K), -np.inf), np.zeros(B, dtype=np.int64), np.zeros(B))
        img = data.image.reshape(B, -1)[:, k]
        ctf = data.ctf.reshape(B, -1)[:, k]
        inorm = data.image_norm.clamp_min(1e-30)
        min_sep = 2.0 * self.step
        for b0 in range(0, B, block):
            b1 = min(B, b0 + block)
            nb = b1 - b0
            J = (img[b0:b1] * ctf[b0:b1])[:, None, :] * ramp[None]               # (nb, S, K)
            Jm = torch.cat([J.real * self.mult, J.imag * self.mult], -1).reshape(nb * S, -1)
            num = (self.mat @ Jm.T).reshape(len(self), nb, S)                    # (T, nb, S)
            best_num, best_s = num.max(dim=2)                                    # (T, nb)
            norm2 = self.power @ (self.mult[:, None] * ctf[b0:b1].T ** 2)        # (T, nb)
            sc = best_num / torch.sqrt(norm2.clamp_min(1e-30)) / inorm[b0:b1][None]
            for j in range(nb):
                col = sc[:, j]
                mu, sd = float(col.mean()), float(col.std())
                order = torch.argsort(col, descending=True)[: max(64, 16 * K)].numpy()
                picked = []
                R_pick = []
                for t in order:
                    Rt = self.rot[t % self.n_orient]
                    if any(geometry.geodesic_angle(Rt, Rp) < min_sep for Rp in R_pick):
                        continue
                    picked.append(int(t))
                    R_pick.append(Rt)
                    if len(picked) == K:
                        break
                i = b0 + j
                e, q = self.template_pose(np.asarray(picked))
                n = len(picked)
                out.euler[i, :n] = e
                out.amplitudes[i, :n] = q
                out.origins[i, :n] = shifts[best_s[picked, j].numpy()] * level.pixel_size
                out.score[i, :n] = col[picked].numpy()
                out.n[i] = n
                out.zscore[i] = (out.score[i, 0] - mu) / sd if sd > 0 else 0.0
        return out


def _band_index(level: Level) -> torch.Tensor:
    from .levels import band_weight

    W = band_weight(level)
    return torch.nonzero(W.reshape(-1) > 0).reshape(-1)


def _multiplicity_flat(level: Level) -> torch.Tensor:
    from .levels import rfft_multiplicity

    d = level.box
    return rfft_multiplicity(d)[None, :].expand(d, d // 2 + 1).reshape(-1)


class _CentralSlices:
    """Central slices of a volume's Fourier transform on the rfft grid of a ``box``² image
    (frequencies |k| ≤ box/2 in units of the volume's box), phase referenced to the volume's
    centre. The volume (size V ≥ box) is zero-padded twice, pre-corrected for trilinear
    interpolation (sinc²) and transformed once; slices are trilinearly interpolated — the
    Fourier-slice projection of :class:`deephemnma.core.projection.FourierSliceProjector`,
    restricted to the low frequencies a ``box``² template needs."""

    def __init__(self, volume: np.ndarray, box: int, oversample: int = 2):
        import torch.nn.functional as Fn  # noqa: F401  (used in __call__)

        vol = torch.as_tensor(volume, dtype=torch.float64)
        V = vol.shape[0]
        P = V * oversample
        r = (torch.arange(V, dtype=torch.float64) - V // 2) / P
        c = torch.special.sinc(r) ** 2
        vol = vol / (c[:, None, None] * c[None, :, None] * c[None, None, :])
        pad = vol.new_zeros((P, P, P))
        o = P // 2 - V // 2
        pad[o:o + V, o:o + V, o:o + V] = vol
        ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(pad)))
        self._ft = torch.stack([ft.real, ft.imag]).to(torch.float32)[None].contiguous()
        self.P = P
        self.oversample = oversample
        self.box = int(box)

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as Fn

        d = self.box
        ky = torch.fft.fftfreq(d, d=1.0 / d, dtype=torch.float32)
        kx = torch.arange(d // 2 + 1, dtype=torch.float32)
        k3 = kx[None, None, :, None] * R[:, None, None, 0, :] + ky[None, :, None, None] * R[:, None, None, 1, :]
        k3 = k3 * self.oversample
        P = self.P
        grid = (k3 + P // 2) / (P - 1) * 2 - 1
        out = Fn.grid_sample(self._ft, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)
        return torch.complex(out[0, 0], out[0, 1])
