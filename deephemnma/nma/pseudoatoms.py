"""EM map → Gaussian pseudoatoms (the reference of HEMNMA when no atomic model is given).

The map inside a mask is approximated by a sum of isotropic Gaussians of one fixed width σ:

    ρ(r) ≈ Σ_k a_k · exp(−|r − p_k|² / 2σ²)

* Mask: voxels above ``threshold`` (default: map mean + ``threshold_std`` × std), dilated by
  2σ so that the Gaussians' tails are fitted too. Outside the mask the map is ignored.
* Width: ``sigma`` Å, default 0.3 × ``resolution`` (default resolution: Nyquist, 2 voxels).
  A Gaussian cannot represent detail finer than its width: when the fit stops improving
  before the target error, the log says so (lower σ, or low-pass the map to the resolution
  you want represented).
* Greedy growth: pseudoatoms are added at the highest local maxima of the positive residual
  (map − model) inside the thresholded region, a quarter more per round (at least 100), then
  all positions and heights are refined together by Adam steps on the squared error
  (heights kept ≥ 0; pseudoatoms whose height reaches 0 are removed), until the relative
  error ‖map − model‖ / ‖map‖ over the mask reaches ``target_error``, or ``max_atoms`` is
  reached, or the error stalls. Everything is deterministic (no random numbers).

Coordinates are in Å in the map's frame as ChimeraX places it: voxel (i, j, k) along
(x, y, z) sits at origin + (i, j, k) × voxel size, where origin is the header's origin if it
is non-zero and otherwise (nxstart, nystart, nzstart) × voxel size. Weights are the integral
of each Gaussian, a_k·(2π)^{3/2}·σ³ (map units × Å³), the same meaning as the atomic weights
(electrons = integral of an atom's density).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.fileio import require_file
from ..core.logs import get_logger

log = get_logger(__name__)

MAX_WORK = 4_000_000  # atoms × stencil voxels per evaluation chunk


@dataclass
class MapVolume:
    """A density map: ``data`` [z, y, x] float64, isotropic ``voxel`` size (Å) and the
    position (Å, x y z) of voxel (0, 0, 0)."""

    data: np.ndarray
    voxel: float
    origin: np.ndarray
    path: str | None = None

    @property
    def box_centre(self) -> np.ndarray:
        """Å position (x, y, z) of the box centre voxel (n // 2 along each axis, RELION's centre)."""
        nz, ny, nx = self.data.shape
        return self.origin + self.voxel * np.array([nx // 2, ny // 2, nz // 2], dtype=np.float64)


def read_map(path: str | os.PathLike) -> MapVolume:
    """Read an MRC map with mrcfile (standard axis order only), as float64 [z, y, x]."""
    import mrcfile

    p = require_file(path, "map file")
    try:
        with mrcfile.open(str(p), permissive=True) as m:
            if m.data is None or m.header is None:
                raise ValueError("no data block")
            h = m.header
            if (int(h.mapc), int(h.mapr), int(h.maps)) != (1, 2, 3):
                raise InputError(p, f"axis order (mapc, mapr, maps) = ({int(h.mapc)}, {int(h.mapr)}, {int(h.maps)}) "
                                    "is not the standard (1, 2, 3); resave the map with standard axes")
            data = np.asarray(m.data, dtype=np.float64)
            vs = m.voxel_size
            voxel = np.array([float(vs.x), float(vs.y), float(vs.z)])
            origin = np.array([float(h.origin.x), float(h.origin.y), float(h.origin.z)])
            nstart = np.array([int(h.nxstart), int(h.nystart), int(h.nzstart)], dtype=np.float64)
    except InputError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise InputError(p, f"cannot read as an MRC map ({msg})") from None
    if data.ndim != 3 or min(data.shape) < 2:
        raise InputError(p, f"expected a 3D map, got data of shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise InputError(p, f"map contains {int((~np.isfinite(data)).sum())} NaN or infinite voxel(s)")
    if np.any(voxel <= 0):
        raise InputError(p, f"voxel size {voxel.tolist()} Å is not positive; set it in the header")
    if np.ptp(voxel) > 1e-3 * voxel.max():
        raise InputError(p, f"anisotropic voxel size {voxel.tolist()} Å is not supported")
    if not np.any(origin):
        origin = nstart * voxel
    return MapVolume(data=data, voxel=float(voxel[0]), origin=origin, path=str(p))


@dataclass
class PseudoatomFit:
    """Result of :func:`fit_pseudoatoms`: positions (K, 3) Å x y z, weights (K,) integrals,
    sigma (Å), relative error over the mask, and figures of the fit."""

    coords: np.ndarray
    weights: np.ndarray
    sigma: float
    error: float
    threshold: float
    reached_target: bool
    info: dict = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return len(self.coords)


class _Region:
    """The voxels a fit works on: the map cropped to the thresholded core plus a margin, the
    mask (core dilated by 2σ), and Gaussian stencils of radius 3σ around pseudoatoms."""

    def __init__(self, d: np.ndarray, core: np.ndarray, sig: float):
        from scipy import ndimage

        self.sig = sig
        R = int(math.ceil(3.0 * sig))
        dil = int(math.ceil(2.0 * sig))
        # crop to the mask's bounding box plus the stencil margin (large maps, small molecules)
        nz = np.argwhere(core)
        self.lo = np.maximum(nz.min(0) - dil - R - 1, 0)
        hi = np.minimum(nz.max(0) + dil + R + 2, d.shape)
        crop = tuple(slice(a, b) for a, b in zip(self.lo, hi))
        self.sub, self.core = d[crop], core[crop]
        self.mask = ndimage.binary_dilation(self.core, iterations=dil) if dil > 0 else self.core
        self.shape = np.array(self.sub.shape)
        self.vid = np.full(self.sub.shape, -1, dtype=np.int64)
        self.vid[self.mask] = np.arange(int(self.mask.sum()))
        self.y = self.sub[self.mask]
        self.nv = len(self.y)
        self.off = np.stack(np.meshgrid(*[np.arange(-R, R + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
        self.chunk = max(1, MAX_WORK // len(self.off))

    def stencil(self, pos):
        c = np.rint(pos).astype(np.int64)
        v = c[:, None, :] + self.off[None]
        inside = np.all((v >= 0) & (v < self.shape), axis=-1)
        vc = np.clip(v, 0, self.shape - 1)
        row = np.where(inside, self.vid[vc[..., 0], vc[..., 1], vc[..., 2]], -1)
        dv = v - pos[:, None, :]
        g = np.exp(-(dv ** 2).sum(-1) / (2.0 * self.sig * self.sig))
        g[row < 0] = 0.0
        return np.maximum(row, 0), g, dv

    def model(self, pos, amp):
        out = np.zeros(self.nv)
        for s in range(0, len(pos), self.chunk):
            row, g, _ = self.stencil(pos[s:s + self.chunk])
            out += np.bincount(row.ravel(), (amp[s:s + self.chunk, None] * g).ravel(), minlength=self.nv)
        return out

    def gradient(self, pos, amp, r):
        G = np.empty((len(pos), 4))
        for s in range(0, len(pos), self.chunk):
            row, g, dv = self.stencil(pos[s:s + self.chunk])
            rg = r[row] * g
            G[s:s + self.chunk, 3] = rg.sum(1)
            G[s:s + self.chunk, :3] = amp[s:s + self.chunk, None] * (rg[..., None] * dv).sum(1) / (self.sig * self.sig)
        return G

    def residual_peaks(self, resid):
        """Local maxima of the positive residual (map − model) inside the core, highest first."""
        from scipy import ndimage

        rvol = np.zeros(self.sub.shape)
        rvol[self.mask] = -resid
        peaks = np.argwhere((rvol == ndimage.maximum_filter(rvol, size=3)) & (rvol > 0) & self.core)
        pv = rvol[tuple(peaks.T)]
        order = np.argsort(-pv, kind="stable")
        return peaks[order], pv[order]


class _Adam:
    """Adam on (x, y, z, amplitude) per pseudoatom, amplitudes kept ≥ 0; grows with the atoms."""

    def __init__(self, ymax: float):
        self.m1, self.m2 = np.zeros((0, 4)), np.zeros((0, 4))
        self.lr = np.array([0.05, 0.05, 0.05, 0.05 * ymax])
        self.b1, self.b2, self.step = 0.9, 0.999, 0

    def grow(self, n: int) -> None:
        self.m1 = np.vstack([self.m1, np.zeros((n, 4))])
        self.m2 = np.vstack([self.m2, np.zeros((n, 4))])

    def keep(self, sel) -> None:
        self.m1, self.m2 = self.m1[sel], self.m2[sel]

    def run(self, region: _Region, pos, amp, iterations: int):
        for _ in range(iterations):
            G = region.gradient(pos, amp, region.model(pos, amp) - region.y)
            self.step += 1
            self.m1 = self.b1 * self.m1 + (1 - self.b1) * G
            self.m2 = self.b2 * self.m2 + (1 - self.b2) * G * G
            upd = self.lr * (self.m1 / (1 - self.b1 ** self.step)) / (np.sqrt(self.m2 / (1 - self.b2 ** self.step)) + 1e-30)
            pos -= upd[:, :3]
            amp = np.maximum(amp - upd[:, 3], 0.0)
        return pos, amp


def _grow_and_fit(region: _Region, target_error: float, max_atoms: int, iterations: int, ny: float):
    """Add pseudoatoms at the residual's peaks and refine them all, round after round, until
    the relative error reaches the target, stalls, or the atoms run out."""
    pos, amp = np.zeros((0, 3)), np.zeros(0)
    adam = _Adam(float(region.y.max()))
    resid = -region.y.copy()  # model − map
    err, history, stalled, stop_reason = 1.0, [], 0, "max_atoms"
    while True:
        peaks, pv = region.residual_peaks(resid)
        n_add = min(max(len(pos) // 4, 100), max_atoms - len(pos), len(peaks))
        if n_add <= 0:
            stop_reason = "max_atoms" if len(pos) >= max_atoms else "no residual left"
            break
        pos = np.vstack([pos, peaks[:n_add].astype(np.float64)])
        amp = np.concatenate([amp, 0.5 * pv[:n_add]])
        adam.grow(n_add)
        pos, amp = adam.run(region, pos, amp, iterations)
        alive = amp > 1e-9 * max(float(amp.max()), 1e-300)
        pos, amp = pos[alive], amp[alive]
        adam.keep(alive)
        resid = region.model(pos, amp) - region.y
        new_err = float(np.linalg.norm(resid)) / ny
        history.append((len(pos), new_err))
        log.debug("pseudoatoms: %d, relative error %.4f", len(pos), new_err)
        stalled = stalled + 1 if new_err > 0.995 * err else 0
        err = new_err
        if err <= target_error:
            stop_reason = "target reached"
            break
        if stalled >= 2:
            stop_reason = "error stalled"
            break
    return pos, amp, err, history, stop_reason


def fit_pseudoatoms(vol: MapVolume, threshold: float | None = None, threshold_std: float = 1.0,
                    sigma: float | None = None, resolution: float | None = None,
                    target_error: float = 0.05, max_atoms: int = 20000, iterations: int = 60,
                    min_atoms: int = 4) -> PseudoatomFit:
    """Approximate ``vol`` by Gaussian pseudoatoms (see the module docstring)."""
    d = vol.data
    where = vol.path
    mean, std, vmax = float(d.mean()), float(d.std()), float(d.max())
    thr = float(threshold) if threshold is not None else mean + threshold_std * std
    core = d > thr
    n_core = int(core.sum())
    if n_core == 0:
        raise InputError(where, f"no voxel above the threshold {thr:.6g} (map maximum {vmax:.6g}); "
                                "lower nma.pseudoatoms.threshold")
    res = float(resolution) if resolution is not None else 2.0 * vol.voxel
    sig_A = float(sigma) if sigma is not None else 0.3 * res
    sig = sig_A / vol.voxel                       # in voxels
    if sig <= 0:
        raise ValueError("sigma must be positive")
    region = _Region(d, core, sig)
    ny = float(np.linalg.norm(region.y))
    if ny == 0:
        raise InputError(where, "the map is zero inside the thresholded region")
    pos, amp, err, history, stop_reason = _grow_and_fit(region, target_error, max_atoms, iterations, ny)
    if len(pos) < min_atoms:
        raise InputError(where, f"only {len(pos)} pseudoatom(s) fitted above threshold {thr:.6g}; "
                                f"at least {min_atoms} needed (lower the threshold or sigma)")
    reached = err <= target_error
    if not reached:
        hint = ("the Gaussians are too wide for the map's detail: lower nma.pseudoatoms.sigma or low-pass "
                "the map" if stop_reason == "error stalled" else "raise nma.pseudoatoms.max_atoms")
        log.warning("%s: pseudoatom fit stopped at relative error %.4f > target %.4f with %d pseudoatoms "
                    "(%s); %s", where, err, target_error, len(pos), stop_reason, hint)
    # voxel indices (z, y, x) in the crop → Å (x, y, z)
    coords = vol.origin + vol.voxel * (pos + region.lo)[:, ::-1]
    weights = amp * (2.0 * math.pi) ** 1.5 * sig_A ** 3
    info = {
        "threshold": thr, "threshold_voxels": n_core, "mask_voxels": region.nv, "sigma_A": sig_A,
        "resolution_A": res, "voxel_A": vol.voxel, "map_shape_zyx": list(d.shape), "relative_error": err,
        "target_error": target_error, "n_pseudoatoms": int(len(pos)), "stop_reason": stop_reason,
        "rounds": [[int(k), float(e)] for k, e in history],
        "volume_per_pseudoatom_A3": n_core * vol.voxel ** 3 / max(len(pos), 1),
    }
    log.info("%s: %d pseudoatoms (σ = %.2f Å) fit the map with relative error %.4f (target %.4f)",
             where, len(pos), sig_A, err, target_error)
    return PseudoatomFit(coords=coords, weights=weights, sigma=sig_A, error=err, threshold=thr,
                         reached_target=reached, info=info)


def render_pseudoatoms(coords: np.ndarray, weights: np.ndarray, sigma: float, like: MapVolume) -> np.ndarray:
    """The Gaussian model sampled on ``like``'s grid ([z, y, x]), for checks and display."""
    grid = [like.origin[a] + like.voxel * np.arange(n) for a, n in zip(range(3), like.data.shape[::-1])]
    amp = np.asarray(weights) / ((2.0 * math.pi) ** 1.5 * sigma ** 3)
    gx = np.exp(-(grid[0][None, :] - coords[:, 0:1]) ** 2 / (2 * sigma ** 2))
    gy = np.exp(-(grid[1][None, :] - coords[:, 1:2]) ** 2 / (2 * sigma ** 2))
    gz = np.exp(-(grid[2][None, :] - coords[:, 2:3]) ** 2 / (2 * sigma ** 2))
    return np.einsum("k,kz,ky,kx->zyx", amp, gz, gy, gx, optimize=True)
