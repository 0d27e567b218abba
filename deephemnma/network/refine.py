"""HEMNMA's continuous refinement alone, seeded by the network (issue 16 item 3).

The network gives each particle one or a few pose + amplitude hypotheses (the decoded
rotation, and optionally the next distinct peaks of its SO(3) distribution); the
:class:`deephemnma.align.core.Aligner`'s coarse-to-fine L-BFGS refinement polishes them —
exactly the loop that follows the global search in ``Aligner.align`` — and keeps the best
scoring hypothesis per particle. No template bank is built.

:func:`distribution_peaks` picks the hypotheses: the top grid rotations of the predicted
distribution that are at least ``min_sep`` degrees apart (non-maximum suppression), each
replaced by its local weighted mean (:meth:`SO3Grid.decode`'s ``local`` rule).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..core import geometry
from ..align.core import Aligner, BatchResult, best_per_particle
from ..align.levels import LevelData, ctf_for_level
from ..align.refine import refine
from .so3 import SO3Grid, geodesic_cos


def distribution_peaks(grid: SO3Grid, logits: torch.Tensor, n_peaks: int = 2, min_sep: float = 30.0,
                       k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n_peaks`` rotations per particle (B, P, 3, 3) and their probabilities (B, P)
    (0 where fewer distinct peaks exist), best first."""
    prob = torch.softmax(logits.float(), 1)
    B = len(logits)
    rots = torch.zeros(B, n_peaks, 3, 3)
    mass = torch.zeros(B, n_peaks)
    p = prob.clone()
    cos_sep = math.cos(math.radians(min_sep))
    for j in range(n_peaks):
        best = p.argmax(1)
        mass[:, j] = p[torch.arange(B), best]
        rots[:, j] = grid.decode(torch.log(p.clamp_min(1e-30)), "local", k)
        near = geodesic_cos(grid.matrices[best], grid.matrices) > cos_sep          # (B, n)
        p = p.masked_fill(near, 0.0)
    return rots, mass


def polish(aligner: Aligner, images: np.ndarray, ctf, ctf_mode, rotations: np.ndarray, origins: np.ndarray,
           amplitudes: np.ndarray, particle: np.ndarray | None = None, keep: list | None = None) -> BatchResult:
    """Refine hypotheses (rotations (H,3,3), origins (H,2) Å, amplitudes (H,M); ``particle``
    (H,) index of each hypothesis' image, default one per image) of images (B, D, D) through
    the aligner's levels; keep the best per particle. ``keep[i]``: hypotheses per particle
    kept after level i (default: the aligner's candidates of the next level; 1 after the last).
    ``search_score``/``zscore`` are NaN."""
    s = aligner.settings
    B = len(images)
    img = torch.as_tensor(np.asarray(images, dtype=np.float32))
    F = torch.fft.rfft2(img)
    part = np.arange(B) if particle is None else np.asarray(particle, dtype=np.int64)
    R, o, q = np.asarray(rotations, float), np.asarray(origins, float), np.asarray(amplitudes, float)
    shift_bound = aligner.max_shift + 2 * aligner.search_level.pixel_size
    evaluations, res, sel = 0, None, None
    for li, lv in enumerate(aligner.levels):
        data = LevelData.build(F, ctf_for_level(ctf, ctf_mode, lv, B), lv)
        res = refine(aligner.models[lv.box], data, part, R, o, q, aligner.amp_bound, shift_bound,
                     max_iter=aligner.iterations[li], xtol=s.xtol)
        evaluations += res.evaluations
        if keep is not None and li < len(keep):
            k = int(keep[li])
        else:
            k = aligner.candidates[li + 1] if li + 1 < len(aligner.levels) else 1
        sel = best_per_particle(part, res.score, k)
        part, R, o, q = part[sel], res.rotations[sel], res.origins[sel], res.amplitudes[sel]
    order = np.argsort(part, kind="stable")
    part, R, o, q, final = part[order], R[order], o[order], q[order], sel[order]
    lv = aligner.levels[-1]
    with torch.no_grad():
        P = aligner.models[lv.box].project(torch.as_tensor(R, dtype=torch.float32),
                                           torch.as_tensor(o / lv.pixel_size, dtype=torch.float32),
                                           torch.as_tensor(q, dtype=torch.float32), lv.box, lv.pixel_size, lv.blur)
        sig = data.significance(P, torch.as_tensor(part)).double().numpy()
    bound = np.abs(q) >= 0.999 * aligner.amp_bound[None, :]
    nan = np.full(B, np.nan)
    return BatchResult(euler=geometry.matrix_to_euler(R), origins=o, amplitudes=q, score=res.score[final],
                       converged=res.converged[final], at_bound=bound.any(1), significance=sig, zscore=nan,
                       search_score=nan, iterations=res.iterations[final], evaluations=evaluations)
