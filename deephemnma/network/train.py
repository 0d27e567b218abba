"""The one training loop (every engine), recipes, exact resume, metrics and early stopping.

``train(particles, out_dir, settings)`` trains the regressor of :mod:`.model` on image set 1
(STAR file(s) with HEMNMA labels) and writes into ``out_dir``:

* ``last.pt`` after every epoch (atomic) and ``best.pt`` whenever the validation loss
  improves (:mod:`.checkpoint` lists their contents);
* ``metrics.csv`` (one row per epoch), ``tensorboard/`` (event files), ``curves.png``
  (training and validation curves), ``summary.json`` (final figures, including the errors of
  predicting the training mean, the baseline any model must beat).

Recipes (``network.recipe``; any key set explicitly wins over the recipe):

======================  ===========================  ==================================
key                     ``paper`` (seed 000 §2.2)    ``fast`` (default)
======================  ===========================  ==================================
mode                    separate (three models)      joint (one model, weighted losses)
dropout (MLP)           0.5                          0 (0.5 slowed learning ~2× on small runs)
optimizer               Adam, weight decay 1e-5      AdamW, weight decay 1e-4
lr                      1e-5                         1e-3 (linear warm-up 2 epochs)
schedule                ÷10 every 80 epochs          cosine to 1 % of lr
epochs                  400                          60
batch_size (per rank)   2                            32
mixed precision (GPU)   off                          bf16 (fp16 + loss scaling if no bf16)
channels_last (GPU)     off                          on
======================  ===========================  ==================================

Exact resume: the data order of epoch e is ``default_rng([seed, e]).permutation(n)``,
dropout masks and augmentations are seeded from (seed, epoch, step, slot), and ``last.pt``
holds the model, optimiser, loss scaler, RNG states, epoch, step, history and
early-stopping state. Rerunning the same command after a kill continues from the last
completed epoch and — on CPU with the same thread count, or with ``deterministic: true`` —
ends with bit-for-bit the weights of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..core.errors import ConfigError, InputError
from ..core.fileio import atomic_path, atomic_write_json, atomic_write_text
from ..core.logs import get_logger
from ..core.resume import fingerprint
from ..core.settings import schema_settings
from ..core.star import ORIGINAL_PIXEL_SIZE
from .checkpoint import inference_state, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import (
    BatchDataset,
    ParticleSet,
    StepSampler,
    batch_seed,
    load_particles,
    make_loader,
    split_by_particle,
)
from .engines import Engine, make_engine
from .model import ModelConfig, build_model
from .targets import TargetCodec, head_losses, mean_prediction_baseline, particle_errors

log = get_logger(__name__)

RECIPES: dict[str, dict] = {
    "paper": {"mode": "separate", "optimizer": "adam", "lr": 1e-5, "weight_decay": 1e-5, "schedule": "step",
              "warmup_epochs": 0, "epochs": 400, "batch_size": 2, "amp": "off", "channels_last": "off", "patience": 0, "dropout": 0.5},
    "fast": {"mode": "joint", "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "schedule": "cosine",
             "warmup_epochs": 2, "epochs": 60, "batch_size": 32, "amp": "auto", "channels_last": "auto", "patience": 20, "dropout": 0.0},
}


@schema_settings("network")
class TrainSettings:
    """The ``network`` section of the configuration (defaults: the schema); keys left null
    take the recipe's value (:data:`RECIPES`), keys set explicitly win over the recipe."""

    recipe: str
    mode: str | None
    arch: str
    hidden: list
    dropout: float | None
    epochs: int | None
    batch_size: int | None
    accumulate: int
    optimizer: str | None
    lr: float | None
    weight_decay: float | None
    schedule: str | None
    step_epochs: int
    step_gamma: float
    warmup_epochs: float | None
    min_lr_ratio: float
    scale_lr: str
    amplitude_weight: float
    quaternion_weight: float
    shift_weight: float
    quaternion_loss: str
    amp: str | None
    channels_last: str | None
    clip_grad: float
    val_fraction: float
    patience: int | None
    min_delta: float
    augment: str
    normalize: str
    exclude_flagged: bool
    num_workers: int | None
    engine: str
    device: str
    deterministic: bool
    seed: int | None
    predict_batch_size: int

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ConfigError(f"network.recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}")
        for k, v in RECIPES[self.recipe].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        self.seed = int(self.seed or 0)

    def validate(self) -> None:
        checks = [
            (self.mode in ("joint", "shared", "separate"), "mode must be joint, shared or separate"),
            (self.optimizer in ("adam", "adamw"), "optimizer must be adam or adamw"),
            (self.schedule in ("step", "cosine", "constant"), "schedule must be step, cosine or constant"),
            (self.scale_lr in ("linear", "none"), "scale_lr must be linear or none"),
            (self.quaternion_loss in ("l1", "dot"), "quaternion_loss must be l1 or dot"),
            (self.amp in ("auto", "off", "bf16", "fp16"), "amp must be auto, off, bf16 or fp16"),
            (self.channels_last in ("auto", "on", "off"), "channels_last must be auto, on or off"),
            (self.augment in ("none", "rot90"), "augment must be none or rot90"),
            (self.normalize in ("per_image", "none"), "normalize must be per_image or none"),
            (self.epochs >= 1 and self.batch_size >= 1 and self.accumulate >= 1, "epochs, batch_size, accumulate must be >= 1"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"network: {msg}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(d["hidden"])
        return d


@dataclass
class TrainResult:
    model: torch.nn.Module            # the trained network (last epoch), on the engine's device
    codec: TargetCodec
    history: list[dict]
    best_epoch: int
    out_dir: Path
    engine: Engine
    summary: dict


def lr_factor(step: int, total_steps: int, warmup_steps: int, s: TrainSettings, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if s.schedule == "step":
        return s.step_gamma ** (step // max(1, s.step_epochs * steps_per_epoch))
    if s.schedule == "cosine":
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return 1.0


def _make_optimizer(s: TrainSettings, model: torch.nn.Module) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)


def _amp_dtype(s: TrainSettings, device: torch.device):
    if device.type != "cuda" or s.amp == "off":
        return None
    if s.amp == "fp16" or (s.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def default_workers(device: torch.device, local_size: int = 1) -> int:
    """DataLoader workers: a few per GPU rank; one on CPU (loading is cheap next to the model)."""
    from ..core.runtime import default_threads

    if device.type == "cuda":
        return max(1, min(8, default_threads() // max(1, local_size) - 1))
    return 1


def _image_keys(ps: ParticleSet) -> set[str]:
    im = ps.images
    return {f"{im.files[f].resolve()}@{i}" for f, i in zip(im.file_idx, im.image_idx)}


def prepare_data(particles, settings: TrainSettings, val_particles=None, data_dir=None):
    """(train set, validation set or None) — validation by particle, never overlapping."""
    full = load_particles(particles, data_dir, labels=True, exclude_flagged=settings.exclude_flagged)
    if val_particles:
        val = load_particles(val_particles, data_dir, labels=True, exclude_flagged=settings.exclude_flagged)
        common = _image_keys(full) & _image_keys(val)
        if common:
            raise InputError(val.sources[0], f"{len(common)} particle image(s) are in both the training and the "
                             f"validation set (e.g. {sorted(common)[0]})")
        if (val.box, round(val.pixel_size, 4)) != (full.box, round(full.pixel_size, 4)):
            raise InputError(val.sources[0], f"validation images ({val.box} px, {val.pixel_size:.4g} Å/px) differ "
                             f"from training images ({full.box} px, {full.pixel_size:.4g} Å/px)")
        return full, val
    if settings.val_fraction <= 0:
        return full, None
    if len(np.unique(full.keys)) < 2:
        raise InputError(full.sources[0], "need at least 2 particles for a validation split")
    tr, va = split_by_particle(full.keys, settings.val_fraction, settings.seed)
    return full.subset(tr), full.subset(va)


def _same_targets(ck: dict, codec: TargetCodec, equal) -> bool:
    """The checkpoint's target coding (modes, standardisation statistics) is ``codec``'s,
    statistics compared with ``equal`` (np.allclose, or np.array_equal for an exact match)."""
    old = TargetCodec.from_dict(ck["codec"])
    return old.modes == codec.modes and all(equal(getattr(old, a), getattr(codec, a))
                                            for a in ("amp_mean", "amp_std", "shift_mean", "shift_std"))


def _check_resume(ck: dict, model_cfg: ModelConfig, codec: TargetCodec, data_info: dict, s: TrainSettings,
                  world: int, path: Path) -> None:
    if ck["model_config"] != model_cfg.to_dict():
        raise InputError(path, f"cannot resume: the model configuration differs ({ck['model_config']} vs "
                         f"{model_cfg.to_dict()}); use a new output directory or --no-resume")
    same = _same_targets(ck, codec, np.allclose)
    if not same or ck["data"]["n_train"] != data_info["n_train"] or ck["data"]["n_val"] != data_info["n_val"]:
        raise InputError(path, "cannot resume: the training data differ from the checkpoint's "
                         "(other particles, split or labels); use a new output directory or --no-resume")
    old_s = ck["settings"]
    gb_old = old_s["batch_size"] * old_s["accumulate"] * ck.get("world_size", 1)
    gb_new = s.batch_size * s.accumulate * world
    if gb_old != gb_new or old_s["seed"] != s.seed:
        log.warning("resuming with a different global batch (%d vs %d) or seed: the continuation is not the "
                    "run the checkpoint started", gb_new, gb_old)


def _data_fingerprint(*groups) -> str:
    """Fingerprint of the bytes of the training (and validation) STAR files: labels, image
    names and order in one value, so ``resume="auto"`` notices any change of the data."""
    files = [p for g in groups for p in ([] if g is None else [g] if isinstance(g, (str, Path)) else list(g))]
    return fingerprint(files=files, length=64)


# Settings that do not change what training computes (a resume may differ in them).
_RESUME_NEUTRAL = {"num_workers", "predict_batch_size"}


def _unfinished_match(ck: dict, model_cfg: ModelConfig, codec: TargetCodec, data_info: dict, s: TrainSettings,
                      world: int) -> str | None:
    """Why ``ck`` is *not* an unfinished run of this very training (None: it is one, resume).
    Used by ``resume="auto"`` (the workflow): a job rerun because its inputs or settings
    changed starts over; a job killed midway continues."""
    if ck["model_config"] != model_cfg.to_dict():
        return "the model configuration differs"
    if not (_same_targets(ck, codec, np.array_equal) and ck["data"] == data_info):
        return "the training data differ"
    a = {k: v for k, v in ck["settings"].items() if k not in _RESUME_NEUTRAL}
    b = {k: v for k, v in s.to_dict().items() if k not in _RESUME_NEUTRAL}
    if a != b or ck.get("world_size", 1) != world:
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return f"the settings differ ({', '.join(changed) or 'number of ranks'})"
    best = ck["best"]
    if int(ck["epoch"]) >= s.epochs or (s.patience > 0 and best.get("bad_epochs", 0) >= s.patience):
        return "that run finished"
    return None


# ----------------------------------------------------------------------------- metrics I/O
CSV_COLUMNS = ["epoch", "global_step", "lr", "train_loss", "train_loss_amplitudes", "train_loss_quaternion",
               "train_loss_shifts", "val_loss", "val_loss_amplitudes", "val_loss_quaternion", "val_loss_shifts",
               "val_amplitude_mae", "val_angle_error_deg", "val_shift_mae_A", "epoch_time_s", "train_images_per_s",
               "is_best"]


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def plot_curves(path: Path, history: list[dict]) -> None:
    """Training and validation curves (loss and the three errors) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0, 0]
    ax.plot(ep, [h["train_loss"] for h in history], label="training")
    if history and history[0].get("val_loss") is not None:
        ax.plot(ep, [h["val_loss"] for h in history], label="validation")
    ax.set_yscale("log")
    ax.set_title("loss (weighted L1, standardised)")
    ax.legend()
    for ax, key, title in ((axes[0, 1], "val_angle_error_deg", "validation angle error (°)"),
                           (axes[1, 0], "val_shift_mae_A", "validation shift error (Å)"),
                           (axes[1, 1], "val_amplitude_mae", "validation amplitude error")):
        vals = [h.get(key) for h in history]
        if any(v is not None for v in vals):
            ax.plot(ep, [np.nan if v is None else v for v in vals], color="C1")
        ax.set_title(title)
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, loader, codec: TargetCodec, raw: dict, s: TrainSettings, engine: Engine, device,
             amp_dtype=None, channels_last=False) -> dict:
    """Validation metrics over this rank's shard, summed over ranks: losses (standardised, as in
    training) and mean errors in physical units."""
    model.eval()
    sums = np.zeros(8)
    weights = {"amplitudes": s.amplitude_weight, "quaternion": s.quaternion_weight, "shifts": s.shift_weight}
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        tgt = {k: batch[k].to(device, non_blocking=True) for k in ("amplitudes", "quaternion", "shifts")}
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            pred = model(x)
        hl = head_losses(pred, tgt, s.quaternion_loss, codec.loss_scales(s.quaternion_loss))
        n = len(x)
        idx = batch["index"].numpy()
        dec = codec.decode({k: v.float().cpu().numpy() for k, v in pred.items()})
        err = particle_errors(dec, {k: v[idx] for k, v in raw.items()})
        sums += [n, sum(weights[k] * float(v) for k, v in hl.items()) * n,
                 float(hl.get("amplitudes", torch.zeros(()))) * n, float(hl["quaternion"]) * n, float(hl["shifts"]) * n,
                 err["amplitude"].sum(), err["angle"].sum(), err["shift"].sum()]
    sums = engine.all_sum(sums)
    n = max(sums[0], 1)
    return {"val_loss": sums[1] / n, "val_loss_amplitudes": sums[2] / n, "val_loss_quaternion": sums[3] / n,
            "val_loss_shifts": sums[4] / n, "val_amplitude_mae": sums[5] / n, "val_angle_error_deg": sums[6] / n,
            "val_shift_mae_A": sums[7] / n, "n_val": int(sums[0])}


# ----------------------------------------------------------------------------- training
def train(particles: str | Path | Sequence[str | Path], out_dir: str | Path, settings: TrainSettings, *,
          val_particles=None, data_dir=None, engine: Engine | None = None, resume: bool | str = True,
          original_pixel_size: float | None = None, max_epochs: int | None = None) -> TrainResult:
    """Train on ``particles`` (STAR file(s) with labels); write checkpoints and logs into ``out_dir``.

    ``resume``: True continues from ``out_dir/last.pt`` when it exists (an error if its model
    or data differ); ``"auto"`` continues only an unfinished run with the same data, settings
    and ranks and otherwise starts over; False always starts over. ``max_epochs`` stops after
    that many epochs *of this call* (the schedule still spans ``settings.epochs``); used to
    train in pieces. Returns a :class:`TrainResult`.
    """
    s = settings
    out = Path(out_dir)
    engine = engine or make_engine(s.engine, s.device)
    device = engine.device
    if s.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if engine.is_main:
        out.mkdir(parents=True, exist_ok=True)
    log.info("engine: %s", engine.describe())

    # ---- data
    train_set, val_set = prepare_data(particles, s, val_particles, data_dir)
    codec = TargetCodec.fit(train_set.table)
    raw_train = codec.raw_labels(train_set.table)
    raw_val = codec.raw_labels(val_set.table) if val_set is not None else None
    if original_pixel_size is None and ORIGINAL_PIXEL_SIZE in train_set.table.columns:  # recorded by preprocess
        original_pixel_size = float(np.median(pd.to_numeric(train_set.table[ORIGINAL_PIXEL_SIZE], errors="coerce")))
    data_info = {"box": train_set.box, "pixel_size": train_set.pixel_size,
                 "original_pixel_size": float(original_pixel_size or train_set.pixel_size),
                 "normalize": s.normalize, "n_train": len(train_set), "n_val": 0 if val_set is None else len(val_set),
                 "sources": [str(p) for p in train_set.sources],
                 "fingerprint": _data_fingerprint(particles, val_particles)}
    log.info("training on %d particles, validating on %d; %d² images at %.4g Å/px; modes %s",
             data_info["n_train"], data_info["n_val"], train_set.box, train_set.pixel_size, codec.modes)

    # ---- model and optimiser
    torch.manual_seed(s.seed)
    model_cfg = ModelConfig(n_amplitudes=len(codec.modes), arch=s.arch, mode=s.mode, hidden=tuple(s.hidden),
                            dropout=s.dropout)
    model = build_model(model_cfg).to(device)
    channels_last = device.type == "cuda" and s.channels_last != "off" or s.channels_last == "on"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(s, model)
    amp_dtype = _amp_dtype(s, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    sampler = StepSampler(len(train_set), s.batch_size, world_size=engine.world_size, rank=engine.rank,
                          accumulate=s.accumulate, seed=s.seed, shuffle=True)
    steps_per_epoch = sampler.steps_per_epoch()
    if steps_per_epoch == 0:
        raise ConfigError(f"network.batch_size {s.batch_size} × {engine.world_size} rank(s) × accumulate "
                          f"{s.accumulate} exceeds the {len(train_set)} training particles")
    total_steps = s.epochs * steps_per_epoch
    warmup_steps = int(round(s.warmup_epochs * steps_per_epoch))
    lr_scale = engine.world_size * s.accumulate if s.scale_lr == "linear" else 1
    base_lr = s.lr * lr_scale

    # ---- resume
    epoch0, step0, history = 0, 0, []
    best = {"epoch": -1, "score": math.inf, "bad_epochs": 0}
    last_path, best_path = out / "last.pt", out / "best.pt"
    ck = load_checkpoint(last_path) if resume and last_path.exists() else None
    if ck is not None and resume == "auto":
        why = _unfinished_match(ck, model_cfg, codec, data_info, s, engine.world_size)
        if why:
            log.info("starting over: %s is not an unfinished run of this training (%s)", last_path, why)
            ck = None
    if ck is not None:
        _check_resume(ck, model_cfg, codec, data_info, s, engine.world_size, last_path)
        model.load_state_dict(ck["model_state"])
        if scaler is not None and ck.get("scaler_state"):
            scaler.load_state_dict(ck["scaler_state"])
        set_rng_state(ck["rng"])
        epoch0, step0, history, best = int(ck["epoch"]), int(ck["global_step"]), list(ck["history"]), dict(ck["best"])
        log.info("resumed from %s: %d epoch(s) done", last_path, epoch0)
    # Horovod's DistributedOptimizer is a new optimiser over the same parameter groups, with
    # empty state: a resumed optimiser state is loaded into the wrapped one.
    optimizer = engine.wrap_optimizer(optimizer, model, s.accumulate)
    if epoch0:
        optimizer.load_state_dict(ck["optimizer_state"])
    engine.broadcast_state(model, optimizer)
    wrapped = engine.wrap_model(model)

    # ---- loaders
    workers = default_workers(device, engine.local_size) if s.num_workers is None else int(s.num_workers)
    pin = device.type == "cuda"
    train_ds = BatchDataset(train_set.images, raw_train, codec, train_set.pixel_size, s.normalize, s.augment, s.seed)
    loader = make_loader(train_ds, sampler, num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
    val_loader = None
    if val_set is not None:
        val_ds = BatchDataset(val_set.images, raw_val, codec, val_set.pixel_size, s.normalize, "none", s.seed)
        val_sampler = StepSampler(len(val_set), max(s.batch_size, 64), world_size=engine.world_size,
                                  rank=engine.rank, shuffle=False)
        val_loader = make_loader(val_ds, val_sampler, num_workers=workers, pin_memory=pin,
                                 persistent_workers=workers > 0)

    writer = None
    if engine.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"), purge_step=epoch0 + 1)
    weights = {"amplitudes": s.amplitude_weight, "quaternion": s.quaternion_weight, "shifts": s.shift_weight}
    params = [p for p in model.parameters() if p.requires_grad]
    global_step = step0
    end_epoch = s.epochs if max_epochs is None else min(s.epochs, epoch0 + int(max_epochs))
    stop = best["bad_epochs"] >= s.patience > 0

    for epoch in range(epoch0, end_epoch):
        if stop:
            break
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        sums = np.zeros(5)  # steps, loss, amplitudes, quaternion, shifts (this rank)
        it = iter(loader)
        for step in range(steps_per_epoch):
            lr = base_lr * lr_factor(global_step, total_steps, warmup_steps, s, steps_per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr
            step_loss = np.zeros(4)
            for k in range(s.accumulate):
                batch = next(it)
                x = batch["image"].to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                tgt = {h: batch[h].to(device, non_blocking=True) for h in ("amplitudes", "quaternion", "shifts")}
                slot = engine.rank * s.accumulate + k
                torch.manual_seed(batch_seed(s.seed, epoch, step, slot, 1))  # dropout masks
                with engine.no_sync(wrapped, k == s.accumulate - 1):
                    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
                    with ctx:
                        pred = wrapped(x)
                    hl = head_losses(pred, tgt, s.quaternion_loss, codec.loss_scales(s.quaternion_loss))
                    loss = sum(weights[h] * v for h, v in hl.items())
                    scaled = loss / s.accumulate
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                step_loss += [float(loss.detach()), float(hl["amplitudes"].detach()) if "amplitudes" in hl else 0.0,
                              float(hl["quaternion"].detach()), float(hl["shifts"].detach())]
            engine.optimizer_step(optimizer, scaler, s.clip_grad, params)
            optimizer.zero_grad()
            global_step += 1
            sums += np.concatenate([[1], step_loss / s.accumulate])
            if not np.isfinite(step_loss[0]):
                raise FloatingPointError(f"training loss is {step_loss[0]} at epoch {epoch + 1}, step {step + 1}: "
                                         "lower network.lr or enable network.clip_grad")
        del it
        train_time = time.perf_counter() - t0
        engine.average_buffers(model)
        tot = engine.all_sum(sums)
        row = {"epoch": epoch + 1, "global_step": global_step, "lr": lr,
               "train_loss": tot[1] / tot[0], "train_loss_amplitudes": tot[2] / tot[0],
               "train_loss_quaternion": tot[3] / tot[0], "train_loss_shifts": tot[4] / tot[0],
               "train_images_per_s": steps_per_epoch * sampler.global_batch / train_time}
        if val_loader is not None:
            row.update(evaluate(model, val_loader, codec, raw_val, s, engine, device, amp_dtype, channels_last))
        row["epoch_time_s"] = time.perf_counter() - t0
        score = row.get("val_loss", row["train_loss"])
        improved = score < best["score"] - s.min_delta
        if improved:
            best = {"epoch": epoch + 1, "score": float(score), "bad_epochs": 0}
        else:
            best["bad_epochs"] += 1
        row["is_best"] = int(improved)
        history.append({k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in row.items()})
        stop = s.patience > 0 and best["bad_epochs"] >= s.patience
        if engine.is_main:
            state = {
                "model_config": model_cfg.to_dict(), "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "codec": codec.to_dict(), "data": data_info, "settings": s.to_dict(), "epoch": epoch + 1,
                "global_step": global_step, "history": history, "best": best, "world_size": engine.world_size,
                "engine": engine.name, "versions": {"deephemnma": str(__version__), "torch": str(torch.__version__)},
                "optimizer_state": optimizer.state_dict(), "scaler_state": scaler.state_dict() if scaler else None,
                "rng": rng_state(),
            }
            save_checkpoint(last_path, state)
            if improved:
                save_checkpoint(best_path, inference_state(state))
            write_metrics_csv(out / "metrics.csv", history)
            plot_curves(out / "curves.png", history)
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    writer.add_scalar(k, v, epoch + 1)
            writer.flush()
            msg = (f"epoch {epoch + 1}/{s.epochs}: train loss {row['train_loss']:.4f}"
                   + (f", val loss {row['val_loss']:.4f}, angle {row['val_angle_error_deg']:.2f}°, shift "
                      f"{row['val_shift_mae_A']:.3f} Å, amplitude {row['val_amplitude_mae']:.3g}" if "val_loss" in row else "")
                   + f" ({row['train_images_per_s']:.0f} images/s{', best' if improved else ''})")
            log.info(msg)
        engine.barrier()
        if stop:
            log.info("early stopping: no improvement for %d epochs (best epoch %d)", s.patience, best["epoch"])

    if writer is not None:
        writer.close()
    summary = {}
    if engine.is_main and history:
        summary = {"best_epoch": best["epoch"], "epochs_done": history[-1]["epoch"], "best": next(
            (h for h in history if h["epoch"] == best["epoch"]), history[-1]), "last": history[-1],
            "data": data_info, "engine": engine.name, "world_size": engine.world_size}
        if raw_val is not None:
            summary["mean_prediction_baseline"] = mean_prediction_baseline(raw_train, raw_val)
        atomic_write_json(out / "summary.json", summary)
    return TrainResult(model=model, codec=codec, history=history, best_epoch=best["epoch"], out_dir=out,
                       engine=engine, summary=summary)
