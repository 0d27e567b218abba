"""Amortised HEMNMA: the grid network's answer, polished by HEMNMA's refinement, with a
fallback to full HEMNMA (issue 16 item 3; ``deephemnma predict`` with a grid checkpoint).

For each batch of particles of one STAR file (a shard of image set 2):

1. the network (:class:`.posenet.PoseNet`, averaged over ``turns`` quarter turns of each
   image) gives a distribution over the SO(3) grid, amplitudes and shifts; the
   ``hypotheses`` best distinct peaks of the distribution are the starting poses;
2. ``refine: local`` / ``fallback``: HEMNMA's continuous refinement alone (the
   :class:`deephemnma.align.Aligner`'s coarse-to-fine L-BFGS over pose and amplitudes, no
   global search) polishes every hypothesis and keeps the best-scoring one;
3. ``refine: fallback``: a particle whose refined score stays below ``fallback_score`` (a
   low quantile of set 1's HEMNMA scores) goes through full HEMNMA — global search and
   refinement — and is flagged (``dhnmaFlag`` bit 32).

Output: the input STAR with the columns HEMNMA writes (pose, amplitudes, ``dhnmaScore``,
``dhnmaConverged``, ``dhnmaFlag``) plus ``dhnmaNetworkConfidence`` (the network's largest
grid probability) and ``dhnmaNetworkAngleError`` (degrees between the network's answer and
the refined one: how far refinement moved it). Each finished batch is saved (resume after a
kill: :class:`deephemnma.core.resume.BatchProgress`); a summary JSON (counts, fallback
fraction, seconds per particle) is written beside the output.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..align import AlignSettings, Aligner
from ..align.model import load_model
from ..align.run import FORMAT_VERSION, _read_batch, align_batch, assemble_results, ctf_setup, progress_dir
from ..core import star as S
from ..core.errors import InputError
from ..core.fileio import atomic_write_json
from ..core.geometry import angular_error, matrix_to_euler
from ..core.logs import get_logger, progress
from ..core.resume import BatchProgress, fingerprint
from ..core.runtime import one_torch_thread
from .posenet import PoseNet, PoseNetConfig
from .refine import distribution_peaks, polish

log = get_logger(__name__)

REFINE_MODES = ("none", "local", "fallback")


def posenet_from_checkpoint(state: dict, device="cpu") -> PoseNet:
    """The grid network of a checkpoint, in eval mode on ``device``."""
    cfg = {k: v for k, v in state["model_config"].items() if k != "modes"}
    net = PoseNet(PoseNetConfig(**cfg))
    net.load_state_dict(state["model_state"])
    return net.to(device).eval()


@torch.no_grad()
def network_answers(net: PoseNet, images: np.ndarray, turns: int, hypotheses: int, device) -> dict:
    """Per particle: ``rotations`` (B, P, 3, 3) the distribution's best distinct peaks,
    ``probability`` (B, P), ``origins`` (B, 2) Å, ``amplitudes`` (B, M), ``confidence`` (B,)."""
    a = net.answers(torch.as_tensor(images, dtype=torch.float32, device=device)[:, None], turns)
    R, prob = distribution_peaks(net.grid, a["logits"], hypotheses)
    return {"rotations": R.double().cpu().numpy(), "probability": prob.double().cpu().numpy(),
            **{k: a[k].double().cpu().numpy() for k in ("origins", "amplitudes", "confidence")}}


class Amortiser:
    """Network → refinement → fallback for batches of one pixel size (see the module docstring)."""

    def __init__(self, net: PoseNet, aligner: Aligner, refine: str, hypotheses: int, turns: int,
                 fallback_score: float | None, min_significance: float | None, device):
        if refine not in REFINE_MODES:
            raise InputError(None, f"network.refine must be one of {', '.join(REFINE_MODES)}, got {refine!r}")
        self.net, self.aligner, self.refine = net, aligner, refine
        self.hypotheses, self.turns, self.device = max(1, int(hypotheses)), int(turns), device
        self.fallback_score, self.min_significance = fallback_score, min_significance

    def __call__(self, imgs: np.ndarray, unreadable: np.ndarray, params, modes: np.ndarray) -> dict:
        B, M = len(imgs), self.aligner.model.n_modes
        ans = network_answers(self.net, imgs, self.turns, self.hypotheses, self.device)
        top = ans["rotations"][:, 0]
        rec = {"euler": matrix_to_euler(top), "origins": ans["origins"], "amplitudes": ans["amplitudes"],
               "score": np.zeros(B), "significance": np.zeros(B), "converged": np.zeros(B, dtype=bool),
               "flag": np.where(unreadable, S.FLAG_BAD_IMAGE, 0).astype(np.int64),
               "confidence": ans["confidence"], "moved": np.zeros(B), "fallback": np.zeros(B, dtype=bool)}
        ok = np.flatnonzero(~unreadable)
        if self.refine == "none" or not ok.size:
            return rec
        keep = ans["probability"][ok] > 0
        part = np.repeat(np.arange(len(ok)), keep.sum(1))
        res = polish(self.aligner, imgs[ok], None if params is None else params[ok], modes[ok],
                     ans["rotations"][ok][keep], ans["origins"][ok][part], ans["amplitudes"][ok][part], part)
        self._store(rec, ok, res)
        rec["moved"][ok] = angular_error(top[ok], _matrices(res.euler))
        if self.refine == "fallback" and self.fallback_score is not None:
            low = ok[res.score < self.fallback_score]
            if low.size:
                full = align_batch(self.aligner, imgs[low], unreadable[low], None if params is None else params[low],
                                   modes[low], self.min_significance)
                for k in ("euler", "origins", "amplitudes", "score", "significance", "converged"):
                    rec[k][low] = full[k]
                rec["flag"][low] = full["flag"] | S.FLAG_FALLBACK
                rec["fallback"][low] = True
        return rec

    def _store(self, rec: dict, ok: np.ndarray, res) -> None:
        from ..align.run import FLAG_AT_BOUND

        for k in ("euler", "origins", "amplitudes", "score", "significance", "converged"):
            rec[k][ok] = getattr(res, k)
        fl = np.zeros(ok.size, dtype=np.int64)
        fl[~res.converged] |= S.FLAG_NOT_CONVERGED
        fl[res.at_bound] |= FLAG_AT_BOUND
        if self.min_significance is not None:
            fl[res.significance < self.min_significance] |= S.FLAG_JUNK
        rec["flag"][ok] |= fl


def _matrices(euler: np.ndarray) -> np.ndarray:
    from ..core.geometry import euler_to_matrix

    return euler_to_matrix(euler)


def fallback_threshold(reference_star, quantile: float) -> float | None:
    """The ``quantile`` of the HEMNMA scores of set 1 (``dhnmaScore`` of unflagged particles)."""
    if reference_star is None:
        return None
    t = S.read_star(reference_star).particles
    if S.SCORE not in t.columns:
        raise InputError(reference_star, "no _dhnmaScore column: give HEMNMA's output for image set 1")
    ok = t[S.FLAG].to_numpy() == 0 if S.FLAG in t.columns else np.ones(len(t), dtype=bool)
    scores = pd.to_numeric(t[S.SCORE], errors="coerce").to_numpy()[ok]
    scores = scores[np.isfinite(scores)]
    return float(np.quantile(scores, quantile)) if scores.size else None


def amortise_star(state: dict, particles, out, modes, align_settings: AlignSettings, *, refine: str = "fallback",
                  hypotheses: int = 2, turns: int = 4, fallback_score: float | None = None, data_dir=None,
                  batch_size: int = 64, device=None, checkpoint_id: str = "") -> dict:
    """Predict (and refine) every particle of ``particles`` with a grid checkpoint's network;
    write ``out`` (atomic, resumable per batch) and return a summary. On the CPU everything
    runs on one thread: the same bytes on any machine and thread count (shards run in
    parallel as jobs)."""
    device = device or torch.device("cpu")
    with one_torch_thread() if device.type == "cpu" else contextlib.nullcontext():
        return _amortise_star(state, particles, out, modes, align_settings, refine, hypotheses, turns,
                              fallback_score, data_dir, batch_size, device, checkpoint_id)


def _amortise_star(state, particles, out, modes, align_settings, refine, hypotheses, turns, fallback_score, data_dir,
                   batch_size, device, checkpoint_id) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    star = S.read_star(particles, data_dir=data_dir)
    table = S.merged(star)
    n = len(star)
    model = load_model(modes, select=state["model_config"].get("modes"))
    params, ctf_modes = ctf_setup(star, table, align_settings.ctf)
    px = S.pixel_sizes(star) if n else np.zeros(0)
    from ..core.mrc import ParticleImages

    images = ParticleImages.from_star(star, data_dir) if n else None
    box = images.box if n else state["data"]["box"]
    if n and (box != state["data"]["box"] or abs(float(np.median(px)) - state["data"]["pixel_size"]) > 1e-3 * px[0]):
        raise InputError(particles, f"these particles are {box}² pixels at {float(np.median(px)):.4g} Å/px but the "
                         f"network was trained on {state['data']['box']}² at {state['data']['pixel_size']:.4g} Å/px: "
                         "give the particles preprocessed the same way as the training set")
    net = posenet_from_checkpoint(state, device)
    fp = fingerprint({"refine": refine, "hypotheses": hypotheses, "turns": turns, "fallback": fallback_score,
                      "align": align_settings.as_dict(), "checkpoint": checkpoint_id, "format": FORMAT_VERSION},
                     table[S.IMAGE_NAME].astype(str).tolist() if n else [], arrays=[model.vectors, px])
    batches = [(a, min(n, a + batch_size)) for a in range(0, n, batch_size)]
    store = BatchProgress(progress_dir(out), fp, len(batches), FORMAT_VERSION)
    done = store.load()
    runners: dict[float, Amortiser] = {}
    todo = [b for b in range(len(batches)) if b not in done]
    bar = progress(total=sum(batches[b][1] - batches[b][0] for b in todo), desc="predict", unit="particle")
    for b in todo:
        idx = np.arange(*batches[b])
        imgs, unreadable = _read_batch(images, idx)
        p = float(px[idx][0])
        if p not in runners:
            runners[p] = Amortiser(net, Aligner(model, box, p, align_settings), refine, hypotheses, turns,
                                   fallback_score, align_settings.min_significance, device)
        rec = runners[p](imgs, unreadable, None if params is None else params[idx], ctf_modes[idx])
        store.save(b, rec)
        done[b] = rec
        bar.update(len(idx))
    bar.close()
    result = assemble_results(star, model, done, batches)
    cat = {k: np.concatenate([done[b][k] for b in range(len(batches))]) if batches else np.zeros(0)
           for k in ("confidence", "moved", "fallback")}
    result["dhnmaNetworkConfidence"] = cat["confidence"]
    result["dhnmaNetworkAngleError"] = cat["moved"]
    S.write_star(out, result, star.optics, source=star.path, data_dir=data_dir)
    store.clear()
    seconds = time.perf_counter() - t0
    summary = {"particles": n, "fallback": int(cat["fallback"].sum()),
               "fallback_fraction": float(cat["fallback"].mean()) if n else 0.0,
               "seconds": seconds, "seconds_per_particle": seconds / max(n, 1), "resumed_batches": len(batches) - len(todo),
               "settings": {"refine": refine, "hypotheses": hypotheses, "turns": turns, "fallback_score": fallback_score},
               "median_network_move_deg": float(np.median(cat["moved"])) if n and refine != "none" else None}
    atomic_write_json(out.with_suffix(".json"), summary)
    log.info("predicted %d particles (%s) in %.1f s; %d (%.1f %%) went through full HEMNMA", n, refine, seconds,
             summary["fallback"], 100 * summary["fallback_fraction"])
    return summary
