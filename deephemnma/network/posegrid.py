"""The default formulation (issue 16): orientation as a distribution over an SO(3) grid,
amplitudes and shifts as regression heads, trained on an unlimited stream of exactly
labelled particles rendered through the project's own forward model, mixed with the real
HEMNMA-labelled images of image set 1.

Data (:class:`PoseGridTask`):

* image set 1 with HEMNMA's labels (the filtered ``kept.star``) is split by particle into
  training, validation and test particles (``val_fraction``, ``test_fraction``); the test
  particles are seen by nothing but the final report;
* a renderer (:mod:`.render`) is calibrated on the training particles — gain, signal
  transfer and noise spectrum from the residuals of each image against the render of its
  HEMNMA labels — and draws amplitudes and origins from the labels (a kernel density
  estimate), orientations uniformly, CTF rows from the data's own rows;
* each micro-batch is ``batch_size`` images rendered on the training device from the key
  (seed, epoch, step, slot) alone — any engine, any number of ranks, exact resume — of which
  a fraction ``real_fraction`` are real training particles once ``real_after`` of the
  steps are done (sim-to-real fine-tuning).

Model: :class:`.posenet.PoseNet`; loss: cross-entropy with soft targets over the grid
(``grid_sigma`` degrees), smooth L1 on standardised amplitudes and shifts.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..core.ctf import CTFParams
from ..core.errors import InputError
from ..core.geometry import angular_error, euler_to_matrix, matrix_to_euler
from ..core.logs import get_logger
from .data import ParticleSet
from .engines import Engine
from .loop import Task
from .posenet import PoseNet, PoseNetConfig, loss_terms
from .render import (
    ANGLES,
    ORIGINS,
    ParameterPrior,
    ParticleRenderer,
    RenderSettings,
    amplitude_columns_for,
    calibrate,
    seeded_generator,
)
from .targets import test_block

log = get_logger(__name__)

#: particles used to calibrate the renderer (gain, transfer, noise spectrum)
CALIBRATION_PARTICLES = 2000


def ctf_mode_of(table: pd.DataFrame) -> str:
    """The CTF the images carry, from the majority of their RELION flags."""
    def frac(col):
        return float(pd.to_numeric(table[col], errors="coerce").fillna(0).mean()) if col in table.columns else 0.0

    if frac("rlnCtfDataAreCtfPremultiplied") > 0.5:
        return "premultiplied"
    if frac("rlnCtfDataArePhaseFlipped") > 0.5:
        return "phase_flipped"
    return "raw" if "rlnDefocusU" in table.columns else "none"


def labels_of(table: pd.DataFrame, model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rotations (n,3,3), origins (n,2) Å, amplitudes (n,M)) float64 from a labelled table."""
    missing = [c for c in ANGLES + ORIGINS + amplitude_columns_for(model) if c not in table.columns]
    if missing:
        raise InputError(None, f"training particles lack the label column(s) {', '.join('_' + c for c in missing)} "
                               "(HEMNMA's output for the modes of the modes file)")
    return (euler_to_matrix(table[ANGLES].to_numpy(np.float64)), table[ORIGINS].to_numpy(np.float64),
            table[amplitude_columns_for(model)].to_numpy(np.float64))


def build_renderer(model, train: ParticleSet, images: np.ndarray, s, device) -> tuple[ParticleRenderer, dict]:
    """A renderer calibrated on (a seeded subset of at most 2,000 of) the training particles."""
    table = train.table.reset_index(drop=True)
    settings = RenderSettings(box=train.box, pixel_size=train.pixel_size, ctf_mode=ctf_mode_of(table),
                              oversample=s.render_oversample)
    ctf = CTFParams.from_table(table) if "rlnDefocusU" in table.columns else None
    prior = ParameterPrior.from_table(table, model, kind=s.render_prior, bandwidth=s.render_bandwidth)
    bare = ParticleRenderer(model, settings, prior, ctf, seed=s.seed, device=device)
    rng = np.random.default_rng([s.seed, 0xCA1])
    sub = np.sort(rng.permutation(len(table))[:CALIBRATION_PARTICLES])
    bare_sub = ParticleRenderer(model, settings, prior, None if ctf is None else ctf[sub], seed=s.seed, device=device)
    cal = calibrate(bare_sub, images[sub], table.iloc[sub])
    rend = ParticleRenderer(model, settings, prior, ctf, gain=cal["gain"], noise_power=cal["noise_power"],
                            transfer=cal["transfer"], seed=s.seed, device=device)
    log.info("renderer: %d² at %.4g Å/px, CTF %s, gain %+.3g (%s particles), calibrated on %d particles",
             settings.box, settings.pixel_size, settings.ctf_mode, cal["gain"],
             "white" if cal["gain"] > 0 else "DARK", len(sub))
    if cal["gain"] <= 0:
        log.warning("the renders correlate negatively with the particles: the contrast polarity of the training "
                    "images is inverted relative to the reference (data.invert_contrast)")
    return rend, cal


