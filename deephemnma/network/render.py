"""On-the-fly renderer of exactly labelled training particles through the project's own
forward model (DESIGN §6, issue 16 item 2).

A rendered particle is, with parameters drawn per particle:

    x(q)   = x0 + Σ_k q_k V_k                    reference deformed along the selected modes
    P      = project(A · x(q)) at (centre − origin)   analytic Gaussian-atom projection
                                                  (:meth:`ElasticModel.project`)
    S      = F⁻¹[ C(k) · L(k) · F[P] ]           C: the particle's CTF as the data hold it
                                                  (|CTF| for phase-flipped data, CTF for raw,
                                                  CTF² for premultiplied), L: the preprocessing's
                                                  antialias low-pass (raised cosine to Nyquist)
    image  = normalise_background(g · S + n)      g: gain (signal scale and polarity) measured
                                                  on the real data; n: Gaussian noise with the
                                                  radial power spectrum measured on the real data

``oversample = o > 1`` renders at ``o·d`` pixels of ``pixel/o`` Å and Fourier-crops to ``d``,
exactly as ``deephemnma preprocess`` downscales the real particles (CTF, raised-cosine
low-pass, crop); ``o = 1`` renders directly at the preprocessed box (4× cheaper at o = 2).

Parameters: uniform orientations on SO(3); amplitudes and origins from
:class:`ParameterPrior` (a kernel density estimate of, or a Gaussian fitted to, what HEMNMA
found on image set 1); CTF rows drawn uniformly from the data's own STAR rows.

Calibration (:func:`calibrate`): with HEMNMA's labels on set 1, the model image of every
particle is rendered; the gain is the least-squares scale of model onto image over all
particles (zero frequency excluded), and the noise spectrum is the ring-averaged power of
the residuals ``image − g·model`` — "residuals against HEMNMA's fits". Model error (the
Gaussian-atom approximation, HEMNMA's own errors) leaks into it; on the demo it is below 1 %
of the noise power per ring (see NETWORK_REPORT.md).

Determinism: a batch depends only on (seed, epoch, step) and the batch size — every random
draw comes from one ``torch.Generator`` seeded from ``SeedSequence([seed, epoch, step])``,
on the renderer's device — so the same call gives the same batch bit for bit (on one device
and thread count), and an interrupted run resumes exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..align.model import ElasticModel
from ..core.ctf import CTFParams, compute_ctf
from ..core.geometry import euler_to_matrix, quaternion_to_matrix_torch
from ..core.imageops import normalise_background

CTF_MODES = ("phase_flipped", "raw", "premultiplied", "none")
ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
ORIGINS = ["rlnOriginXAngst", "rlnOriginYAngst"]


def amplitude_columns_for(model: ElasticModel) -> list[str]:
    """The STAR amplitude column of each of the model's modes (``dhnmaAmplitudeNNN``)."""
    return [f"dhnmaAmplitude{int(m):03d}" for m in model.mode_numbers]


# ------------------------------------------------------------------------- small helpers
def seeded_generator(seed: int, epoch: int, step: int, device="cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from ``SeedSequence([seed, epoch, step])``."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(step)]).generate_state(2, np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return g


def ring_radius(box: int, device=None) -> torch.Tensor:
    """|k| in Fourier pixels on the rfft grid (box, box//2+1), float64."""
    ky = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64, device=device)
    kx = torch.fft.rfftfreq(box, d=1.0 / box, dtype=torch.float64, device=device)
    return torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)


def raised_cosine_lowpass(box: int, cutoff: float, width: float, device=None) -> torch.Tensor:
    """(box, box//2+1) filter: 1 below ``cutoff − width`` Fourier pixels, 0 beyond ``cutoff``,
    a raised cosine between (the preprocessing's antialias filter; cutoff = new Nyquist)."""
    k = ring_radius(box, device)
    t = ((k - (cutoff - width)) / max(width, 1e-9)).clamp(0, 1)
    return (0.5 * (1 + torch.cos(math.pi * t))).to(torch.float32)


