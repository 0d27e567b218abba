"""Training targets: encoding HEMNMA labels for the network, decoding its outputs, losses, metrics.

Labels in a STAR file (per particle): amplitudes ``dhnmaAmplitudeNNN`` (one column per
normal mode), Euler angles ``rlnAngleRot/Tilt/Psi`` (degrees, RELION ZYZ) and origins
``rlnOriginXAngst/YAngst`` (Å). The network sees:

* amplitudes and shifts *standardised* with the training set's mean and standard
  deviation (per mode, per axis): ``z = (value − mean) / std``. Shifts are standardised in
  Å, a physical unit, so they do not depend on the pixel size of the images.
* the orientation as the unit quaternion of :func:`deephemnma.core.geometry.euler_to_quaternion`
  (w ≥ 0 for the target; the network's sign is free: the losses are invariant to q ↔ −q).

Losses (:func:`head_losses`): L1 (the paper's mean absolute error) per head, each divided
by the loss of the best constant prediction on the training set (``TargetCodec.baseline``:
about 0.8 for standardised amplitudes and shifts, 0.1–0.4 for quaternions depending on how
spread the orientations are), so that 1.0 means "no better than predicting the mean" for
every head and the joint model's weighted sum is balanced: the quaternion's L1 is several
times smaller than the others'. The quaternion L1 is taken on the raw (unnormalised)
output, so the normalisation does not damp its gradient; predictions are normalised.
(Measured on toy sets: with equal raw weights, the normalised-quaternion loss and dropout
0.5, a joint model's orientation error stayed at the mean-prediction level for 18 epochs
while shifts and amplitudes were learnt; with these choices and no dropout it fell to 39 %
of it in 18 epochs.)

:class:`TargetCodec` holds the statistics and the mode list; it is stored in every
checkpoint (``to_dict``/``from_dict``) so prediction needs nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..core import geometry
from ..core.star import ANGLE_COLUMNS, ORIGIN_COLUMNS, amplitude_column
from ..core.star import amplitude_modes as _amplitude_modes



def amplitude_modes(columns) -> list[int]:
    """Sorted mode numbers of the amplitude columns present (:func:`deephemnma.core.star.amplitude_modes`)."""
    return _amplitude_modes(list(columns))


@dataclass
class TargetCodec:
    """Mode list and standardisation statistics of the training targets."""

    modes: list[int]
    amp_mean: np.ndarray
    amp_std: np.ndarray
    shift_mean: np.ndarray
    shift_std: np.ndarray
    baseline: dict | None = None  # constant-prediction loss per head (training set)

    # ----------------------------------------------------------------- construction
    @classmethod
    def fit(cls, table: pd.DataFrame, modes: list[int] | None = None) -> "TargetCodec":
        """Statistics from the (training) rows of ``table``."""
        modes = amplitude_modes(table.columns) if modes is None else [int(m) for m in modes]
        amp = table[[amplitude_column(m) for m in modes]].to_numpy(np.float64) if modes else np.zeros((len(table), 0))
        sh = table[list(ORIGIN_COLUMNS)].to_numpy(np.float64)
        codec = cls(modes=modes, amp_mean=amp.mean(0), amp_std=_safe_std(amp),
                    shift_mean=sh.mean(0), shift_std=_safe_std(sh))
        codec.baseline = codec._constant_prediction_losses(codec.encode_table(table))
        return codec

    @staticmethod
    def _constant_prediction_losses(enc: dict[str, np.ndarray]) -> dict:
        """Training-set loss of the best constant prediction of each head (mean amplitudes and
        shifts = 0 in standardised units; the chordal-mean quaternion)."""
        q = enc["quaternion"].astype(np.float64)
        qm = np.linalg.eigh(q.T @ q)[1][:, -1]
        l1 = np.minimum(np.abs(q - qm).mean(-1), np.abs(q + qm).mean(-1)).mean()
        dot = (1 - np.abs(q @ qm)).mean()
        amp = np.abs(enc["amplitudes"]).mean() if enc["amplitudes"].size else 1.0
        return {k: float(max(v, 1e-6)) for k, v in (("amplitudes", amp), ("quaternion_l1", l1),
                                                     ("quaternion_dot", dot), ("shifts", np.abs(enc["shifts"]).mean()))}

    def to_dict(self) -> dict:
        return {"modes": list(self.modes), "amp_mean": self.amp_mean.tolist(), "amp_std": self.amp_std.tolist(),
                "shift_mean": self.shift_mean.tolist(), "shift_std": self.shift_std.tolist(),
                "baseline": dict(self.baseline or {})}

    @classmethod
    def from_dict(cls, d: dict) -> "TargetCodec":
        return cls(modes=[int(m) for m in d["modes"]],
                   amp_mean=np.asarray(d["amp_mean"], np.float64).reshape(-1),
                   amp_std=np.asarray(d["amp_std"], np.float64).reshape(-1),
                   shift_mean=np.asarray(d["shift_mean"], np.float64).reshape(2),
                   shift_std=np.asarray(d["shift_std"], np.float64).reshape(2),
                   baseline=dict(d.get("baseline") or {}) or None)

    def loss_scales(self, quaternion_loss: str = "l1") -> dict[str, float]:
        """Divisors of the head losses (1.0 each when there is no baseline)."""
        b = self.baseline or {}
        return {"amplitudes": b.get("amplitudes", 1.0), "quaternion": b.get(f"quaternion_{quaternion_loss}", 1.0),
                "shifts": b.get("shifts", 1.0)}

    @property
    def amplitude_columns(self) -> list[str]:
        return [amplitude_column(m) for m in self.modes]

    @property
    def label_columns(self) -> list[str]:
        return self.amplitude_columns + list(ANGLE_COLUMNS) + list(ORIGIN_COLUMNS)

    # ----------------------------------------------------------------- encode / decode
    def raw_labels(self, table: pd.DataFrame) -> dict[str, np.ndarray]:
        """Labels in physical units: amplitudes (N, M), angles (N, 3) degrees, shifts (N, 2) Å."""
        amp = table[self.amplitude_columns].to_numpy(np.float64) if self.modes else np.zeros((len(table), 0))
        return {"amplitudes": amp, "angles": table[list(ANGLE_COLUMNS)].to_numpy(np.float64),
                "shifts": table[list(ORIGIN_COLUMNS)].to_numpy(np.float64)}

    def encode(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Physical labels → network targets (float32): standardised amplitudes and shifts, quaternions."""
        return {
            "amplitudes": ((raw["amplitudes"] - self.amp_mean) / self.amp_std).astype(np.float32),
            "quaternion": geometry.euler_to_quaternion(raw["angles"]).astype(np.float32),
            "shifts": ((raw["shifts"] - self.shift_mean) / self.shift_std).astype(np.float32),
        }

    def encode_table(self, table: pd.DataFrame) -> dict[str, np.ndarray]:
        return self.encode(self.raw_labels(table))

    def decode(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Network outputs (numpy) → physical units: amplitudes, quaternion (w ≥ 0), angles (deg), shifts (Å)."""
        q = geometry.canonical_quaternion(np.asarray(out["quaternion"], np.float64))
        q = q / np.linalg.norm(q, axis=-1, keepdims=True)
        amp = np.asarray(out.get("amplitudes", np.zeros((len(q), 0))), np.float64)
        return {
            "amplitudes": amp * self.amp_std + self.amp_mean,
            "quaternion": q,
            "angles": geometry.quaternion_to_euler(q),
            "shifts": np.asarray(out["shifts"], np.float64) * self.shift_std + self.shift_mean,
        }


def _safe_std(x: np.ndarray) -> np.ndarray:
    if x.shape[1] == 0:
        return np.ones(0)
    s = x.std(0) if len(x) > 1 else np.ones(x.shape[1])
    return np.where(s > 1e-12, s, 1.0)


# ----------------------------------------------------------------------------- losses
def quaternion_l1(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample sign-invariant L1: ``min(mean|q − t|, mean|q + t|)``."""
    return torch.minimum((q - t).abs().mean(-1), (q + t).abs().mean(-1))


def quaternion_dot(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample ``1 − |⟨q, t⟩|`` (both unit length)."""
    return 1 - (q * t).sum(-1).abs()


def head_losses(pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                quaternion_loss: str = "l1", scales: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Mean loss of each head (float32): L1 for amplitudes and shifts (standardised units,
    the paper's mean absolute error); for the quaternion the sign-invariant L1 of the raw
    output (``quaternion_raw`` when present) or 1−|⟨q,t⟩| of the unit one. Each is divided
    by ``scales[head]`` (:meth:`TargetCodec.loss_scales`) when given."""
    sc = scales or {}
    out = {}
    if "amplitudes" in pred and pred["amplitudes"].shape[-1] > 0:
        out["amplitudes"] = (pred["amplitudes"].float() - target["amplitudes"]).abs().mean() / sc.get("amplitudes", 1.0)
    if quaternion_loss == "l1":
        q = pred.get("quaternion_raw", pred["quaternion"]).float()
        out["quaternion"] = quaternion_l1(q, target["quaternion"]).mean() / sc.get("quaternion", 1.0)
    else:
        out["quaternion"] = quaternion_dot(pred["quaternion"].float(), target["quaternion"]).mean() / sc.get("quaternion", 1.0)
    out["shifts"] = (pred["shifts"].float() - target["shifts"]).abs().mean() / sc.get("shifts", 1.0)
    return out


# ----------------------------------------------------------------------------- metrics
def particle_errors(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-particle errors in physical units, both arguments as from :meth:`TargetCodec.decode`
    / :meth:`TargetCodec.raw_labels`:

    * ``amplitude``: mean absolute amplitude error over the modes;
    * ``angle``: the paper's angle error (degrees, :func:`deephemnma.core.geometry.angular_error`);
    * ``shift``: mean absolute shift error over x and y (Å).
    """
    A = geometry.euler_to_matrix(pred["angles"])
    B = geometry.euler_to_matrix(truth["angles"])
    n = len(A)
    amp = (np.abs(pred["amplitudes"] - truth["amplitudes"]).mean(-1) if truth["amplitudes"].shape[-1]
           else np.zeros(n))
    return {"amplitude": amp, "angle": geometry.angular_error(A, B),
            "shift": np.abs(pred["shifts"] - truth["shifts"]).mean(-1)}


def mean_prediction_baseline(train_raw: dict[str, np.ndarray], eval_raw: dict[str, np.ndarray]) -> dict[str, float]:
    """Errors of predicting one constant for every particle: the training mean amplitudes and
    shifts, and the training set's mean orientation (the chordal L2 mean: the principal
    eigenvector of Σ q qᵀ over training quaternions)."""
    n = len(eval_raw["angles"])
    q = geometry.euler_to_quaternion(train_raw["angles"])
    w, v = np.linalg.eigh(q.T @ q)
    qm = v[:, -1]
    pred = {"amplitudes": np.broadcast_to(train_raw["amplitudes"].mean(0), eval_raw["amplitudes"].shape),
            "angles": np.broadcast_to(geometry.quaternion_to_euler(qm), (n, 3)),
            "shifts": np.broadcast_to(train_raw["shifts"].mean(0), (n, 2))}
    return {k: float(v.mean()) for k, v in particle_errors(pred, eval_raw).items()}


#: the paper's angle metric for a constant or random orientation (uniform rotations)
CHANCE_ANGLE_DEG = 90.0


def test_block(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray], train: dict[str, np.ndarray],
               modes=None) -> dict:
    """The errors on held-out test particles, next to predicting the training mean and to
    chance, with a verdict in words. ``pred``/``truth``/``train`` as :meth:`TargetCodec.decode`
    / :meth:`TargetCodec.raw_labels`; ``modes`` (M, N, 3) the mode vectors of the amplitudes
    (adds the deformation RMSD in Å, which does not depend on how modes are normalised)."""
    from ..core.modes import amplitudes_to_rmsd

    n = len(truth["angles"])
    err = particle_errors(pred, truth)
    mean_pred = {"amplitudes": np.broadcast_to(train["amplitudes"].mean(0), truth["amplitudes"].shape),
                 "angles": pred["angles"], "shifts": np.broadcast_to(train["shifts"].mean(0), (n, 2))}
    base = mean_prediction_baseline(train, truth)
    errors = {"angle_deg": float(err["angle"].mean()), "angle_deg_median": float(np.median(err["angle"])),
              "fraction_over_30deg": float((err["angle"] > 30).mean()), "shift_A": float(err["shift"].mean()),
              "amplitude": float(err["amplitude"].mean())}
    baseline = {"angle_deg": base["angle"], "shift_A": base["shift"], "amplitude": base["amplitude"]}
    if modes is not None and truth["amplitudes"].shape[-1]:
        V = np.asarray(modes, np.float64)
        errors["rmsd_A"] = float(amplitudes_to_rmsd(pred["amplitudes"] - truth["amplitudes"], V).mean())
        baseline["rmsd_A"] = float(amplitudes_to_rmsd(mean_pred["amplitudes"] - truth["amplitudes"], V).mean())
    return {"n": int(n), "errors": errors, "baseline": baseline, "chance": {"angle_deg": CHANCE_ANGLE_DEG},
            "verdict": verdict(errors, baseline)}


def verdict(errors: dict, baseline: dict) -> str:
    """One sentence on what the network's test errors mean."""
    a = errors["angle_deg"]
    if a > 0.8 * CHANCE_ANGLE_DEG:
        return (f"the network predicts orientations at chance ({a:.0f}°; chance ~{CHANCE_ANGLE_DEG:.0f}°): its "
                "answers for image set 2 are noise unless refined")
    parts = [f"orientation error {a:.1f}° (chance ~{CHANCE_ANGLE_DEG:.0f}°)"]
    if "rmsd_A" in errors:
        ratio = errors["rmsd_A"] / max(baseline["rmsd_A"], 1e-12)
        parts.append(f"deformation RMSD {errors['rmsd_A']:.2f} Å = {100 * ratio:.0f} % of predicting the mean "
                     f"conformation" + (" (no better than the mean)" if ratio > 0.9 else ""))
    return "; ".join(parts)
