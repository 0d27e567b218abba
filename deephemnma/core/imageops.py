"""Image operations shared by the stages: resizing in Fourier space, filters, masks,
background normalisation, contrast, masked statistics and the Fourier ring correlation.

Images are float ``[y, x]`` arrays or tensors ``(..., D, D)`` with D even; the centre of an
image is the pixel ``D // 2`` on each axis (as in :mod:`deephemnma.core.projection`). Every
function accepts numpy arrays or torch tensors and returns the same kind (torch inside).

* :func:`fourier_crop` — downscale ``D → d`` by keeping the ``d``² lowest frequencies
  (exact band-limited resampling; the new Nyquist row/column is zeroed, which keeps the
  result real and alias-free); pixel values (the mean) are preserved, the pixel size
  becomes ``pixel_size · D / d``. :func:`fourier_pad` is the inverse (upsampling).
* :func:`lowpass` — circular raised-cosine low-pass (the antialias filter before cropping).
* :func:`circular_mask`, :func:`normalise_background` — RELION's normalisation: mean 0 and
  standard deviation 1 of the pixels *outside* a circle (radius 0.9 · D/2 by default).
* :func:`invert_contrast`, :func:`masked_variance`, :func:`frc` (Fourier ring correlation),
  :func:`ring_index`.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _to_torch(x):
    if isinstance(x, torch.Tensor):
        return x, False
    return torch.from_numpy(np.ascontiguousarray(x)), True


def _back(t: torch.Tensor, was_numpy: bool):
    return t.numpy() if was_numpy else t


def _check_square(x, what="images"):
    if x.dim() < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{what} must be square (..., D, D), got {tuple(x.shape)}")
    return x.shape[-1]


# ------------------------------------------------------------------ frequency grids
def radial_frequency(box: int, rfft: bool = True, device=None, dtype=torch.float64) -> torch.Tensor:
    """|k| in Fourier pixels (cycles per box) on the (r)fft grid of a box² image."""
    ky = torch.fft.fftfreq(box, d=1.0 / box, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(box, d=1.0 / box, device=device, dtype=dtype) if rfft else ky
    return torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)


def ring_index(box: int, rfft: bool = False, device=None) -> torch.Tensor:
    """Integer ring number round(|k|) of each Fourier pixel (full fft2 layout by default)."""
    return torch.round(radial_frequency(box, rfft, device)).to(torch.long)


def raised_cosine(k: torch.Tensor, cutoff: float, width: float) -> torch.Tensor:
    """1 for k ≤ cutoff − width, 0 for k ≥ cutoff, cos² fall-off in between (width ≥ 0)."""
    if width <= 0:
        return (k < cutoff).to(k.dtype)
    t = ((k - (cutoff - width)) / width).clamp(0.0, 1.0)
    return torch.cos(0.5 * math.pi * t) ** 2


# ------------------------------------------------------------------ resizing
def crop_spectrum(F: torch.Tensor, new_box: int) -> torch.Tensor:
    """Crop an rfft2 spectrum (..., D, D//2+1) of D² images to that of d² images, zeroing the
    new Nyquist row and column. ``irfft2(G, s=(d, d)) · d²/D²`` is then the downscaled image."""
    D = F.shape[-2]
    d = int(new_box)
    h = d // 2
    rows = torch.cat([torch.arange(0, h), torch.arange(D - h, D)]).to(F.device)
    G = F[..., rows, : h + 1].clone()
    G[..., h, :] = 0  # the new Nyquist row (−d/2) …
    G[..., :, h] = 0  # … and column: keeps the cropped image real and alias-free
    return G


def fourier_crop(images, new_box: int):
    """Downscale (..., D, D) → (..., d, d) by Fourier cropping (see the module docstring)."""
    x, np_in = _to_torch(images)
    D = _check_square(x)
    d = int(new_box)
    if d % 2 or D % 2:
        raise ValueError(f"box sizes must be even, got {D} → {d}")
    if d > D:
        raise ValueError(f"cannot crop {D} to a larger box {d} (use fourier_pad)")
    if d == D:
        return images
    dtype = x.dtype
    F = torch.fft.rfft2(x.to(torch.float64) if dtype == torch.float64 else x.to(torch.float32))
    out = torch.fft.irfft2(crop_spectrum(F, d), s=(d, d)) * (d * d) / (D * D)
    return _back(out.to(dtype), np_in)


def fourier_pad(images, new_box: int):
    """Upscale (..., d, d) → (..., D, D) by zero-padding the transform (values preserved)."""
    x, np_in = _to_torch(images)
    d = _check_square(x)
    D = int(new_box)
    if d % 2 or D % 2 or D < d:
        raise ValueError(f"need even sizes and a larger box, got {d} → {D}")
    if D == d:
        return images
    dtype = x.dtype
    F = torch.fft.rfft2(x.to(torch.float64) if dtype == torch.float64 else x.to(torch.float32))
    h = d // 2
    G = F.new_zeros(F.shape[:-2] + (D, D // 2 + 1))
    # the old Nyquist row/column (±d/2, ambiguous in sign) are dropped, as in fourier_crop
    G[..., :h, :h] = F[..., :h, :h]
    G[..., D - h + 1:, :h] = F[..., h + 1:, :h]
    out = torch.fft.irfft2(G, s=(D, D)) * (D * D) / (d * d)
    return _back(out.to(dtype), np_in)


def lowpass(images, pixel_size: float, resolution: float, width_px: float = 2.0):
    """Circular raised-cosine low-pass: zero beyond 1/``resolution`` (Å⁻¹), full below
    1/``resolution`` − ``width_px`` Fourier pixels."""
    x, np_in = _to_torch(images)
    D = _check_square(x)
    cutoff = D * pixel_size / resolution  # in Fourier pixels
    filt = raised_cosine(radial_frequency(D, device=x.device), cutoff, width_px)
    out = torch.fft.irfft2(torch.fft.rfft2(x) * filt.to(x.dtype if x.is_floating_point() else torch.float32), s=(D, D))
    return _back(out.to(x.dtype), np_in)


# ------------------------------------------------------------------ masks and normalisation
def circular_mask(box: int, radius: float, device=None) -> torch.Tensor:
    """Boolean (box, box): pixels whose centre lies within ``radius`` pixels of the centre (box//2)."""
    g = torch.arange(box, device=device, dtype=torch.float64) - box // 2
    return (g[:, None] ** 2 + g[None, :] ** 2) <= radius * radius


def background_radius(box: int, fraction: float = 0.9) -> float:
    """RELION's background radius: ``fraction`` × box / 2 pixels."""
    return fraction * box / 2


def normalise_background(images, radius: float | None = None, eps: float = 1e-12):
    """Subtract the mean and divide by the standard deviation of the pixels outside a circle
    of ``radius`` pixels (default 0.9 · box / 2), per image (RELION's normalisation)."""
    x, np_in = _to_torch(images)
    D = _check_square(x)
    r = background_radius(D) if radius is None else float(radius)
    bg = ~circular_mask(D, r, x.device)
    if not bool(bg.any()):
        raise ValueError(f"background radius {r} leaves no background pixels in a {D}² image")
    v = x[..., bg].to(torch.float64)
    mean = v.mean(-1)
    std = v.std(-1, unbiased=False)
    out = (x.to(torch.float64) - mean[..., None, None]) / (std[..., None, None] + eps)
    return _back(out.to(x.dtype), np_in)


def invert_contrast(images):
    """Negate the images (dark particles on a light background ↔ light on dark)."""
    x, np_in = _to_torch(images)
    return _back(-x, np_in)


def masked_variance(images, mask) -> torch.Tensor | np.ndarray:
    """Per-image variance (about the masked mean) of the pixels where ``mask`` is true."""
    x, np_in = _to_torch(images)
    m, _ = _to_torch(mask)
    v = x[..., m.to(torch.bool)].to(torch.float64)
    out = v.var(-1, unbiased=False)
    return _back(out, np_in)


# ------------------------------------------------------------------ Fourier ring correlation
def frc(a, b, rfft: bool = False):
    """Fourier ring correlation of two images (or stacks, summed over the stack) per integer
    ring 0 … D//2: Re Σ A B* / sqrt(Σ|A|² Σ|B|²). Returns a float64 array (D//2 + 1,);
    rings where either image has no power are NaN."""
    ta, _ = _to_torch(a)
    tb, _ = _to_torch(b)
    D = _check_square(ta)
    if tb.shape[-2:] != ta.shape[-2:]:
        raise ValueError(f"image shapes differ: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    A = torch.fft.fft2(ta.to(torch.float64))
    B = torch.fft.fft2(tb.to(torch.float64))
    ring = ring_index(D, device=A.device)
    nr = D // 2 + 1
    keep = ring < nr
    idx = ring[keep]

    def ring_sum(v):
        v = v.reshape(-1, D, D).sum(0)[keep]
        return torch.zeros(nr, dtype=torch.float64).index_add_(0, idx, v)

    num = ring_sum((A * B.conj()).real)
    den = torch.sqrt(ring_sum(A.abs() ** 2) * ring_sum(B.abs() ** 2))
    out = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(den, float("nan")))
    return out.numpy()
