"""The one training loop, for every formulation and engine: set-up, epochs, checkpoints, resume.

A formulation is a *task* (:class:`Task`): it owns the model, the data (real labelled
images, or batches rendered on the fly), the loss, the validation metrics and what a
checkpoint must carry besides the weights. :func:`fit` runs any task on any engine
(:mod:`.engines`: one process, torch DDP or Horovod) with the optimiser and schedule of the
settings, mixed precision and channels_last on GPU, gradient accumulation, and writes

* ``last.pt`` after every epoch (atomic) and ``best.pt`` (inference state) whenever the
  task's score improves (:mod:`.checkpoint` lists the contents);
* ``metrics.csv`` (one row per epoch), ``tensorboard/``, ``curves.png``.

Exact resume: every random draw of an epoch is a function of (seed, epoch, step, slot) —
the data order, the rendered batches, dropout masks — and ``last.pt`` holds the model,
optimiser, loss scaler, RNG states, epoch, step, history and early-stopping state. Rerunning
after a kill continues from the last completed epoch and — on CPU with the same thread
count, or with ``deterministic: true`` — ends with bit-for-bit the weights of an
uninterrupted run. ``resume="auto"`` (the workflow's) continues only an unfinished run of
the same task, data, settings and ranks.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .. import __version__
from ..core.errors import ConfigError, InputError
from ..core.fileio import atomic_path, atomic_write_text
from ..core.logs import get_logger
from .checkpoint import inference_state, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import batch_seed
from .engines import Engine

log = get_logger(__name__)


class Task:
    """What a formulation provides to :func:`fit` (override the methods).

    Attributes set by the task: ``kind`` (name in checkpoints), ``model`` (an nn.Module on
    the engine's device), ``model_config`` (dict that rebuilds the model), ``data_info``
    (dict that identifies the training data: checked on resume), ``steps_per_epoch``,
    ``global_batch`` (images per optimiser step over all ranks), ``loss_names``
    (the loss terms, in the order they are logged)."""

    kind = "task"
    loss_names: tuple = ()

    def state(self) -> dict:
        """What a checkpoint carries besides the weights (target coding, calibration …)."""
        return {}

    def same_state(self, saved: dict) -> bool:
        """Whether a checkpoint's task state belongs to this very task (resume checks)."""
        return True

    def restore(self, saved: dict) -> None:
        """Take back what :meth:`state` recorded that a resumed run cannot recompute."""

    def set_epoch(self, epoch: int) -> None:
        pass

    def micro_batches(self, epoch: int) -> Iterator[dict]:
        """This rank's micro-batches of the epoch, in order (steps × accumulate of them)."""
        raise NotImplementedError

    def losses(self, output: dict, batch: dict, epoch: int, step: int) -> tuple[torch.Tensor, dict]:
        """(weighted total, {term: value}) of one micro-batch."""
        raise NotImplementedError

    def forward(self, model, batch: dict):
        return model(batch["image"])

    def validate(self, model, engine: Engine) -> dict:
        """Validation metrics (summed over ranks); ``val_loss`` is the early-stopping score."""
        return {}

    def finish(self, model, engine: Engine, out: Path) -> dict:
        """Final figures for summary.json (e.g. the held-out test split), on the main rank."""
        return {}

    def log_line(self, row: dict) -> str:
        return f"loss {row['train_loss']:.4f}"


@dataclass
class Schedule:
    """The optimiser's learning-rate schedule over ``total_steps`` optimiser steps."""

    kind: str             # step | cosine | constant
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    step_epochs: int = 80
    step_gamma: float = 0.1
    min_lr_ratio: float = 0.01

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "step":
            return self.step_gamma ** (step // max(1, self.step_epochs * self.steps_per_epoch))
        if self.kind == "cosine":
            t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0


@dataclass
class Progress:
    """Where training stands (what ``last.pt`` records besides the states)."""

    epoch: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": -1, "score": math.inf, "bad_epochs": 0})


# ----------------------------------------------------------------------------- set-up
def amp_dtype(setting: str, device: torch.device):
    """The autocast dtype of ``network.amp`` on this device (None: full precision)."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "fp16" or (setting == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def make_optimizer(s, model: torch.nn.Module) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)


def settings_key(s) -> dict:
    """The settings that change what training computes (a resume must match them)."""
    neutral = {"num_workers", "predict_batch_size", "refine", "refine_hypotheses", "tta_turns",
               "fallback_quantile", "refine_levels"}
    return {k: v for k, v in s.to_dict().items() if k not in neutral}


def why_not_resume(ck: dict, task: Task, s, world: int) -> str | None:
    """Why ``ck`` is *not* an unfinished run of this very training (None: resume it).
    A job rerun because its inputs or settings changed starts over; one killed midway continues."""
    if ck.get("task", "regressor") != task.kind or ck["model_config"] != task.model_config:
        return "the model differs"
    if not task.same_state(ck) or ck["data"] != task.data_info:
        return "the training data differ"
    a, b = settings_key_dict(ck["settings"]), settings_key(s)
    if a != b or ck.get("world_size", 1) != world:
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return f"the settings differ ({', '.join(changed) or 'number of ranks'})"
    best = ck["best"]
    if int(ck["epoch"]) >= s.epochs or (s.patience > 0 and best.get("bad_epochs", 0) >= s.patience):
        return "that run finished"
    return None


def settings_key_dict(d: dict) -> dict:
    class _S:
        def to_dict(self):
            return d

    return settings_key(_S())


def check_resume(ck: dict, task: Task, s, world: int, path: Path) -> None:
    """An explicit resume (``resume=True``) of a checkpoint that is not this training is an error."""
    if ck.get("task", "regressor") != task.kind or ck["model_config"] != task.model_config:
        raise InputError(path, f"cannot resume: the model configuration differs ({ck['model_config']} vs "
                         f"{task.model_config}); use a new output directory or --no-resume")
    if not task.same_state(ck) or any(ck["data"].get(k) != task.data_info.get(k) for k in ("n_train", "n_val")):
        raise InputError(path, "cannot resume: the training data differ from the checkpoint's "
                         "(other particles, split or labels); use a new output directory or --no-resume")
    old = ck["settings"]
    if old["batch_size"] * old["accumulate"] * ck.get("world_size", 1) != s.batch_size * s.accumulate * world \
            or old["seed"] != s.seed:
        log.warning("resuming with a different global batch or seed: the continuation is not the run the "
                    "checkpoint started")


#: a second name (hard link) of best.pt kept for resuming: a workflow engine removes a job's
#: declared outputs (best.pt) before rerunning it, but last.pt's best epoch needs its weights
BEST_COPY = ".best.resume.pt"


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes a second name of ``src`` (same inode), replaced atomically."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    os.link(src, tmp)
    os.replace(tmp, dst)


def keep_best_copy(out: Path) -> None:
    """Point ``out/BEST_COPY`` at the current best.pt."""
    _link(out / "best.pt", out / BEST_COPY)


def restore_best(out: Path, ck: dict) -> str | None:
    """Put back best.pt for a resumed run whose best.pt was removed (by snakemake before a rerun,
    or by hand) from the copy :func:`keep_best_copy` kept; why it cannot, or None."""
    best, copy = out / "best.pt", out / BEST_COPY
    want = int(ck.get("best", {}).get("epoch") or 0)
    if best.exists() or want == 0:
        return None
    if not copy.exists() or int(load_checkpoint(copy).get("epoch", -1)) != want:
        return f"best.pt of epoch {want} is gone"
    _link(copy, best)
    log.info("best.pt (epoch %d) restored from %s", want, copy)
    return None


def load_progress(task: Task, s, engine: Engine, out: Path, resume, scaler) -> tuple[Progress, dict | None]:
    """The progress to continue from (model weights, scaler and RNG restored), and the
    checkpoint (for the optimiser state) — or a fresh start."""
    last = out / "last.pt"
    ck = load_checkpoint(last) if resume and last.exists() else None
    if ck is not None and resume == "auto":
        why = why_not_resume(ck, task, s, engine.world_size)
        if why:
            log.info("starting over: %s is not an unfinished run of this training (%s)", last, why)
            ck = None
    if ck is not None and engine.is_main:
        why = restore_best(out, ck)
        if why:
            log.warning("starting over: %s cannot be continued (%s)", last, why)
            ck = None
    ck = engine.broadcast_object(ck is not None) and ck
    if not ck:
        return Progress(), None
    check_resume(ck, task, s, engine.world_size, last)
    task.model.load_state_dict(ck["model_state"])
    task.restore(ck)
    if scaler is not None and ck.get("scaler_state"):
        scaler.load_state_dict(ck["scaler_state"])
    set_rng_state(ck["rng"])
    log.info("resumed from %s: %d epoch(s) done", last, int(ck["epoch"]))
    return Progress(int(ck["epoch"]), int(ck["global_step"]), list(ck["history"]), dict(ck["best"])), ck


# ----------------------------------------------------------------------------- the loop
class Trainer:
    """Runs one task: :meth:`epoch` trains one epoch, :meth:`checkpoint` records it."""

    def __init__(self, task: Task, s, out: Path, engine: Engine, resume=True):
        self.task, self.s, self.out, self.engine = task, s, out, engine
        self.device = engine.device
        model = task.model
        self.channels_last = (self.device.type == "cuda" and s.channels_last != "off") or s.channels_last == "on"
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.amp = amp_dtype(s.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        optimizer = make_optimizer(s, model)
        self.progress, ck = load_progress(task, s, engine, out, resume, self.scaler)
        # Horovod's DistributedOptimizer is a new optimiser over the same parameter groups, with
        # empty state: a resumed optimiser state is loaded into the wrapped one.
        self.optimizer = engine.wrap_optimizer(optimizer, model, s.accumulate)
        if ck is not None:
            self.optimizer.load_state_dict(ck["optimizer_state"])
        engine.broadcast_state(model, self.optimizer)
        self.wrapped = engine.wrap_model(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        scale = engine.world_size * s.accumulate if s.scale_lr == "linear" else 1
        self.base_lr = s.lr * scale
        spe = task.steps_per_epoch
        self.schedule = Schedule(s.schedule, s.epochs * spe, int(round(s.warmup_epochs * spe)), spe, s.step_epochs,
                                 s.step_gamma, s.min_lr_ratio)
        self.cpu0 = time.process_time()  # reset at each epoch's start
        self.writer = None
        if engine.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=self.progress.epoch + 1)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()

    def epoch(self, epoch: int) -> dict:
        """Train one epoch; its row of metrics (training part)."""
        task, s, engine = self.task, self.s, self.engine
        self.cpu0 = time.process_time()
        task.set_epoch(epoch)
        task.model.train()
        t0 = time.perf_counter()
        n_terms = len(task.loss_names)
        sums = np.zeros(2 + n_terms)  # steps, loss, terms
        batches = task.micro_batches(epoch)
        lr = self.base_lr
        for step in range(task.steps_per_epoch):
            lr = self.base_lr * self.schedule.factor(self.progress.global_step)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            step_loss = np.zeros(1 + n_terms)
            for k in range(s.accumulate):
                batch = next(batches)
                if self.channels_last:
                    batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
                torch.manual_seed(batch_seed(s.seed, epoch, step, engine.rank * s.accumulate + k, 1))  # dropout
                with engine.no_sync(self.wrapped, k == s.accumulate - 1):
                    with self._autocast():
                        output = task.forward(self.wrapped, batch)
                    loss, terms = task.losses(output, batch, epoch, step)
                    scaled = loss / s.accumulate
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                step_loss += [float(loss.detach())] + [float(terms[n].detach()) if n in terms else 0.0
                                                       for n in task.loss_names]
            engine.optimizer_step(self.optimizer, self.scaler, s.clip_grad, self.params)
            self.optimizer.zero_grad()
            self.progress.global_step += 1
            sums += np.concatenate([[1], step_loss / s.accumulate])
            if not np.isfinite(step_loss[0]):
                raise FloatingPointError(f"training loss is {step_loss[0]} at epoch {epoch + 1}, step {step + 1}: "
                                         "lower network.lr or enable network.clip_grad")
        del batches
        train_time = time.perf_counter() - t0
        engine.average_buffers(task.model)
        tot = engine.all_sum(sums)
        row = {"epoch": epoch + 1, "global_step": self.progress.global_step, "lr": lr,
               "train_loss": tot[1] / tot[0], "train_images_per_s": task.steps_per_epoch * task.global_batch / train_time}
        row.update({f"train_loss_{n}": tot[2 + i] / tot[0] for i, n in enumerate(task.loss_names)})
        return row

    def record(self, row: dict) -> bool:
        """Validation, early-stopping bookkeeping and checkpoints of a finished epoch; whether it improved."""
        task, s, engine, p = self.task, self.s, self.engine, self.progress
        row.update(engine.broadcast_object(task.validate(task.model, engine)))  # every rank decides alike
        # the epoch's CPU seconds, all ranks (their own processes, not data-loading workers): kept in
        # the history, so the training's total survives a kill and resume (summary.json: cpu_seconds)
        row["cpu_seconds"] = float(engine.all_sum(np.array([time.process_time() - self.cpu0]))[0])
        score = row.get("val_loss", row["train_loss"])
        improved = score < p.best["score"] - s.min_delta
        if improved:
            p.best = {"epoch": row["epoch"], "score": float(score), "bad_epochs": 0}
        else:
            p.best["bad_epochs"] += 1
        row["is_best"] = int(improved)
        p.history.append({k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in row.items()})
        p.epoch = row["epoch"]
        if engine.is_main:
            self.checkpoint(improved)
            log.info("epoch %d/%d: %s (%.0f images/s%s)", row["epoch"], s.epochs, task.log_line(row),
                     row["train_images_per_s"], ", best" if improved else "")
        engine.barrier()
        return improved

    def checkpoint(self, improved: bool) -> None:
        task, s, p = self.task, self.s, self.progress
        state = {
            "task": task.kind, "model_config": task.model_config,
            "model_state": {k: v.detach().cpu() for k, v in task.model.state_dict().items()},
            **task.state(), "data": task.data_info, "settings": s.to_dict(), "epoch": p.epoch,
            "global_step": p.global_step, "history": p.history, "best": p.best,
            "world_size": self.engine.world_size, "engine": self.engine.name,
            "versions": {"deephemnma": str(__version__), "torch": str(torch.__version__)},
            "optimizer_state": self.optimizer.state_dict(),
            "scaler_state": self.scaler.state_dict() if self.scaler else None, "rng": rng_state(),
        }
        # best.pt first: a job killed between the two writes resumes from the previous last.pt and
        # redoes this epoch (same bytes); the other order could leave a last.pt whose best epoch's
        # best.pt was never written, and a resumed run that ends without any best.pt
        if improved:
            save_checkpoint(self.out / "best.pt", inference_state(state))
            keep_best_copy(self.out)
        save_checkpoint(self.out / "last.pt", state)
        write_metrics_csv(self.out / "metrics.csv", p.history)
        plot_curves(self.out / "curves.png", p.history, task.loss_names)
        row = p.history[-1]
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def fit(task: Task, s, out: Path, engine: Engine, resume=True, max_epochs: int | None = None) -> Progress:
    """Train ``task`` for ``s.epochs`` epochs (or ``max_epochs`` more of them, the schedule
    still spanning ``s.epochs``), with early stopping after ``s.patience`` epochs without
    improvement (0: never). Returns the final :class:`Progress`."""
    if task.steps_per_epoch < 1:
        raise ConfigError(f"network.batch_size {s.batch_size} × {engine.world_size} rank(s) × accumulate "
                          f"{s.accumulate} leaves no step per epoch for the training data")
    trainer = Trainer(task, s, out, engine, resume)
    p = trainer.progress
    end = s.epochs if max_epochs is None else min(s.epochs, p.epoch + int(max_epochs))
    try:
        for epoch in range(p.epoch, end):
            if s.patience > 0 and p.best["bad_epochs"] >= s.patience:
                log.info("early stopping: no improvement for %d epochs (best epoch %d)", s.patience, p.best["epoch"])
                break
            trainer.record(trainer.epoch(epoch))
    finally:
        trainer.close()
    return p


# ----------------------------------------------------------------------------- metrics I/O
def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """One row per epoch, every metric a column (the columns of the first row first)."""
    cols = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})
    atomic_write_text(path, buf.getvalue())


def plot_curves(path: Path, history: list[dict], loss_names=()) -> None:
    """Training and validation curves (loss, angle, shift and amplitude errors) as a PNG."""
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
    ax.set_title("loss")
    ax.legend()
    for ax, key, title in ((axes[0, 1], "val_angle_error_deg", "validation angle error (°)"),
                           (axes[1, 0], "val_shift_mae_A", "validation shift error (Å)"),
                           (axes[1, 1], "val_amplitude_mae", "validation amplitude error")):
        vals = [h.get(key) for h in history]
        if any(v is not None for v in vals):
            ax.plot(ep, [np.nan if v is None else v for v in vals], color="C1", label="network")
        base = [h.get(key.replace("val_", "val_baseline_")) for h in history]
        if any(v is not None for v in base):
            ax.plot(ep, [np.nan if v is None else v for v in base], "k:", label="predict the mean")
        if key == "val_angle_error_deg" and any(v is not None for v in vals):
            ax.axhline(90, color="grey", lw=0.5, ls="--", label="chance (~90°)")
        if any(v is not None for v in vals):
            ax.legend(fontsize=7)
        ax.set_title(title)
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
