"""Particle preprocessing for any RELION data set: phase flip, downscale, normalise, split, chunk.

Per image (the paper's §3.1.3 order; every step configurable in the ``preprocess`` section):

1. **CTF phase flip** — the image's Fourier transform times sign(CTF), the CTF of that
   particle from its STAR row (optics merged; :func:`deephemnma.core.ctf.phase_flip`), at the
   input box and pixel size. Skipped for optics groups whose images are already phase
   flipped (``rlnCtfDataArePhaseFlipped`` = 1) or CTF-premultiplied
   (``rlnCtfDataAreCtfPremultiplied`` = 1: CTF² has no sign to correct).
2. **Antialias low-pass + downscale** by Fourier cropping ``D → d`` (``box``): a circular
   raised-cosine low-pass that reaches zero at ``1/lowpass_resolution`` (default: the new
   Nyquist frequency, 1/(2 · new pixel size) — the paper's 1.3 Å for 256² → 128² at
   0.325 Å), then the d² lowest frequencies are kept. The pixel size becomes
   ``pixel_size · D / d`` (optics table); shifts stay in Å and so need no change.
3. **Normalisation** as RELION: mean 0 and standard deviation 1 of the background, the
   pixels outside a circle of radius ``background_radius`` · d/2 (0.9).
4. Optional **contrast inversion** (dark particles → light, as RELION expects).

Then the particles are **split** into image set 1 (the HEMNMA / training subset: ``set1_size``
particles, or ``set1_fraction`` of them; a seeded uniform draw, no stratification) and image
set 2 (the rest), each kept in input order and cut into chunks (:func:`chunk_sizes`:
``chunk_size`` for set 1; for set 2 ``set2_chunk_size``, or ``chunk_size`` enlarged so that
set 2 has at most ``set2_max_chunks`` chunks). Stacks are float32, or float16 (MRC mode 12)
with ``dtype: float16``; readers get float32 either way.

Output tree (``DIR``)::

    DIR/set1/chunk_0000.star + chunk_0000.mrcs   a RELION 3.1 STAR per chunk (rlnImageName
    DIR/set1/chunk_0000.json                      → NNNNNN@chunk_0000.mrcs, beside it) + its
    DIR/set1/chunk_0001.star …                    stack; the .json records completion
    DIR/set2/chunk_0000.star …
    DIR/set1.star, DIR/set2.star                  every particle of the set (rlnImageName →
                                                  NNNNNN@set1/chunk_0000.mrcs, relative to DIR)
    DIR/preprocess.json                           manifest: counts, boxes, pixel sizes, chunks

Every input column is kept (the particle table and the optics table); ``rlnImageName`` is
rewritten, and two columns record where each image came from, so that later stages (the
per-group reconstructions) can go back to the original-size images and evaluations can
join a ground-truth table: ``dhnmaOriginalImageName`` (the input's ``rlnImageName``,
verbatim) and ``dhnmaOriginalPixelSize`` (Å). :func:`original_images` resolves the names as
the input STAR did (its path and the data directory are in the manifest as
``original_star`` / ``original_data_dir``). When the input already has these columns (a
preprocessed set preprocessed again) they are kept, and so are the manifest's
``original_star`` / ``original_data_dir``. (``rlnImageOriginalName`` is RELION's own label
for the extraction-time name and is left untouched.) In the optics table
``rlnImagePixelSize`` and ``rlnImageSize`` are updated and ``rlnCtfDataArePhaseFlipped`` is
set to 1 for the optics groups whose images were flipped.

Chunks are processed in parallel processes (each on one thread: same bytes whatever the
number of processes), each reading only its particles (positioned reads of the stacks) in batches
and writing its stack with :class:`deephemnma.core.mrc.StackWriter`: memory does not grow with
the number of particles. A chunk whose record exists with the same settings fingerprint is
not redone. :func:`plan_chunks` gives the chunk names from the particle count alone (for
Snakemake at parse time).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .core.errors import ConfigError, InputError
from .core.fileio import atomic_write_json
from .core.imageops import circular_mask, crop_spectrum, normalise_background, radial_frequency, raised_cosine
from .core.logs import get_logger, progress
from .core.parallel import run_in_processes
from .core.runtime import one_torch_thread
from .core.resume import chunk_done, fingerprint, write_record
from .core.settings import schema_settings
from .core.star import CTF_PHASE_FLIPPED as PHASE_FLIPPED, CTF_PREMULTIPLIED as PREMULTIPLIED
from .core.star import ORIGINAL_IMAGE_NAME as ORIGINAL_NAME, ORIGINAL_PIXEL_SIZE

log = get_logger(__name__)

STREAM_SPLIT = 11
SETS = ("set1", "set2")
FORMAT_VERSION = 1


@schema_settings("preprocess")
class PreprocessSettings:
    """The ``preprocess`` config section (defaults and meanings: the schema)."""

    phase_flip: bool
    box: int | None
    lowpass_resolution: float | None
    lowpass_width: float
    normalise: bool
    background_radius: float
    pixel_size: float | None
    set1_size: int | None
    set1_fraction: float | None
    chunk_size: int
    set2_chunk_size: int | None
    set2_max_chunks: int
    dtype: str
    batch_size: int
    workers: int | None
    seed: int | None

    def validate(self) -> None:
        if self.box is not None and (self.box % 2 or self.box < 8):
            raise ConfigError(f"preprocess.box must be even and ≥ 8, got {self.box}")
        if self.set1_fraction is not None and not 0 <= self.set1_fraction <= 1:
            raise ConfigError("preprocess.set1_fraction must be in [0, 1]")

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def fingerprint(self, extra: str = "") -> str:
        d = self.as_dict()
        # not in the bytes of a chunk: how many processes, batch size, and the set-2 chunk
        # sizing (a chunk's start and size are checked on their own); float32 is what every
        # stack was before the dtype setting existed
        for k in ("workers", "batch_size", "set2_chunk_size", "set2_max_chunks"):
            d.pop(k)
        if d["dtype"] == "float32":
            d.pop("dtype")
        return fingerprint(d, extra, FORMAT_VERSION)


# ---------------------------------------------------------------------------- planning
def split_sizes(n_particles: int, settings: PreprocessSettings) -> tuple[int, int]:
    """(n in set 1, n in set 2)."""
    n = int(n_particles)
    if settings.set1_fraction is not None:
        n1 = int(round(settings.set1_fraction * n))
    elif settings.set1_size is not None:
        n1 = min(int(settings.set1_size), n)
    else:
        n1 = n
    return n1, n - n1


def split_indices(n_particles: int, settings: PreprocessSettings) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (sorted, 0-based) of set 1 and set 2: a seeded uniform draw."""
    n1, _ = split_sizes(n_particles, settings)
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, STREAM_SPLIT]))
    perm = rng.permutation(int(n_particles))
    return np.sort(perm[:n1]), np.sort(perm[n1:])


