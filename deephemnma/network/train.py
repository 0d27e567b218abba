"""Training: the recipes, the settings, and ``train()`` for every formulation and engine.

``train(particles, out_dir, settings, modes=...)`` trains on image set 1 (STAR file(s) with
HEMNMA labels) and writes into ``out_dir`` ``last.pt``, ``best.pt``, ``metrics.csv``,
``tensorboard/``, ``curves.png`` (:mod:`.loop`) and ``summary.json``: the final figures,
with the errors on held-out test particles next to predicting the mean and chance, and the
training's CPU seconds (``cpu_seconds``: every epoch's, all ranks, across resumes).

The recipe chooses the formulation (``network.recipe``; any key set explicitly wins over
the recipe):

======================  =========================  ======================  ======================
key                     ``grid`` (default)         ``fast``                ``paper`` (seed 000)
======================  =========================  ======================  ======================
formulation             SO(3)-grid classification  quaternion regression   quaternion regression
                        (:mod:`.posegrid`)         (:mod:`.regressor`)     (three models)
data                    renders + real set 1       real set 1              real set 1
arch                    convnet                    resnet34                resnet34
heads                   512                        1000, 512, 128          1000, 512, 128
optimizer, lr           AdamW 1e-3                 AdamW 1e-3              Adam 1e-5
schedule                cosine, 1 warm-up epoch    cosine, 2 warm-up       ÷10 every 80 epochs
epochs × batch          see RECIPES                60 × 32                 400 × 2
early stopping          none                       20 epochs               none
======================  =========================  ======================  ======================

The grid recipe learns where the paper's direct regression of the orientation does not
(issue 16; learning curves in bench/README.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..core.errors import ConfigError, InputError
from ..core.fileio import atomic_write_json
from ..core.logs import get_logger
from ..core.resume import fingerprint
from ..core.settings import schema_settings
from .checkpoint import load_checkpoint
from .engines import Engine, make_engine
from .loop import Schedule, Task, fit

log = get_logger(__name__)

RECIPES: dict[str, dict] = {
    "grid": {"mode": "joint", "arch": "convnet", "hidden": [512], "optimizer": "adamw", "lr": 1e-3,
             "weight_decay": 1e-4, "schedule": "cosine", "warmup_epochs": 1, "epochs": 100, "batch_size": 64,
             "amp": "auto", "channels_last": "auto", "patience": 0, "dropout": 0.0},
    "paper": {"mode": "separate", "arch": "resnet34", "hidden": [1000, 512, 128], "optimizer": "adam", "lr": 1e-5,
              "weight_decay": 1e-5, "schedule": "step", "warmup_epochs": 0, "epochs": 400, "batch_size": 2,
              "amp": "off", "channels_last": "off", "patience": 0, "dropout": 0.5},
    "fast": {"mode": "joint", "arch": "resnet34", "hidden": [1000, 512, 128], "optimizer": "adamw", "lr": 1e-3,
             "weight_decay": 1e-4, "schedule": "cosine", "warmup_epochs": 2, "epochs": 60, "batch_size": 32,
             "amp": "auto", "channels_last": "auto", "patience": 20, "dropout": 0.0},
}


@schema_settings("network")
class TrainSettings:
    """The ``network`` section of the configuration (defaults: the schema); keys left null
    take the recipe's value (:data:`RECIPES`), keys set explicitly win over the recipe."""

    recipe: str
    mode: str | None
    arch: str | None
    width: int | None
    hidden: list | None
    input_box: int
    grid_directions: int
    grid_inplane: int
    grid_sigma: float
    grid_sigma_end: float | None
    label_smoothing: float
    steps_per_epoch: int
    render_oversample: int
    render_prior: str
    render_bandwidth: float
    real_fraction: float
    real_after: float
    test_fraction: float
    tta_turns: int
    refine: str
    refine_hypotheses: int
    fallback_quantile: float
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
    # ---- the VAE (network.model: vae; deephemnma/network/vae.py)
    model: str
    vae_init: str
    vae_init_checkpoint: str | None
    vae_pretrain: float | None
    vae_data: str
    vae_particles: list | None
    vae_prior: str
    vae_prior_rmsd: float | None
    vae_kl_weight: float
    vae_pose_fraction: float
    vae_shift_range: float | None
    vae_refine_iterations: int
    vae_pseudo_fraction: float | None
    vae_pseudo_after: float | None
    vae_pseudo_particles: int | None
    vae_pseudo_data: str | None
    vae_pseudo_memory: int | None
    vae_calibrate_on: str
    vae_pseudo_prior: bool

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ConfigError(f"network.recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}")
        for k, v in RECIPES[self.recipe].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        self.seed = int(self.seed or 0)
        self.hidden = list(self.hidden)
        # self-training on every particle without HEMNMA's labels: from scratch set 1 (and set 2 with
        # vae_data all); from the regressor's start the particles beyond set 1 when the VAE has them
        # (bench/README.md: better than the regressor alone on angle, shift and RMSD, where without
        # it the VAE only kept its accuracy)
        if self.vae_pseudo_fraction is None:
            self.vae_pseudo_fraction = 0.5 if self.vae_init == "scratch" else 0.25 if self.vae_data == "all" else 0.0
        if self.vae_pseudo_after is None:
            self.vae_pseudo_after = 0.3 if self.vae_init == "scratch" else 0.0
        if self.vae_pseudo_particles is None:
            self.vae_pseudo_particles = 512 if self.vae_init == "scratch" else 1024
        if self.vae_pseudo_data is None:  # the particles self-training fits: all it has without HEMNMA's labels
            self.vae_pseudo_data = "others" if self.vae_init == "regressor" else "all" if self.vae_data == "all" else "set1"
        if self.vae_pseudo_memory is None:
            self.vae_pseudo_memory = 1
        # without labels the encoder must find poses alone: a longer pose pretraining and a wider
        # starting prior (bench/README.md: 43.6° with 2 Å and 30 %, 17° with 6 Å and 70 %)
        if self.vae_pretrain is None:
            self.vae_pretrain = 0.7 if self.vae_init == "scratch" else 0.3
        if self.vae_prior_rmsd is None:
            self.vae_prior_rmsd = 6.0 if self.vae_init == "scratch" else 2.0
        # the VAE from scratch is limited by its encoder's capacity (bench/README.md: 24 channels give
        # 1.71 / 1.68 Å on two seeds against 16's 1.875 Å); the regressor, and the VAE from it, keep 16
        if self.width is None:
            self.width = 24 if not self.needs_labels else 16

    @property
    def needs_labels(self) -> bool:
        """Whether the training particles must carry HEMNMA's labels (angles, origins,
        amplitudes): every model but the VAE from scratch, which learns from the images alone."""
        return not (self.model == "vae" and self.vae_init == "scratch")

    @property
    def formulation(self) -> str:
        """``posegrid`` (the grid recipe) or ``regressor`` (fast, paper)."""
        return "posegrid" if self.recipe == "grid" else "regressor"

    def validate(self) -> None:
        checks = [
            (self.formulation == "regressor" or self.arch == "convnet" or self.arch.startswith("resnet"),
             "arch must be convnet or a resnet"),
            (self.formulation == "posegrid" or self.arch != "convnet", "arch convnet is for the grid recipe"),
            (self.grid_inplane % self.tta_turns == 0 or self.tta_turns == 1,
             "grid_inplane must be a multiple of tta_turns"),
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
    model: torch.nn.Module            # the trained network (as in best.pt), on the engine's device
    task: Task
    history: list[dict]
    best_epoch: int
    out_dir: Path
    engine: Engine
    summary: dict

    @property
    def codec(self):
        return getattr(self.task, "codec", None)


def lr_factor(step: int, total_steps: int, warmup_steps: int, s: TrainSettings, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    return Schedule(s.schedule, total_steps, warmup_steps, steps_per_epoch, s.step_epochs, s.step_gamma,
                    s.min_lr_ratio).factor(step)


def _data_fingerprint(*groups) -> str:
    """Fingerprint of the bytes of the training (and validation) STAR files: labels, image
    names and order in one value, so ``resume="auto"`` notices any change of the data."""
    files = [p for g in groups for p in ([] if g is None else [g] if isinstance(g, (str, Path)) else list(g))]
    return fingerprint(files=files, length=64)


def make_task(s: TrainSettings, engine: Engine, particles, val_particles=None, data_dir=None, modes=None,
              original_pixel_size: float | None = None) -> Task:
    """The task of the settings' formulation, its data split and loaded."""
    from .regressor import RegressorTask, data_info, prepare_data

    train_set, val_set, test_set = prepare_data(particles, s, val_particles, data_dir)
    info = data_info(train_set, val_set, test_set, s, _data_fingerprint(particles, val_particles, modes),
                     original_pixel_size)
    log.info("training on %d particles, validating on %d, testing on %d; %d² images at %.4g Å/px",
             info["n_train"], info["n_val"], info["n_test"], train_set.box, train_set.pixel_size)
    model = None
    if modes is not None:
        from ..align.model import load_model
        from .targets import amplitude_modes

        model = load_model(modes, select=amplitude_modes(train_set.table.columns) or None)
    if s.model == "vae":  # the VAE with the physics decoder (network.model: vae)
        from .vae_task import VAETask

        if model is None:
            raise InputError(None, "the VAE decodes through the reference: give the modes file (--modes, written by "
                                   "deephemnma nma)")
        return VAETask(s, engine, train_set, val_set, test_set, info, model, modes, data_dir)
    if s.formulation == "posegrid":
        from .posegrid import PoseGridTask

        if model is None:
            raise InputError(None, "the grid recipe renders particles through the reference: give the modes file "
                                   "(--modes, written by deephemnma nma)")
        return PoseGridTask(s, engine, train_set, val_set, test_set, info, model)
    return RegressorTask(s, engine, train_set, val_set, test_set, info, None if model is None else model.vectors)


def train(particles: str | Path | Sequence[str | Path], out_dir: str | Path, settings: TrainSettings, *,
          val_particles=None, data_dir=None, engine: Engine | None = None, resume: bool | str = True,
          original_pixel_size: float | None = None, max_epochs: int | None = None, modes=None) -> TrainResult:
    """Train on ``particles`` (STAR file(s) with HEMNMA labels); write checkpoints and logs into ``out_dir``.

    ``modes``: the modes file of the labels (needed by the grid recipe, which renders
    particles; adds the deformation RMSD to the test figures of the others). ``resume``: True
    continues from ``out_dir/last.pt`` when it exists (an error if its model or data differ);
    ``"auto"`` continues only an unfinished run with the same data, settings and ranks and
    otherwise starts over; False always starts over. ``max_epochs`` stops after that many
    epochs *of this call* (the schedule still spans ``settings.epochs``).
    """
    s = settings
    out = Path(out_dir)
    engine = engine or make_engine(s.engine, s.device)
    if s.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif engine.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if engine.is_main:
        out.mkdir(parents=True, exist_ok=True)
    log.info("engine: %s; recipe %s (%s)", engine.describe(), s.recipe, s.formulation)
    task = make_task(s, engine, particles, val_particles, data_dir, modes, original_pixel_size)
    progress = fit(task, s, out, engine, resume, max_epochs)
    summary = {}
    if engine.is_main and progress.history:
        best_path = out / "best.pt"
        if best_path.exists():  # the figures of the model predict will use
            task.model.load_state_dict(load_checkpoint(best_path)["model_state"])
        h = progress.history
        summary = {"recipe": s.recipe, "formulation": s.formulation, "best_epoch": progress.best["epoch"],
                   "epochs_done": h[-1]["epoch"], "best": next((r for r in h if r["epoch"] == progress.best["epoch"]),
                                                               h[-1]),
                   "last": h[-1], "data": task.data_info, "engine": engine.name, "world_size": engine.world_size,
                   "cpu_seconds": float(sum(r.get("cpu_seconds", 0.0) for r in h)),
                   **task.finish(task.model, engine, out)}
        atomic_write_json(out / "summary.json", summary)
        if "test" in summary:
            log.info("held-out test (%d particles): %s", summary["test"]["n"], summary["test"]["verdict"])
    return TrainResult(model=task.model, task=task, history=progress.history, best_epoch=progress.best["epoch"],
                       out_dir=out, engine=engine, summary=summary)
