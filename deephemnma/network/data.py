"""Particles for training and inference: STAR tables, lazily opened image stacks, batches.

* :func:`load_particles` reads one or several STAR files (e.g. the chunks of image set 1
  after the Mahalanobis filter) into one table (optics joined per particle) plus one
  :class:`deephemnma.core.mrc.ParticleImages` over all their stacks. Images are never loaded
  whole: stacks are opened when a worker first touches them and read with positioned reads.
* :func:`split_by_particle` makes the validation split: deterministic from the seed, and a
  particle (the same image in the same stack, wherever it is listed) is never in both sets.
* :class:`BatchDataset` returns whole batches (one index array → one batch): a batch is
  read with one call to ``ParticleImages.read``, normalised per image and, for training,
  optionally augmented by an in-plane rotation (:func:`rot90_augment`) with the labels
  transformed consistently. All randomness comes from the batch's key (seed, epoch, step,
  slot), never from worker state: any number of workers gives the same batches.
* :class:`StepSampler` yields the micro-batches of one rank for one epoch: the epoch's
  permutation is ``default_rng([seed, epoch]).permutation(n)``, so the data order after a
  resume is the order the interrupted run would have used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from ..core import geometry
from ..core.errors import InputError
from ..core.logs import get_logger
from ..core.star import FLAG as FLAG_COLUMN
from .targets import ANGLE_COLUMNS, ORIGIN_COLUMNS, TargetCodec, amplitude_column, amplitude_modes

log = get_logger(__name__)



@dataclass
class ParticleSet:
    """Particles from one or more STAR files, in file order then row order."""

    table: pd.DataFrame          # particle rows with optics columns joined
    images: "object"             # deephemnma.core.mrc.ParticleImages, same order as table
    keys: np.ndarray             # (n,) int64 id of the physical image (stack file, index)
    box: int
    pixel_size: float
    sources: list[Path]
    stars: list                  # deephemnma.core.star.StarData per source (particles as read)
    source_index: np.ndarray     # (n,) which source each row came from
    source_row: np.ndarray       # (n,) 0-based row in that source

    def __len__(self) -> int:
        return len(self.table)

    def subset(self, rows: np.ndarray) -> "ParticleSet":
        from ..core.mrc import ParticleImages

        rows = np.asarray(rows, dtype=np.int64)
        im = self.images
        sub = ParticleImages(im.files, im.file_idx[rows], im.image_idx[rows], star_path=im.star_path)
        return ParticleSet(self.table.iloc[rows].reset_index(drop=True), sub, self.keys[rows], self.box,
                           self.pixel_size, self.sources, self.stars, self.source_index[rows], self.source_row[rows])


def load_particles(paths: str | os.PathLike | Sequence[str | os.PathLike], data_dir=None, *,
                   labels: bool = False, exclude_flagged: bool = True,
                   pixel_size: float | None = None) -> ParticleSet:
    """Read STAR file(s) and open their images lazily.

    ``labels=True`` requires the HEMNMA labels (angles, origins in Å, at least one amplitude
    column with the same modes in every file) and drops rows flagged in ``dhnmaFlag``
    (non-zero: outlier, not converged, bad image) when ``exclude_flagged``. The images must
    share one box size and one pixel size.
    """
    from ..core.mrc import ParticleImages
    from ..core.star import image_locations, merged, pixel_sizes, read_star

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError(None, "no particle STAR file given")
    tables, stars, files, fidx, iidx, px_all, src_i, src_r = [], [], [], [], [], [], [], []
    modes_ref = None
    for s, path in enumerate(paths):
        from ..core.fileio import require_file

        require_file(path, "particle STAR file")
        star = read_star(path, pixel_size=pixel_size, data_dir=data_dir)
        table = merged(star)
        rows = np.arange(len(table))
        if labels:
            _require_labels(path, table)
            modes = amplitude_modes(table.columns)
            if modes_ref is None:
                modes_ref = modes
            elif modes != modes_ref:
                raise InputError(path, f"amplitude columns for modes {modes} differ from {modes_ref} of {paths[0]}")
            if exclude_flagged and FLAG_COLUMN in table.columns:
                flags = pd.to_numeric(table[FLAG_COLUMN], errors="coerce").fillna(0).to_numpy()
                keep = flags == 0
                if not keep.all():
                    log.info("%s: %d flagged particle(s) (%s != 0) left out of training", path, int((~keep).sum()), FLAG_COLUMN)
                rows = rows[keep]
        if len(rows) == 0:
            log.warning("%s: no particles", path)
            continue
        f, fi, ii = image_locations(star, data_dir)
        base = len(files)
        files += list(f)
        fidx.append(fi[rows] + base)
        iidx.append(ii[rows])
        px_all.append(pixel_sizes(star)[rows])
        tables.append(table.iloc[rows])
        stars.append(star)
        src_i.append(np.full(len(rows), s, np.int64))
        src_r.append(rows)
    if not tables:
        raise InputError(paths[0], "no particles to use")
    table = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0].reset_index(drop=True)
    # Same stack reached through two STAR files: one file entry, so keys identify images.
    uniq, inv = np.unique([str(Path(f).resolve()) for f in files], return_inverse=True)
    file_idx = inv[np.concatenate(fidx)]
    image_idx = np.concatenate(iidx)
    images = ParticleImages([Path(u) for u in uniq], file_idx, image_idx, star_path=paths[0] if len(paths) == 1 else None)
    px = np.concatenate(px_all)
    if np.ptp(px) > 1e-4 * px.max():
        i = int(np.flatnonzero(np.abs(px - px[0]) > 1e-4 * px.max())[0])
        raise InputError(paths[int(np.concatenate(src_i)[i])], f"pixel size {px[i]:.5g} Å differs from {px[0]:.5g} Å "
                         "of the first particle: the network needs one pixel size", row=int(np.concatenate(src_r)[i]) + 1)
    keys = file_idx.astype(np.int64) * (int(image_idx.max()) + 1) + image_idx
    box = images.box
    return ParticleSet(table, images, keys, int(box), float(px[0]), paths, stars,
                       np.concatenate(src_i), np.concatenate(src_r))


def _require_labels(path: Path, table: pd.DataFrame) -> None:
    missing = [c for c in (*ANGLE_COLUMNS, *ORIGIN_COLUMNS) if c not in table.columns]
    if missing:
        raise InputError(path, "missing label column(s) " + ", ".join("_" + c for c in missing)
                         + " (training needs HEMNMA angles and origins in Å)")
    if not amplitude_modes(table.columns):
        raise InputError(path, "no amplitude columns (_dhnmaAmplitudeNNN): training needs HEMNMA amplitudes")
    cols = list(ANGLE_COLUMNS) + list(ORIGIN_COLUMNS) + [amplitude_column(m) for m in amplitude_modes(table.columns)]
    vals = table[cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(vals)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(path, f"_{cols[c]} is not a finite number", row=int(r) + 1)


def split_by_particle(keys: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val): a random ``val_fraction`` of the distinct particles (images)
    goes to validation, with every row of a particle on the same side. Deterministic."""
    keys = np.asarray(keys)
    uniq, inv = np.unique(keys, return_inverse=True)
    n_val = int(round(val_fraction * len(uniq)))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), len(uniq) - 1)
    rng = np.random.default_rng([int(seed), 0x5A1])
    is_val = np.zeros(len(uniq), bool)
    is_val[rng.permutation(len(uniq))[:n_val]] = True
    rows = np.arange(len(keys))
    return rows[~is_val[inv]], rows[is_val[inv]]


