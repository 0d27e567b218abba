"""A variational autoencoder whose decoder is the project's own forward model (issue 12,
DESIGN §6): conformations and poses learned from the particle images through the normal modes.

Model (:class:`PoseVAE`)
------------------------
Encoder: the grid network (:class:`.posenet.PoseNet`, the same code and weights layout) —
the image's features give

* the pose: a distribution over the SO(3) grid (decoded to one rotation by the grid's local
  weighted mean) and the shift (Å);
* a Gaussian posterior over the amplitudes of the selected modes, ``N(μ, diag σ²)``: μ is the
  grid network's amplitude head, log σ² one more head of the same shape (:attr:`PoseVAE.logvar`).

Decoder (:class:`PhysicsDecoder`): the renderer's clean-signal path
(:meth:`.render.ParticleRenderer.clean`) — the reference deformed by the amplitudes
(``x0 + Σ q_k V_k``), rotated, shifted, projected by the analytic Gaussian-atom projector of
the alignment (:meth:`deephemnma.align.model.ElasticModel.project`), multiplied by each
particle's own CTF as the data carry it (``|CTF|`` after preprocess's phase flip), the
preprocessing's antialias low-pass — then the calibrated gain and per-ring signal transfer.
It is differentiable in the rotation, the origins and the amplitudes.

Likelihood: the measured noise is Gaussian and coloured, with the ring-averaged power
``N(|k|)`` of the calibration; whitening by it gives
``−log p(x | θ, q) = ½ Σ_k W(k) |X(k) − M(k)|² / (d² N(|k|)) + const`` over the full Fourier
plane (rfft half plane with multiplicities) in the band ``0 < |k| ≤ d/2 − lowpass_width``
where the preprocessing's filter is 1 (zero frequency excluded: the background
normalisation removes it). The loss of a reconstruction step is the negative evidence lower
bound per Fourier coefficient of that band, ``(½ χ² + β KL) / n_band``, with one
reparameterised sample ``q = μ + σ ε``.

Prior on the amplitudes (``network.vae_prior``)
-----------------------------------------------
``thermal`` (default): ``q_k ~ N(0, c² / λ_k)``, λ_k the eigenvalue of mode k of the elastic
network. Equipartition gives a harmonic mode the thermal variance ``kT / (γ λ_k)``: the
eigenvalues fix the *ratios* of the modes' spreads (soft modes move more) and centre the
prior on the reference, with no label. The absolute scale — temperature over the ENM's
arbitrary spring constant γ — is not known, so ``c`` is one parameter learned with the
network by maximising the evidence lower bound (empirical Bayes), started at the value that
gives the prior an RMS deformation of ``network.vae_prior_rmsd`` Å. ``hemnma``: the mean and
standard deviation of HEMNMA's amplitudes on set 1 (fixed; needs the labels).

Training (:class:`VAETask`, run by :func:`.loop.fit` on any engine, with exact resume)
--------------------------------------------------------------------------------------
Pose and conformation are kept apart the HetACUMN way: the optimiser steps alternate

* **pose-prediction steps** on particles rendered through the same forward model with
  uniform orientations and exact labels: the grid network's losses (soft-target
  cross-entropy over the grid, smooth L1 on shifts and standardised amplitudes) and the
  Gaussian likelihood of the true amplitudes under the posterior head (so that σ is
  calibrated on simulations too). The rendered amplitudes come from the prior (``scratch``)
  or from HEMNMA's labels (``regressor``: a kernel density estimate, as the grid network's);
  origins uniform in ± ``vae_shift_range`` (scratch) or from the labels; noise with the
  calibrated spectrum; the data's own CTF rows; the same background normalisation;
* **reconstruction steps** on real particles: the negative ELBO above. The pose enters the
  decoder detached (it is learnt by the pose steps alone), so the likelihood cannot trade
  conformation for pose.

The first ``vae_pretrain`` of the steps are pose steps only (the encoder must find poses
before the likelihood means anything); then a fraction ``vae_pose_fraction`` of the steps
are pose steps, interleaved. With ``vae_init: regressor`` and ``vae_init_checkpoint`` (a
grid ``best.pt``) the encoder and the calibration start from that network and there is no
pretraining.

Calibration (gain, transfer, noise spectrum)
--------------------------------------------
``regressor``: :func:`.render.calibrate` on HEMNMA's labels (the residuals of each image
against the render of its labels), or the grid checkpoint's. ``scratch`` — no labels:
:func:`calibrate_unlabelled` first (noise: the periodogram of the background the
preprocessing normalised on, outside 0.9·d/2 under a soft mask; signal: the image power
minus that noise, against the power of the reference's renders at uniform orientations with
the data's CTFs, fitted by a gain and a Gaussian envelope exp(b·k²)); then, at the start of
every epoch once reconstruction steps have begun, :func:`.render.calibrate` on the VAE's own
answers (self-calibration: the residuals against the VAE's fits, exactly the labelled
calibration with the VAE's answers as labels) — applied only once those answers explain the
images down to the noise (residual power ≤ :data:`SELF_CALIBRATION_TOLERANCE` × the
background's). The calibration lives in buffers of the model
(``gain``, ``transfer``, ``noise_power``): checkpoints carry it and resume recomputes it
from the same weights.

Outputs: ``deephemnma predict`` with a VAE checkpoint goes through
:func:`.amortise.amortise_star` with the encoder (pose, amplitudes = posterior mean; refined
by HEMNMA with ``network.refine`` local/fallback) and adds ``dhnmaAmplitudeStdNNN``, the
posterior standard deviation of each mode's amplitude (:func:`predict_vae_star`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..core.ctf import CTFParams
from ..core.errors import ConfigError, InputError
from ..core.geometry import angular_error, matrix_to_euler
from ..core.imageops import normalise_background
from ..core.logs import get_logger
from .data import ParticleSet
from .engines import Engine
from .loop import Task
from .posegrid import CALIBRATION_PARTICLES, ctf_mode_of, labels_of
from .posenet import PoseNet, PoseNetConfig, head, loss_terms
from .render import (
    ANGLES,
    ORIGINS,
    ParameterPrior,
    ParticleRenderer,
    RenderSettings,
    amplitude_columns_for,
    calibrate,
    radial_filter,
    random_rotations,
    ring_power,
    ring_radius,
    seeded_generator,
)
from .targets import test_block

log = get_logger(__name__)

#: added to the validation score of epochs of pose steps alone (they can be best.pt only until
#: an epoch with reconstruction steps exists)
PRETRAINING_PENALTY = 1e6
#: the STAR column of the posterior standard deviation of mode ``m``'s amplitude
STD_PREFIX = "dhnmaAmplitudeStd"
#: self-calibration is applied once the residuals of the VAE's fits are at the noise level: their
#: power (over the likelihood's band) at most this multiple of the background's noise power
#: (:func:`calibrate_unlabelled`). With wrong poses the misfit inflates the residuals and the
#: least-squares gain collapses (measured on the demo: gain 0.07 at chance poses, 0.23 with
#: HEMNMA's); with HEMNMA's poses the residuals have 0.8–1.0 × the background's power.
SELF_CALIBRATION_TOLERANCE = 1.1
#: initial log-variance of the posterior (standardised units): σ = one standard deviation of the amplitudes
LOGVAR0 = 0.0
#: the local rotation correction of the grid's answer stays within ± this (radians, per axis-angle component)
POSE_DELTA_BOUND = 0.3
#: pose steps train the correction only where the grid's answer is within this of the truth (degrees)
POSE_DELTA_RANGE = 30.0
#: fraction of the steps after pretraining over which the reconstruction losses ramp up to full weight
RECON_RAMP = 0.1
#: weight of the encoder's pose-correction and shift heads' loss against the refined pose (the
#: shared features must keep serving the grid's pose classification)
DISTILL_WEIGHT = 0.3
#: squared chordal distance ‖R − R'‖²_F of two rotations 10° apart (rotation losses are 1 there)
CHORD_10DEG = 4 * (1 - math.cos(math.radians(10.0)))
#: the posterior's log-variance (standardised units) stays within ± this: σ ≥ e⁻⁶ standard deviations
LOGVAR_BOUND = 12.0


def std_column(mode: int) -> str:
    """``dhnmaAmplitudeStd007``: the posterior standard deviation of mode 7's amplitude."""
    return f"{STD_PREFIX}{int(mode):03d}"


