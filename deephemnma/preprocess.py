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
set 2 (the rest), each kept in input order and cut into chunks of ``chunk_size``.

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
number of processes), each reading only its particles (memory-mapped stacks) in batches
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
from .core.imageops import crop_spectrum, normalise_background, radial_frequency, raised_cosine
from .core.logs import get_logger, progress
from .core.parallel import run_in_processes
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
    invert_contrast: bool
    set1_size: int | None
    set1_fraction: float | None
    chunk_size: int
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
        for k in ("workers", "batch_size"):
            d.pop(k)
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


def plan_chunks(n_particles: int, config) -> list[dict]:
    """The chunks ``preprocess`` writes for ``n_particles`` particles, in order:
    ``{"set", "index", "name", "n", "star", "stack", "record"}`` (paths relative to the
    output directory). ``config``: the whole config, its ``preprocess`` section or a
    :class:`PreprocessSettings`."""
    s = config if isinstance(config, PreprocessSettings) else PreprocessSettings.from_config(config)
    if s.chunk_size < 1:
        raise ConfigError("preprocess.chunk_size must be ≥ 1")
    out = []
    for name, n in zip(SETS, split_sizes(n_particles, s)):
        for k, a in enumerate(range(0, n, s.chunk_size)):
            base = f"{name}/chunk_{k:04d}"
            out.append({"set": name, "index": k, "name": base, "n": min(s.chunk_size, n - a),
                        "start": a, "star": base + ".star", "stack": base + ".mrcs", "record": base + ".json"})
    return out