# ----------------------------------------------------------------------------- augmentation
def rot90_matrix(k: int) -> np.ndarray:
    """In-plane rotation (x, y) ↦ R (x, y) applied by ``np.rot90(image[y, x], k)`` about the
    array centre: ``R = [[0, 1], [−1, 0]]^k``."""
    R1 = np.array([[0.0, 1.0], [-1.0, 0.0]])
    return np.linalg.matrix_power(R1, int(k) % 4)


def rot90_augment(image: np.ndarray, angles_deg: np.ndarray, origin_px: np.ndarray, k: int):
    """Rotate one particle image by k·90° in-plane and transform its labels consistently.

    If ``image`` is the projection with pose ``A = euler_to_matrix(angles)`` and RELION
    origin ``o`` (pixels), the rotated image is the projection with ``A' = R₃ A``
    (R₃ = R acting on x, y) and origin ``o' = R o + (I − R) δ``, where δ = (½, ½) is the
    offset between the image centre D//2 used by the projectors and the array centre
    (D−1)/2 that ``np.rot90`` rotates about. Exact (no interpolation). Returns
    ``(image', angles', origin')``.
    """
    k = int(k) % 4
    if k == 0:
        return image, np.asarray(angles_deg, float), np.asarray(origin_px, float)
    R = rot90_matrix(k)
    R3 = np.eye(3)
    R3[:2, :2] = R
    A2 = R3 @ geometry.euler_to_matrix(angles_deg)
    delta = np.array([0.5, 0.5])
    o2 = R @ np.asarray(origin_px, float) + (np.eye(2) - R) @ delta
    return np.ascontiguousarray(np.rot90(image, k)), geometry.matrix_to_euler(A2), o2


def normalise_images(x: np.ndarray, mode: str) -> np.ndarray:
    """``per_image``: zero mean, unit standard deviation per image; ``none``: unchanged."""
    if mode == "none":
        return x
    m = x.mean(axis=(-2, -1), keepdims=True, dtype=np.float64)
    s = x.std(axis=(-2, -1), keepdims=True, dtype=np.float64)
    return ((x - m) / np.maximum(s, 1e-6)).astype(np.float32)