def soft_bound(logvar: torch.Tensor, bound: float = LOGVAR_BOUND) -> torch.Tensor:
    """The log-variance head's output kept in (−bound, bound) smoothly (b·tanh(x/b)): a hard
    clamp would stop its gradient where the likelihood is sharp."""
    return bound * torch.tanh(logvar / bound)


# ----------------------------------------------------------------------------- the prior
def thermal_shape(modes_path, mode_numbers) -> np.ndarray:
    """1/√λ_k for the modes ``mode_numbers`` of a modes file (the thermal prior's shape)."""
    from ..core.modes import load_modes

    ms = load_modes(modes_path)
    lam = []
    for m in mode_numbers:
        hit = np.flatnonzero(np.asarray(ms.computed_numbers) == int(m))
        if not hit.size:
            raise InputError(modes_path, f"mode {int(m)} has no eigenvalue in the modes file")
        lam.append(float(ms.eigenvalues[hit[0]]))
    lam = np.asarray(lam)
    if not (lam > 0).all():
        raise InputError(modes_path, f"the thermal prior needs positive eigenvalues; modes {list(mode_numbers)} "
                                     f"have {lam.tolist()} (rigid-body modes cannot be selected)")
    return 1.0 / np.sqrt(lam)


def thermal_scale(shape: np.ndarray, vectors: np.ndarray, rmsd: float) -> float:
    """c such that N(0, c²·shape²) has an RMS atomic deformation of ``rmsd`` Å:
    E|Σ q_k v_k|²/N = c² Σ shape_k² |v_k|² / N."""
    V = np.asarray(vectors, np.float64)
    n = V.shape[1]
    norm2 = (V.reshape(len(V), -1) ** 2).sum(1)
    return float(rmsd) * math.sqrt(n / max(float((shape ** 2 * norm2).sum()), 1e-30))


