"""Align one chunk of particles: read, align in batches with resumable progress, write the STAR.

Output
------
The input STAR (RELION 3.0–5; written back as RELION 3.1+ with its optics table) with every
input column kept and these columns set (replaced when present):

=================================  ==========================================================
``rlnAngleRot/Tilt/Psi``           orientation, degrees (RELION ZYZ)
``rlnOriginXAngst/YAngst``         origin, Å (particle centre = image centre − origin)
``dhnmaAmplitudeNNN``              amplitude of normal mode NNN, one column per selected mode
``dhnmaScore``                     final similarity: band-limited normalised cross-correlation
                                   of model and image at the finest level, in [−1, 1]
``dhnmaConverged``                 1 if the finest-level refinement converged, else 0
``dhnmaFlag``                      bit flags (0 = fine), below
=================================  ==========================================================

Flags: :data:`~deephemnma.core.star.FLAG_NOT_CONVERGED` (1) the refinement was still moving at
its iteration limit; :data:`~deephemnma.core.star.FLAG_JUNK` (2) junk: the score is not
significantly above what pure noise reaches (``significance`` below ``align.min_significance``);
:data:`~deephemnma.core.star.FLAG_BAD_IMAGE` (4) empty (constant) or unreadable image, not aligned
(zero pose and amplitudes, score 0); :data:`~deephemnma.core.star.FLAG_AT_BOUND` (8) an amplitude reached its bound.

Resume
------
Particles are aligned in fixed batches of ``batch_size`` in STAR order. Each finished batch is
saved atomically as ``<out>.progress/batch_NNNNNN.npz`` beside a ``state.json`` holding a
fingerprint of everything that determines the results (settings, mode set, particle names,
CTF, pixel sizes, box, thread count, code version). A rerun with the same fingerprint loads
the finished batches and aligns only the rest; a different fingerprint discards the progress.
A batch's results depend only on its own images and the fixed settings, so a resumed run
writes the same bytes as an uninterrupted one. The STAR is written atomically once all
batches are done, then the progress directory is removed.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..core import star as S
from ..core.ctf import CTFParams
from ..core.errors import ConfigError, InputError
from ..core.logs import get_logger, progress
from ..core.resume import BatchProgress, fingerprint
from .core import AlignSettings, Aligner, BatchResult
from .levels import CTF_FLIPPED, CTF_NONE, CTF_PREMULTIPLIED, CTF_RAW
from .model import ElasticModel, load_model

log = get_logger(__name__)

#: dhnmaFlag bit: an amplitude reached its bound (``align.max_amplitude_rmsd``)
FLAG_AT_BOUND = S.FLAG_AT_BOUND
FORMAT_VERSION = 1
PHASE_FLIPPED_COLUMN = "rlnCtfDataArePhaseFlipped"
CTF_MODES = ("auto", CTF_RAW, CTF_FLIPPED, CTF_PREMULTIPLIED, CTF_NONE)


def progress_dir(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".progress")


def _flag_column(table: pd.DataFrame, col: str) -> np.ndarray:
    if col not in table.columns:
        return np.zeros(len(table), dtype=bool)
    v = pd.to_numeric(table[col], errors="coerce").fillna(0).to_numpy()
    return v.astype(float) != 0


def ctf_setup(star: S.StarData, table: pd.DataFrame, mode: str) -> tuple[CTFParams | None, np.ndarray]:
    """CTF parameters (or None) and the per-particle CTF handling mode."""
    if mode not in CTF_MODES:
        raise ConfigError(f"align.ctf must be one of {', '.join(CTF_MODES)}, got {mode!r}")
    n = len(table)
    if mode == CTF_NONE:
        return None, np.full(n, CTF_NONE, dtype=object)
    have = all(c in table.columns for c in S.CTF_COLUMNS)
    if not have:
        if mode == "auto":
            log.warning("%s: no CTF columns: aligning without a CTF", star.path)
            return None, np.full(n, CTF_NONE, dtype=object)
        S.require_columns(table, S.CTF_COLUMNS, f"align.ctf = {mode}")
    params = CTFParams.from_table(table, star.path)
    if mode != "auto":
        return params, np.full(n, mode, dtype=object)
    modes = np.full(n, CTF_RAW, dtype=object)
    modes[_flag_column(table, PHASE_FLIPPED_COLUMN)] = CTF_FLIPPED
    modes[_flag_column(table, S.CTF_PREMULTIPLIED)] = CTF_PREMULTIPLIED
    return params, modes


def _fingerprint(settings: AlignSettings, model: ElasticModel, table: pd.DataFrame, params, modes, px, box,
                 threads: int, seed: int, invert: bool = False) -> str:
    """Everything that determines a batch's results (resume.fingerprint)."""
    names = table[S.IMAGE_NAME].astype(str).tolist() if S.IMAGE_NAME in table.columns else []
    return fingerprint({"settings": settings.as_dict(), "version": __version__, "format": FORMAT_VERSION,
                        "threads": int(threads), "seed": int(seed), "box": int(box), "invert": bool(invert)}, names, [str(m) for m in modes],
                       arrays=[model.coords, model.weights, model.sigma, model.vectors, model.mode_numbers,
                               np.asarray(px, float), *(params.to_columns().values() if params is not None else [])])


