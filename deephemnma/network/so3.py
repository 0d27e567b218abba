"""Orientation as a distribution over a discrete SO(3) grid (issue 16).

Direct regression of a rotation (quaternion, 6D) did not learn on this project's particles;
classification over a grid of rotations does. This module holds the grid, the soft targets,
the loss and the decoding of a predicted distribution to one rotation.

Grid
----
``n_directions`` viewing directions on a Fibonacci sphere × ``n_inplane`` uniform in-plane
angles. With RELION's convention (:mod:`deephemnma.geometry`) the viewing direction of ``A``
(the reference-frame axis projected along) is its third row ``(sin t cos r, sin t sin r,
cos t)``; uniform directions × uniform psi are uniform on SO(3) (Haar measure in ZYZ is
``sin t dr dt dψ``). Direction spacing ≈ √(4π/n_directions) rad; match the in-plane step
2π/n_inplane to it (e.g. 192 × 24: ~15°, 4,608 rotations, mean snapping error ~5.6°;
768 × 48: ~7.4°, 36,864 rotations, ~2.8°).

Targets and loss
----------------
The soft target of a true rotation ``A`` is ``p_g ∝ exp(−θ(A, G_g)² / 2σ²)`` with θ the
geodesic angle; the loss is the cross-entropy ``−Σ_g p_g log softmax(logits)_g`` (minus the
target's entropy it is the KL divergence: zero for a perfect fit). σ ≈ the grid spacing.

Decoding
--------
``argmax``: the best grid rotation. ``local``: the probability-weighted mean of the
quaternions of the argmax's ``k`` nearest grid neighbours (sign-aligned, normalised) — a
sub-grid estimate. Both are differentiable-free (inference only).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..core.geometry import euler_to_matrix, matrix_to_quaternion


def fibonacci_sphere(n: int) -> np.ndarray:
    """(n, 3) unit vectors quasi-uniform on the sphere (golden-angle spiral)."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (3 - math.sqrt(5)) * i
    r = np.sqrt(1 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], 1)


def geodesic_cos(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """cos θ (B, n) of the geodesic angle between rotations A (B,3,3) and G (n,3,3)."""
    tr = torch.einsum("bij,gij->bg", A, G)
    return ((tr - 1) / 2).clamp(-1, 1)


class SO3Grid:
    """Fibonacci directions × in-plane angles (see the module docstring)."""

    def __init__(self, n_directions: int = 192, n_inplane: int = 24, neighbours: int = 32, device="cpu"):
        self.n_directions, self.n_inplane = int(n_directions), int(n_inplane)
        d = fibonacci_sphere(self.n_directions)
        rot = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
        tilt = np.degrees(np.arccos(np.clip(d[:, 2], -1, 1)))
        psi = np.arange(self.n_inplane) * 360.0 / self.n_inplane
        eul = np.stack(np.broadcast_arrays(rot[:, None], tilt[:, None], psi[None, :]), -1).reshape(-1, 3)
        self.euler = eul
        self.matrices = torch.as_tensor(euler_to_matrix(eul), dtype=torch.float32, device=device)
        self.quaternions = torch.as_tensor(matrix_to_quaternion(euler_to_matrix(eul)), dtype=torch.float32, device=device)
        self.k = int(min(neighbours, len(self)))
        self.neighbours = self._nearest(self.k)

    def __len__(self) -> int:
        return self.n_directions * self.n_inplane

    def to(self, device) -> "SO3Grid":
        """Move the grid's tensors to ``device`` (in place); returns the grid."""
        self.matrices = self.matrices.to(device)
        self.quaternions = self.quaternions.to(device)
        self.neighbours = self.neighbours.to(device)
        return self

    @property
    def spacing_deg(self) -> float:
        """Typical distance (degrees) between neighbouring grid rotations."""
        return math.degrees(max(math.sqrt(4 * math.pi / self.n_directions), 2 * math.pi / self.n_inplane))

    def _nearest(self, k: int, chunk: int = 2048) -> torch.Tensor:
        """(n, k) indices of each grid rotation's k nearest (itself first)."""
        out = []
        for a in range(0, len(self), chunk):
            c = geodesic_cos(self.matrices[a:a + chunk], self.matrices)
            out.append(torch.topk(c, k, dim=1).indices)
        return torch.cat(out)

    def soft_targets(self, A: torch.Tensor, sigma_deg: float) -> torch.Tensor:
        """(B, n) target distribution ∝ exp(−θ²/2σ²) around the true rotations A (B,3,3)."""
        theta = torch.arccos(geodesic_cos(A.to(self.matrices.dtype), self.matrices))
        logp = -0.5 * (theta / math.radians(sigma_deg)) ** 2
        return torch.softmax(logp, dim=1)

    def loss(self, logits: torch.Tensor, A: torch.Tensor, sigma_deg: float, smoothing: float = 0.0) -> torch.Tensor:
        """Mean cross-entropy of the logits (B, n) with the soft targets (optionally mixed
        with a uniform distribution by ``smoothing``)."""
        t = self.soft_targets(A, sigma_deg)
        if smoothing > 0:
            t = (1 - smoothing) * t + smoothing / t.shape[1]
        return -(t * F.log_softmax(logits.float(), dim=1)).sum(1).mean()

    def decode(self, logits: torch.Tensor, mode: str = "local", k: int | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """(B, 3, 3) rotations from logits (B, n): ``argmax`` or ``local`` (see the module docstring)."""
        from ..core.geometry import quaternion_to_matrix_torch

        best = logits.argmax(1)
        if mode == "argmax":
            return self.matrices[best]
        k = self.k if k is None else min(int(k), self.k)
        nb = self.neighbours[best][:, :k]                                    # (B, k)
        w = torch.softmax(torch.gather(logits.float(), 1, nb) / temperature, dim=1)
        q = self.quaternions[nb]                                             # (B, k, 4)
        sign = torch.sign((q * self.quaternions[best][:, None]).sum(-1, keepdim=True))
        qm = (w[..., None] * q * sign).sum(1)
        return quaternion_to_matrix_torch(qm)

    def snapping_error(self, n: int = 2000, seed: int = 0) -> float:
        """Mean paper angle error (degrees) of snapping uniform rotations to the nearest grid rotation."""
        from ..core.geometry import angular_error, random_rotations

        A = random_rotations(n, np.random.default_rng(seed))
        idx = geodesic_cos(torch.as_tensor(A, dtype=torch.float32), self.matrices).argmax(1)
        return float(angular_error(A, self.matrices[idx].double().numpy()).mean())
