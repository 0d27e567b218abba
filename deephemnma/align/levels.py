"""Resolution levels, per-particle Fourier data and the similarity measure of the alignment.

Similarity
----------
The image model is ``image = a · CTF ⊛ P(θ) + b + noise`` with ``P`` the projection of the
deformed, rotated, shifted reference, an unknown positive gain ``a`` (the data's scale is
arbitrary after normalisation, and the Gaussian-atom model only approximates the true
scattering) and an unknown offset ``b``. For white Gaussian noise, maximising the likelihood
over ``a`` and ``b`` (profiled out) is maximising the normalised cross-correlation of model
and image over the whole box with the zero frequency excluded::

    score(θ) = Σ_k W(k) Re[conj(C(k) P̂(k)) Î(k)] / sqrt(Σ_k W(k) |C(k) P̂(k)|²) / sqrt(Σ_k W(k) |Î(k)|²)

(sums over the full frequency plane, evaluated on the rfft half plane with multiplicities),
a number in [−1, 1] that is the Pearson correlation of the band-limited model and image.
``W`` selects the band 0 < |k| ≤ k_max of the level. Computing it in Fourier space makes the
CTF a product, the shift a phase ramp, and lets the global search put the CTF on the image
side (``Σ W C T̂* Î``) and its effect on the template's norm into one matrix product
(``Σ W C² |T̂|²``), so one template bank serves particles with different CTFs. No real-space
mask is used: the model is zero away from the particle, so the whole box is the natural
likelihood support, and a mask would cut the CTF's delocalised fringes.

``C`` is the particle's CTF for raw images, ``|CTF|`` for phase-flipped images
(``rlnCtfDataArePhaseFlipped`` = 1, what ``deephemnma preprocess`` writes), ``CTF²`` for
CTF-premultiplied images and 1 when no CTF applies.

Levels
------
A level is a box ``d`` ≤ the image box ``D``: the images are Fourier-cropped to ``d`` (pixel
size × D/d), and the model's Gaussians are widened in quadrature by ``blur = β · pixel`` of
the level (anti-aliasing of the point-sampled analytic projection) while the data are
multiplied by the same Gaussian's transform, so model and data keep matched resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.ctf import CTFParams, compute_ctf

#: CTF handling modes
CTF_RAW, CTF_FLIPPED, CTF_PREMULTIPLIED, CTF_NONE = "raw", "phase_flipped", "premultiplied", "none"


@dataclass(frozen=True)
class Level:
    box: int            # pixels
    pixel_size: float   # Å
    blur: float         # Å, Gaussian widening of the model = data filter
    kmax: float         # 1/Å, upper edge of the band compared

    @classmethod
    def make(cls, box: int, image_box: int, image_pixel: float, blur_factor: float = 0.5,
             resolution: float | None = None) -> "Level":
        px = image_pixel * image_box / box
        kmax = 0.5 / px
        if resolution:
            kmax = min(kmax, 1.0 / resolution)
        return cls(int(box), float(px), float(blur_factor * px), float(kmax))


def rfft_multiplicity(box: int, dtype=torch.float32) -> torch.Tensor:
    """(box//2+1,) weights turning rfft half-plane sums into full-plane sums."""
    m = torch.full((box // 2 + 1,), 2.0, dtype=dtype)
    m[0] = 1.0
    if box % 2 == 0:
        m[-1] = 1.0
    return m


def radial_frequency(box: int, pixel_size: float, dtype=torch.float64) -> torch.Tensor:
    """|k| in 1/Å on the rfft grid (box, box//2+1)."""
    ky = torch.fft.fftfreq(box, d=pixel_size, dtype=dtype)
    kx = torch.fft.rfftfreq(box, d=pixel_size, dtype=dtype)
    return torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)


def _ring_index(box: int) -> torch.Tensor:
    """Integer radius (in frequency samples) of every rfft coefficient of a box² image."""
    ky = torch.fft.fftfreq(box, d=1.0 / box)
    kx = torch.fft.rfftfreq(box, d=1.0 / box)
    return torch.round(torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)).long()


def band_weight(level: Level, dtype=torch.float32) -> torch.Tensor:
    """W(k)·multiplicity on the rfft grid of the level: 1 inside 0 < |k| ≤ kmax, else 0."""
    k = radial_frequency(level.box, level.pixel_size)
    W = ((k > 0) & (k <= level.kmax * (1 + 1e-9))).to(dtype)
    return W * rfft_multiplicity(level.box, dtype)[None, :]


def blur_filter(level: Level, dtype=torch.float32) -> torch.Tensor:
    """Fourier transform of the level's Gaussian blur, exp(−2π² blur² k²)."""
    k = radial_frequency(level.box, level.pixel_size)
    return torch.exp(-2 * math.pi ** 2 * level.blur ** 2 * k ** 2).to(dtype)


def crop_rfft(F: torch.Tensor, box: int) -> torch.Tensor:
    """Fourier crop of rfft-layout transforms (B, D, D//2+1) → (B, box, box//2+1), scaled by
    (box/D)² so that real-space values are preserved."""
    D = F.shape[-2]
    if box == D:
        return F
    if box > D:
        raise ValueError(f"cannot crop a {D}² transform to {box}²")
    h = box // 2
    out = torch.cat([F[..., :h, : h + 1], F[..., D - h:, : h + 1]], dim=-2)
    return out * (box / D) ** 2


def ctf_for_level(params: CTFParams | None, mode: np.ndarray | str, level: Level, n: int) -> torch.Tensor:
    """(n, box, box//2+1) CTF factor C of every particle at the level, by CTF handling mode
    (one mode for all, or one per particle)."""
    shape = (n, level.box, level.box // 2 + 1)
    if params is None:
        return torch.ones(shape)
    modes = np.broadcast_to(np.asarray(mode, dtype=object), (n,))
    ctf = compute_ctf(params, level.box, level.pixel_size)
    out = torch.empty(shape)
    for m in set(modes.tolist()):
        sel = torch.as_tensor(np.flatnonzero(modes == m))
        c = ctf[sel]
        if m == CTF_RAW:
            out[sel] = c
        elif m == CTF_FLIPPED:
            out[sel] = c.abs()
        elif m == CTF_PREMULTIPLIED:
            out[sel] = c * c
        elif m == CTF_NONE:
            out[sel] = 1.0
        else:
            raise ValueError(f"unknown CTF mode {m!r}")
    return out


@dataclass
class LevelData:
    """Per-particle Fourier data at one level: ``image`` = W-band data (already multiplied by
    the level's blur filter), ``ctf`` = C, ``weight`` = W·multiplicity, ``image_norm``."""

    level: Level
    image: torch.Tensor       # (B, d, d//2+1) complex
    ctf: torch.Tensor         # (B, d, d//2+1) real
    weight: torch.Tensor      # (d, d//2+1)
    image_norm: torch.Tensor  # (B,)

    @classmethod
    def build(cls, image_ft: torch.Tensor, ctf: torch.Tensor, level: Level) -> "LevelData":
        """``image_ft``: rfft2 of the full-size images (B, D, D//2+1); ``ctf``: C at the level."""
        F = crop_rfft(image_ft, level.box) * blur_filter(level)
        W = band_weight(level)
        norm = torch.sqrt((W * (F.real ** 2 + F.imag ** 2)).sum((-2, -1)))
        return cls(level, F, ctf, W, norm)

    def __len__(self) -> int:
        return self.image.shape[0]

    def subset(self, idx) -> "LevelData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return LevelData(self.level, self.image[idx], self.ctf[idx], self.weight, self.image_norm[idx])

    def significance(self, projections: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """score / (its standard deviation under the noise of the image): how many standard
        deviations of chance the match is. The noise is modelled as Gaussian with the
        rotationally averaged power spectrum ``P(k)`` of the fit's residual (image − best
        scaled model, in the data term, i.e. including the level's filter); then
        ``var(score) = Σ W|M|²P / (Σ W|M|² · Σ W P)`` with ``M = C·P̂`` the model. An image of
        pure noise, white or coloured, reaches 4–6 after the search; particles far more."""
        with torch.no_grad():
            img = self.image if idx is None else self.image[idx]
            P = torch.fft.rfft2(projections)
            ctf = self.ctf if idx is None else self.ctf[idx]
            M = P * ctf
            W = self.weight
            M2 = M.real ** 2 + M.imag ** 2
            gain = (W * (M.real * img.real + M.imag * img.imag)).sum((-2, -1)) / (W * M2).sum((-2, -1)).clamp_min(1e-30)
            R = img - gain[:, None, None] * M
            ring = _ring_index(self.level.box)
            nr = int(ring.max()) + 1
            R2 = (R.real ** 2 + R.imag ** 2) * W
            num = torch.zeros(len(img), nr).index_add_(1, ring.reshape(-1), R2.reshape(len(img), -1))
            cnt = torch.zeros(nr).index_add_(0, ring.reshape(-1), W.reshape(-1))
            spec = (num / cnt.clamp_min(1e-30))[:, ring]                        # (B, d, d//2+1)
            var = (W * M2 * spec).sum((-2, -1)) / (W * M2).sum((-2, -1)).clamp_min(1e-30) \
                / (W * spec).sum((-2, -1)).clamp_min(1e-30)
            return self.score(projections, idx) / torch.sqrt(var.clamp_min(1e-30))

    def score(self, projections: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Similarity (B,) of real-space model projections (B, d, d) (differentiable).
        ``idx`` maps each projection to its particle (default: one to one)."""
        P = torch.fft.rfft2(projections)
        img, ctf, inorm = (self.image, self.ctf, self.image_norm) if idx is None else \
            (self.image[idx], self.ctf[idx], self.image_norm[idx])
        M = P * ctf
        W = self.weight
        num = (W * (M.real * img.real + M.imag * img.imag)).sum((-2, -1))
        den = torch.sqrt((W * (M.real ** 2 + M.imag ** 2)).sum((-2, -1))).clamp_min(1e-30)
        return num / den / inorm.clamp_min(1e-30)
