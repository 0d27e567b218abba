"""Training of the VAE (:mod:`.vae`): :class:`VAETask`, run by :func:`.loop.fit` on any engine
with exact resume — pose-prediction steps on rendered particles alternated with
reconstruction steps on the particles (the negative evidence lower bound through the physics
decoder), calibration from HEMNMA's labels or from the images alone
(:func:`calibrate_unlabelled`), the pseudo-labels of self-training (:meth:`VAETask.relabel`),
and the pool of particles the reconstruction draws from
(image set 1, or set 1 and set 2 with ``network.vae_data: all``). The model, its decoder and
its inference live in :mod:`.vae` (which ``deephemnma predict`` imports without the training
engines)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.ctf import CTFParams
from ..core.errors import ConfigError, InputError
from ..core.geometry import angular_error, matrix_to_euler
from ..core.imageops import normalise_background
from ..core.logs import get_logger
from .data import ParticleSet
from .engines import Engine
from .loop import Task
from .posegrid import CALIBRATION_PARTICLES, ctf_mode_of, labels_of
from .posenet import PoseNetConfig, loss_terms
from .refine import distribution_peaks
from .render import (
    ANGLES,
    ORIGINS,
    ParameterPrior,
    ParticleRenderer,
    RenderSettings,
    amplitude_columns_for,
    calibrate,
    random_rotations,
    ring_power,
    seeded_generator,
)
from .targets import test_block
from .vae import (
    CHORD_10DEG,
    DISTILL_WEIGHT,
    POSE_DELTA_RANGE,
    PRETRAINING_PENALTY,
    RECON_RAMP,
    SELF_CALIBRATION_TOLERANCE,
    PhysicsDecoder,
    PoseVAE,
    gauss_newton_fit,
    posterior_rmsd,
    soft_bound,
    thermal_scale,
    thermal_shape,
    vae_answers,
)

log = get_logger(__name__)

#: Levenberg–Marquardt iterations of a pseudo-label fit from the encoder's answer (the
#: reconstruction steps' fits take ``vae_refine_iterations``)
PSEUDO_ITERATIONS = 8
#: the pseudo-label gate. A fit's model image M is compared with the particle's signal S by the
#: cosine of the angle between them, estimated in the whitened Fourier band (X = S + N the
#: image, n the band's coefficients, E|N|² = n) as <X, M> / (|M| · sqrt(|X|² − n)): near 1 for
#: a fit that found the particle, whatever its signal-to-noise ratio, within the estimate's
#: noise σ ≈ sqrt(1/|S|² + n/(2|S|⁴)); lower for one that did not (a start outside the fit's
#: basin: wrong view, mirrored hand). A fit is kept when its cosine is within PSEUDO_Z σ of 1
#: and at least PSEUDO_GATE (a particle with too little signal to tell is not kept). Measured
#: on the bench's particles (a scratch VAE, its encoder 16° mean, 12 % > 30° off, three
#: hypotheses): fits < 5° off have cosine 0.93 (median; 10th percentile 0.79), fits > 20° off
#: 0.42 (90th percentile 0.51); a cosine ≥ 0.7 keeps 77 % of the fits, 2.9° mean, none > 30° off.
#: On clean toy particles right fits are at 0.998 and wrong ones up to 0.96: the σ bar decides.
PSEUDO_GATE = 0.7
PSEUDO_Z = 3.0
#: pseudo-labels (over all ranks) needed before the prior follows them (``vae_pseudo_prior``)
PSEUDO_PRIOR_MIN = 32


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
        self.pseudo: dict | None = None   # this rank's pseudo-labels of the epoch (pool rows, R, o, q)
        self.pseudo_pool: dict | None = None  # every rank's kept fits of the last vae_pseudo_memory epochs
        self.pseudo_stats: dict = {}
        self.pseudo_render: ParameterPrior | None = None  # rendered amplitudes from the pseudo-labels
        if s.vae_pseudo_fraction > 0 and self.labelled and s.vae_pseudo_data != "others":
            raise ConfigError(f"network.vae_pseudo_data {s.vae_pseudo_data} with vae_init regressor: set 1 has HEMNMA's "
                              f"labels, self-training fits the other particles (vae_pseudo_data others)")
        if s.vae_pseudo_fraction > 0 and s.vae_pseudo_data != "set1" and self.extra is None:
            raise ConfigError(f"network.vae_pseudo_data {s.vae_pseudo_data} fits the particles beyond set 1: it needs "
                              f"network.vae_data all")
        if self.labelled and s.real_fraction + s.vae_pseudo_fraction > 1:
            raise ConfigError(f"network.real_fraction ({s.real_fraction}) + vae_pseudo_fraction ({s.vae_pseudo_fraction}) "
                              f"exceed the pose steps' batch: their sum must be at most 1")
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
                                                                   "calibration_source": self.calibration_source},
                "pseudo_pool": None if self.pseudo_pool is None else  # tensors: checkpoints load weights-only
                {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.pseudo_pool.items()}}

    def restore(self, saved: dict) -> None:
        """The pseudo-label pool of the epochs before the resumed one (fits of earlier weights:
        not recomputable)."""
        pool = saved.get("pseudo_pool")
        self.pseudo_pool = None if pool is None else {k: v.numpy() for k, v in pool.items()}
        self.decoder.refresh()  # the calibration came back with the weights (buffers)
        self.refiner.refresh()

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
        on_fits = self.s.vae_calibrate_on == "fits"
        if self.self_calibrate and not on_fits and epoch * self.steps_per_epoch >= self.pretrain_steps and epoch > 0:
            self.recalibrate()
        if self.s.vae_pseudo_fraction > 0 and epoch > 0 and \
                epoch * self.steps_per_epoch >= self.s.vae_pseudo_after * self.total_steps:
            self.relabel(epoch)
            if self.self_calibrate and on_fits and self.pseudo_pool is not None:
                self.recalibrate_on_fits()
            if self.s.vae_pseudo_prior and not self.labelled:  # the regressor's start keeps HEMNMA's prior
                self.pseudo_prior()  # every rank, also one without pseudo-labels: a collective sum

    @torch.no_grad()
    def pose_hypotheses(self, images: np.ndarray, batch: int = 256) -> dict:
        """The encoder's starting points of the pseudo-label fits: ``rotations`` (B, H, 3, 3) —
        its rotation (grid + local correction), then the other distinct peaks of its distribution
        over the grid (``network.refine_hypotheses`` in all, as the refinement of ``deephemnma
        predict``; a missing peak repeats the first) —, ``origins`` (B, 2) Å and ``amplitudes``
        (B, M) (posterior mean)."""
        vae, dev = self.model, self.device
        H = max(1, int(self.s.refine_hypotheses))
        was = vae.training
        vae.eval()
        out = []
        for a in range(0, len(images), batch):
            x = torch.as_tensor(np.asarray(images[a:a + batch]), device=dev)[:, None]
            o = vae(x)
            R, _ = vae.rotations(o)
            peaks, prob = distribution_peaks(vae.encoder.grid, o["pose_logits"], H)
            peaks, prob = peaks.to(dev), prob.to(dev)
            peaks = torch.where((prob > 0)[..., None, None], peaks, R[:, None])
            peaks[:, 0] = R
            mu, _, _ = vae.posterior(o)
            out.append({"rotations": peaks, "origins": o["shifts"].float() * vae.encoder.shift_scale, "amplitudes": mu})
        vae.train(was)
        return {k: torch.cat([o[k] for o in out]).double().cpu().numpy() for k in out[0]}

    @torch.no_grad()
    def fit_particles(self, rows: np.ndarray) -> dict:
        """The self-training fits of the pool's ``rows``: the encoder's pose hypotheses
        (:meth:`pose_hypotheses`), each fitted through the decoder (:func:`.vae.gauss_newton_fit`,
        :data:`PSEUDO_ITERATIONS` iterations of rotation, shift and amplitudes at half the box),
        the best-correlating one kept. Returns ``hypotheses``, ``fit`` (rotations, origins,
        amplitudes), ``correlation``, ``cosine`` (with the particle's estimated signal), ``bar``
        (the gate :data:`PSEUDO_GATE` / :data:`PSEUDO_Z` of each particle), ``kept`` (cosine ≥ bar)
        and ``other_hypothesis`` (the best fit started from another peak than the encoder's answer)."""
        vae, dev = self.model, self.device
        images = self.pool.read(rows)
        hyp = self.pose_hypotheses(images)
        H = hyp["rotations"].shape[1]
        fits, score, second, cosine, bar = [], [], [], [], []
        dec = self.decoder
        w = dec.weight / dec.noise
        for a in range(0, len(rows), 128):
            sl = slice(a, a + 128)
            x = torch.as_tensor(images[sl], device=dev)
            b = len(x)
            ci = torch.as_tensor(rows[sl], device=dev).repeat(H)  # the pool's rows are its CTF rows
            xs = x.repeat(H, 1, 1)                                  # hypothesis-major: row h·b + i
            R0 = torch.as_tensor(hyp["rotations"][sl], dtype=torch.float32, device=dev).transpose(0, 1).reshape(-1, 3, 3)
            o0, q0 = (torch.as_tensor(hyp[k][sl], dtype=torch.float32, device=dev).repeat(H, 1)
                      for k in ("origins", "amplitudes"))
            f = gauss_newton_fit(self.refiner, xs, ci, R0, o0, q0, iterations=PSEUDO_ITERATIONS,
                                 amplitude_scale=vae.encoder.amp_std)
            X = dec.image_spectrum(xs)
            M = dec.spectrum(f["rotations"], f["origins"], f["amplitudes"], ci)
            xm = (w * (X.real * M.real + X.imag * M.imag)).sum((-2, -1))
            xx = (w * X.abs() ** 2).sum((-2, -1))
            cc = (xm / torch.sqrt(xx * (w * M.abs() ** 2).sum((-2, -1))).clamp_min(1e-30))
            best, h = cc.reshape(H, b).max(0)
            pick = h * b + torch.arange(b, device=dev)
            score.append(best)
            chi0 = xx[pick] / dec.box ** 2                          # |X|² (whitened, E|N|² = n_band)
            s2 = (chi0 - dec.n_band).clamp_min(1e-6 * dec.n_band)  # |S|², estimated
            cosine.append(best / torch.sqrt(s2 / chi0))
            bar.append(torch.clamp(1 - PSEUDO_Z * torch.sqrt(1 / s2 + dec.n_band / (2 * s2 ** 2)), min=PSEUDO_GATE))
            second.append(h > 0)
            fits.append({k: f[k][pick].double().cpu().numpy() for k in ("rotations", "origins", "amplitudes")})
        score = torch.cat(score).double().cpu().numpy()
        cosine = torch.cat(cosine).double().cpu().numpy()
        fit = {k: np.concatenate([f[k] for f in fits]) for k in fits[0]}
        bar = torch.cat(bar).double().cpu().numpy()
        other = torch.cat(second).double().cpu().numpy()
        return {"hypotheses": hyp, "fit": fit, "correlation": score, "cosine": cosine, "bar": bar,
                "kept": cosine >= bar, "other_hypothesis": other}

    @torch.no_grad()
    def relabel(self, epoch: int) -> None:
        """Pseudo-labels of this epoch (self-training; no label of any kind is read).

        ``vae_pseudo_particles`` particles (a seeded draw per epoch, each rank its share) of
        ``vae_pseudo_data``: set 1, the particles beyond set 1 (``others``, ``vae_data: all``; the
        regressor's start, set 1 having HEMNMA's labels) or both (``all``: scratch with ``vae_data: all``)
        are answered by the encoder, then fitted through the decoder from each of its pose
        hypotheses (:meth:`pose_hypotheses`) — :func:`.vae.gauss_newton_fit`,
        :data:`PSEUDO_ITERATIONS` iterations of rotation, shift and amplitudes at half the box (the
        reconstruction steps' refiner), the best-correlating hypothesis kept — and the fits whose model
        image explains the particle's signal (:data:`PSEUDO_GATE`) become
        labelled real images of the pose steps. Rendered particles teach the encoder poses on
        the renderer's images; these teach it on the data's own (other atoms, other noise, the
        microscope's real transfer), which is what the regressor's HEMNMA labels give it. With
        ``set1`` the particles the VAE is tested on (set 2) reach it through the likelihood alone;
        fitting them (``others``, ``all``) refines its answers for the very particles it then
        answers, from the images themselves (transductive, as a VAE trained on all particles is).
        A function of the weights at the start of the epoch: a resumed run recomputes it."""
        s, eng = self.s, self.engine
        n1 = len(self.train_set)                       # set 1 heads the pool: rows 0..n1-1
        lo, hi = {"set1": (0, n1), "others": (n1, self.n_pool), "all": (0, self.n_pool)}[s.vae_pseudo_data]
        n = hi - lo
        rows = lo + np.random.default_rng([s.seed, epoch, 0x5E1F]).permutation(n)[:min(s.vae_pseudo_particles, n)]
        drawn = np.sort(rows)
        rows = np.sort(rows[eng.rank::eng.world_size])
        if not len(rows):
            self.pseudo = None
            self.update_pool(epoch, drawn)
            return
        r = self.fit_particles(rows)
        hyp, fit, score, cosine, bar, other = (r[k] for k in ("hypotheses", "fit", "correlation", "cosine", "bar",
                                                             "other_hypothesis"))
        keep = np.flatnonzero(r["kept"])
        self.pseudo = {"rows": rows[keep], "correlation": score[keep], "cosine": cosine[keep],
                       **{k: v[keep] for k, v in fit.items()}} if len(keep) else None
        self.update_pool(epoch, drawn)
        mean = (lambda v: float(v.mean()) if len(v) else float("nan"))
        stats = {"pseudo_labels": int(len(keep)), "pseudo_fitted": int(len(rows)),
                 "pseudo_cosine": float(np.median(cosine)), "pseudo_bar": float(np.median(bar)),
                 "pseudo_other_hypothesis": mean(other[keep])}
        table = self.train_set.table
        in1 = np.flatnonzero(rows < n1)                # set-1 fits: HEMNMA's labels may be in the table
        if len(in1) and \
                all(c in table.columns for c in ANGLES + ORIGINS + amplitude_columns_for(self.elastic)):
            R, o, q = labels_of(table.iloc[rows[in1]], self.elastic)  # HEMNMA's: reported, never used
            k1, r1 = np.flatnonzero(np.isin(in1, keep)), np.flatnonzero(~np.isin(in1, keep))  # of in1
            err = angular_error(fit["rotations"][in1], R)
            stats.update(pseudo_angle_vs_hemnma_deg=mean(err[k1]), pseudo_angle_rejected_vs_hemnma_deg=mean(err[r1]),
                         encoder_angle_vs_hemnma_deg=float(angular_error(hyp["rotations"][in1, 0], R).mean()),
                         pseudo_rmsd_vs_hemnma_A=mean(self.elastic.rmsd_between(fit["amplitudes"][in1][k1], q[k1])))
        stats["pseudo_pool"] = int(len(self.pseudo_pool["rows"])) if self.pseudo_pool is not None else 0
        self.pseudo_stats = stats
        log.info("pseudo-labels of epoch %d: %d of %d fits kept (cosine with the particle's signal: median %.2f, bar "
                 "%.2f; %.0f %% of those kept from another pose hypothesis than the encoder's answer)%s", epoch + 1,
                 len(keep), len(rows), stats["pseudo_cosine"], stats["pseudo_bar"], 100 * stats["pseudo_other_hypothesis"],
                 "" if "pseudo_angle_vs_hemnma_deg" not in stats else
                 f"; vs HEMNMA (reported only): kept {stats['pseudo_angle_vs_hemnma_deg']:.1f}°, rejected "
                 f"{stats['pseudo_angle_rejected_vs_hemnma_deg']:.1f}°, the encoder's "
                 f"{stats['encoder_angle_vs_hemnma_deg']:.1f}°, kept RMSD {stats['pseudo_rmsd_vs_hemnma_A']:.2f} Å")

    def update_pool(self, epoch: int, drawn: np.ndarray) -> None:
        """The pose steps' pseudo-labels: every rank's kept fits of this epoch (a collective sum
        over the epoch's draw ``drawn``, so all ranks hold the same pool) and those of the
        ``vae_pseudo_memory`` − 1 epochs before it — a particle's latest kept fit replaces an
        earlier one, and a fit older than the memory leaves. One epoch's fits are a few hundred
        particles; a longer memory lets the encoder see thousands of the data's own images with
        labels, as HEMNMA's labels give the regressor's start — on the VAE bench it trained worse
        than the epoch's own fits (bench/README.md). The pool is checkpointed (:meth:`state`)."""
        M = self.elastic.n_modes
        table = np.zeros((len(drawn), 12 + M))  # kept, R (9), origins (2), amplitudes
        p = self.pseudo
        if p is not None:
            at = np.searchsorted(drawn, p["rows"])
            table[at, 0] = 1.0
            table[at, 1:10] = np.asarray(p["rotations"], np.float64).reshape(-1, 9)
            table[at, 10:12] = p["origins"]
            table[at, 12:] = p["amplitudes"]
        table = self.engine.all_sum(table)
        got = table[:, 0] > 0.5
        new = {"rows": drawn[got].astype(np.int64), "epoch": np.full(int(got.sum()), epoch, np.int64),
               "rotations": table[got, 1:10].reshape(-1, 3, 3), "origins": table[got, 10:12],
               "amplitudes": table[got, 12:]}
        old = self.pseudo_pool
        if old is not None:
            stay = (old["epoch"] > epoch - int(self.s.vae_pseudo_memory)) & ~np.isin(old["rows"], new["rows"])
            new = {k: np.concatenate([old[k][stay], new[k]]) for k in new}
        order = np.argsort(new["rows"], kind="stable")
        self.pseudo_pool = {k: v[order] for k, v in new.items()} if len(order) else None

    @torch.no_grad()
    def pseudo_prior(self) -> None:
        """The prior and the rendered amplitudes from this epoch's pseudo-labels (empirical Bayes;
        ``network.vae_pseudo_prior``). The thermal prior is centred on the reference with the
        ENM's ratios of spreads: a specimen whose conformations all lie away from the reference
        (the bench's: mode 7 at −100 ± 58, mode 8 at +127 ± 61, mode 9 at 0 ± 142 against the
        prior's 0 ± 203 / 133 / 92) has its posterior means pulled toward it by the KL, and the
        pose steps render conformations it does not have. The pseudo-labels are fits of the
        particles themselves (maximum likelihood, no prior), so once at least
        :data:`PSEUDO_PRIOR_MIN` exist (over all ranks) the prior's mean and per-mode standard
        deviation become theirs (the learnt scale is kept: the shape absorbs the rest), and the
        pose steps render amplitudes resampled from them with ``render_bandwidth`` jitter
        (``render_prior`` kde) or from their Gaussian, as HEMNMA's labels are with the
        regressor's start. Computed from the epoch's pseudo-labels alone: a resumed run gets
        the same prior."""
        vae, M = self.model, self.elastic.n_modes
        q = np.zeros((0, M)) if self.pseudo is None else np.asarray(self.pseudo["amplitudes"], np.float64)
        tot = np.asarray(self.engine.all_sum(np.concatenate([[len(q)], q.sum(0), (q ** 2).sum(0)])), np.float64)
        n = tot[0]
        self.pseudo_render = None
        if n < PSEUDO_PRIOR_MIN:
            return
        mean = tot[1:1 + M] / n
        std = np.sqrt(np.maximum(tot[1 + M:] / n - mean ** 2, 0.0))
        std = np.maximum(std, 1e-3 * max(float(std.max()), 1e-6))
        scale = float(torch.exp(vae.prior_log_scale.detach()))
        vae.prior_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        vae.prior_shape.copy_(torch.as_tensor(std / scale, dtype=torch.float32))
        if len(q):
            self.pseudo_render = ParameterPrior(q, np.asarray(self.pseudo["origins"], np.float64), kind=self.s.render_prior,
                                                bandwidth=self.s.render_bandwidth, shift_kind="uniform",
                                                shift_range=self.shift_range)
        self.pseudo_stats.update({f"prior_mean_{m}": float(v) for m, v in zip(self.elastic.mode_numbers, mean)})
        self.pseudo_stats.update({f"prior_std_{m}": float(v) for m, v in zip(self.elastic.mode_numbers, std)})
        log.info("prior from %d pseudo-labels: %s", int(n), ", ".join(
            f"mode {m} {a:+.3g} ± {b:.3g}" for m, a, b in zip(self.elastic.mode_numbers, mean, std)))

    @torch.no_grad()
    def recalibrate(self) -> None:
        """Self-calibration (``vae_calibrate_on: answers``): :func:`.render.calibrate` on the
        VAE's own answers for the calibration particles (rotation, origins, posterior mean)."""
        pred = self.predict_images(self.cal_images)
        table = self.pose_table(pred["rotations"], pred["origins"], pred["amplitudes"])
        self.apply_calibration(calibrate(self.cal_renderer, self.cal_images, table), "answers")

    @torch.no_grad()
    def recalibrate_on_fits(self) -> None:
        """Self-calibration (``vae_calibrate_on: fits``): :func:`.render.calibrate` on the
        pseudo-label pool — the particles whose fit through the decoder explains their signal,
        at most :data:`CALIBRATION_PARTICLES`, the latest first. The encoder's answers are
        rougher than these fits: on the VAE bench the residuals of the scratch encoder's answers
        kept 1.14 × the background's noise power to the end, so the calibration from the images
        alone (gain and a signal transfer that rose to 10 × at the edge) was never replaced, where
        the fits' residuals have 1.005 × and their calibration is near HEMNMA's labels' (gain 0.215
        vs 0.228, transfer within 30 %). Yet the scratch VAE trained worse with it (bench/README.md):
        the noise measured on the fits' residuals also loosens the pseudo-label gate. All ranks
        hold the same pool: the same calibration."""
        p = self.pseudo_pool
        take = np.sort(np.argsort(-p["epoch"], kind="stable")[:CALIBRATION_PARTICLES])
        rows = p["rows"][take]
        table = self.pose_table(p["rotations"][take], p["origins"][take], p["amplitudes"][take])
        ctf = self.renderer.ctf
        rend = ParticleRenderer(self.elastic, self.settings, None, None if ctf is None else ctf[rows],
                                seed=self.s.seed, device="cpu")
        self.apply_calibration(calibrate(rend, self.pool.read(rows), table), f"{len(rows)} fits")

    def pose_table(self, rotations, origins, amplitudes) -> pd.DataFrame:
        """Rotations, origins and amplitudes as the label columns :func:`.render.calibrate` reads."""
        return pd.DataFrame(np.concatenate([matrix_to_euler(rotations), origins, amplitudes], 1),
                            columns=ANGLES + ORIGINS + amplitude_columns_for(self.elastic))

    def apply_calibration(self, cal: dict, source: str) -> None:
        """Take ``cal`` when its residuals are at the background's noise (within
        :data:`SELF_CALIBRATION_TOLERANCE`), else keep the calibration."""
        nb = int(self.decoder.kmax * self.settings.noise_bins_per_px) + 1
        ratio = float(np.mean(cal["noise_power"][1:nb]) / np.mean(self.background_noise[1:nb]))
        if ratio > SELF_CALIBRATION_TOLERANCE:  # the answers do not explain the images yet: keep the calibration
            log.info("self-calibration not applied: the residuals of the VAE's %s have %.2f × the background's noise "
                     "power (poses or conformations not found yet)", source, ratio)
            return
        self.model.set_calibration(cal["gain"], cal["transfer"], cal["noise_power"])
        self.decoder.refresh()
        self.refiner.refresh()
        log.info("self-calibration on the VAE's %s: gain %+.3g, residuals %.3f × the background's noise power",
                 source, cal["gain"], ratio)

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
        elif self.pseudo_render is not None:
            q, o = self.pseudo_render.sample(n, g, dev)
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
        sources = []  # (how many, (pool rows, R, o, q)): HEMNMA's labels of set 1, then pseudo-labels
        if self.labelled:
            frac = (epoch * self.steps_per_epoch + step) / max(1, self.total_steps)
            if frac >= s.real_after:
                sources.append((int(round(s.batch_size * s.real_fraction)), (np.arange(len(self.train_set)), *self.labels)))
        if self.pseudo_pool is not None:
            p = self.pseudo_pool
            sources.append((int(round(s.batch_size * s.vae_pseudo_fraction)),
                            (p["rows"], p["rotations"], p["origins"], p["amplitudes"])))
        b = self.render(epoch, key, s.batch_size - sum(k for k, _ in sources))
        dev = self.device
        for j, (n_real, labels) in enumerate(sources):
            if not n_real:
                continue
            g = seeded_generator(s.seed + 1 + 7 * j, epoch, key)
            pick = torch.randint(len(labels[0]), (n_real,), generator=g).numpy()
            idx, R, o, q = (x[pick] for x in labels)
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
        row.update(self.pseudo_stats)
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
            "scale": float(torch.exp(self.model.prior_log_scale.detach()))},
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
