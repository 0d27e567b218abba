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

from ..align.core import Aligner, BatchResult
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
    the aligner's levels (:meth:`Aligner.refine_hypotheses`); keep the best per particle."""
    F = torch.fft.rfft2(torch.as_tensor(np.asarray(images, dtype=np.float32)))
    part = np.arange(len(images)) if particle is None else np.asarray(particle, dtype=np.int64)
    return aligner.refine_hypotheses(F, ctf, ctf_mode, part, np.asarray(rotations, float), np.asarray(origins, float),
                                     np.asarray(amplitudes, float), keep)
