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
gives the prior an RMS deformation of ``network.vae_prior_rmsd`` Å. With self-training
(below) the thermal prior is where training starts: once an epoch has pseudo-labels
(``network.vae_pseudo_prior``), the prior's mean and per-mode spread become theirs — fits of the
particles themselves, so a specimen whose conformations lie away from the reference is not
pulled back to it — and the pose steps render amplitudes drawn from them
(:meth:`.vae_task.VAETask.pseudo_prior`). ``hemnma``: the mean and standard deviation of
HEMNMA's amplitudes on set 1 (fixed; needs the labels).

Training (:class:`.vae_task.VAETask`, run by :func:`.loop.fit` on any engine, with exact resume)
--------------------------------------------------------------------------------------
Pose and conformation are kept apart the HetACUMN way: the optimiser steps alternate

* **pose-prediction steps** on particles rendered through the same forward model with
  uniform orientations and exact labels: the grid network's losses (soft-target
  cross-entropy over the grid, smooth L1 on shifts and standardised amplitudes) and the
  Gaussian likelihood of the true amplitudes under the posterior head (so that σ is
  calibrated on simulations too). The rendered amplitudes come from the prior (``scratch``;
  from the pseudo-labels once there are some) or from HEMNMA's labels (``regressor``: a kernel density estimate, as the grid network's);
  origins uniform in ± ``vae_shift_range`` (scratch) or from the labels; noise with the
  calibrated spectrum; the data's own CTF rows; the same background normalisation;
* **reconstruction steps** on real particles: the negative ELBO above. The pose enters the
  decoder detached (it is learnt by the pose steps alone), so the likelihood cannot trade
  conformation for pose.

Self-training (``vae_pseudo_fraction``: 0.5 by default for ``scratch``; 0.25 from the regressor's
start with ``vae_data: all``, beside set 1's HEMNMA labels): rendered particles teach poses
on the renderer's images, not the data's (other atoms, the microscope's real transfer, other
noise), and without labels the encoder's poses on real particles lag its poses on renders.
So at the start of every epoch (after ``vae_pseudo_after`` of the steps) particles are
answered by the encoder and fitted through the decoder from its pose hypotheses (its
answer and the other peaks of its distribution over the grid; :func:`gauss_newton_fit`:
rotation, shift and amplitudes; the best-correlating one kept); the fits whose model image
explains the particle's signal — the cosine between them in the whitened band, estimated from
the image and the noise spectrum, within 3σ of 1 and at least 0.7 — become labelled real
images in that fraction of each pose step's batch (a fit started outside its basin, a wrong
view or the mirrored hand, finds no model that matches: cosine ~0.4 against ~0.9) (:meth:`.vae_task.VAETask.relabel`). The decoder is
the teacher, the encoder the student: the amortised refinement of the reconstruction steps
made a label with a quality gate. The fits are of every particle the VAE has without HEMNMA's
labels (``vae_pseudo_data``): from scratch set 1 and, with ``vae_data: all``, set 2; from the
regressor's start the particles beyond set 1 — so the VAE refines its answers for the particles
it then answers with the images themselves (transductive, as any VAE trained on all particles is).

The first ``vae_pretrain`` of the steps are pose steps only (the encoder must find poses
before the likelihood means anything; 0.7 by default for ``scratch``, with a 6 Å starting
prior, ``vae_prior_rmsd``: with no label the poses are the hard part; 0.3 and 2 Å otherwise); then a fraction ``vae_pose_fraction`` of the steps
are pose steps, interleaved. With ``vae_init: regressor`` and ``vae_init_checkpoint`` (a
grid ``best.pt``) the encoder and the calibration start from that network and there is no
pretraining.

Calibration (gain, transfer, noise spectrum)
--------------------------------------------
``regressor``: :func:`.render.calibrate` on HEMNMA's labels (the residuals of each image
against the render of its labels), or the grid checkpoint's. ``scratch`` — no labels:
:func:`.vae_task.calibrate_unlabelled` first (noise: the periodogram of the background the
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
import torch
import torch.nn as nn

from ..core.errors import InputError
from ..core.geometry import matrix_to_euler
from ..core.logs import get_logger
from .posenet import PoseNet, PoseNetConfig, head
from .render import ANGLES, ORIGINS, ParticleRenderer, radial_filter, ring_radius

log = get_logger(__name__)

#: added to the validation score of epochs of pose steps alone (they can be best.pt only until
#: an epoch with reconstruction steps exists)
PRETRAINING_PENALTY = 1e6
#: the STAR column of the posterior standard deviation of mode ``m``'s amplitude
STD_PREFIX = "dhnmaAmplitudeStd"
#: self-calibration is applied once the residuals of the VAE's fits are at the noise level: their
#: power (over the likelihood's band) at most this multiple of the background's noise power
#: (:func:`.vae_task.calibrate_unlabelled`). With wrong poses the misfit inflates the residuals and the
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
