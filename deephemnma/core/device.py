"""The torch device a stage runs on: one picker for training ranks, prediction and maps."""
from __future__ import annotations

import torch

from .errors import ConfigError


def pick_device(device: str = "auto", local_rank: int = 0, setting: str = "device") -> torch.device:
    """``auto`` → the GPU of this rank (``local_rank`` modulo the GPUs of the node) when torch
    sees one, else the CPU; ``cpu``; ``cuda`` or ``cuda:N`` (a ConfigError naming ``setting``
    when no GPU is visible)."""
    device = str(device or "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{setting} is {device!r} but torch sees no CUDA device")
        dev = torch.device(device)
        if dev.index is None:
            dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
        return dev
    raise ConfigError(f"{setting} must be auto, cpu or cuda[:N], got {device!r}")
