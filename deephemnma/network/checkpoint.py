"""Checkpoints: one file holds everything needed to resume training or to predict.

Contents (a dict, saved with ``torch.save`` atomically, loadable with ``weights_only=True``:
only tensors, numbers, strings, lists, tuples and dicts):

``format``/``format_version``
    ``"deephemnma-network"``, 1.
``model_config``
    :class:`.model.ModelConfig` as a dict (arch, mode, hidden sizes, dropout, M).
``model_state``
    the network's ``state_dict`` (CPU tensors).
``codec``
    :class:`.targets.TargetCodec` as a dict: the mode list and the standardisation
    statistics of amplitudes and shifts (Å).
``data``
    ``box`` and ``pixel_size`` (Å) of the training images, ``original_pixel_size`` (Å; the
    pixel size of the full-size particles when the training images were downscaled, else the
    same), ``normalize`` (image normalisation), training/validation counts and sources.
``settings``
    the resolved training settings (:class:`.train.TrainSettings` as a dict).
``epoch``, ``global_step``
    completed epochs and optimiser steps.
``history``
    one dict of metrics per completed epoch (what ``metrics.csv`` shows).
``best``
    ``{"epoch", "score"}`` of the best epoch so far (validation loss) and the early-stopping
    counter ``bad_epochs``.
``optimizer_state``, ``scaler_state``, ``rng`` (``last.pt`` only)
    the optimiser's state (Adam moments), the mixed-precision loss scaler, the RNG states of
    python, numpy and torch (CPU and CUDA) — with the epoch and step they make resuming exact.
``world_size``, ``engine``, ``versions``
    how it was trained.

``best.pt`` is the same without the optimiser/scaler/RNG states: the file ``predict`` needs.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..core.errors import InputError
from ..core.fileio import atomic_path

FORMAT = "deephemnma-network"
FORMAT_VERSION = 1
RESUME_KEYS = ("optimizer_state", "scaler_state", "rng")


def rng_state() -> dict:
    """RNG states of python, numpy (as tensors/ints: weights_only-safe) and torch."""
    py = random.getstate()
    np_state = np.random.get_state(legacy=True)
    state = {
        "python": (py[0], tuple(py[1]), py[2]),
        "numpy": {"key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` (see the module docstring) atomically."""
    path = Path(path)
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def inference_state(state: dict) -> dict:
    """``state`` without what only resuming needs."""
    return {k: v for k, v in state.items() if k not in RESUME_KEYS}


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs)."""
    from ..core.fileio import require_file

    path = require_file(path, "checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise InputError(path, f"not a readable checkpoint ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(path, "not a deephemnma network checkpoint")
    if int(state.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(path, f"checkpoint format {state['format_version']} is newer than this deephemnma "
                         f"understands ({FORMAT_VERSION})")
    return state


def build_from_checkpoint(state: dict, device="cpu"):
    """(model in eval mode on ``device``, codec) from a loaded checkpoint."""
    from .model import ModelConfig, build_model
    from .targets import TargetCodec

    cfg = ModelConfig.from_dict(state["model_config"])
    model = build_model(cfg)
    model.load_state_dict(state["model_state"])
    model.to(device).eval()
    return model, TargetCodec.from_dict(state["codec"])