# ---------------------------------------------------------------------------- image processing
def process_images(images, out_box: int | None, pixel_size, settings: PreprocessSettings, ctf=None,
                   flip=None) -> torch.Tensor:
    """Phase flip, low-pass, Fourier-crop, normalise and (optionally) invert a batch.

    ``images`` (B, D, D); ``pixel_size`` (B,) or scalar Å (input); ``ctf`` (B, D, D//2+1)
    rfft-layout CTFs (needed when ``flip`` has any true entry); ``flip`` (B,) bool.
    Returns (B, d, d) float32.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images, dtype=torch.float32)
    B, D = x.shape[0], x.shape[-1]
    d = D if out_box is None else int(out_box)
    if d > D:
        raise ValueError(f"cannot downscale {D} to a larger box {d}")
    px = torch.as_tensor(np.broadcast_to(np.asarray(pixel_size, dtype=np.float64), (B,)).copy())
    F = torch.fft.rfft2(x)
    if ctf is not None and flip is not None and np.any(flip):
        sgn = torch.sign(torch.as_tensor(ctf, dtype=torch.float32))
        keep = torch.as_tensor(np.asarray(flip, dtype=bool))
        F = F * torch.where(keep[:, None, None], sgn, torch.ones_like(sgn))
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
    if settings.invert_contrast:
        out = -out
    return out.to(torch.float32)


# ---------------------------------------------------------------------------- tables
def _flag(table: pd.DataFrame, col: str) -> np.ndarray:
    if col not in table.columns:
        return np.zeros(len(table), dtype=bool)
    v = pd.to_numeric(table[col], errors="coerce").fillna(0).to_numpy()
    return v != 0


def output_optics(optics: pd.DataFrame, in_box: int, out_box: int, flipped_groups: Sequence) -> pd.DataFrame:
    """The optics table of the output: pixel size × D/d, image size d, phase-flip flag."""
    from .core.star import DETECTOR_PIXEL_SIZE, IMAGE_PIXEL_SIZE, IMAGE_SIZE, MAGNIFICATION, OPTICS_GROUP

    o = optics.copy()
    scale = in_box / out_box
    if IMAGE_PIXEL_SIZE in o.columns:
        o[IMAGE_PIXEL_SIZE] = o[IMAGE_PIXEL_SIZE].astype(float) * scale
    elif MAGNIFICATION in o.columns and DETECTOR_PIXEL_SIZE in o.columns:
        o[IMAGE_PIXEL_SIZE] = o[DETECTOR_PIXEL_SIZE].astype(float) * 1e4 / o[MAGNIFICATION].astype(float) * scale
    o[IMAGE_SIZE] = int(out_box)
    if len(flipped_groups) and OPTICS_GROUP in o.columns:
        prev = _flag(o, PHASE_FLIPPED)
        o[PHASE_FLIPPED] = (prev | o[OPTICS_GROUP].isin(list(flipped_groups)).to_numpy()).astype(np.int64)
    return o


# ---------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _worker_init(images, settings: PreprocessSettings, out_box: int, optics: pd.DataFrame) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _WORKER.update(images=images, settings=settings, out_box=out_box, optics=optics)


def _process_chunk(task: dict) -> dict:
    from .core.ctf import CTFParams, compute_ctf
    from .core.mrc import StackWriter
    from .core.star import IMAGE_NAME, write_star

    images = _WORKER["images"]
    settings: PreprocessSettings = _WORKER["settings"]
    d: int = _WORKER["out_box"]
    optics: pd.DataFrame = _WORKER["optics"]
    out_dir = Path(task["out_dir"])
    spec = task["spec"]
    idx = task["indices"]
    rows: pd.DataFrame = task["rows"]
    px = task["pixel_size"]
    flip = task["flip"]
    ctf_cols = task["ctf"]
    t0 = time.perf_counter()
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with StackWriter(out_dir / spec["stack"], len(idx), d, float(px[0] * images.box / d) if len(px) else 1.0) as w:
            for a in range(0, len(idx), settings.batch_size):
                sl = slice(a, a + settings.batch_size)
                x = images.read(idx[sl])
                images.close()  # unmap after each batch: resident pages of the input stacks stay bounded
                ctf = None
                if flip[sl].any():
                    cp = CTFParams(**{k: v[sl] for k, v in ctf_cols.items()})
                    ctf = torch.cat([compute_ctf(cp[j:j + 1], x.shape[-1], float(px[sl][j])) for j in range(len(cp))]) \
                        if np.ptp(px[sl]) > 0 else compute_ctf(cp, x.shape[-1], float(px[sl][0]))
                w.append(process_images(x, d, px[sl], settings, ctf, flip[sl]).numpy())
    finally:
        torch.set_num_threads(prev)
        images.close()
    out = rows.copy()
    stack_name = Path(spec["stack"]).name
    out[IMAGE_NAME] = [f"{i + 1:06d}@{stack_name}" for i in range(len(out))]
    write_star(out_dir / spec["star"], out, optics)
    return write_record(out_dir / spec["record"], task["fingerprint"], **spec, seconds=time.perf_counter() - t0)


def _chunk_done(out_dir: Path, spec: dict, fp: str) -> bool:
    return chunk_done(out_dir / spec["record"], fp, [out_dir / spec["star"], out_dir / spec["stack"]],
                      n=spec["n"], start=spec["start"]) is not None


# ---------------------------------------------------------------------------- driver
def preprocess_dataset(particles_star, out_dir, settings: PreprocessSettings, *, data_dir=None,
                       pixel_size: float | None = None, workers: int = 1, only: Sequence[str] | None = None) -> dict:
    """Preprocess the particles of ``particles_star`` into ``out_dir`` (see the module
    docstring). ``only``: chunk names (e.g. ``"set1/chunk_0003"``) to process, the others
    being left alone (the per-set STARs and the manifest are then not written: a call
    without ``only`` writes them once every chunk is complete, without redoing any). Returns the manifest (``{"complete": False, ...}`` when chunks remain)."""
    from .core.ctf import CTFParams
    from .core.mrc import ParticleImages
    from .core.star import IMAGE_NAME, OPTICS_GROUP, image_locations, merged, pixel_sizes, read_star, write_star

    t0 = time.perf_counter()
    particles_star = Path(particles_star)
    out_dir = Path(out_dir)
    star = read_star(particles_star, pixel_size=pixel_size, data_dir=data_dir)
    n = len(star)
    if n == 0:
        raise InputError(particles_star, "no particles")
    files, file_idx, image_idx = image_locations(star, data_dir)
    images = ParticleImages(files, file_idx, image_idx, star_path=star.path)
    images.validate()
    D = images.box
    d = D if settings.box is None else int(settings.box)
    if d > D:
        raise InputError(particles_star, f"images are {D}² pixels, smaller than preprocess.box = {d}")
    if D % 2:
        raise InputError(particles_star, f"odd box size {D} is not supported")
    px = pixel_sizes(star)
    table = merged(star)

    flip = np.zeros(n, dtype=bool)
    ctf_cols = None
    if settings.phase_flip:
        already = _flag(table, PHASE_FLIPPED)
        premult = _flag(table, PREMULTIPLIED)
        if premult.any():
            log.warning("%d particles have CTF-premultiplied images: not phase flipped", int(premult.sum()))
        if already.any():
            log.info("%d particles are already phase flipped: not flipped again", int(already.sum()))
        flip = ~(already | premult)
        if flip.any():
            params = CTFParams.from_table(table, particles_star)
            ctf_cols = {k: getattr(params, k) for k in params.__dataclass_fields__}
    flipped_groups = sorted(set(table[OPTICS_GROUP].to_numpy()[flip].tolist())) \
        if OPTICS_GROUP in table.columns and flip.any() else []
    optics = output_optics(star.optics, D, d, flipped_groups)

    rows = star.particles.copy()
    origin = {"original_star": str(particles_star.resolve()),
              "original_data_dir": None if data_dir is None else str(Path(data_dir).resolve())}
    if ORIGINAL_NAME not in rows.columns:
        rows[ORIGINAL_NAME] = rows[IMAGE_NAME].astype(str)
    else:  # preprocessed before: the names refer to that run's input
        prev = _find_manifest(particles_star)
        if prev is not None:
            origin = {k: prev.get(k) for k in origin}
        else:
            log.warning("%s already has %s but no preprocess.json beside it: original_images() will resolve the "
                        "names against %s", particles_star, ORIGINAL_NAME, particles_star)
    if ORIGINAL_PIXEL_SIZE not in rows.columns:
        rows[ORIGINAL_PIXEL_SIZE] = px

    plan = plan_chunks(n, settings)
    sets = dict(zip(SETS, split_indices(n, settings)))
    fp = settings.fingerprint(f"{particles_star.resolve()}|{n}|{D}|{os.path.getsize(particles_star)}")
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

    def task(spec: dict) -> dict:  # built only when submitted: the table is not copied whole
        idx = sets[spec["set"]][spec["start"]:spec["start"] + spec["n"]]
        (out_dir / spec["set"]).mkdir(parents=True, exist_ok=True)
        return {"spec": spec, "indices": idx, "rows": rows.iloc[idx], "pixel_size": px[idx], "flip": flip[idx],
                "ctf": None if ctf_cols is None else {k: v[idx] for k, v in ctf_cols.items()},
                "out_dir": str(out_dir), "fingerprint": fp}

    n_todo = sum(s["n"] for s in todo)
    workers = max(1, min(int(workers), len(todo))) if todo else 1
    log.info("preprocessing %d particles (%d chunks) %d² → %d², %d worker process%s", n_todo, len(todo), D, d,
             workers, "" if workers == 1 else "es")
    bar = progress(total=n_todo, desc="preprocess", unit="particle")
    if workers == 1:
        saved = dict(_WORKER)
        _worker_init(images, settings, d, optics)
        try:
            for spec in todo:
                _process_chunk(task(spec))
                done.append(spec["name"])
                bar.update(spec["n"])
        finally:
            _WORKER.clear()
            _WORKER.update(saved)
    elif todo:
        images.close()
        for rec in run_in_processes(_process_chunk, (task(s) for s in todo), workers, _worker_init,
                                    (images, settings, d, optics)):
            done.append(rec["name"])
            bar.update(rec["n"])
    bar.close()

    complete = len(set(done)) == len(plan)
    manifest = {
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "input_star": str(particles_star.resolve()),
        **origin,
        "n_particles": n,
        "box_in": D,
        "box_out": d,
        "pixel_size_in": sorted({float(v) for v in np.unique(px)}),
        "pixel_size_out": sorted({float(v) * D / d for v in np.unique(px)}),
        "phase_flipped": int(flip.sum()),
        "settings": settings.as_dict(),
        "fingerprint": fp,
        "sets": {},
        "chunks": plan,
        "seconds": time.perf_counter() - t0,
    }
    for name in SETS:
        spec_set = [s for s in plan if s["set"] == name]
        manifest["sets"][name] = {"n": int(len(sets[name])), "star": f"{name}.star",
                                  "chunks": [s["name"] for s in spec_set]}
    if not complete:
        log.info("%d of %d chunks complete; set STARs and manifest are written when all are", len(set(done)), len(plan))
        return manifest
    if only is not None:  # per-chunk jobs (a workflow): the index is written by one final call without ``only``
        manifest["complete"] = False
        log.info("chunks %s done; run without --chunks to write the set STARs and the manifest", ", ".join(only))
        return manifest
    for name in SETS:
        idx = sets[name]
        out = rows.iloc[idx].copy()
        names = []
        for s in (s for s in plan if s["set"] == name):
            names.extend(f"{i + 1:06d}@{s['stack']}" for i in range(s["n"]))
        out[IMAGE_NAME] = names
        write_star(out_dir / f"{name}.star", out, optics)
    atomic_write_json(out_dir / "preprocess.json", manifest)
    return manifest


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
