"""Fourier shell correlation, resolution estimates and soft masks (numpy, volumes [z, y, x]).

* :func:`fsc` — FSC between two maps in shells one Fourier voxel wide, from 0 to Nyquist
  (``D//2 + 1`` shells; shell ``s`` holds the voxels with ``round(|k|) = s``, |k| in units of
  1/(D·voxel)). Frequencies in 1/Å.
* :func:`resolution_at` — the resolution (Å) where a curve first falls below a threshold
  (0.143 for half maps, 0.5 for a map against a reference), linearly interpolated between
  the two shells around the crossing; Nyquist when the curve never crosses.
* :func:`spherical_mask`, :func:`auto_mask` — soft masks (raised-cosine edge).
* :func:`masked_fsc` — FSC of masked maps corrected for the mask's own correlation by
  phase randomisation beyond the frequency where the unmasked FSC falls below 0.8 (Chen et
  al. 2013, as RELION's post-processing): ``(FSC_masked − FSC_rand) / (1 − FSC_rand)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FSC_HALF_MAPS = 0.143
FSC_REFERENCE = 0.5


def shell_indices(box: int, rfft: bool = True) -> np.ndarray:
    """Integer shell (round |k|) of every voxel of the (r)fftn of a box³ volume, FFT order."""
    k = np.fft.fftfreq(box) * box
    kx = np.fft.rfftfreq(box) * box if rfft else k
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    return np.rint(r).astype(np.int64)


@dataclass
class FSCCurve:
    """An FSC curve: ``shell`` (int), ``frequency`` (1/Å), ``fsc`` per shell, and counts."""

    shell: np.ndarray
    frequency: np.ndarray
    fsc: np.ndarray
    n_voxels: np.ndarray
    voxel_size: float
    extra: dict = field(default_factory=dict)  # other named curves on the same shells

    def resolution(self, threshold: float = FSC_HALF_MAPS, curve: str | None = None) -> float:
        return resolution_at(self.frequency, self.extra[curve] if curve else self.fsc, threshold)

    def as_table(self) -> dict:
        res = np.where(self.frequency > 0, 1.0 / np.maximum(self.frequency, 1e-12), np.inf)
        out = {"shell": self.shell, "frequency": self.frequency, "resolution": res, "fsc": self.fsc,
               "n_voxels": self.n_voxels}
        out.update(self.extra)
        return out


def _shell_sums(a: np.ndarray, shells: np.ndarray, nshell: int) -> np.ndarray:
    """Sums of ``a`` per shell (shells ≥ nshell, the corners beyond Nyquist, are ignored)."""
    return np.bincount(shells.ravel(), weights=a.ravel(), minlength=nshell)[:nshell]


def _rfft_multiplicity(box: int) -> np.ndarray:
    """Weights of the rfft half-volume voxels so that shell sums equal full-volume sums."""
    w = np.full(box // 2 + 1, 2.0)
    w[0] = 1.0
    if box % 2 == 0:
        w[-1] = 1.0
    return w


def fsc(map1, map2, voxel_size: float = 1.0) -> FSCCurve:
    """Fourier shell correlation of two D³ maps (shells 0 … D//2). Computed in the maps'
    precision (float32 maps: complex64 transforms), sums in float64, in slabs (bounded memory)."""
    a = np.asarray(map1)
    b = np.asarray(map2)
    if a.shape != b.shape or a.ndim != 3 or len(set(a.shape)) != 1:
        raise ValueError(f"maps must be cubes of the same size, got {a.shape} and {b.shape}")
    dt = np.float32 if (a.dtype == np.float32 and b.dtype == np.float32) else np.float64
    D = a.shape[0]
    A = np.fft.rfftn(a.astype(dt, copy=False))
    B = np.fft.rfftn(b.astype(dt, copy=False))
    return _fsc_from_ft(A, B, D, voxel_size)


def _fsc_from_ft(A, B, D, voxel_size) -> FSCCurve:
    n = D // 2 + 1
    k = np.fft.fftfreq(D) * D
    kx = np.fft.rfftfreq(D) * D
    m = _rfft_multiplicity(D)
    num = np.zeros(n)
    d1 = np.zeros(n)
    d2 = np.zeros(n)
    cnt = np.zeros(n)
    step = max(1, int(2 ** 22 // (D * (D // 2 + 1))))
    for z0 in range(0, D, step):
        z1 = min(D, z0 + step)
        r = np.sqrt(k[z0:z1, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
        sh = np.rint(r).astype(np.int64).ravel()
        a, b = A[z0:z1], B[z0:z1]
        mm = np.broadcast_to(m, a.shape).ravel()
        num += _shell_sums(((a * np.conj(b)).real).ravel() * mm, sh, n)
        d1 += _shell_sums((a.real ** 2 + a.imag ** 2).ravel() * mm, sh, n)
        d2 += _shell_sums((b.real ** 2 + b.imag ** 2).ravel() * mm, sh, n)
        cnt += _shell_sums(mm, sh, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = num / np.sqrt(d1 * d2)
    f = np.where(np.isfinite(f), f, 0.0)
    s = np.arange(n)
    return FSCCurve(shell=s, frequency=s / (D * voxel_size), fsc=f, n_voxels=cnt.astype(np.int64),
                    voxel_size=float(voxel_size))


def resolution_at(frequency, curve, threshold: float) -> float:
    """Resolution (Å) at the first crossing of ``threshold`` after shell 0 (linear
    interpolation in frequency); 1/(highest frequency) if the curve never falls below it."""
    f = np.asarray(frequency, float)
    c = np.asarray(curve, float)
    below = np.flatnonzero(c[1:] < threshold) + 1
    if below.size == 0:
        return float(1.0 / f[-1])
    i = int(below[0])
    c0, c1 = c[i - 1], c[i]
    t = 0.0 if c0 == c1 else (c0 - threshold) / (c0 - c1)
    fc = f[i - 1] + t * (f[i] - f[i - 1])
    return float(1.0 / fc) if fc > 0 else float("inf")


# ---------------------------------------------------------------------------------- masks
def _raised_cosine(dist_out: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (dist_out ≤ 0), falling to 0 over ``edge`` voxels outside."""
    if edge <= 0:
        return (dist_out <= 0).astype(np.float32)
    t = np.clip(dist_out / edge, 0.0, 1.0)
    return (0.5 * (1 + np.cos(np.pi * t))).astype(np.float32)


def spherical_mask(box: int, radius: float, edge: float = 3.0) -> np.ndarray:
    """Soft sphere (voxels): 1 within ``radius`` of the centre voxel ``box//2``, raised-cosine
    fall-off over ``edge`` voxels."""
    g = np.arange(box) - box // 2
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    return _raised_cosine(r - radius, edge)


def auto_mask(volume, voxel_size: float, threshold: float = 0.1, lowpass: float = 15.0,
              dilate: float = 3.0, edge: float = 6.0) -> np.ndarray:
    """Soft mask around the molecule: the map low-passed to ``lowpass`` Å (Gaussian),
    thresholded at ``threshold`` × its maximum, largest connected component kept, dilated by
    ``dilate`` Å and given a raised-cosine edge ``edge`` Å wide."""
    from scipy import ndimage

    v = np.asarray(volume, dtype=np.float64)
    # Gaussian whose transfer exp(−2π²σ²k²) is ½ at k = 1/lowpass
    sigma = max(np.sqrt(np.log(2) / 2) / np.pi * lowpass / voxel_size, 0.5)
    low = ndimage.gaussian_filter(v, sigma)
    binary = low > threshold * low.max()
    if not binary.any():
        return np.ones_like(v, dtype=np.float32)
    lab, nlab = ndimage.label(binary)
    if nlab > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        binary = lab == int(np.argmax(sizes))
    dist = ndimage.distance_transform_edt(~binary) * voxel_size  # Å outside the object
    return _raised_cosine(dist - dilate, edge)


def _randomise_phases(ft: np.ndarray, shells: np.ndarray, from_shell: int, rng) -> np.ndarray:
    out = ft.copy()
    sel = shells >= from_shell
    phase = rng.uniform(0, 2 * np.pi, size=int(sel.sum()))
    out[sel] = np.abs(ft[sel]) * np.exp(1j * phase)
    return out


def masked_fsc(map1, map2, mask, voxel_size: float = 1.0, seed: int = 0) -> FSCCurve:
    """FSC of the masked maps with the phase-randomisation correction; the returned curve is
    the corrected one, ``extra`` holds ``fsc_unmasked``, ``fsc_masked``, ``fsc_randomised``."""
    a = np.asarray(map1, np.float64)
    b = np.asarray(map2, np.float64)
    mask = np.asarray(mask, np.float64)
    D = a.shape[0]
    unmasked = fsc(a, b, voxel_size)
    masked = fsc(a * mask, b * mask, voxel_size)
    crossing = np.flatnonzero(unmasked.fsc[1:] < 0.8)
    start = int(crossing[0]) + 1 if crossing.size else D // 2 + 1
    rng = np.random.default_rng(seed)
    shells = shell_indices(D)
    if start <= D // 2:
        ra = np.fft.irfftn(_randomise_phases(np.fft.rfftn(a), shells, start, rng), s=a.shape, axes=(0, 1, 2))
        rb = np.fft.irfftn(_randomise_phases(np.fft.rfftn(b), shells, start, rng), s=b.shape, axes=(0, 1, 2))
        rand = fsc(ra * mask, rb * mask, voxel_size).fsc
    else:
        rand = np.zeros_like(masked.fsc)
    corrected = masked.fsc.copy()
    hi = unmasked.shell >= start
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (masked.fsc - rand) / (1 - rand)
    corrected[hi] = np.where(np.isfinite(corr[hi]), corr[hi], 0.0)
    return FSCCurve(shell=unmasked.shell, frequency=unmasked.frequency, fsc=corrected,
                    n_voxels=unmasked.n_voxels, voxel_size=float(voxel_size),
                    extra={"fsc_unmasked": unmasked.fsc, "fsc_masked": masked.fsc, "fsc_randomised": rand})