def _is_nan_error(exc: InputError) -> bool:
    return "NaN or Inf" in str(exc)


def _read_batch(images, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images of ``idx`` and a mask of unusable ones: images with NaN/Inf pixels are
    returned as zeros and flagged (other read errors, e.g. a missing stack, are raised)."""
    try:
        return images.read(idx), np.zeros(len(idx), dtype=bool)
    except InputError as exc:
        if not _is_nan_error(exc):
            raise
    out = np.zeros((len(idx), images.box, images.box), dtype=np.float32)
    bad = np.zeros(len(idx), dtype=bool)
    for j, i in enumerate(idx):
        try:
            out[j] = images.read([int(i)])[0]
        except InputError as exc:
            if not _is_nan_error(exc):
                raise
            log.warning("%s: not aligned", exc)
            bad[j] = True
    return out, bad


def align_batch(aligner: Aligner, imgs: np.ndarray, unreadable: np.ndarray, params: CTFParams | None,
                modes: np.ndarray, min_significance: float | None) -> dict:
    """Align one batch; returns the arrays saved in a batch record."""
    n = len(imgs)
    M = aligner.model.n_modes
    flat = imgs.reshape(n, -1).astype(np.float64)
    empty = unreadable | ~(flat.std(axis=1) > 1e-8 * (np.abs(flat).max(axis=1) + 1e-30))
    rec = {
        "euler": np.zeros((n, 3)), "origins": np.zeros((n, 2)), "amplitudes": np.zeros((n, M)),
        "score": np.zeros(n), "significance": np.zeros(n), "converged": np.zeros(n, dtype=bool),
        "flag": np.zeros(n, dtype=np.int64),
    }
    rec["flag"][empty] |= S.FLAG_BAD_IMAGE
    ok = np.flatnonzero(~empty)
    if ok.size:
        res: BatchResult = aligner.align(imgs[ok], None if params is None else params[ok], modes[ok])
        rec["euler"][ok] = res.euler
        rec["origins"][ok] = res.origins
        rec["amplitudes"][ok] = res.amplitudes
        rec["score"][ok] = res.score
        rec["significance"][ok] = res.significance
        rec["converged"][ok] = res.converged
        fl = np.zeros(ok.size, dtype=np.int64)
        fl[~res.converged] |= S.FLAG_NOT_CONVERGED
        fl[res.at_bound] |= FLAG_AT_BOUND
        if min_significance is not None:
            fl[res.significance < min_significance] |= S.FLAG_JUNK
        rec["flag"][ok] |= fl
    return rec


def align_star(particles, modes_path, out, settings: AlignSettings | None = None, *, data_dir=None,
               pixel_size: float | None = None, seed: int = 0, threads: int | None = None,
               stop_after: int | None = None, invert=False) -> dict:
    """Align every particle of ``particles`` (STAR) against the mode set ``modes_path`` and
    write ``out`` (see the module docstring). ``invert``: the contrast setting
    (``data.invert_contrast``) for images that did not come through ``deephemnma preprocess``
    (those are white already). ``stop_after``: stop after that many new batches without
    writing the output (for tests of the resume mechanics). Returns a summary."""
    from ..core.mrc import ParticleImages

    settings = settings or AlignSettings()
    t0 = time.perf_counter()
    out = Path(out)
    threads = int(threads or torch.get_num_threads())
    star = S.read_star(particles, pixel_size=pixel_size, data_dir=data_dir)
    n = len(star)
    table = S.merged(star)
    model = load_model(modes_path, select=settings.modes, atom_sigma=settings.atom_sigma)
    if model.n_atoms == 0:
        raise InputError(modes_path, "the mode set has no atoms")
    params, modes = ctf_setup(star, table, settings.ctf)
    px = S.pixel_sizes(star) if n else np.zeros(0)
    images = ParticleImages.from_star(star, data_dir) if n else None
    if images is not None:
        images.validate()  # every stack exists and is consistent before any work
    box = images.box if n else 0
    if n and box % 2:
        raise InputError(star.path, f"odd box size {box} is not supported")
    polarity = _polarity(star, invert, model, data_dir) if n else {"invert": False}
    fp = _fingerprint(settings, model, table, params, modes, px, box, threads, seed, polarity["invert"])
    bs = max(1, int(settings.batch_size))
    batches = [(a, min(n, a + bs)) for a in range(0, n, bs)]
    progress_files = BatchProgress(progress_dir(out), fp, len(batches), FORMAT_VERSION)
    done = progress_files.load()
    if done:
        log.info("resuming %s: %d of %d batches already done", out, len(done), len(batches))
    run = _Batches(model, box, settings, images, params, modes, px, polarity["invert"])
    new = 0
    todo = [b for b in range(len(batches)) if b not in done]
    bar = progress(total=sum(batches[b][1] - batches[b][0] for b in todo), desc="align", unit="particle")
    for b in todo:
        if stop_after is not None and new >= stop_after:
            bar.close()
            return {"complete": False, "batches_done": len(done), "batches": len(batches)}
        rec = run(np.arange(*batches[b]))
        progress_files.save(b, rec)
        done[b] = rec
        new += 1
        bar.update(batches[b][1] - batches[b][0])
    bar.close()
    result = assemble_results(star, model, done, batches)
    summary = _summary(result, n, len(batches), new, t0, threads, model, modes, polarity)
    _check_flagged(summary, settings, star.path, polarity)
    # written atomically; relative image paths rebased to resolve from the output's directory
    S.write_star(out, result, star.optics, source=star.path, data_dir=data_dir)
    progress_files.clear()
    log.info("aligned %d particles in %.1f s (%d batches, %d resumed); flags: %s", n, summary["seconds"],
             len(batches), summary["resumed_batches"], summary["flagged"])
    return summary


def _polarity(star: S.StarData, invert, model: ElasticModel, data_dir) -> dict:
    """Whether to negate the images: never for particles written by ``deephemnma preprocess``
    (white by construction); else ``data.invert_contrast`` (auto: detected against the model)."""
    from ..core.polarity import resolve_invert

    if S.ORIGINAL_IMAGE_NAME in star.particles.columns:
        return {"invert": False, "decision": "preprocessed by deephemnma (white)"}
    inv, decision = resolve_invert(invert, star.path, model, data_dir=data_dir, what="data.invert_contrast")
    return {"invert": bool(inv), "decision": decision.as_dict() if decision is not None else "set in the configuration"}


class _Batches:
    """Aligns one batch of particles (rows of the STAR) with one Aligner per pixel size."""

    def __init__(self, model, box, settings, images, params, modes, px, invert: bool):
        self.model, self.box, self.settings, self.images = model, box, settings, images
        self.params, self.modes, self.px, self.invert = params, modes, px, invert
        self.aligners: dict[float, Aligner] = {}

    def __call__(self, idx: np.ndarray) -> dict:
        imgs, unreadable = _read_batch(self.images, idx)
        if self.invert:
            imgs = -imgs
        parts = []
        for p in np.unique(self.px[idx]):
            sel = np.flatnonzero(self.px[idx] == p)
            if float(p) not in self.aligners:
                self.aligners[float(p)] = Aligner(self.model, self.box, float(p), self.settings)
            r = align_batch(self.aligners[float(p)], imgs[sel], unreadable[sel],
                            None if self.params is None else self.params[idx[sel]], self.modes[idx[sel]],
                            self.settings.min_significance)
            parts.append((sel, r))
        rec = {k: np.zeros((len(idx),) + v.shape[1:], dtype=v.dtype) for k, v in parts[0][1].items()}
        for sel, r in parts:
            for k, v in r.items():
                rec[k][sel] = v
        return rec


def _summary(result: pd.DataFrame, n: int, n_batches: int, new: int, t0: float, threads: int, model, modes,
             polarity: dict) -> dict:
    flags = result[S.FLAG].to_numpy() if n else np.zeros(0, dtype=np.int64)
    return {
        "particles": n, "batches": n_batches, "resumed_batches": n_batches - new,
        "seconds": time.perf_counter() - t0, "threads": threads,
        "modes": [int(m) for m in model.mode_numbers],
        "ctf_modes": {str(k): int(v) for k, v in zip(*np.unique(modes.astype(str), return_counts=True))} if n else {},
        "flagged": {name: int(((flags & bit) != 0).sum()) for name, bit in
                    (("not_converged", S.FLAG_NOT_CONVERGED), ("junk", S.FLAG_JUNK),
                     ("bad_image", S.FLAG_BAD_IMAGE), ("at_bound", FLAG_AT_BOUND))},
        "unusable": int(((flags & (S.FLAG_JUNK | S.FLAG_BAD_IMAGE)) != 0).sum()),
        "mean_score": float(result[S.SCORE].mean()) if n else None,
        "polarity": polarity,
    }


def _check_flagged(summary: dict, settings: AlignSettings, source, polarity: dict) -> None:
    """Stop loudly when most particles are junk or unreadable: something about the input is wrong."""
    n, bad = summary["particles"], summary["unusable"]
    if n == 0 or bad <= settings.max_flagged_fraction * n:
        return
    pol = polarity.get("decision")
    pol_txt = pol.get("polarity") if isinstance(pol, dict) else pol
    raise InputError(source, f"{bad} of {n} particles aligned as junk or unreadable ({summary['flagged']['junk']} "
                             f"junk, {summary['flagged']['bad_image']} bad images; more than align.max_flagged_fraction "
                             f"{settings.max_flagged_fraction:g}): check the contrast polarity (data.invert_contrast; "
                             f"images {'negated' if polarity['invert'] else 'as read'}, {pol_txt}), the pixel size, "
                             "the box and centring, the reference and the defocus sign")


def assemble_results(star: S.StarData, model: ElasticModel, done: dict, batches: list) -> pd.DataFrame:
    """The input table with the batches' results as HEMNMA's columns (pose, amplitudes, score, flags)."""
    p = star.particles.copy()
    n = len(p)
    M = model.n_modes
    cat = {k: (np.concatenate([done[b][k] for b in range(len(batches))]) if batches else None)
           for k in ("euler", "origins", "amplitudes", "score", "converged", "flag")}
    if not batches:
        cat = {"euler": np.zeros((0, 3)), "origins": np.zeros((0, 2)), "amplitudes": np.zeros((0, M)),
               "score": np.zeros(0), "converged": np.zeros(0, dtype=bool), "flag": np.zeros(0, dtype=np.int64)}
    cols = {
        S.ANGLE_ROT: cat["euler"][:, 0], S.ANGLE_TILT: cat["euler"][:, 1], S.ANGLE_PSI: cat["euler"][:, 2],
        S.ORIGIN_X_ANGST: cat["origins"][:, 0], S.ORIGIN_Y_ANGST: cat["origins"][:, 1],
    }
    for k, m in enumerate(model.mode_numbers):
        cols[S.amplitude_column(int(m))] = cat["amplitudes"][:, k]
    cols[S.SCORE] = cat["score"].astype(np.float64)
    cols[S.CONVERGED] = cat["converged"].astype(np.int64)
    cols[S.FLAG] = cat["flag"].astype(np.int64)
    for c, v in cols.items():
        p[c] = np.asarray(v).reshape(n)
    return p