def chunk_sizes(n_particles: int, settings: PreprocessSettings) -> tuple[int, int]:
    """Particles per chunk of (set 1, set 2). Set 1: ``chunk_size`` (one HEMNMA job each).
    Set 2 (one prediction shard each): ``set2_chunk_size``, or when it is null
    ``chunk_size`` enlarged to the smallest multiple of it that cuts set 2 into at most
    ``set2_max_chunks`` chunks — so that the job count stays in the hundreds at 10⁶
    particles (980 shards of 1,000 → 196 of 5,000) while small runs keep ``chunk_size``."""
    if settings.chunk_size < 1:
        raise ConfigError("preprocess.chunk_size must be ≥ 1")
    c1 = int(settings.chunk_size)
    if settings.set2_chunk_size is not None:
        if settings.set2_chunk_size < 1:
            raise ConfigError("preprocess.set2_chunk_size must be ≥ 1")
        return c1, int(settings.set2_chunk_size)
    if settings.set2_max_chunks < 1:
        raise ConfigError("preprocess.set2_max_chunks must be ≥ 1")
    _, n2 = split_sizes(n_particles, settings)
    per = -(-n2 // int(settings.set2_max_chunks))  # ceil: the smallest size giving ≤ max chunks
    return c1, c1 * max(1, -(-per // c1))


def plan_chunks(n_particles: int, config) -> list[dict]:
    """The chunks ``preprocess`` writes for ``n_particles`` particles, in order:
    ``{"set", "index", "name", "n", "star", "stack", "record"}`` (paths relative to the
    output directory; sizes: :func:`chunk_sizes`). ``config``: the whole config, its
    ``preprocess`` section or a :class:`PreprocessSettings`."""
    s = config if isinstance(config, PreprocessSettings) else PreprocessSettings.from_config(config)
    out = []
    for name, n, size in zip(SETS, split_sizes(n_particles, s), chunk_sizes(n_particles, s)):
        for k, a in enumerate(range(0, n, size)):
            base = f"{name}/chunk_{k:04d}"
            out.append({"set": name, "index": k, "name": base, "n": min(size, n - a),
                        "start": a, "star": base + ".star", "stack": base + ".mrcs", "record": base + ".json"})
    return out


# ---------------------------------------------------------------------------- image processing
def process_images(images, out_box: int | None, pixel_size, settings: PreprocessSettings, ctf=None,
                   flip=None, *, invert: bool = False, resample: tuple[int, int] | None = None) -> torch.Tensor:
    """Phase flip, low-pass, Fourier-crop, normalise and (optionally) invert a batch.

    ``images`` (B, D, D); ``pixel_size`` (B,) or scalar Å (input); ``ctf`` (B, D, D//2+1)
    rfft-layout CTFs (needed when ``flip`` has any true entry); ``flip`` (B,) bool.
    ``resample`` (D', m), for optics groups whose sampling differs from the output's: the
    flipped image is zero-padded to D' pixels and Fourier-cropped to m (pixel size
    px·D'/m), normalised, then centre-cropped or zero-padded to ``out_box``.
    Returns (B, d, d) float32.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images, dtype=torch.float32)
    B, D = x.shape[0], x.shape[-1]
    d = D if out_box is None else int(out_box)
    if resample is None and d > D:
        raise ValueError(f"cannot downscale {D} to a larger box {d}")
    px = torch.as_tensor(np.broadcast_to(np.asarray(pixel_size, dtype=np.float64), (B,)).copy())
    F = torch.fft.rfft2(x)
    if ctf is not None and flip is not None and np.any(flip):
        sgn = torch.sign(torch.as_tensor(ctf, dtype=torch.float32))
        keep = torch.as_tensor(np.asarray(flip, dtype=bool))
        F = F * torch.where(keep[:, None, None], sgn, torch.ones_like(sgn))
    if resample is not None:
        return _resampled(F, D, d, resample, settings, invert)
    if d != D or settings.lowpass_resolution is not None:
        if settings.lowpass_resolution is None:
            cutoff = torch.full((B,), d / 2.0, dtype=torch.float64)  # the new Nyquist, in Fourier pixels
        else:
            cutoff = D * px / settings.lowpass_resolution
        k = radial_frequency(D)
        filt = raised_cosine(k[None], cutoff[:, None, None], settings.lowpass_width)
        F = F * filt.to(torch.float32)
    if d != D:
        out = torch.fft.irfft2(crop_spectrum(F, d), s=(d, d)) * (d * d / (D * D))
    else:
        out = torch.fft.irfft2(F, s=(D, D))
    if settings.normalise:
        out = normalise_background(out, settings.background_radius * d / 2)
    if invert:
        out = -out
    return out.to(torch.float32)


def _resampled(F: torch.Tensor, D: int, d: int, resample: tuple[int, int], settings, invert: bool) -> torch.Tensor:
    """The resampling path of :func:`process_images`: pad D → D' (zeros around the image,
    less its background mean), low-pass at the new Nyquist, Fourier-crop D' → m, normalise
    by the background of the original field of view, crop or pad m → d."""
    Dp, m = (int(v) for v in resample)
    x = torch.fft.irfft2(F, s=(D, D))
    x = x - x[:, ~circular_mask(D, settings.background_radius * D / 2)].mean(-1)[:, None, None]
    if Dp > D:
        x = _crop_or_pad(x, Dp)
    G = torch.fft.rfft2(x)
    G = G * raised_cosine(radial_frequency(Dp)[None], torch.full((1,), m / 2.0, dtype=torch.float64)[:, None, None],
                          settings.lowpass_width).to(torch.float32)
    out = torch.fft.irfft2(crop_spectrum(G, m), s=(m, m)) * (m * m / (Dp * Dp))
    if settings.normalise:  # background: outside the usual circle, inside the original field of view
        side = D * m / Dp
        g = torch.arange(m, dtype=torch.float64) - m // 2
        inside = (g.abs()[:, None] <= side / 2) & (g.abs()[None, :] <= side / 2)
        ring = inside & ~circular_mask(m, settings.background_radius * side / 2)
        v = out[:, ring].to(torch.float64)
        out = ((out - v.mean(-1)[:, None, None]) / (v.std(-1, unbiased=False)[:, None, None] + 1e-12)).float()
        out = out * inside
    out = _crop_or_pad(out, d)
    return (-out if invert else out).to(torch.float32)


def _crop_or_pad(x: torch.Tensor, d: int) -> torch.Tensor:
    """Centre crop or zero-pad (B, m, m) images to (B, d, d), keeping pixel m//2 at d//2."""
    m = x.shape[-1]
    if m > d:
        a = m // 2 - d // 2
        return x[:, a:a + d, a:a + d]
    out = x.new_zeros((x.shape[0], d, d))
    a = d // 2 - m // 2
    out[:, a:a + m, a:a + m] = x
    return out


# ---------------------------------------------------------------------------- tables
def _flag(table: pd.DataFrame, col: str) -> np.ndarray:
    if col not in table.columns:
        return np.zeros(len(table), dtype=bool)
    v = pd.to_numeric(table[col], errors="coerce").fillna(0).to_numpy()
    return v != 0


def output_optics(optics: pd.DataFrame, pixel_out, out_box: int, flipped_groups: Sequence) -> pd.DataFrame:
    """The optics table of the output: every column kept, ``rlnImagePixelSize`` (``pixel_out``:
    one value, or one per optics group in table order) and ``rlnImageSize`` set, and
    ``rlnCtfDataArePhaseFlipped`` = 1 for the groups whose images were flipped."""
    from .core.star import IMAGE_PIXEL_SIZE, IMAGE_SIZE, OPTICS_GROUP

    o = optics.copy()
    o[IMAGE_PIXEL_SIZE] = np.broadcast_to(np.asarray(pixel_out, dtype=np.float64), (len(o),)).copy()
    o[IMAGE_SIZE] = int(out_box)
    if len(flipped_groups) and OPTICS_GROUP in o.columns:
        prev = _flag(o, PHASE_FLIPPED)
        o[PHASE_FLIPPED] = (prev | o[OPTICS_GROUP].isin(list(flipped_groups)).to_numpy()).astype(np.int64)
    return o


# ---------------------------------------------------------------------------- geometry
def _even(x: float) -> int:
    return max(2, 2 * int(round(x / 2.0)))


def _padded_size(D: int, ratio: float, tol: float = 2e-3) -> tuple[int, int]:
    """(D', m): the smallest even D' ≥ D (up to 2D) whose resampled size D'·ratio is within
    ``tol`` of an even integer m (else the closest found): resampling D' → m pixels then
    reaches the target pixel size to that precision."""
    best = None
    for Dp in range(D, 2 * D + 1, 2):
        m = _even(Dp * ratio)
        err = abs(Dp * ratio - m) / (Dp * ratio)
        if best is None or err < best[2] - 1e-12:
            best = (Dp, m, err)
        if err <= tol:
            break
    return best[0], best[1]


def output_geometry(boxes: np.ndarray, px: np.ndarray, settings: PreprocessSettings, source=None) -> dict:
    """Output box d, pixel size P and, per particle, how its image is resampled.

    One input geometry (box D, pixel size px): d = ``box`` (or D), P = px·D/d — plain
    Fourier cropping. Several (optics groups from different microscopes or sessions): P =
    ``pixel_size`` or the largest field of view px·D over d; each group's image is
    zero-padded to D' and Fourier-resampled to m pixels with px·D'/m within 0.2 % of P
    (:func:`_padded_size`), then cropped or padded to d (``resample``: (n, 2) of (D', m))."""
    fov = boxes * px
    if settings.box is not None and int(settings.box) > int(boxes.max()) and settings.pixel_size is None:
        raise InputError(source, f"images are {int(boxes.max())}² pixels, smaller than preprocess.box = {settings.box}")
    single = np.ptp(boxes) == 0 and np.ptp(px) <= 1e-6 * px.max()
    d = int(boxes[0]) if settings.box is None and single else int(settings.box or boxes.max())
    if settings.pixel_size is None and single:
        return {"box": d, "pixel_size": float(px[0] * (boxes[0] / d)), "resample": None, "single": True}
    P = float(settings.pixel_size) if settings.pixel_size is not None else float(fov.max() / d)
    plan = {}
    for D, p in set(zip(boxes.tolist(), px.tolist())):
        plan[(D, p)] = _padded_size(int(D), p / P)
        Dp, m = plan[(D, p)]
        log.info("optics group %d² × %.4g Å/px: resampled %d → %d pixels (%.5g Å/px, %+.2f %% from %.5g)",
                 D, p, Dp, m, p * Dp / m, 100 * (p * Dp / m / P - 1), P)
    resample = np.array([plan[(D, p)] for D, p in zip(boxes.tolist(), px.tolist())], dtype=np.int64)
    return {"box": d, "pixel_size": P, "resample": resample, "single": False}


# ---------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _worker_init(groups, settings: PreprocessSettings, out_box: int, optics: pd.DataFrame, invert: bool) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _WORKER.update(groups=groups, settings=settings, out_box=out_box, optics=optics, invert=invert)


def _read(groups: dict, box: np.ndarray, local: np.ndarray, pos: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Images of the chunk's particles ``pos`` as [(positions, images)], one entry per input box."""
    out = []
    for D in np.unique(box[pos]):
        sel = pos[box[pos] == D]
        images = groups[int(D)][1]
        out.append((sel, images.read(local[sel])))
        images.close()  # unmap after each batch: resident pages of the input stacks stay bounded
    return out


def _process_chunk(task: dict) -> dict:
    from .core.ctf import CTFParams, compute_ctf
    from .core.mrc import StackWriter
    from .core.star import IMAGE_NAME, write_star

    settings: PreprocessSettings = _WORKER["settings"]
    d: int = _WORKER["out_box"]
    out_dir = Path(task["out_dir"])
    spec, px, flip, resample = task["spec"], task["pixel_size"], task["flip"], task["resample"]
    n = len(px)
    t0 = time.perf_counter()
    with one_torch_thread(), StackWriter(out_dir / spec["stack"], n, d, task["pixel_out"],
                                                  dtype=settings.dtype) as w:
        for a in range(0, n, settings.batch_size):
            batch = np.empty((min(n, a + settings.batch_size) - a, d, d), dtype=np.float32)
            for j, x in _read(_WORKER["groups"], task["box"], task["local"], np.arange(a, min(n, a + settings.batch_size))):
                ctf = None
                if flip[j].any():
                    cp = CTFParams(**{k: v[j] for k, v in task["ctf"].items()})
                    ctf = torch.cat([compute_ctf(cp[i:i + 1], x.shape[-1], float(px[j][i])) for i in range(len(cp))]) \
                        if np.ptp(px[j]) > 0 else compute_ctf(cp, x.shape[-1], float(px[j][0]))
                if resample is None:
                    batch[j - a] = process_images(x, d, px[j], settings, ctf, flip[j], invert=_WORKER["invert"]).numpy()
                    continue
                for r in np.unique(resample[j], axis=0):  # one (D', m) per input geometry
                    q = np.flatnonzero((resample[j] == r).all(axis=1))
                    batch[j[q] - a] = process_images(x[q], d, px[j][q], settings, None if ctf is None else ctf[q],
                                                     flip[j][q], invert=_WORKER["invert"], resample=tuple(r)).numpy()
            w.append(batch)
    out = task["rows"].copy()
    stack_name = Path(spec["stack"]).name
    out[IMAGE_NAME] = [f"{i + 1:06d}@{stack_name}" for i in range(len(out))]
    write_star(out_dir / spec["star"], out, _WORKER["optics"])
    return write_record(out_dir / spec["record"], task["fingerprint"], **spec, seconds=time.perf_counter() - t0)


def _chunk_done(out_dir: Path, spec: dict, fp: str) -> bool:
    return chunk_done(out_dir / spec["record"], fp, [out_dir / spec["star"], out_dir / spec["stack"]],
                      n=spec["n"], start=spec["start"]) is not None


# ---------------------------------------------------------------------------- driver
class _Input:
    """The particles to preprocess: table, images grouped by box, pixel sizes, CTF plan."""

    def __init__(self, particles_star: Path, settings: PreprocessSettings, data_dir, pixel_size):
        from .core.mrc import ParticleImages
        from .core.star import merged, pixel_sizes, read_star

        self.path = particles_star
        self.star = star = read_star(particles_star, pixel_size=pixel_size, data_dir=data_dir)
        self.n = len(star)
        if self.n == 0:
            raise InputError(particles_star, "no particles")
        self.groups = ParticleImages.by_box(star, data_dir)
        self.box = np.empty(self.n, dtype=np.int64)
        self.local = np.empty(self.n, dtype=np.int64)  # index of each particle in its box group
        for D, (rows, images) in self.groups.items():
            if D % 2:
                raise InputError(images.files[int(images.file_idx[0])], f"odd box size {D} is not supported")
            images.validate()
            self.box[rows] = D
            self.local[rows] = np.arange(len(rows))
        self.px = pixel_sizes(star)
        self.table = merged(star)
        self.geometry = output_geometry(self.box, self.px, settings, particles_star)

    def ctf_plan(self, settings: PreprocessSettings):
        """(flip per particle, CTF columns or None, original CTF state per particle)."""
        from .core.ctf import CTFParams

        already, premult = _flag(self.table, PHASE_FLIPPED), _flag(self.table, PREMULTIPLIED)
        state = np.where(premult, 2, np.where(already, 1, 0)).astype(np.int64)
        flip = np.zeros(self.n, dtype=bool)
        ctf_cols = None
        if settings.phase_flip:
            if premult.any():
                log.warning("%d particles have CTF-premultiplied images: not phase flipped", int(premult.sum()))
            if already.any():
                log.info("%d particles are already phase flipped: not flipped again", int(already.sum()))
            flip = ~(already | premult)
            if flip.any():
                params = CTFParams.from_table(self.table, self.path)
                ctf_cols = {k: getattr(params, k) for k in params.__dataclass_fields__}
        return flip, ctf_cols, state


def _rows_with_origin(inp: _Input, flip: np.ndarray, state: np.ndarray, data_dir) -> tuple[pd.DataFrame, dict]:
    """The input rows with the columns that lead back to the original images (name, pixel
    size, CTF state) and the manifest's ``original_star`` / ``original_data_dir``."""
    from .core.star import IMAGE_NAME, ORIGINAL_CTF_STATE

    rows = inp.star.particles.copy()
    origin = {"original_star": str(inp.path.resolve()),
              "original_data_dir": None if data_dir is None else str(Path(data_dir).resolve())}
    if ORIGINAL_NAME not in rows.columns:
        rows[ORIGINAL_NAME] = rows[IMAGE_NAME].astype(str)
        rows[ORIGINAL_CTF_STATE] = state
    else:  # preprocessed before: the names refer to that run's input
        prev = _find_manifest(inp.path)
        if prev is not None:
            origin = {k: prev.get(k) for k in origin}
        else:
            log.warning("%s already has %s but no preprocess.json beside it: original_images() will resolve the "
                        "names against %s", inp.path, ORIGINAL_NAME, inp.path)
    if ORIGINAL_PIXEL_SIZE not in rows.columns:
        rows[ORIGINAL_PIXEL_SIZE] = inp.px
    if PHASE_FLIPPED in rows.columns:  # a per-particle flag (RELION 3.0) wins over the optics table's
        rows[PHASE_FLIPPED] = (_flag(rows, PHASE_FLIPPED) | flip).astype(np.int64)
    return rows, origin


def _polarity(inp: _Input, setting, reference, out_dir: Path, data_dir) -> dict:
    """The contrast decision for this input (``data.invert_contrast``), made once and kept in
    ``out_dir/polarity.json`` (per-chunk jobs share it). Particles written by a previous
    preprocess run are white already."""
    from .core.polarity import resolve_invert

    if ORIGINAL_NAME in inp.star.particles.columns:
        return {"invert": False, "setting": setting, "decision": "already preprocessed (white)"}
    fp = fingerprint(str(inp.path.resolve()), os.path.getsize(inp.path), str(setting),
                     str(reference) if reference is not None else None)
    cached = out_dir / "polarity.json"
    rec = chunk_done(cached, fp)
    if rec is not None:
        return {k: v for k, v in rec.items() if k != "fingerprint"}
    invert, decision = resolve_invert(setting, inp.path, reference, data_dir=data_dir, what="data.invert_contrast")
    doc = {"invert": bool(invert), "setting": setting,
           "decision": decision.as_dict() if decision is not None else "set in the configuration"}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_record(cached, fp, **doc)
    return doc


def preprocess_dataset(particles_star, out_dir, settings: PreprocessSettings, *, data_dir=None,
                       pixel_size: float | None = None, workers: int = 1, only: Sequence[str] | None = None,
                       invert=False, reference=None) -> dict:
    """Preprocess the particles of ``particles_star`` into ``out_dir`` (see the module
    docstring). ``only``: chunk names (e.g. ``"set1/chunk_0003"``) to process, the others
    being left alone (the per-set STARs and the manifest are then not written: a call
    without ``only`` writes them once every chunk is complete, without redoing any).
    ``invert``: ``data.invert_contrast`` (auto, true, false); ``reference``: what polarity
    detection compares the particles with (modes file, model, map or radius in Å).
    Returns the manifest (``{"complete": False, ...}`` when chunks remain)."""
    t0 = time.perf_counter()
    particles_star, out_dir = Path(particles_star), Path(out_dir)
    inp = _Input(particles_star, settings, data_dir, pixel_size)
    geo = inp.geometry
    flip, ctf_cols, state = inp.ctf_plan(settings)
    polarity = _polarity(inp, invert, reference, out_dir, data_dir)
    from .core.star import OPTICS_GROUP

    flipped_groups = sorted(set(inp.table[OPTICS_GROUP].to_numpy()[flip].tolist())) \
        if OPTICS_GROUP in inp.table.columns and flip.any() else []
    optics = output_optics(inp.star.optics, geo["pixel_size"], geo["box"], flipped_groups)
    rows, origin = _rows_with_origin(inp, flip, state, data_dir)
    plan = plan_chunks(inp.n, settings)
    sets = dict(zip(SETS, split_indices(inp.n, settings)))
    fp = settings.fingerprint(f"{particles_star.resolve()}|{inp.n}|{sorted(set(inp.box.tolist()))}|"
                              f"{os.path.getsize(particles_star)}|{polarity['invert']}")
    todo, done = _todo(plan, out_dir, fp, only)

    def task(spec: dict) -> dict:  # built only when submitted: the table is not copied whole
        idx = sets[spec["set"]][spec["start"]:spec["start"] + spec["n"]]
        (out_dir / spec["set"]).mkdir(parents=True, exist_ok=True)
        return {"spec": spec, "rows": rows.iloc[idx], "pixel_size": inp.px[idx], "flip": flip[idx],
                "box": inp.box[idx], "local": inp.local[idx],
                "resample": None if geo["resample"] is None else geo["resample"][idx],
                "pixel_out": geo["pixel_size"], "out_dir": str(out_dir), "fingerprint": fp,
                "ctf": None if ctf_cols is None else {k: v[idx] for k, v in ctf_cols.items()}}

    done += _run_chunks(todo, task, inp, settings, geo["box"], optics, polarity["invert"], workers)
    manifest = {
        "format_version": FORMAT_VERSION, "complete": len(set(done)) == len(plan),
        "input_star": str(particles_star.resolve()), **origin, "n_particles": inp.n,
        "box_in": sorted(set(int(b) for b in inp.box)) if not geo["single"] else int(inp.box[0]),
        "box_out": geo["box"], "pixel_size_in": sorted({float(v) for v in np.unique(inp.px)}),
        "pixel_size_out": [geo["pixel_size"]], "phase_flipped": int(flip.sum()), "polarity": polarity,
        "settings": settings.as_dict(), "fingerprint": fp, "chunks": plan, "seconds": time.perf_counter() - t0,
        "sets": {name: {"n": int(len(sets[name])), "star": f"{name}.star",
                        "chunks": [s["name"] for s in plan if s["set"] == name]} for name in SETS},
    }
    if not manifest["complete"]:
        log.info("%d of %d chunks complete; set STARs and manifest are written when all are", len(set(done)), len(plan))
        return manifest
    if only is not None:  # per-chunk jobs (a workflow): the index is written by one final call without ``only``
        manifest["complete"] = False
        log.info("chunks %s done; run without --chunks to write the set STARs and the manifest", ", ".join(only))
        return manifest
    _write_index(out_dir, rows, optics, sets, plan)
    atomic_write_json(out_dir / "preprocess.json", manifest)
    return manifest


def _todo(plan: list[dict], out_dir: Path, fp: str, only) -> tuple[list[dict], list[str]]:
    todo, done = [], []
    for spec in plan:
        if _chunk_done(out_dir, spec, fp):
            done.append(spec["name"])
        elif only is None or spec["name"] in only:
            todo.append(spec)
    if only is not None:
        unknown = set(only) - {s["name"] for s in plan}
        if unknown:
            raise ConfigError(f"unknown chunk name(s) {sorted(unknown)}; the plan has {plan[0]['name']} … {plan[-1]['name']}")
    if done:
        log.info("%d of %d chunks already complete: not redone", len(done), len(plan))
    return todo, done


def _run_chunks(todo, task, inp: _Input, settings, d: int, optics, invert: bool, workers: int) -> list[str]:
    """Process the chunks (in this process, or in worker processes); their names."""
    done = []
    n_todo = sum(s["n"] for s in todo)
    workers = max(1, min(int(workers), len(todo))) if todo else 1
    log.info("preprocessing %d particles (%d chunks) %s² → %d², %d worker process%s", n_todo, len(todo),
             "/".join(str(b) for b in sorted(inp.groups)), d, workers, "" if workers == 1 else "es")
    bar = progress(total=n_todo, desc="preprocess", unit="particle")
    init_args = (inp.groups, settings, d, optics, invert)
    if workers == 1:
        saved = dict(_WORKER)
        _worker_init(*init_args)
        try:
            for spec in todo:
                _process_chunk(task(spec))
                done.append(spec["name"])
                bar.update(spec["n"])
        finally:
            _WORKER.clear()
            _WORKER.update(saved)
    elif todo:
        for _, images in inp.groups.values():
            images.close()
        for rec in run_in_processes(_process_chunk, (task(s) for s in todo), workers, _worker_init, init_args):
            done.append(rec["name"])
            bar.update(rec["n"])
    bar.close()
    return done


def _write_index(out_dir: Path, rows: pd.DataFrame, optics: pd.DataFrame, sets: dict, plan: list[dict]) -> None:
    """set1.star and set2.star: every particle of the set, image names into the chunk stacks."""
    from .core.star import IMAGE_NAME, write_star

    for name in SETS:
        out = rows.iloc[sets[name]].copy()
        names = []
        for s in (s for s in plan if s["set"] == name):
            names.extend(f"{i + 1:06d}@{s['stack']}" for i in range(s["n"]))
        out[IMAGE_NAME] = names
        write_star(out_dir / f"{name}.star", out, optics)


# ---------------------------------------------------------------------------- back to the originals
def _find_manifest(star_path) -> dict | None:
    """The ``preprocess.json`` of a set STAR (beside it) or a chunk STAR (one level up)."""
    p = Path(star_path).resolve()
    for d in (p.parent, p.parent.parent):
        m = d / "preprocess.json"
        if m.is_file():
            try:
                return json.loads(m.read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


def original_images(star, manifest: dict | str | os.PathLike | None = None):
    """:class:`deephemnma.core.mrc.ParticleImages` of the ORIGINAL (full-size, unprocessed) images
    of the particles of a preprocessed STAR (``StarData`` or path), in its row order.

    ``dhnmaOriginalImageName`` holds each particle's ``rlnImageName`` verbatim as it was in
    the input STAR (so it is also the key of a ground-truth table); it is resolved as the
    input STAR resolved it, i.e. relative to ``original_star`` (and ``original_data_dir``)
    recorded in the manifest, which is found beside a set STAR or one level above a chunk
    STAR when not given. The original pixel size is ``dhnmaOriginalPixelSize``."""
    from .core.mrc import ParticleImages
    from .core.star import IMAGE_NAME, StarData, read_star

    if not isinstance(star, StarData):
        star = read_star(star)
    if ORIGINAL_NAME not in star.particles.columns:
        raise InputError(star.path, f"no _{ORIGINAL_NAME} column: not written by deephemnma preprocess")
    if manifest is None:
        manifest = _find_manifest(star.path)
        if manifest is None:
            raise InputError(star.path, "preprocess.json not found beside the STAR file (or one level up)")
    elif not isinstance(manifest, dict):
        manifest = json.loads(Path(manifest).read_text())
    orig = StarData(star.particles[[ORIGINAL_NAME]].rename(columns={ORIGINAL_NAME: IMAGE_NAME}), star.optics,
                    Path(manifest["original_star"]), star.version)
    return ParticleImages.from_star(orig, manifest.get("original_data_dir"))