def ring_power(images: torch.Tensor, bins_per_px: int = 1) -> np.ndarray:
    """Mean power per radial bin (``bins_per_px`` bins per Fourier pixel, bin = round(|k|·bins))
    of images (B, d, d): E|F(k)|²/d² (unit white noise → 1 in every bin), averaged over the
    images and the bin's coefficients (empty bins: the previous bin's value)."""
    d = images.shape[-1]
    F = torch.fft.rfft2(images.to(torch.float64))
    p = (F.real ** 2 + F.imag ** 2).mean(0) / (d * d)
    ring = torch.round(ring_radius(d) * bins_per_px).long().reshape(-1)
    n = int(ring.max()) + 1
    num = torch.zeros(n, dtype=torch.float64).index_add_(0, ring, p.reshape(-1))
    cnt = torch.zeros(n, dtype=torch.float64).index_add_(0, ring, torch.ones_like(p).reshape(-1))
    out = (num / cnt.clamp_min(1)).numpy()
    for i in np.flatnonzero(cnt.numpy() == 0):
        out[i] = out[i - 1] if i else 0.0
    return out


def radial_filter(values: np.ndarray, box: int, device=None, bins_per_px: int = 1) -> torch.Tensor:
    """(box, box//2+1) filter f(|k|) from per-bin values: linear interpolation between integer
    rings (``bins_per_px`` = 1), nearest bin otherwise (as :func:`ring_power` bins)."""
    p = torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)
    k = ring_radius(box, device)
    if bins_per_px != 1:
        return p[torch.round(k * bins_per_px).long().clamp(max=len(p) - 1)].to(torch.float32)
    k = k.clamp(max=len(p) - 1)
    lo = k.floor().long()
    hi = (lo + 1).clamp(max=len(p) - 1)
    t = k - lo
    return ((1 - t) * p[lo] + t * p[hi]).to(torch.float32)


def spectrum_filter(power: np.ndarray, box: int, device=None, bins_per_px: int = 1) -> torch.Tensor:
    """(box, box//2+1) amplitude filter sqrt(P(|k|)) from a per-bin power."""
    return torch.sqrt(radial_filter(np.clip(power, 0, None), box, device, bins_per_px))


def ring_sums(values: torch.Tensor) -> np.ndarray:
    """Sum per integer ring of rfft-grid values (B, d, d//2+1), over images and coefficients."""
    d = values.shape[-2]
    ring = torch.round(ring_radius(d)).long().reshape(-1)
    v = values.to(torch.float64).reshape(-1, ring.numel()).sum(0)
    return torch.zeros(int(ring.max()) + 1, dtype=torch.float64).index_add_(0, ring, v).numpy()


