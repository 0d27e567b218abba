"""Inference: a trained checkpoint + particles → predicted amplitudes, angles and shifts.

:func:`predict_images` streams a :class:`deephemnma.core.mrc.ParticleImages` through the network
in batches (no autograd; on GPU with autocast and channels_last), with DataLoader workers
reading and normalising the next batches while the current one is computed (pinned memory
and non-blocking copies on GPU). :func:`predict_star` does this for one STAR file (a shard)
and writes a STAR file with every input column kept plus the predictions.

Output columns:

* ``rlnAngleRot/Tilt/Psi`` (degrees; RELION ZYZ, tilt in [0, 180]) from the predicted unit
  quaternion (:func:`deephemnma.core.geometry.quaternion_to_euler`);
* ``rlnOriginXAngst/YAngst`` (Å) — shifts are learnt and written in Å, a physical unit:
  the same numbers are right for the (downscaled) images the network saw and for the
  original full-size particles (RELION converts with each file's own pixel size);
* ``dhnmaAmplitudeNNN``, one per normal mode of the training set.

Input values already in those columns (e.g. HEMNMA's own labels on image set 1, or a
consensus refinement's angles) are kept under ``dhnmaInput<Name>`` (``rlnAngleRot`` →
``dhnmaInputAngleRot``, ``dhnmaAmplitude007`` → ``dhnmaInputAmplitude007``).

The particles must be the images the network was trained on in kind: the same box and
pixel size (the preprocessed, downscaled stacks), else an InputError says what to give.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.errors import InputError
from ..core.device import pick_device
from ..core.logs import get_logger, progress
from .checkpoint import build_from_checkpoint, load_checkpoint
from .data import BatchDataset, StepSampler, make_loader
from .targets import ANGLE_COLUMNS, ORIGIN_COLUMNS, TargetCodec

log = get_logger(__name__)


def input_column_name(col: str) -> str:
    """Where an input value of a predicted column is kept: ``rlnAngleRot`` → ``dhnmaInputAngleRot``."""
    for prefix in ("rln", "dhnma"):
        if col.startswith(prefix):
            return "dhnmaInput" + col[len(prefix):]
    return "dhnmaInput" + col


def default_predict_workers(device: torch.device) -> int:
    from ..core.runtime import default_threads

    return max(1, min(8, default_threads() - 1)) if device.type == "cuda" else 1


@torch.no_grad()
def predict_images(model: torch.nn.Module, codec: TargetCodec, images, *, normalize: str = "per_image",
                   batch_size: int = 256, num_workers: int | None = None, device: torch.device | None = None,
                   amp: bool | None = None, channels_last: bool | None = None, show_progress: bool = True,
                   prefetch_factor: int = 4) -> dict[str, np.ndarray]:
    """Predict every particle of ``images`` (in order). Returns the decoded predictions:
    ``amplitudes`` (N, M), ``quaternion`` (N, 4), ``angles`` (N, 3) degrees, ``shifts`` (N, 2) Å,
    and ``timing`` figures (``images_per_s`` of the whole loop)."""
    device = device or next(model.parameters()).device
    cuda = device.type == "cuda"
    amp = cuda if amp is None else amp and cuda
    channels_last = cuda if channels_last is None else channels_last
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if amp else None
    workers = default_predict_workers(device) if num_workers is None else int(num_workers)
    n = len(images)
    ds = BatchDataset(images, normalize=normalize)
    sampler = StepSampler(n, batch_size, shuffle=False)
    loader = make_loader(ds, sampler, num_workers=workers, pin_memory=cuda, prefetch_factor=prefetch_factor)
    outs = {"amplitudes": np.zeros((n, len(codec.modes)), np.float32), "quaternion": np.zeros((n, 4), np.float32),
            "shifts": np.zeros((n, 2), np.float32)}
    t0 = time.perf_counter()
    pending = None  # GPU: copy the previous batch's results while the next one runs

    def collect(item):
        idx, pred = item
        for k in outs:
            if k in pred:
                outs[k][idx] = pred[k].float().cpu().numpy()

    bar = progress(total=n, desc="predict", unit="particle") if show_progress else contextlib.nullcontext()
    with bar:
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
            with ctx:
                pred = model(x)
            if pending is not None:
                collect(pending)
            pending = (batch["index"].numpy(), pred)
            if show_progress:
                bar.update(len(x))
        if pending is not None:
            collect(pending)
    elapsed = time.perf_counter() - t0
    dec = codec.decode({k: v for k, v in outs.items()})
    dec["timing"] = {"seconds": elapsed, "images_per_s": n / max(elapsed, 1e-9), "workers": workers,
                     "batch_size": batch_size, "device": str(device), "amp": str(amp_dtype)}
    return dec


def add_predictions(particles: pd.DataFrame, pred: dict[str, np.ndarray], codec: TargetCodec) -> pd.DataFrame:
    """A copy of ``particles`` with the predicted columns (input values kept as dhnmaInput*)."""
    out = particles.copy()
    new = {ANGLE_COLUMNS[i]: pred["angles"][:, i] for i in range(3)}
    new.update({ORIGIN_COLUMNS[i]: pred["shifts"][:, i] for i in range(2)})
    new.update({c: pred["amplitudes"][:, j] for j, c in enumerate(codec.amplitude_columns)})
    for col, values in new.items():
        if col in out.columns:
            out.insert(out.columns.get_loc(col) + 1, input_column_name(col), out[col].to_numpy())
        out[col] = np.asarray(values, dtype=np.float64)
    return out


def check_compatible(state: dict, box: int, pixel_size: float, path) -> None:
    d = state["data"]
    if box != d["box"] or abs(pixel_size - d["pixel_size"]) > 1e-3 * d["pixel_size"]:
        raise InputError(path, f"these particles are {box}² pixels at {pixel_size:.4g} Å/px but the network was "
                         f"trained on {d['box']}² at {d['pixel_size']:.4g} Å/px: give the particles preprocessed "
                         "the same way as the training set (the predicted shifts are in Å and apply to the "
                         "original images as well)")


def _checkpoint_id(path) -> str:
    """Identifies a checkpoint's content (for resumable prediction): size and modification time."""
    st = Path(path).stat()
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def predict_star(checkpoint: str | os.PathLike, particles: str | os.PathLike, out: str | os.PathLike, *,
                 data_dir=None, batch_size: int = 256, num_workers: int | None = None, device: str = "auto",
                 amp: bool | None = None, modes=None, amortise: dict | None = None) -> dict:
    """Predict the particles of one STAR file and write ``out`` (atomic). Returns timing figures.
    Grid checkpoints (the default recipe) need the ``modes`` file and ``amortise``: the keyword
    arguments of :func:`.amortise.amortise_star` (refinement and fallback settings)."""
    from ..core.star import write_star
    from .data import load_particles

    state = load_checkpoint(checkpoint)
    dev = pick_device(device, setting="--device")
    task = state.get("task")
    if task in ("vae", "posegrid"):  # refined through the reference by HEMNMA (amortise); the VAE adds posterior widths
        if task == "vae":
            from .vae import predict_vae_star as predict_refined
        else:
            from .amortise import amortise_star as predict_refined
        if modes is None:
            raise InputError(checkpoint, f"a {'VAE' if task == 'vae' else 'grid'} checkpoint's predictions are refined "
                                         "through the reference: give the modes file (--modes)")
        kw = dict(amortise or {})
        return predict_refined(state, particles, out, modes, kw.pop("align_settings"), data_dir=data_dir, device=dev,
                               checkpoint_id=_checkpoint_id(checkpoint), **kw)
    model, codec = build_from_checkpoint(state, dev)
    ps = load_particles(particles, data_dir, labels=False)
    check_compatible(state, ps.box, ps.pixel_size, particles)
    star = ps.stars[0]
    log.info("predicting %d particles of %s on %s", len(ps), particles, dev)
    pred = predict_images(model, codec, ps.images, normalize=state["data"]["normalize"], batch_size=batch_size,
                          num_workers=num_workers, device=dev, amp=amp)
    table = add_predictions(star.particles, pred, codec)
    write_star(out, table, star.optics, source=star.path, data_dir=data_dir)  # image paths rebased to out's directory
    t = pred["timing"]
    log.info("wrote %s: %d particles in %.1f s (%.0f particles/s)", out, len(table), t["seconds"], t["images_per_s"])
    return t