class PoseGridTask(Task):
    """SO(3)-grid pose classification + amplitude/shift regression on renders and real images."""

    kind = "posegrid"
    loss_names = ("pose", "amplitudes", "shifts")

    def __init__(self, s, engine: Engine, train: ParticleSet, val, test, info: dict, model):
        self.s, self.engine, self.device = s, engine, engine.device
        self.elastic = model
        self.train_set, self.val_set, self.test_set = train, val, test
        self.images = train.images.read(np.arange(len(train)))
        self.labels = labels_of(train.table, model)
        self.renderer, cal = build_renderer(model, train, self.images, s, self.device)
        self.calibration = {"gain": float(cal["gain"]), "noise_power": np.asarray(cal["noise_power"]).tolist(),
                            "transfer": None if cal["transfer"] is None else np.asarray(cal["transfer"]).tolist()}
        amp = self.renderer.prior.amplitudes
        cfg = PoseNetConfig(n_amplitudes=model.n_modes, arch=s.arch, input_box=min(s.input_box, train.box),
                            n_directions=s.grid_directions, n_inplane=s.grid_inplane, hidden=int(s.hidden[0]),
                            width=s.width)
        torch.manual_seed(s.seed)
        self.model = PoseNet(cfg, amp.mean(0), np.where(amp.std(0) > 0, amp.std(0), 1.0),
                             shift_scale=float(max(self.renderer.prior.origins.std(), 1e-3))).to(self.device)
        self.model_config = {**cfg.to_dict(), "modes": [int(m) for m in model.mode_numbers]}
        self.data_info = {**info, "ctf_mode": self.renderer.s.ctf_mode}
        self.steps_per_epoch = int(s.steps_per_epoch)
        self.global_batch = s.batch_size * s.accumulate * engine.world_size
        self.total_steps = s.epochs * self.steps_per_epoch

    # ---- checkpoints
    def state(self) -> dict:
        return {"calibration": self.calibration, "mode_numbers": self.model_config["modes"]}

    def same_state(self, saved: dict) -> bool:
        c = saved.get("calibration") or {}
        return c.get("gain") == self.calibration["gain"] and c.get("noise_power") == self.calibration["noise_power"]

    # ---- data
    def micro_batches(self, epoch: int):
        s, rank = self.s, self.engine.rank
        for step in range(self.steps_per_epoch):
            frac = (epoch * self.steps_per_epoch + step) / max(1, self.total_steps)
            n_real = int(round(s.batch_size * s.real_fraction)) if frac >= s.real_after and len(self.images) else 0
            for k in range(s.accumulate):
                slot = rank * s.accumulate + k
                b = self.renderer.batch(epoch, step * 1_000_003 + slot, s.batch_size - n_real)
                if n_real:
                    b = self._mix(b, self._real(epoch, step, slot, n_real))
                yield {"image": b["images"], "rotations": b["rotations"], "amplitudes": b["amplitudes"],
                       "origins": b["origins"]}

    def _real(self, epoch: int, step: int, slot: int, n: int) -> dict:
        g = seeded_generator(self.s.seed + 1, epoch, step * 1_000_003 + slot)
        idx = torch.randint(len(self.images), (n,), generator=g).numpy()
        R, o, q = (x[idx] for x in self.labels)
        dev = self.device
        return {"images": torch.as_tensor(self.images[idx], device=dev)[:, None],
                "rotations": torch.as_tensor(R, dtype=torch.float32, device=dev),
                "origins": torch.as_tensor(o, dtype=torch.float32, device=dev),
                "amplitudes": torch.as_tensor(q, dtype=torch.float32, device=dev)}

    @staticmethod
    def _mix(a: dict, b: dict) -> dict:
        return {k: torch.cat([a[k], b[k]]) for k in ("images", "rotations", "origins", "amplitudes")}

    # ---- loss
    def losses(self, output, batch, epoch, step):
        s = self.s
        frac = (epoch * self.steps_per_epoch + step) / max(1, self.total_steps)
        sigma = s.grid_sigma if s.grid_sigma_end is None else s.grid_sigma + (s.grid_sigma_end - s.grid_sigma) * frac
        terms = loss_terms(self.model, output, batch, sigma, s.label_smoothing)
        total = terms["pose"] + s.amplitude_weight * terms["amplitudes"] + s.shift_weight * terms["shifts"]
        return total, terms

    # ---- evaluation
    @torch.no_grad()
    def predict_set(self, model: PoseNet, ps: ParticleSet, turns: int = 1) -> dict:
        """Physical predictions for a particle set (rotations, origins Å, amplitudes)."""
        model.eval()
        out = []
        for a in range(0, len(ps), 256):
            x = torch.as_tensor(ps.images.read(np.arange(a, min(len(ps), a + 256))), device=self.device)[:, None]
            out.append({k: v.double().cpu().numpy() for k, v in model.predict(x, turns=turns).items()})
        model.train()
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

    def _errors(self, pred: dict, ps: ParticleSet) -> dict:
        R, o, q = labels_of(ps.table, self.elastic)
        ang = angular_error(pred["rotations"], R)
        return {"angle": ang, "shift": np.abs(pred["origins"] - o).mean(-1),
                "rmsd": self.elastic.rmsd_between(pred["amplitudes"], q)}

    def validate(self, model, engine: Engine) -> dict:
        if self.val_set is None or not engine.is_main:
            return {}
        pred = self.predict_set(self.model, self.val_set)
        e = self._errors(pred, self.val_set)
        _, _, q = labels_of(self.val_set.table, self.elastic)
        base = self.elastic.rmsd_between(np.broadcast_to(self.labels[2].mean(0), q.shape), q)
        return {"val_loss": float(e["angle"].mean()) / 90.0 + float(e["rmsd"].mean()) / max(float(base.mean()), 1e-9),
                "val_angle_error_deg": float(e["angle"].mean()), "val_angle_median_deg": float(np.median(e["angle"])),
                "val_shift_mae_A": float(e["shift"].mean()), "val_rmsd_A": float(e["rmsd"].mean()),
                "val_baseline_rmsd_A": float(base.mean()), "n_val": len(self.val_set)}

    def finish(self, model, engine: Engine, out) -> dict:
        if self.test_set is None:
            return {}
        pred = self.predict_set(self.model, self.test_set, turns=self.s.tta_turns)
        R, o, q = labels_of(self.test_set.table, self.elastic)
        train_R, train_o, train_q = self.labels
        as_raw = (lambda R_, o_, q_: {"angles": matrix_to_euler(R_), "shifts": o_, "amplitudes": q_})
        return {"test": test_block(as_raw(pred["rotations"], pred["origins"], pred["amplitudes"]), as_raw(R, o, q),
                                   as_raw(train_R, train_o, train_q), self.elastic.vectors),
                "calibration": {"gain": self.calibration["gain"]}}

    def log_line(self, row: dict) -> str:
        msg = f"loss {row['train_loss']:.4f} (pose {row.get('train_loss_pose', float('nan')):.3f})"
        if "val_angle_error_deg" in row:
            msg += (f"; validation: angle {row['val_angle_error_deg']:.1f}° (median {row['val_angle_median_deg']:.1f}°),"
                    f" shift {row['val_shift_mae_A']:.2f} Å, deformation RMSD {row['val_rmsd_A']:.2f} Å "
                    f"(mean conformation {row['val_baseline_rmsd_A']:.2f} Å)")
        return msg