def effective_ctf(params: CTFParams | None, mode: str, box: int, pixel_size: float, device=None) -> torch.Tensor:
    """(n, box, box//2+1) CTF factor the data carry: |CTF| (phase_flipped), CTF (raw),
    CTF² (premultiplied) or ones (none)."""
    if mode not in CTF_MODES:
        raise ValueError(f"ctf mode must be one of {CTF_MODES}, got {mode!r}")
    if params is None or mode == "none":
        n = 1 if params is None else len(params)
        return torch.ones(n, box, box // 2 + 1, device=device)
    c = compute_ctf(params, box, pixel_size, device=device)
    return {"phase_flipped": c.abs(), "raw": c, "premultiplied": c * c}[mode]


def random_rotations(n: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """(n, 3, 3) rotations uniform on SO(3) (normalised Gaussian quaternions)."""
    q = torch.randn(n, 4, generator=gen, device=device, dtype=torch.float64)
    return quaternion_to_matrix_torch(q).to(torch.float32)


# ------------------------------------------------------------------------- parameter prior
@dataclass
class ParameterPrior:
    """Where amplitudes (M modes) and origins (Å) are drawn from.

    ``kind = "kde"``: resample the set-1 labels and add Gaussian jitter of ``bandwidth`` × the
    per-column standard deviation (a kernel density estimate: follows a curved landscape such
    as the demo's helix); ``"gaussian"``: a Gaussian with the labels' mean and covariance;
    ``"uniform_shift"`` origins only: uniform in ± ``shift_range`` Å per axis."""

    amplitudes: np.ndarray          # (K, M) set-1 labels
    origins: np.ndarray             # (K, 2) Å
    kind: str = "kde"
    bandwidth: float = 0.2
    shift_kind: str = "kde"
    shift_range: float | None = None

    @classmethod
    def from_table(cls, table: pd.DataFrame, model: ElasticModel, **kw) -> "ParameterPrior":
        """From a STAR table with HEMNMA labels (amplitude and origin columns)."""
        amp = table[amplitude_columns_for(model)].to_numpy(np.float64)
        return cls(amp, table[ORIGINS].to_numpy(np.float64), **kw)

    def _draw(self, values: np.ndarray, kind: str, n: int, gen, device) -> torch.Tensor:
        v = torch.as_tensor(values, dtype=torch.float64, device=device)
        if kind == "gaussian":
            mean, cov = v.mean(0), torch.cov(v.T).reshape(v.shape[1], v.shape[1])
            L = torch.linalg.cholesky(cov + 1e-9 * torch.eye(v.shape[1], dtype=v.dtype, device=device))
            return mean + torch.randn(n, v.shape[1], generator=gen, device=device, dtype=v.dtype) @ L.T
        idx = torch.randint(len(v), (n,), generator=gen, device=device)
        jitter = torch.randn(n, v.shape[1], generator=gen, device=device, dtype=v.dtype)
        return v[idx] + self.bandwidth * v.std(0) * jitter

    def sample(self, n: int, gen: torch.Generator, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(amplitudes (n, M), origins (n, 2) Å), float32."""
        q = self._draw(self.amplitudes, self.kind, n, gen, device)
        if self.shift_kind == "uniform":
            r = self.shift_range if self.shift_range is not None else float(np.abs(self.origins).max())
            o = (torch.rand(n, 2, generator=gen, device=device, dtype=torch.float64) * 2 - 1) * r
        else:
            o = self._draw(self.origins, self.shift_kind, n, gen, device)
        return q.to(torch.float32), o.to(torch.float32)


# ------------------------------------------------------------------------- the renderer
@dataclass
class RenderSettings:
    """How particles are drawn (the settings a checkpoint records)."""

    box: int                        # preprocessed box d
    pixel_size: float               # Å per pixel at d
    ctf_mode: str = "phase_flipped"
    oversample: int = 1             # render at o·d, then preprocess-like crop to d
    lowpass_width: float = 2.0      # Fourier pixels (preprocess.lowpass_width)
    background_radius: float = 0.9  # fraction of d/2 (preprocess.background_radius)
    extra_sigma: float = 0.0        # Å widening of every atom's Gaussian
    normalise: bool = True
    noise_bins_per_px: int = 4      # radial resolution of the noise spectrum (CTF-modulated noise)


class ParticleRenderer:
    """Renders batches of labelled particles (see the module docstring).

    ``model``: the elastic reference; ``ctf``: CTF rows to draw from (None: no CTF);
    ``prior``: amplitudes / origins; ``gain``: signal scale and polarity, ``noise_power``:
    per-ring power (:func:`ring_power` convention) of the noise at the preprocessed box
    (None: noise-free); ``transfer``: optional per-ring factor (signed) applied to the
    signal on top of ``gain`` — what the Gaussian-atom model misses of the data's spectrum
    (the atoms' true scattering, envelopes), fitted by :func:`calibrate`."""

    def __init__(self, model: ElasticModel, settings: RenderSettings, prior: ParameterPrior, ctf: CTFParams | None,
                 gain: float = 1.0, noise_power: np.ndarray | None = None, transfer: np.ndarray | None = None, *,
                 seed: int = 0, device="cpu"):
        self.model, self.s, self.prior = model, settings, prior
        self.gain, self.seed, self.device = float(gain), int(seed), torch.device(device)
        self.ctf = ctf
        d, o = settings.box, max(1, int(settings.oversample))
        self.render_box, self.render_px = d * o, settings.pixel_size / o
        self.noise_filter = None if noise_power is None else \
            spectrum_filter(noise_power, d, self.device, settings.noise_bins_per_px)
        self.lowpass = raised_cosine_lowpass(self.render_box, d / 2.0, settings.lowpass_width, self.device)
        self.transfer = None if transfer is None else radial_filter(transfer, d, self.device)
        self._ctf_cache = self._unique_ctfs()

    def _unique_ctfs(self):
        """CTFs precomputed per distinct row when the data have few (≤ 256) distinct ones."""
        if self.ctf is None:
            return None
        cols = np.stack([self.ctf.defocus_u, self.ctf.defocus_v, self.ctf.defocus_angle, self.ctf.voltage,
                         self.ctf.cs, self.ctf.amp_contrast, self.ctf.phase_shift, self.ctf.bfactor, self.ctf.scale], 1)
        uniq, inverse = np.unique(cols, axis=0, return_inverse=True)
        if len(uniq) > 256:
            return None
        first = np.array([np.flatnonzero(inverse.reshape(-1) == u)[0] for u in range(len(uniq))])
        table = effective_ctf(self.ctf[first], self.s.ctf_mode, self.render_box, self.render_px, self.device)
        return table, torch.as_tensor(inverse.reshape(-1), device=self.device)

    def ctf_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """(n, D, D//2+1) effective CTFs of the CTF rows ``idx`` at the render box."""
        if self.ctf is None:
            return torch.ones(len(idx), self.render_box, self.render_box // 2 + 1, device=self.device)
        if self._ctf_cache is not None:
            table, inverse = self._ctf_cache
            return table[inverse[idx]]
        return effective_ctf(self.ctf[idx.cpu().numpy()], self.s.ctf_mode, self.render_box, self.render_px, self.device)

    def clean(self, rotations: torch.Tensor, origins: torch.Tensor, amplitudes: torch.Tensor,
              ctf_idx: torch.Tensor) -> torch.Tensor:
        """Noise-free preprocessed signal S (B, d, d) (gain not applied): projection, CTF,
        antialias low-pass, Fourier crop to d. ``origins`` in Å."""
        D, d = self.render_box, self.s.box
        P = self.model.project(rotations, origins / self.render_px, amplitudes, D, self.render_px, self.s.extra_sigma)
        F = torch.fft.rfft2(P) * self.ctf_rows(ctf_idx) * self.lowpass
        if D != d:
            h = d // 2
            F = torch.cat([F[..., :h, :h + 1], F[..., D - h:, :h + 1]], dim=-2) * (d * d / (D * D))
        if self.transfer is not None:
            F = F * self.transfer
        return torch.fft.irfft2(F, s=(d, d))

    def noise(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, d, d) noise with the measured spectrum (zeros when noise-free)."""
        d = self.s.box
        if self.noise_filter is None:
            return torch.zeros(n, d, d, device=self.device)
        w = torch.randn(n, d, d, generator=gen, device=self.device)
        return torch.fft.irfft2(torch.fft.rfft2(w) * self.noise_filter, s=(d, d))

    def finish(self, signal: torch.Tensor, noise: torch.Tensor, noise_scale: float = 1.0) -> torch.Tensor:
        """gain · S + noise_scale · n, normalised like the preprocessed data."""
        img = self.gain * signal + float(noise_scale) * noise
        if self.s.normalise and (noise_scale > 0 and self.noise_filter is not None):
            img = normalise_background(img, self.s.background_radius * self.s.box / 2)
        elif self.s.normalise:  # noise-free: background mean 0, scale as if the noise were there
            d = self.s.box
            g = torch.arange(d, device=img.device, dtype=torch.float32) - d // 2
            bg = (g[:, None] ** 2 + g[None, :] ** 2) > (self.s.background_radius * d / 2) ** 2
            img = img - img[..., bg].mean(-1)[..., None, None]
        return img.to(torch.float32)

    def batch(self, epoch: int, step: int, n: int, noise_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """One batch, a function of (seed, epoch, step, n) only: ``images`` (n, 1, d, d),
        ``rotations`` (n, 3, 3), ``amplitudes`` (n, M), ``origins`` (n, 2) Å, ``ctf_index`` (n,)."""
        g = seeded_generator(self.seed, epoch, step, self.device)
        R = random_rotations(n, g, self.device)
        q, o = self.prior.sample(n, g, self.device)
        nrows = 1 if self.ctf is None else len(self.ctf)
        ci = torch.randint(nrows, (n,), generator=g, device=self.device)
        nz = self.noise(n, g)
        with torch.no_grad():
            S = self.clean(R, o, q, ci)
        img = self.finish(S, nz, noise_scale)
        return {"images": img[:, None], "rotations": R, "amplitudes": q, "origins": o, "ctf_index": ci}


# ------------------------------------------------------------------------- calibration
def labelled_poses(table: pd.DataFrame, model: ElasticModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rotations (n,3,3), origins (n,2) Å, amplitudes (n,M)) float32 from a labelled STAR table."""
    R = torch.as_tensor(euler_to_matrix(table[ANGLES].to_numpy(np.float64)), dtype=torch.float32)
    o = torch.tensor(table[ORIGINS].to_numpy(np.float64), dtype=torch.float32)  # a copy: the column may be read-only
    q = torch.tensor(table[amplitude_columns_for(model)].to_numpy(np.float64), dtype=torch.float32)
    return R, o, q


def calibrate(renderer: ParticleRenderer, images: np.ndarray, table: pd.DataFrame, batch: int = 64,
              per_ring: bool = True, smooth: int = 1) -> dict:
    """Gain, signal transfer and noise spectrum from real preprocessed images (n, d, d) with
    HEMNMA labels (``table`` rows in the same order; CTF rows = ``renderer.ctf`` rows in the
    same order). ``renderer`` should have no transfer of its own.

    gain = Σ⟨S, x⟩ / Σ⟨S, S⟩ over all particles (zero frequency excluded; S: the clean render
    of each particle's labels). With ``per_ring`` the transfer is the same least-squares fit
    per Fourier ring, divided by the gain (sums smoothed over ± ``smooth`` rings; rings without
    signal get the last fitted value). Noise power = :func:`ring_power` of the residuals
    x − model, in ``noise_bins_per_px`` bins per Fourier pixel (the pre-CTF noise is modulated
    by |CTF|², which oscillates faster than one ring). Returns ``{"gain", "transfer" (or
    None), "gains" (per particle), "noise_power", "noise_power_rings" (per integer ring),
    "signal_power" (of the fitted model), "image_power"}``."""
    R, o, q = labelled_poses(table, renderer.model)
    n = len(images)
    with torch.no_grad():
        S = torch.cat([renderer.clean(R[a:a + batch], o[a:a + batch], q[a:a + batch], torch.arange(a, min(n, a + batch)))
                       for a in range(0, n, batch)]).double()
    X = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    FS, FX = torch.fft.rfft2(S), torch.fft.rfft2(X)
    FS[..., 0, 0] = 0
    FX[..., 0, 0] = 0
    cross = (FS.real * FX.real + FS.imag * FX.imag)
    power = FS.real ** 2 + FS.imag ** 2
    per = cross.sum((-2, -1)) / power.sum((-2, -1)).clamp_min(1e-30)
    gain = float(cross.sum() / power.sum())
    transfer = None
    fit = gain * FS
    if per_ring:
        num, den = ring_sums(cross), ring_sums(power)
        kern = np.ones(2 * smooth + 1)
        num_s, den_s = np.convolve(num, kern, "same"), np.convolve(den, kern, "same")
        ok = den_s > 1e-6 * den_s.max()
        t = np.where(ok, num_s / np.where(ok, den_s, 1), np.nan) / gain
        last = np.flatnonzero(ok)
        t[:last[0]] = t[last[0]]
        t[last[-1] + 1:] = t[last[-1]]
        t[0] = t[1]
        transfer = t
        fit = fit * radial_filter(t, X.shape[-1]).double()
    d = X.shape[-1]
    resid = torch.fft.irfft2(FX - fit, s=(d, d))
    return {"gain": gain, "transfer": transfer, "gains": per.numpy(),
            "noise_power": ring_power(resid, renderer.s.noise_bins_per_px), "noise_power_rings": ring_power(resid),
            "signal_power": ring_power(torch.fft.irfft2(fit, s=(d, d))), "image_power": ring_power(X)}