def posterior_rmsd(std: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """RMS atomic displacement (Å) of a posterior sample about its mean, per particle:
    sqrt(Σ_k σ_k² |v_k|² / N) (modes orthogonal)."""
    V = np.asarray(vectors, np.float64)
    norm2 = (V.reshape(len(V), -1) ** 2).sum(1)
    return np.sqrt((np.asarray(std, np.float64) ** 2 * norm2).sum(-1) / V.shape[1])


# ----------------------------------------------------------------------------- the model
class PoseVAE(nn.Module):
    """Encoder (:class:`.posenet.PoseNet` + a log-variance head), prior and calibration.

    ``forward(images) -> {"pose_logits", "amplitudes" (posterior mean, standardised),
    "shifts" (shift_scale units), "amp_logvar" (standardised units)}``."""

    def __init__(self, cfg: PoseNetConfig, amp_mean=None, amp_std=None, shift_scale: float = 1.0, *,
                 prior_mean=None, prior_shape=None, prior_log_scale: float = 0.0, learn_prior: bool = True,
                 gain: float = 1.0, transfer=None, noise_power=None, n_transfer: int = 33, n_noise: int = 129):
        super().__init__()
        M = cfg.n_amplitudes
        self.encoder = PoseNet(cfg, amp_mean, amp_std, shift_scale)
        n_features = self.encoder.amp[0].in_features
        self.logvar = head(n_features, cfg.hidden, M)
        nn.init.zeros_(self.logvar[-1].weight)
        nn.init.constant_(self.logvar[-1].bias, LOGVAR0)
        self.pose_delta = head(n_features, cfg.hidden, 3)
        nn.init.zeros_(self.pose_delta[-1].weight)
        nn.init.zeros_(self.pose_delta[-1].bias)
        f32 = dict(dtype=torch.float32)
        self.register_buffer("prior_mean", torch.as_tensor(np.zeros(M) if prior_mean is None else prior_mean, **f32))
        self.register_buffer("prior_shape", torch.as_tensor(np.ones(M) if prior_shape is None else prior_shape, **f32))
        self.prior_log_scale = nn.Parameter(torch.tensor(float(prior_log_scale)), requires_grad=bool(learn_prior))
        self.register_buffer("gain", torch.tensor(float(gain)))
        self.register_buffer("transfer", torch.as_tensor(np.ones(n_transfer) if transfer is None else transfer, **f32))
        self.register_buffer("noise_power", torch.as_tensor(np.ones(n_noise) if noise_power is None else noise_power,
                                                            **f32))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        enc = self.encoder
        f = enc.features(enc.prepare(x))
        return {"pose_logits": enc.pose(f), "amplitudes": enc.amp(f), "shifts": enc.shift(f),
                "amp_logvar": self.logvar(f), "pose_delta": POSE_DELTA_BOUND * torch.tanh(self.pose_delta(f))}

    def rotations(self, out: dict, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(R (B,3,3), R_grid): the grid's decoded rotation (no gradient; ``logits`` to decode
        other logits, e.g. turn-averaged ones) corrected by the local rotation head,
        R = R_grid · exp([δ]×) (differentiable in δ)."""
        with torch.no_grad():
            R_grid = self.encoder.grid.decode((out["pose_logits"] if logits is None else logits).detach().float(),
                                              "local")
        return R_grid @ axis_angle_matrix(out["pose_delta"].float()), R_grid

    def prior_std(self) -> torch.Tensor:
        """(M,) standard deviations of the prior."""
        return torch.exp(self.prior_log_scale) * self.prior_shape

    def posterior(self, out: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(μ, σ, log σ) in physical units (B, M) from the forward's output."""
        enc = self.encoder
        lv = soft_bound(out["amp_logvar"].float())
        mu = out["amplitudes"].float() * enc.amp_std + enc.amp_mean
        log_std = 0.5 * lv + torch.log(enc.amp_std)
        return mu, torch.exp(log_std), log_std

    def kl(self, mu: torch.Tensor, std: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
        """(B,) KL(N(μ, σ²) ‖ prior), summed over the modes."""
        ps = self.prior_std()
        return (torch.log(ps) - log_std + (std ** 2 + (mu - self.prior_mean) ** 2) / (2 * ps ** 2) - 0.5).sum(-1)

    def calibration(self) -> dict:
        return {"gain": float(self.gain), "transfer": self.transfer.double().cpu().numpy().tolist(),
                "noise_power": self.noise_power.double().cpu().numpy().tolist()}

    def set_calibration(self, gain: float, transfer, noise_power) -> None:
        with torch.no_grad():
            self.gain.fill_(float(gain))
            self.transfer.copy_(torch.as_tensor(np.asarray(transfer, np.float64), dtype=torch.float32))
            self.noise_power.copy_(torch.as_tensor(np.asarray(noise_power, np.float64), dtype=torch.float32))


@torch.no_grad()
def vae_answers(vae: PoseVAE, x: torch.Tensor, turns: int = 1) -> dict[str, torch.Tensor]:
    """The VAE's answers for images (B, 1, d, d): ``rotations`` (grid decode, averaged over
    ``turns`` quarter turns, then the local correction of the unturned image), ``origins`` (Å),
    ``amplitudes`` (posterior mean) and ``std`` (posterior standard deviation); the pose,
    amplitude and shift heads averaged over the turns as :meth:`.posenet.PoseNet.turned_outputs`."""
    out = vae(x)
    logits = None
    mu_std, shifts = out["amplitudes"], out["shifts"]
    if turns > 1:
        t = vae.encoder.turned_outputs(x, turns)
        logits, mu_std, shifts = t["log_probs"], t["amplitudes"], t["shifts"]
    R, _ = vae.rotations(out, logits)
    mu, std, _ = vae.posterior({**out, "amplitudes": mu_std})
    return {"rotations": R, "origins": shifts.float() * vae.encoder.shift_scale, "amplitudes": mu, "std": std}


def vae_from_checkpoint(state: dict, device="cpu") -> PoseVAE:
    """The VAE of a checkpoint, in eval mode on ``device``."""
    mc = state["model_config"]
    net = PoseVAE(PoseNetConfig(**mc["encoder"]), n_transfer=int(mc["n_transfer"]), n_noise=int(mc["n_noise"]),
                  learn_prior=mc.get("prior") == "thermal")
    net.load_state_dict(state["model_state"])
    return net.to(device).eval()


# ----------------------------------------------------------------------------- the decoder
class PhysicsDecoder:
    """Image model ``M(k) = gain · T(|k|) · C_i(k) · L(k) · F[P(R, o, q)](k)`` and its whitened
    distance to images (see the module docstring). ``renderer``: a :class:`.render.ParticleRenderer`
    without gain, transfer or noise of its own (its CTF rows are the particles' rows);
    ``vae``: where the calibration lives. Call :meth:`refresh` after the calibration changes."""

    def __init__(self, renderer: ParticleRenderer, vae: PoseVAE, image_box: int | None = None,
                 image_pixel_size: float | None = None):
        if renderer.transfer is not None or renderer.gain != 1.0:
            raise ValueError("the decoder's renderer must have no gain or transfer of its own")
        self.renderer, self.vae = renderer, vae
        s = renderer.s
        d = s.box
        self.box = d
        # a coarser level (box d < the images' D, pixel × D/d) of images Fourier-cropped to d: the
        # same per-ring calibration (ring k is the same frequency), the projector's values scale
        # with the pixel area, the cropped noise's power with (d/D)²
        D = int(image_box or d)
        self.image_box = D
        self.signal_scale = (float(image_pixel_size or s.pixel_size) / s.pixel_size) ** 2
        self.noise_scale = (d / D) ** 2
        dev = renderer.device
        k = ring_radius(d, dev)
        mult = torch.full((d // 2 + 1,), 2.0, dtype=torch.float64, device=dev)
        mult[0] = 1.0
        if d % 2 == 0:
            mult[-1] = 1.0
        self.kmax = d / 2.0 - s.lowpass_width
        band = (k > 0) & (k <= self.kmax + 1e-9)
        self.weight = (band.double() * mult[None, :]).float()
        self.n_band = float(self.weight.sum())
        self.refresh()

    def refresh(self) -> None:
        s, dev, d = self.renderer.s, self.renderer.device, self.box
        v = self.vae
        self.transfer = radial_filter(v.transfer.double().cpu().numpy(), d, dev) * (float(v.gain) * self.signal_scale)
        noise = v.noise_power.double().cpu().numpy()
        self.noise = radial_filter(np.clip(noise, 1e-12, None), d, dev, s.noise_bins_per_px).clamp_min(1e-12) \
            * self.noise_scale
        self.noise_amplitude = torch.sqrt(self.noise)

    def spectrum(self, rotations: torch.Tensor, origins: torch.Tensor, amplitudes: torch.Tensor,
                 ctf_index: torch.Tensor) -> torch.Tensor:
        """rfft2 (B, d, d//2+1) of the model images (differentiable in all three)."""
        S = self.renderer.clean(rotations, origins, amplitudes, ctf_index)
        return torch.fft.rfft2(S) * self.transfer

    def image(self, rotations, origins, amplitudes, ctf_index) -> torch.Tensor:
        """Model images (B, d, d): the decoder's output before noise and normalisation."""
        d = self.box
        return torch.fft.irfft2(self.spectrum(rotations, origins, amplitudes, ctf_index), s=(d, d))

    def image_spectrum(self, images: torch.Tensor) -> torch.Tensor:
        """rfft2 of images (B, D, D) at this decoder's box (Fourier crop, values preserved)."""
        F = torch.fft.rfft2(images.float())
        D, d = self.image_box, self.box
        if D == d:
            return F
        h = d // 2
        return torch.cat([F[..., :h, :h + 1], F[..., D - h:, :h + 1]], dim=-2) * (d * d / (D * D))

    def chi2(self, image_ft: torch.Tensor, model_ft: torch.Tensor) -> torch.Tensor:
        """(B,) Σ_k W(k) |X − M|² / (d² N(|k|)): twice the negative log-likelihood (+ const)."""
        r = image_ft - model_ft
        return (self.weight * (r.real ** 2 + r.imag ** 2) / self.noise).sum((-2, -1)) / (self.box * self.box)

    def noise_images(self, n: int, gen: torch.Generator) -> torch.Tensor:
        d = self.box
        w = torch.randn(n, d, d, generator=gen, device=self.renderer.device)
        return torch.fft.irfft2(torch.fft.rfft2(w) * self.noise_amplitude, s=(d, d))


def axis_angle_matrix(v: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rotation matrices exp([v]×) of axis-angle vectors (B, 3) (Rodrigues; differentiable)."""
    theta = torch.sqrt((v * v).sum(-1) + 1e-24)[:, None, None]
    K = torch.zeros(len(v), 3, 3, dtype=v.dtype, device=v.device)
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -v[:, 2], v[:, 1], -v[:, 0]
    K = K - K.transpose(1, 2)
    eye = torch.eye(3, dtype=v.dtype, device=v.device)[None]
    return eye + torch.sin(theta) / theta * K + (1 - torch.cos(theta)) / theta ** 2 * (K @ K)


def fit_through_decoder(decoder: PhysicsDecoder, images: torch.Tensor, ctf_index: torch.Tensor,
                        rotations: torch.Tensor, origins: torch.Tensor, amplitudes: torch.Tensor, *,
                        steps: int = 100, lr: float = 0.02, amplitude_scale: float = 1.0,
                        fit_pose: bool = True) -> dict[str, torch.Tensor]:
    """Maximise the likelihood of ``images`` (B, d, d) over a local rotation correction
    (``R = R0 · exp([δ]×)``), the origins (Å) and the amplitudes by Adam (cosine-decayed
    learning rate) through the decoder alone. ``amplitude_scale``: the amplitudes' natural unit (steps are taken on q / scale).
    Returns ``rotations``, ``origins``, ``amplitudes``, ``chi2`` (detached)."""
    R0 = rotations.detach().float()
    delta = torch.zeros(len(R0), 3, device=R0.device, requires_grad=fit_pose)
    o = origins.detach().float().clone().requires_grad_(fit_pose)
    z = (amplitudes.detach().float() / amplitude_scale).clone().requires_grad_(True)
    params = [z] + ([delta, o] if fit_pose else [])
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, int(steps)), eta_min=lr / 100)
    X = decoder.image_spectrum(images)
    for _ in range(int(steps)):
        R = R0 @ axis_angle_matrix(delta)
        loss = decoder.chi2(X, decoder.spectrum(R, o, z * amplitude_scale, ctf_index)).sum() / decoder.n_band
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        R = R0 @ axis_angle_matrix(delta)
        q = z * amplitude_scale
        c = decoder.chi2(X, decoder.spectrum(R, o, q, ctf_index))
    return {"rotations": R.detach(), "origins": o.detach(), "amplitudes": q.detach(), "chi2": c}


@torch.no_grad()
def gauss_newton_fit(decoder: PhysicsDecoder, images: torch.Tensor, ctf_index: torch.Tensor,
                     rotations: torch.Tensor, origins: torch.Tensor, amplitudes: torch.Tensor, *,
                     iterations: int = 5, amplitude_scale=1.0, shift_scale: float = 1.0,
                     damping: float = 1e-3) -> dict[str, torch.Tensor]:
    """Levenberg–Marquardt on the whitened χ² of each image over a local rotation correction
    δ (``R = R0 · exp([δ]×)``), the origins and the amplitudes, with a forward-difference
    Jacobian (one render per parameter, no autograd): per image and iteration
    ``(JᵀWJ + λ diag JᵀWJ) Δ = JᵀW r``, the step kept only where χ² falls (λ ÷ 3, else × 10).
    Parameters are scaled to natural units (radians, ``shift_scale`` Å, ``amplitude_scale``).
    Returns ``rotations``, ``origins``, ``amplitudes``, ``chi2``."""
    B = len(images)
    M = amplitudes.shape[1]
    dev = images.device
    X = decoder.image_spectrum(images)
    w = (decoder.weight / decoder.noise).sqrt() / decoder.box            # whitening of a residual
    scale = torch.cat([torch.ones(3, device=dev), torch.full((2,), float(shift_scale), device=dev),
                       torch.as_tensor(amplitude_scale, dtype=torch.float32, device=dev).reshape(-1).expand(M)])
    P = 5 + M
    h = 1e-3

    def model(delta, o, q):
        R = rotations.float() @ axis_angle_matrix(delta)
        return decoder.spectrum(R, o, q, ctf_index)

    delta = torch.zeros(B, 3, device=dev)
    o = origins.float().clone()
    q = amplitudes.float().clone()
    lam = torch.full((B,), float(damping), device=dev)

    def chi2_of(F):
        r = (X - F) * w
        return (r.real ** 2 + r.imag ** 2).sum((-2, -1))

    F0 = model(delta, o, q)
    c0 = chi2_of(F0)
    for _ in range(int(iterations)):
        cols = []
        for j in range(P):
            step = torch.zeros(B, P, device=dev)
            step[:, j] = h
            u = step * scale
            cols.append(((model(delta + u[:, :3], o + u[:, 3:5], q + u[:, 5:]) - F0) / h * w))
        J = torch.stack(cols, 1)                                             # (B, P, d, d//2+1)
        r = (X - F0) * w
        Jr = torch.view_as_real(J).flatten(2)                                # (B, P, n)
        rr = torch.view_as_real(r).flatten(1)                                # (B, n)
        A = Jr @ Jr.transpose(1, 2)
        g = (Jr @ rr[:, :, None])[..., 0]
        Ad = A + lam[:, None, None] * torch.diag_embed(torch.diagonal(A, dim1=1, dim2=2).clamp_min(1e-12))
        dp = torch.linalg.solve(Ad, g) * scale
        d_new, o_new, q_new = delta + dp[:, :3], o + dp[:, 3:5], q + dp[:, 5:]
        F1 = model(d_new, o_new, q_new)
        c1 = chi2_of(F1)
        ok = c1 < c0
        sel = ok[:, None]
        delta, o, q = torch.where(sel, d_new, delta), torch.where(sel, o_new, o), torch.where(sel, q_new, q)
        F0 = torch.where(ok[:, None, None], F1, F0)
        c0 = torch.where(ok, c1, c0)
        lam = torch.where(ok, lam / 3, lam * 10)
    return {"rotations": rotations.float() @ axis_angle_matrix(delta), "origins": o, "amplitudes": q, "chi2": c0}


# ----------------------------------------------------------------------------- calibration
def soft_background_mask(d: int, radius: float, edge: float = 3.0) -> np.ndarray:
    """(d, d) weights: 0 inside ``radius`` pixels of the centre (d//2), a raised cosine to 1
    over ``edge`` pixels outside it."""
    g = np.arange(d) - d // 2
    r = np.sqrt(g[:, None] ** 2 + g[None, :] ** 2)
    t = np.clip((r - radius) / edge, 0, 1)
    return 0.5 - 0.5 * np.cos(np.pi * t)


@torch.no_grad()
def calibrate_unlabelled(renderer: ParticleRenderer, images: np.ndarray, amplitudes: np.ndarray,
                         seed: int = 0, batch: int = 128) -> dict:
    """Gain, transfer and noise spectrum from particle images without any label.

    Noise: the periodogram of each image's background — the pixels outside the circle of
    ``background_radius``·d/2 the preprocessing normalised on, under a soft mask ``w`` (mean
    removed), divided by mean(w²) — per ring (``noise_bins_per_px`` bins per Fourier pixel),
    averaged over the images. Signal: the image power minus that noise, per ring, compared
    with the power of the reference's renders (``amplitudes``, uniform orientations, the
    particles' own CTF rows, no gain) by a weighted fit ``log(signal/render) = a + b k²``
    over the rings where the signal is at least a tenth of the noise: gain = e^{a/2},
    transfer(k) = e^{b k²/2} (clipped to [0.1, 10]). ``renderer``'s CTF rows are the images'
    rows. Returns the keys of :func:`.render.calibrate` that the VAE uses."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    n, d = x.shape[0], x.shape[-1]
    w = torch.as_tensor(soft_background_mask(d, renderer.s.background_radius * d / 2))
    xm = (x - (x * w).sum((-2, -1), keepdim=True) / w.sum()) * w
    norm = float((w ** 2).mean())
    noise = ring_power(xm, renderer.s.noise_bins_per_px) / norm
    noise_rings = ring_power(xm) / norm
    g = seeded_generator(seed, 0, 0xCA1)
    R = random_rotations(n, g)
    q = torch.as_tensor(np.broadcast_to(np.asarray(amplitudes, np.float64), (n, renderer.model.n_modes)).copy(),
                        dtype=torch.float32)
    o = torch.zeros(n, 2)
    S = torch.cat([renderer.clean(R[a:a + batch].to(renderer.device), o[a:a + batch].to(renderer.device),
                                  q[a:a + batch].to(renderer.device), torch.arange(a, min(n, a + batch)))
                   .cpu() for a in range(0, n, batch)])
    model_power = ring_power(S)
    image_power = ring_power(x)
    signal = image_power - noise_rings
    k = np.arange(len(signal), dtype=np.float64)
    kmax = d / 2.0 - renderer.s.lowpass_width
    ok = (k >= 1) & (k <= kmax) & (model_power > 1e-6 * model_power[1:].max()) & (signal > 0.1 * noise_rings)
    if ok.sum() < 2:
        raise InputError(None, "the images carry too little signal above their background noise to calibrate the "
                               "renderer without labels (vae_init scratch): check the contrast polarity and the box")
    y = np.log(signal[ok] / model_power[ok])
    wt = (2 * np.pi * np.maximum(k[ok], 0.5)) * (signal[ok] / image_power[ok]) ** 2
    A = np.stack([np.ones(ok.sum()), k[ok] ** 2], 1)
    a, b = np.linalg.lstsq(A * np.sqrt(wt)[:, None], y * np.sqrt(wt), rcond=None)[0]
    transfer = np.clip(np.exp(0.5 * b * k ** 2), 0.1, 10.0)
    return {"gain": float(np.exp(0.5 * a)), "transfer": transfer, "noise_power": noise,
            "noise_power_rings": noise_rings, "image_power": image_power, "signal_power": signal,
            "rings_fitted": int(ok.sum()), "envelope_b": float(b)}


# ----------------------------------------------------------------------------- particles
class ParticlePool:
    """Several :class:`.data.ParticleSet` images as one index space (read lazily)."""

    def __init__(self, sets: list[ParticleSet]):
        self.sets = [s for s in sets if s is not None and len(s)]
        self.offsets = np.cumsum([0] + [len(s) for s in self.sets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        box = self.sets[0].box
        out = np.empty((len(idx), box, box), np.float32)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        for j in np.unique(which):
            sel = np.flatnonzero(which == j)
            out[sel] = self.sets[j].images.read(idx[sel] - self.offsets[j])
        return out


def set2_beside(train: ParticleSet) -> Path:
    """The set2.star of the preprocessing that made these set-1 particles: the folder above the
    folder of their image stacks (results/preprocess/set1/chunk_NNNN.mrcs → results/preprocess)."""
    stack = Path(train.images.files[int(train.images.file_idx[0])]).resolve()
    return stack.parent.parent / "set2.star"


def extra_particles(s, train: ParticleSet, data_dir=None) -> ParticleSet | None:
    """The unlabelled particles added to the reconstruction (``vae_data: all``)."""
    if s.vae_data != "all":
        return None
    from .data import load_particles

    paths = list(s.vae_particles or [])
    if not paths:
        p = set2_beside(train)
        if not p.exists():
            raise InputError(p, "network.vae_data all: no set2.star beside the preprocessed set 1; give the other "
                                "particles in network.vae_particles")
        paths = [p]
    extra = load_particles(paths, data_dir, labels=False, exclude_flagged=False)
    if (extra.box, round(extra.pixel_size, 4)) != (train.box, round(train.pixel_size, 4)):
        raise InputError(extra.sources[0], f"these particles ({extra.box} px, {extra.pixel_size:.4g} Å/px) differ from "
                         f"the training particles ({train.box} px, {train.pixel_size:.4g} Å/px)")
    return extra


# ----------------------------------------------------------------------------- the task
class VAETask(Task):
    """The VAE on any engine through :func:`.loop.fit` (see the module docstring)."""

    kind = "vae"
    loss_names = ("pose", "rotation", "amplitudes", "shifts", "posterior", "reconstruction", "kl", "distill")

    def __init__(self, s, engine: Engine, train: ParticleSet, val, test, info: dict, model, modes_path,
                 data_dir=None):
        if s.formulation != "posegrid":
            raise ConfigError("network.model vae needs network.recipe grid: its encoder is the grid network")
        self.labelled = s.vae_init == "regressor"
        if s.vae_prior == "hemnma" and not self.labelled:
            raise ConfigError("network.vae_prior hemnma is HEMNMA's amplitudes: with vae_init scratch (no labels) "
                              "use the thermal prior")
        self.s, self.engine, self.device = s, engine, engine.device
        self.elastic, self.modes_path = model, modes_path
        self.train_set, self.val_set, self.test_set = train, val, test
        self.extra = extra_particles(s, train, data_dir)
        self.pool = ParticlePool([train, self.extra])
        self.n_pool = len(self.pool)
        # CTF rows: the pool's, then validation and test particles' (decoded, never sampled)
        parts = [p for p in (train, self.extra, val, test) if p is not None]
        self.ctf_offset = {"val": self.n_pool, "test": self.n_pool + (0 if val is None else len(val))}
        tables = [p.table for p in parts]
        has_ctf = all("rlnDefocusU" in t.columns for t in tables)
        ctf = CTFParams.from_table(pd.concat(tables, ignore_index=True)) if has_ctf else None
        if not has_ctf and any("rlnDefocusU" in t.columns for t in tables):
            raise InputError(None, "some particles have CTF parameters and others not")
        self.settings = RenderSettings(box=train.box, pixel_size=train.pixel_size, ctf_mode=ctf_mode_of(train.table),
                                       oversample=s.render_oversample)
        self.renderer = ParticleRenderer(model, self.settings, None, ctf, seed=s.seed, device=self.device)
        rng = np.random.default_rng([s.seed, 0xCA1])
        self.cal_rows = np.sort(rng.permutation(len(train))[:CALIBRATION_PARTICLES])
        self.cal_images = train.images.read(self.cal_rows)
        self.cal_renderer = ParticleRenderer(model, self.settings, None, None if ctf is None else ctf[self.cal_rows],
                                             seed=s.seed, device="cpu")
        self.shift_range = float(s.vae_shift_range if s.vae_shift_range is not None
                                 else 0.05 * train.box * train.pixel_size)
        M = model.n_modes
        ckpt = self._init_checkpoint(s, train)
        # ---- labels (regressor) — the renders' amplitudes/origins and the real labelled images
        self.labels = labels_of(train.table, model) if self.labelled else None
        self.label_prior = (ParameterPrior.from_table(train.table, model, kind=s.render_prior,
                                                      bandwidth=s.render_bandwidth) if self.labelled else None)
        prior_mean, prior_log_scale, learn, shape = self._amplitude_prior(s, model, modes_path)
        # ---- calibration
        if ckpt is not None:
            cal = ckpt["calibration"]
            self.calibration_source = f"the grid checkpoint {s.vae_init_checkpoint}"
        elif self.labelled:
            cal = calibrate(self.cal_renderer, self.cal_images, train.table.iloc[self.cal_rows])
            self.calibration_source = "HEMNMA's labels (residuals of set 1 against the renders of its labels)"
        else:
            cal = calibrate_unlabelled(self.cal_renderer, self.cal_images, prior_mean, seed=s.seed)
            self.calibration_source = "the images (background noise; image power minus noise vs the renders)"
        transfer = np.ones(train.box // 2 + 1) if cal.get("transfer") is None else np.asarray(cal["transfer"])
        noise = np.asarray(cal["noise_power"], np.float64)
        # ---- the encoder
        if ckpt is not None:
            cfg = PoseNetConfig(**{k: v for k, v in ckpt["model_config"].items() if k != "modes"})
            enc_state = ckpt["model_state"]
            amp_mean, amp_std = enc_state["amp_mean"].numpy(), enc_state["amp_std"].numpy()
            shift_scale = float(enc_state["shift_scale"])
        else:
            cfg = PoseNetConfig(n_amplitudes=M, arch=s.arch, input_box=min(s.input_box, train.box),
                                n_directions=s.grid_directions, n_inplane=s.grid_inplane, hidden=int(s.hidden[0]),
                                width=s.width)
            if self.labelled:
                amp = self.labels[2]
                amp_mean, amp_std = amp.mean(0), np.where(amp.std(0) > 0, amp.std(0), 1.0)
                shift_scale = float(max(self.labels[1].std(), 1e-3))
            else:
                amp_mean, amp_std = prior_mean, math.exp(prior_log_scale) * shape
                shift_scale = max(self.shift_range / math.sqrt(3), 1e-3)
        torch.manual_seed(s.seed)
        self.model = PoseVAE(cfg, amp_mean, amp_std, shift_scale, prior_mean=prior_mean, prior_shape=shape,
                             prior_log_scale=prior_log_scale, learn_prior=learn, gain=cal["gain"], transfer=transfer,
                             noise_power=noise, n_transfer=len(transfer), n_noise=len(noise)).to(self.device)
        if ckpt is not None:
            self.model.encoder.load_state_dict(ckpt["model_state"])
        self.decoder = PhysicsDecoder(self.renderer, self.model)
        self.refiner = self._refiner(model, ctf)
        self.initial_calibration = self.model.calibration()
        self.background_noise = np.asarray(noise)  # scratch: measured on the background, pose-independent
        self.model_config = {"encoder": cfg.to_dict(), "modes": [int(m) for m in model.mode_numbers],
                             "prior": s.vae_prior, "n_transfer": len(transfer), "n_noise": len(noise)}
        self.data_info = {**info, "ctf_mode": self.settings.ctf_mode, "vae_data": s.vae_data,
                          "n_extra": 0 if self.extra is None else len(self.extra),
                          "extra_sources": [] if self.extra is None else [str(p) for p in self.extra.sources]}
        self.steps_per_epoch = int(s.steps_per_epoch)
        self.global_batch = s.batch_size * s.accumulate * engine.world_size
        self.total_steps = s.epochs * self.steps_per_epoch
        self.pretrain_steps = 0 if ckpt is not None else int(round(s.vae_pretrain * self.total_steps))
        self.self_calibrate = not self.labelled
        log.info("VAE (%s): %d² at %.4g Å/px, prior %s (%s), calibration from %s: gain %+.3g; %d pretraining steps "
                 "of %d; reconstruction on %d particles%s", s.vae_init, train.box, train.pixel_size, s.vae_prior,
                 ", ".join(f"σ{m} {v:.3g}" for m, v in zip(model.mode_numbers,
                                                         self.model.prior_std().detach().cpu().numpy())),
                 self.calibration_source, cal["gain"], self.pretrain_steps, self.total_steps, self.n_pool,
                 "" if self.extra is None else f" (set 1 + {len(self.extra)} more)")

    def _amplitude_prior(self, s, model, modes_path) -> tuple[np.ndarray, float, bool, np.ndarray]:
        """The prior on the amplitudes: (mean, log of its scale c, whether c is learnt, the
        per-mode shape whose product with c is the prior's standard deviation)."""
        if s.vae_prior == "thermal":
            shape = thermal_shape(modes_path, model.mode_numbers)
            c0 = thermal_scale(shape, model.vectors, s.vae_prior_rmsd)
            return np.zeros(model.n_modes), math.log(c0), True, shape
        amp = self.labels[2]
        return amp.mean(0), 0.0, False, np.where(amp.std(0) > 0, amp.std(0), 1.0)

    def _refiner(self, model, ctf) -> PhysicsDecoder:
        """The decoder of the per-particle pose refinement: half the box (boxes ≥ 48) with the
        atoms lumped on a grid of 1.5 pixels of that level, else the decoder itself."""
        d, px = self.settings.box, self.settings.pixel_size
        if d < 48:
            return self.decoder
        dc = d // 2
        pc = px * d / dc
        rs = RenderSettings(box=dc, pixel_size=pc, ctf_mode=self.settings.ctf_mode, lowpass_width=1.0,
                            background_radius=self.settings.background_radius)
        rend = ParticleRenderer(model.coarse(1.5 * pc), rs, None, ctf, seed=self.s.seed, device=self.device)
        return PhysicsDecoder(rend, self.model, image_box=d, image_pixel_size=px)

    def _init_checkpoint(self, s, train: ParticleSet) -> dict | None:
        if not (self.labelled and s.vae_init_checkpoint):
            return None
        from .checkpoint import load_checkpoint

        ck = load_checkpoint(s.vae_init_checkpoint)
        if ck.get("task") != "posegrid":
            raise InputError(s.vae_init_checkpoint, f"network.vae_init_checkpoint must be a grid network's checkpoint "
                                                    f"(task posegrid), not {ck.get('task', 'regressor')!r}")
        if [int(m) for m in ck["model_config"].get("modes", [])] != [int(m) for m in self.elastic.mode_numbers]:
            raise InputError(s.vae_init_checkpoint, f"the grid network predicts modes {ck['model_config'].get('modes')}, "
                                                    f"the VAE decodes modes {self.elastic.mode_numbers.tolist()}")
        d = ck["data"]
        if d["box"] != train.box or abs(d["pixel_size"] - train.pixel_size) > 1e-3 * train.pixel_size:
            raise InputError(s.vae_init_checkpoint, f"the grid network was trained on {d['box']}² at "
                             f"{d['pixel_size']:.4g} Å/px, these particles are {train.box}² at {train.pixel_size:.4g}")
        return ck

    # ---- checkpoints
    def state(self) -> dict:
        return {"calibration": self.model.calibration(), "initial_calibration": self.initial_calibration,
                "mode_numbers": self.model_config["modes"], "vae": {"init": self.s.vae_init,
                                                                   "calibration_source": self.calibration_source}}

    def same_state(self, saved: dict) -> bool:
        c = saved.get("initial_calibration") or {}
        return c.get("gain") == self.initial_calibration["gain"] and \
            c.get("noise_power") == self.initial_calibration["noise_power"]

    # ---- schedule
    def step_kind(self, epoch: int, step: int) -> str:
        """``pose`` or ``recon`` for optimiser step ``step`` of ``epoch``."""
        g = epoch * self.steps_per_epoch + step
        if g < self.pretrain_steps:
            return "pose"
        j = g - self.pretrain_steps
        f = self.s.vae_pose_fraction
        return "pose" if math.floor((j + 1) * f + 1e-9) > math.floor(j * f + 1e-9) else "recon"

    def recon_ramp(self, epoch: int, step: int) -> float:
        """Weight of the reconstruction losses: linear from 0 to 1 over the first
        :data:`RECON_RAMP` of the steps after pretraining (an untrained posterior head meets a
        sharp likelihood: full weight at once blew the shared features up on the toy)."""
        g = epoch * self.steps_per_epoch + step - self.pretrain_steps
        n = max(1.0, RECON_RAMP * (self.total_steps - self.pretrain_steps))
        return float(min(1.0, (g + 1) / n))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.self_calibrate and epoch * self.steps_per_epoch >= self.pretrain_steps and epoch > 0:
            self.recalibrate()

    @torch.no_grad()
    def recalibrate(self) -> None:
        """Self-calibration: :func:`.render.calibrate` on the VAE's own answers for the
        calibration particles (rotation, origins, posterior mean)."""
        pred = self.predict_images(self.cal_images)
        table = pd.DataFrame(np.concatenate([matrix_to_euler(pred["rotations"]), pred["origins"],
                                             pred["amplitudes"]], 1),
                             columns=ANGLES + ORIGINS + amplitude_columns_for(self.elastic))
        cal = calibrate(self.cal_renderer, self.cal_images, table)
        nb = int(self.decoder.kmax * self.settings.noise_bins_per_px) + 1
        ratio = float(np.mean(cal["noise_power"][1:nb]) / np.mean(self.background_noise[1:nb]))
        if ratio > SELF_CALIBRATION_TOLERANCE:  # the answers do not explain the images yet: keep the calibration
            log.info("self-calibration not applied: the residuals of the VAE's fits have %.2f × the background's noise "
                     "power (poses or conformations not found yet)", ratio)
            return
        self.model.set_calibration(cal["gain"], cal["transfer"], cal["noise_power"])
        self.decoder.refresh()
        self.refiner.refresh()
        log.info("self-calibration on the VAE's answers: gain %+.3g", cal["gain"])

    # ---- data
    def micro_batches(self, epoch: int):
        s, rank = self.s, self.engine.rank
        for step in range(self.steps_per_epoch):
            kind = self.step_kind(epoch, step)
            for k in range(s.accumulate):
                key = step * 1_000_003 + rank * s.accumulate + k
                yield self.pose_batch(epoch, step, key) if kind == "pose" else self.recon_batch(epoch, key)

    @torch.no_grad()
    def render(self, epoch: int, key: int, n: int) -> dict:
        """``n`` rendered particles with exact labels, a function of (seed, epoch, key)."""
        dev, M = self.device, self.elastic.n_modes
        g = seeded_generator(self.s.seed, epoch, key, dev)
        R = random_rotations(n, g, dev)
        if self.labelled:
            q, o = self.label_prior.sample(n, g, dev)
        else:
            q = self.model.prior_mean + torch.randn(n, M, generator=g, device=dev) * self.model.prior_std().detach()
            o = (torch.rand(n, 2, generator=g, device=dev) * 2 - 1) * self.shift_range
        nrows = 1 if self.renderer.ctf is None else self.n_pool
        ci = torch.randint(nrows, (n,), generator=g, device=dev)
        noise = self.decoder.noise_images(n, g)
        img = self.decoder.image(R, o, q, ci) + noise
        img = normalise_background(img, self.settings.background_radius * self.settings.box / 2).float()
        return {"image": img[:, None], "rotations": R, "amplitudes": q.float(), "origins": o.float()}

    def pose_batch(self, epoch: int, step: int, key: int) -> dict:
        s = self.s
        n_real = 0
        if self.labelled:
            frac = (epoch * self.steps_per_epoch + step) / max(1, self.total_steps)
            n_real = int(round(s.batch_size * s.real_fraction)) if frac >= s.real_after else 0
        b = self.render(epoch, key, s.batch_size - n_real)
        if n_real:
            g = seeded_generator(s.seed + 1, epoch, key)
            idx = torch.randint(len(self.train_set), (n_real,), generator=g).numpy()
            R, o, q = (x[idx] for x in self.labels)
            dev = self.device
            real = {"image": torch.as_tensor(self.pool.read(idx), device=dev)[:, None],
                    "rotations": torch.as_tensor(R, dtype=torch.float32, device=dev),
                    "origins": torch.as_tensor(o, dtype=torch.float32, device=dev),
                    "amplitudes": torch.as_tensor(q, dtype=torch.float32, device=dev)}
            b = {k: torch.cat([b[k], real[k]]) for k in real}
        return {"kind": "pose", **b}

    def recon_batch(self, epoch: int, key: int) -> dict:
        g = seeded_generator(self.s.seed + 2, epoch, key)
        n = self.s.batch_size
        idx = torch.randint(self.n_pool, (n,), generator=g)
        eps = torch.randn(n, self.elastic.n_modes, generator=g)
        dev = self.device
        return {"kind": "recon", "image": torch.as_tensor(self.pool.read(idx.numpy()), device=dev)[:, None],
                "ctf_index": idx.to(dev), "eps": eps.to(dev)}

    # ---- losses
    def elbo_terms(self, out: dict, images: torch.Tensor, ctf_index: torch.Tensor, eps: torch.Tensor | None = None,
                   refine: int = 0):
        """(χ² (B,), KL (B,), answers) of images (B, 1, d, d): the rotation decoded from the grid
        (no gradient) corrected by the local rotation head, the shift head, amplitudes sampled
        from the posterior (``eps``) or its mean."""
        vae = self.model
        R, _ = vae.rotations(out)
        o = out["shifts"].float() * vae.encoder.shift_scale
        mu, std, log_std = vae.posterior(out)
        answers = {"rotations": R, "origins": o, "mu": mu, "std": std}
        if refine > 0:  # the likelihood at the particle's locally refined pose
            ref = gauss_newton_fit(self.refiner, images[:, 0], ctf_index, R.detach(), o.detach(), mu.detach(),
                                   iterations=refine, amplitude_scale=vae.encoder.amp_std)
            R, o = ref["rotations"], ref["origins"]
            answers.update(refined_rotations=R, refined_origins=o)
        q = mu if eps is None else mu + std * eps
        spec = self.decoder.spectrum(R, o, q, ctf_index)
        chi2 = self.decoder.chi2(torch.fft.rfft2(images[:, 0].float()), spec)
        return chi2, vae.kl(mu, std, log_std), answers

    def losses(self, output, batch, epoch, step):
        s, vae = self.s, self.model
        # every parameter takes part in every step (DDP and Horovod reduce all gradients)
        zero = sum(v.float().sum() for v in output.values()) * 0.0 + vae.prior_log_scale * 0.0
        if batch["kind"] == "pose":
            frac = (epoch * self.steps_per_epoch + step) / max(1, self.total_steps)
            sigma = s.grid_sigma if s.grid_sigma_end is None else s.grid_sigma + (s.grid_sigma_end - s.grid_sigma) * frac
            terms = loss_terms(vae.encoder, output, batch, sigma, s.label_smoothing)
            qa, _ = vae.encoder.encode_targets(batch["amplitudes"], batch["origins"])
            lv = soft_bound(output["amp_logvar"].float())
            terms["posterior"] = 0.5 * (lv + (qa - output["amplitudes"].detach().float()) ** 2 * torch.exp(-lv)).mean()
            R, R_grid = vae.rotations(output)
            A = batch["rotations"].float()
            near = (torch.einsum("bij,bij->b", R_grid, A) - 1) / 2 > math.cos(math.radians(POSE_DELTA_RANGE))
            chord = ((R - A) ** 2).sum((-2, -1)) / CHORD_10DEG
            terms["rotation"] = (chord * near).sum() / near.sum().clamp_min(1)
            # the correction head learns once the grid has (while pretraining it slows the grid's learning)
            w_rot = 0.0 if epoch * self.steps_per_epoch + step < self.pretrain_steps else 1.0
            total = terms["pose"] + w_rot * terms["rotation"] + s.amplitude_weight * (terms["amplitudes"] + terms["posterior"]) \
                + s.shift_weight * terms["shifts"]
            return total + zero, terms
        chi2, kl, ans = self.elbo_terms(output, batch["image"], batch["ctf_index"], batch["eps"],
                                        s.vae_refine_iterations)
        nb = self.decoder.n_band
        ramp = self.recon_ramp(epoch, step)
        total = ramp * (0.5 * chi2 + s.vae_kl_weight * kl).mean() / nb
        terms = {"reconstruction": chi2.mean().detach() / nb, "kl": kl.mean().detach()}
        if "refined_rotations" in ans:  # the encoder learns the refined pose (amortised refinement)
            chord = ((ans["rotations"] - ans["refined_rotations"]) ** 2).sum((-2, -1)) / CHORD_10DEG
            shift = torch.nn.functional.smooth_l1_loss(ans["origins"] / vae.encoder.shift_scale,
                                                       ans["refined_origins"] / vae.encoder.shift_scale)
            terms["distill"] = chord.mean() + shift
            total = total + ramp * DISTILL_WEIGHT * terms["distill"]
        return total + zero, terms

    # ---- evaluation
    @torch.no_grad()
    def predict_images(self, images: np.ndarray, turns: int = 1, batch: int = 256) -> dict:
        """Rotations, origins (Å), posterior mean and standard deviation of the amplitudes."""
        vae = self.model
        was = vae.training
        vae.eval()
        out = []
        for a in range(0, len(images), batch):
            x = torch.as_tensor(np.asarray(images[a:a + batch]), device=self.device)[:, None]
            out.append(vae_answers(vae, x, turns))
        vae.train(was)
        return {k: torch.cat([o[k] for o in out]).double().cpu().numpy() for k in out[0]}

    @torch.no_grad()
    def elbo_of(self, ps: ParticleSet, offset: int, batch: int = 128) -> dict:
        """Mean χ² and KL per particle of a set (posterior mean, no sampling)."""
        vae = self.model
        was = vae.training
        vae.eval()
        chi2, kl = [], []
        for a in range(0, len(ps), batch):
            idx = np.arange(a, min(len(ps), a + batch))
            x = torch.as_tensor(ps.images.read(idx), device=self.device)[:, None]
            c, k, _ = self.elbo_terms(vae(x), x, torch.as_tensor(idx + offset, device=self.device))
            chi2.append(c.cpu())
            kl.append(k.cpu())
        vae.train(was)
        return {"chi2": torch.cat(chi2).double().numpy(), "kl": torch.cat(kl).double().numpy()}

    def validate(self, model, engine: Engine) -> dict:
        if self.val_set is None or not engine.is_main:
            return {}
        e = self.elbo_of(self.val_set, self.ctf_offset["val"])
        nb = self.decoder.n_band
        # an epoch of pose steps alone has not trained the posterior: never the best checkpoint once one has
        pretraining = (getattr(self, "epoch", 0) + 1) * self.steps_per_epoch <= self.pretrain_steps
        row = {"val_loss": float((0.5 * e["chi2"] + e["kl"]).mean()) / nb + (PRETRAINING_PENALTY if pretraining else 0.0),
               "val_neg_elbo": float((0.5 * e["chi2"] + e["kl"]).mean()) / nb, "val_chi2_per_coefficient":
               float(e["chi2"].mean()) / nb, "val_kl": float(e["kl"].mean()), "n_val": len(self.val_set),
               "prior_scale": float(torch.exp(self.model.prior_log_scale.detach())), "gain": float(self.model.gain.detach())}
        pred = self.predict_images(self.val_set.images.read(np.arange(len(self.val_set))))
        row["val_posterior_rmsd_A"] = float(posterior_rmsd(pred["std"], self.elastic.vectors).mean())
        if all(c in self.val_set.table.columns for c in ANGLES + ORIGINS + amplitude_columns_for(self.elastic)):
            R, o, q = labels_of(self.val_set.table, self.elastic)  # HEMNMA's: reported, never used to choose
            ref = labels_of(self.train_set.table, self.elastic)[2].mean(0)
            row.update({"val_angle_error_deg": float(angular_error(pred["rotations"], R).mean()),
                        "val_angle_median_deg": float(np.median(angular_error(pred["rotations"], R))),
                        "val_shift_mae_A": float(np.abs(pred["origins"] - o).mean()),
                        "val_rmsd_A": float(self.elastic.rmsd_between(pred["amplitudes"], q).mean()),
                        "val_baseline_rmsd_A": float(self.elastic.rmsd_between(np.broadcast_to(ref, q.shape), q).mean())})
        return row

    def finish(self, model, engine: Engine, out) -> dict:
        doc = {"model": "vae", "vae_init": self.s.vae_init, "prior": {
            "kind": self.s.vae_prior, "mean": self.model.prior_mean.cpu().numpy().tolist(),
            "std": self.model.prior_std().detach().cpu().numpy().tolist(),
            "scale": float(torch.exp(self.model.prior_log_scale))},
            "calibration": {"source": self.calibration_source, "gain": float(self.model.gain),
                            "initial_gain": self.initial_calibration["gain"]}}
        if self.test_set is None:
            return doc
        pred = self.predict_images(self.test_set.images.read(np.arange(len(self.test_set))), turns=self.s.tta_turns)
        try:
            R, o, q = labels_of(self.test_set.table, self.elastic)
        except InputError:
            return doc
        train_R, train_o, train_q = labels_of(self.train_set.table, self.elastic)
        as_raw = (lambda R_, o_, q_: {"angles": matrix_to_euler(R_), "shifts": o_, "amplitudes": q_})
        doc["test"] = test_block(as_raw(pred["rotations"], pred["origins"], pred["amplitudes"]), as_raw(R, o, q),
                                 as_raw(train_R, train_o, train_q), self.elastic.vectors)
        doc["test"]["posterior_rmsd_A"] = float(posterior_rmsd(pred["std"], self.elastic.vectors).mean())
        doc["test"]["posterior_std"] = pred["std"].mean(0).tolist()
        return doc

    def log_line(self, row: dict) -> str:
        msg = (f"loss {row['train_loss']:.4f} (pose {row.get('train_loss_pose', float('nan')):.3f}, reconstruction "
               f"{row.get('train_loss_reconstruction', float('nan')):.3f}, KL {row.get('train_loss_kl', float('nan')):.2f})")
        if "val_loss" in row:
            msg += f"; validation: -ELBO {row['val_neg_elbo']:.4f}, χ²/coefficient {row['val_chi2_per_coefficient']:.3f}"
        if "val_angle_error_deg" in row:
            msg += (f", vs HEMNMA: angle {row['val_angle_error_deg']:.1f}° (median {row['val_angle_median_deg']:.1f}°), "
                    f"shift {row['val_shift_mae_A']:.2f} Å, deformation RMSD {row['val_rmsd_A']:.2f} Å (mean "
                    f"conformation {row['val_baseline_rmsd_A']:.2f} Å), posterior ±{row['val_posterior_rmsd_A']:.2f} Å")
        return msg


# ----------------------------------------------------------------------------- prediction
def encoder_state(state: dict) -> dict:
    """A grid-network checkpoint view of a VAE checkpoint (its encoder), for :mod:`.amortise`."""
    mc = state["model_config"]
    return {"task": "posegrid", "model_config": {**mc["encoder"], "modes": list(mc["modes"])},
            "model_state": {k[len("encoder."):]: v for k, v in state["model_state"].items() if k.startswith("encoder.")},
            "data": state["data"], "settings": state.get("settings", {})}


@torch.no_grad()
def answers_of(vae: PoseVAE, images, device, turns: int = 1, batch: int = 256) -> dict[str, np.ndarray]:
    """:func:`vae_answers` for every image of a ParticleImages, as float64 arrays."""
    out = []
    for a in range(0, len(images), batch):
        x = torch.as_tensor(images.read(np.arange(a, min(len(images), a + batch))), device=device)[:, None]
        out.append({k: v.double().cpu().numpy() for k, v in vae_answers(vae, x, turns).items()})
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def predict_vae_star(state: dict, particles, out, modes, align_settings, *, data_dir=None, device=None,
                     checkpoint_id: str = "", **amortise_kw) -> dict:
    """Predict every particle with a VAE checkpoint and write ``out`` (the columns of
    :func:`.amortise.amortise_star`, which runs first with the VAE's encoder: with
    ``refine`` local or fallback, HEMNMA's continuous refinement polishes the grid's
    hypotheses). With ``refine: none`` the pose, shift and amplitudes are the VAE's own
    (rotation corrected by its local head, posterior mean). Always adds
    ``dhnmaAmplitudeStdNNN``, the posterior standard deviation of each amplitude (the VAE's,
    also where HEMNMA refined the amplitudes)."""
    import contextlib

    from ..core import star as S
    from ..core.fileio import atomic_write_json
    from ..core.mrc import ParticleImages
    from ..core.runtime import one_torch_thread
    from .amortise import amortise_star

    device = device or torch.device("cpu")
    summary = amortise_star(encoder_state(state), particles, out, modes, align_settings, data_dir=data_dir,
                            device=device, checkpoint_id=checkpoint_id, **amortise_kw)
    modes_list = [int(m) for m in state["model_config"]["modes"]]
    turns = int(amortise_kw.get("turns", 1))
    with one_torch_thread() if device.type == "cpu" else contextlib.nullcontext():
        star = S.read_star(particles, data_dir=data_dir)
        vae = vae_from_checkpoint(state, device)
        ans = answers_of(vae, ParticleImages.from_star(star, data_dir), device, turns) if len(star) else None
    written = S.read_star(out)
    table = written.particles.copy()
    if ans is not None:
        if amortise_kw.get("refine", "fallback") == "none":
            eul = matrix_to_euler(ans["rotations"])
            for j, c in enumerate(ANGLES):
                table[c] = eul[:, j]
            for j, c in enumerate(ORIGINS):
                table[c] = ans["origins"][:, j]
            for j, m in enumerate(modes_list):
                table[f"dhnmaAmplitude{m:03d}"] = ans["amplitudes"][:, j]
        for j, m in enumerate(modes_list):
            table[std_column(m)] = ans["std"][:, j]
    else:
        for m in modes_list:
            table[std_column(m)] = np.zeros(0)
    S.write_star(out, table, written.optics)
    summary["posterior_std_mean"] = ans["std"].mean(0).tolist() if ans is not None else []
    atomic_write_json(Path(out).with_suffix(".json"), summary)
    return summary