def batch_seed(seed: int, *key: int) -> int:
    """A 63-bit seed from (seed, epoch, step, slot, ...): the same key gives the same seed."""
    return int(np.random.SeedSequence([int(seed), *map(int, key)]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------- dataset
class BatchDataset(torch.utils.data.Dataset):
    """``dataset[key]`` → one batch. ``key = (tag, indices)``, ``tag`` a tuple of ints that
    seeds the batch's augmentation; ``indices`` positions in ``particles``.

    Returns ``{"image": (B, 1, D, D) float32, "index": (B,) int64}`` plus, when ``codec`` is
    given, the encoded targets ``amplitudes`` (B, M), ``quaternion`` (B, 4), ``shifts`` (B, 2).
    """

    def __init__(self, images, raw_labels: dict[str, np.ndarray] | None = None, codec: TargetCodec | None = None,
                 pixel_size: float = 1.0, normalize: str = "per_image", augment: str = "none", seed: int = 0):
        self.images = images
        self.raw = raw_labels
        self.codec = codec
        self.pixel_size = float(pixel_size)
        self.normalize = normalize
        self.augment = augment
        self.seed = int(seed)
        if augment not in ("none", "rot90"):
            raise ValueError(f"augment must be 'none' or 'rot90', got {augment!r}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        tag, idx = key
        idx = np.asarray(idx, dtype=np.int64)
        x = self.images.read(idx)
        out = {"index": torch.from_numpy(idx)}
        if self.raw is not None and self.codec is not None:
            raw = {k: v[idx].copy() for k, v in self.raw.items()}
            if self.augment == "rot90":
                rng = np.random.default_rng(batch_seed(self.seed, *tag))
                ks = rng.integers(0, 4, size=len(idx))
                for j, k in enumerate(ks):
                    if k:
                        x[j], raw["angles"][j], o = rot90_augment(x[j], raw["angles"][j],
                                                                  raw["shifts"][j] / self.pixel_size, k)
                        raw["shifts"][j] = o * self.pixel_size
            for k, v in self.codec.encode(raw).items():
                out[k] = torch.from_numpy(v)
        x = normalise_images(x, self.normalize)
        out["image"] = torch.from_numpy(x)[:, None]
        return out


class StepSampler(torch.utils.data.Sampler):
    """Keys of this rank's micro-batches, epoch by epoch (``set_epoch``).

    Training (``shuffle=True``): step s of epoch e uses the global batch
    ``perm[s·G:(s+1)·G]``, ``G = batch_size · world_size · accumulate``, of the permutation
    ``default_rng([seed, epoch]).permutation(n)``; rank r takes its ``accumulate``
    micro-batches from the slice ``[r·b·K, (r+1)·b·K)``. Incomplete last global batches are
    dropped (every rank must do the same number of steps). Evaluation (``shuffle=False``):
    rank r takes positions r, r+W, r+2W, ... in batches of ``batch_size``; nothing dropped.
    """

    def __init__(self, n: int, batch_size: int, *, world_size: int = 1, rank: int = 0, accumulate: int = 1,
                 seed: int = 0, shuffle: bool = True, positions: np.ndarray | None = None):
        self.n = int(n)
        self.b = int(batch_size)
        self.world = int(world_size)
        self.rank = int(rank)
        self.accumulate = int(accumulate)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.positions = np.arange(self.n) if positions is None else np.asarray(positions, np.int64)
        self.epoch = 0
        self.start_step = 0

    @property
    def global_batch(self) -> int:
        return self.b * self.world * self.accumulate

    def steps_per_epoch(self) -> int:
        return len(self.positions) // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = int(epoch)
        self.start_step = int(start_step)

    def permutation(self, epoch: int) -> np.ndarray:
        return self.positions[np.random.default_rng([self.seed, int(epoch)]).permutation(len(self.positions))]

    def __iter__(self) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        if not self.shuffle:
            mine = self.positions[self.rank::self.world]
            for i, s in enumerate(range(0, len(mine), self.b)):
                yield (self.epoch, i, self.rank), mine[s:s + self.b]
            return
        perm = self.permutation(self.epoch)
        G, K, b = self.global_batch, self.accumulate, self.b
        for step in range(self.start_step, self.steps_per_epoch()):
            g = perm[step * G:(step + 1) * G]
            for k in range(K):
                slot = self.rank * K + k
                yield (self.epoch, step, slot), g[slot * b:(slot + 1) * b]

    def __len__(self) -> int:
        if not self.shuffle:
            return -(-len(self.positions[self.rank::self.world]) // self.b)
        return (self.steps_per_epoch() - self.start_step) * self.accumulate


def make_loader(dataset: BatchDataset, sampler: StepSampler, *, num_workers: int = 0, pin_memory: bool = False,
                prefetch_factor: int = 4, persistent_workers: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over whole batches (``batch_size=None``: the sampler yields batch keys)."""
    kw = {}
    if num_workers > 0:
        kw = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers}
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers,
                                       pin_memory=pin_memory, **kw)
