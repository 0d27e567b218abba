"""The paper's formulation (seed 000 §2.2): a ResNet regressor of amplitudes, a unit quaternion
and shifts, trained on real images with HEMNMA's labels (recipes ``fast`` and ``paper``).

Kept for comparison and for data sets where the paper's recipe is wanted: on this project's
particles direct regression of the orientation does not learn (issue 16); the default
formulation is :mod:`.posegrid`. The task plugs into :func:`.loop.fit`.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import torch

from ..core.errors import InputError
from ..core.star import ORIGINAL_PIXEL_SIZE
from .data import BatchDataset, ParticleSet, StepSampler, load_particles, make_loader, split_by_particle
from .engines import Engine
from .loop import Task
from .model import ModelConfig, build_model
from .targets import TargetCodec, head_losses, mean_prediction_baseline, particle_errors, test_block


def default_workers(device: torch.device, local_size: int = 1) -> int:
    """DataLoader workers: a few per GPU rank; one on CPU (loading is cheap next to the model)."""
    from ..core.runtime import default_threads

    if device.type == "cuda":
        return max(1, min(8, default_threads() // max(1, local_size) - 1))
    return 1


def _image_keys(ps: ParticleSet) -> set[str]:
    im = ps.images
    return {f"{im.files[f].resolve()}@{i}" for f, i in zip(im.file_idx, im.image_idx)}


def prepare_data(particles, settings, val_particles=None, data_dir=None):
    """(train, validation or None, test or None) sets — by particle, never overlapping. The
    test split (``network.test_fraction`` of set 1) is seen by nothing but the final report.
    Labels are required where the settings need them (:attr:`.train.TrainSettings.needs_labels`)."""
    labels = settings.needs_labels
    full = load_particles(particles, data_dir, labels=labels, exclude_flagged=settings.exclude_flagged)
    test = None
    if settings.test_fraction > 0 and len(np.unique(full.keys)) >= 3:
        rest, te = split_by_particle(full.keys, settings.test_fraction, settings.seed + 7717)
        full, test = full.subset(rest), full.subset(te)
    if val_particles:
        val = load_particles(val_particles, data_dir, labels=labels, exclude_flagged=settings.exclude_flagged)
        common = _image_keys(full) & _image_keys(val)
        if common:
            raise InputError(val.sources[0], f"{len(common)} particle image(s) are in both the training and the "
                             f"validation set (e.g. {sorted(common)[0]})")
        if (val.box, round(val.pixel_size, 4)) != (full.box, round(full.pixel_size, 4)):
            raise InputError(val.sources[0], f"validation images ({val.box} px, {val.pixel_size:.4g} Å/px) differ "
                             f"from training images ({full.box} px, {full.pixel_size:.4g} Å/px)")
        return full, val, test
    if settings.val_fraction <= 0:
        return full, None, test
    if len(np.unique(full.keys)) < 2:
        raise InputError(full.sources[0], "need at least 2 particles for a validation split")
    tr, va = split_by_particle(full.keys, settings.val_fraction, settings.seed)
    return full.subset(tr), full.subset(va), test


def data_info(train: ParticleSet, val, test, settings, fingerprint: str, original_pixel_size=None) -> dict:
    """What identifies the training data (box, pixel sizes, counts, sources, fingerprint)."""
    if original_pixel_size is None and ORIGINAL_PIXEL_SIZE in train.table.columns:  # recorded by preprocess
        original_pixel_size = float(np.median(pd.to_numeric(train.table[ORIGINAL_PIXEL_SIZE], errors="coerce")))
    return {"box": train.box, "pixel_size": train.pixel_size,
            "original_pixel_size": float(original_pixel_size or train.pixel_size), "normalize": settings.normalize,
            "n_train": len(train), "n_val": 0 if val is None else len(val), "n_test": 0 if test is None else len(test),
            "sources": [str(p) for p in train.sources], "fingerprint": fingerprint}


class RegressorTask(Task):
    """ResNet + MLP regression of amplitudes, quaternion and shifts on real labelled images."""

    kind = "regressor"
    loss_names = ("amplitudes", "quaternion", "shifts")

    def __init__(self, s, engine: Engine, train: ParticleSet, val, test, info: dict, modes=None):
        self.s, self.engine, self.device = s, engine, engine.device
        self.train_set, self.val_set, self.test_set, self.modes = train, val, test, modes
        self.codec = TargetCodec.fit(train.table)
        self.raw_train = self.codec.raw_labels(train.table)
        self.raw_val = self.codec.raw_labels(val.table) if val is not None else None
        self.data_info = info
        torch.manual_seed(s.seed)
        cfg = ModelConfig(n_amplitudes=len(self.codec.modes), arch=s.arch, mode=s.mode, hidden=tuple(s.hidden),
                          dropout=s.dropout)
        self.model_config = cfg.to_dict()
        self.model = build_model(cfg).to(self.device)
        self.sampler = StepSampler(len(train), s.batch_size, world_size=engine.world_size, rank=engine.rank,
                                   accumulate=s.accumulate, seed=s.seed, shuffle=True)
        self.steps_per_epoch = self.sampler.steps_per_epoch()
        self.global_batch = self.sampler.global_batch
        self.weights = {"amplitudes": s.amplitude_weight, "quaternion": s.quaternion_weight, "shifts": s.shift_weight}
        self.scales = self.codec.loss_scales(s.quaternion_loss)
        self._loaders()

    def _loaders(self) -> None:
        s, pin = self.s, self.device.type == "cuda"
        workers = default_workers(self.device, self.engine.local_size) if s.num_workers is None else int(s.num_workers)
        ds = BatchDataset(self.train_set.images, self.raw_train, self.codec, self.train_set.pixel_size, s.normalize,
                          s.augment, s.seed)
        self.loader = make_loader(ds, self.sampler, num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
        self.val_loader = None
        if self.val_set is not None:
            vds = BatchDataset(self.val_set.images, self.raw_val, self.codec, self.val_set.pixel_size, s.normalize,
                               "none", s.seed)
            vs = StepSampler(len(self.val_set), max(s.batch_size, 64), world_size=self.engine.world_size,
                             rank=self.engine.rank, shuffle=False)
            self.val_loader = make_loader(vds, vs, num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)

    def state(self) -> dict:
        return {"codec": self.codec.to_dict()}

    def same_state(self, saved: dict) -> bool:
        old = TargetCodec.from_dict(saved["codec"])
        return old.modes == self.codec.modes and all(np.array_equal(getattr(old, a), getattr(self.codec, a))
                                                     for a in ("amp_mean", "amp_std", "shift_mean", "shift_std"))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def micro_batches(self, epoch: int):
        for batch in self.loader:
            yield self._to_device(batch)

    def _to_device(self, batch: dict) -> dict:
        out = {"image": batch["image"].to(self.device, non_blocking=True), "index": batch["index"]}
        for h in ("amplitudes", "quaternion", "shifts"):
            out[h] = batch[h].to(self.device, non_blocking=True)
        return out

    def losses(self, output, batch, epoch, step):
        hl = head_losses(output, batch, self.s.quaternion_loss, self.scales)
        return sum(self.weights[h] * v for h, v in hl.items()), hl

    @torch.no_grad()
    def validate(self, model, engine: Engine) -> dict:
        """Losses (standardised, as in training) and mean errors in physical units over this
        rank's shard of the validation set, summed over ranks."""
        if self.val_loader is None:
            return {}
        model.eval()
        sums = np.zeros(8)
        for batch in self.val_loader:
            b = self._to_device(batch)
            amp = contextlib.nullcontext()
            with amp:
                pred = model(b["image"])
            hl = head_losses(pred, b, self.s.quaternion_loss, self.scales)
            n = len(b["image"])
            idx = b["index"].numpy()
            dec = self.codec.decode({k: v.float().cpu().numpy() for k, v in pred.items()})
            err = particle_errors(dec, {k: v[idx] for k, v in self.raw_val.items()})
            sums += [n, sum(self.weights[k] * float(v) for k, v in hl.items()) * n,
                     float(hl.get("amplitudes", torch.zeros(()))) * n, float(hl["quaternion"]) * n,
                     float(hl["shifts"]) * n, err["amplitude"].sum(), err["angle"].sum(), err["shift"].sum()]
        sums = engine.all_sum(sums)
        n = max(sums[0], 1)
        base = mean_prediction_baseline(self.raw_train, self.raw_val)
        return {"val_loss": sums[1] / n, "val_loss_amplitudes": sums[2] / n, "val_loss_quaternion": sums[3] / n,
                "val_loss_shifts": sums[4] / n, "val_amplitude_mae": sums[5] / n, "val_angle_error_deg": sums[6] / n,
                "val_shift_mae_A": sums[7] / n, "n_val": int(sums[0]), "val_baseline_angle_error_deg": base["angle"],
                "val_baseline_shift_mae_A": base["shift"], "val_baseline_amplitude_mae": base["amplitude"]}

    def finish(self, model, engine: Engine, out) -> dict:
        out_doc = {}
        if self.raw_val is not None:
            out_doc["mean_prediction_baseline"] = mean_prediction_baseline(self.raw_train, self.raw_val)
        if self.test_set is not None:
            from .predict import predict_images

            pred = predict_images(model, self.codec, self.test_set.images, normalize=self.s.normalize,
                                  device=self.device, show_progress=False, num_workers=0)
            out_doc["test"] = test_block(pred, self.codec.raw_labels(self.test_set.table), self.raw_train, self.modes)
        return out_doc

    def log_line(self, row: dict) -> str:
        msg = f"train loss {row['train_loss']:.4f}"
        if "val_loss" in row:
            msg += (f", val loss {row['val_loss']:.4f}, angle {row['val_angle_error_deg']:.2f}°, shift "
                    f"{row['val_shift_mae_A']:.3f} Å, amplitude {row['val_amplitude_mae']:.3g}")
        return msg
