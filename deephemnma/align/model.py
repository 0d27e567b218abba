"""The elastic Gaussian-atom model that HEMNMA alignment fits to each particle image.

A reference of ``N`` atoms (coordinates ``x0`` in Å relative to the box centre, density
weights ``w``, Gaussian widths ``σ`` in Å) is deformed by ``M`` normal modes
``V`` (``(M, N, 3)``, each of unit Euclidean norm over its 3N values, the ElNemo/Xmipp
convention, so that amplitudes are on the paper's scale):

    x(q) = x0 + Σ_k q_k V_k

then rotated by ``A`` (RELION convention, :mod:`deephemnma.core.geometry`), shifted by
``−origin`` and projected analytically (:func:`deephemnma.core.projection.project_gaussians`).

The reference is centred on the unweighted mean of its atom coordinates, the convention of
``deephemnma simulate`` (the particle's centre is that point); ``center=False`` keeps the
coordinates as given (already relative to the box centre).

:meth:`ElasticModel.coarse` lumps atoms into pseudo-atoms on a cubic grid (weighted
centroid, summed weight, width enlarged by the spread of the lumped atoms, mode vectors
averaged with the weights, which is exact for the centroid's displacement): the cheap model
used at the low-resolution levels of the search and refinement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import InputError

#: default Gaussian width (Å) of an atom when the mode set gives none
DEFAULT_ATOM_SIGMA = 1.0


@dataclass
class ElasticModel:
    """Reference atoms + selected normal modes, in Å (see the module docstring)."""

    coords: np.ndarray          # (N, 3) Å, relative to the box centre
    weights: np.ndarray         # (N,)
    sigma: np.ndarray           # (N,) Å
    mode_numbers: np.ndarray    # (M,) 1-based
    vectors: np.ndarray         # (M, N, 3)
    source: str | None = None
    _torch_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.coords = np.ascontiguousarray(self.coords, dtype=np.float64).reshape(-1, 3)
        n = len(self.coords)
        self.weights = np.broadcast_to(np.asarray(self.weights, dtype=np.float64), (n,)).copy()
        self.sigma = np.broadcast_to(np.asarray(self.sigma, dtype=np.float64), (n,)).copy()
        self.mode_numbers = np.asarray(self.mode_numbers, dtype=np.int64).reshape(-1)
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float64).reshape(len(self.mode_numbers), n, 3)

    # ------------------------------------------------------------------ properties
    @property
    def n_atoms(self) -> int:
        return len(self.coords)

    @property
    def n_modes(self) -> int:
        return len(self.mode_numbers)

    @property
    def radius(self) -> float:
        """Largest distance of an atom from the centre (Å)."""
        return float(np.sqrt((self.coords ** 2).sum(1)).max()) if self.n_atoms else 0.0

    @property
    def radius_of_gyration(self) -> float:
        w = self.weights / self.weights.sum()
        c = (w[:, None] * self.coords).sum(0)
        return float(np.sqrt((w * ((self.coords - c) ** 2).sum(1)).sum()))

    def amplitude_scale(self) -> float:
        """√N: an amplitude q of one unit-norm mode moves the atoms by q/√N Å RMS."""
        return math.sqrt(max(self.n_atoms, 1))

    # ------------------------------------------------------------------ deformation
    def deform(self, amplitudes) -> np.ndarray:
        """(B, N, 3) coordinates for amplitudes (B, M)."""
        q = np.asarray(amplitudes, dtype=np.float64).reshape(-1, self.n_modes)
        return self.coords[None] + np.einsum("bm,mnj->bnj", q, self.vectors)

    def rmsd_between(self, q1, q2) -> np.ndarray:
        """Atomic RMSD (Å) between the reference deformed by ``q1`` and by ``q2`` (each (B, M)),
        without superposition: the paper's amplitude error in Å."""
        d = np.asarray(q1, dtype=np.float64).reshape(-1, self.n_modes) - np.asarray(q2, dtype=np.float64).reshape(-1, self.n_modes)
        disp = np.einsum("bm,mnj->bnj", d, self.vectors)
        return np.sqrt((disp ** 2).sum(-1).mean(-1))

    def tensors(self, dtype=torch.float32, device=None) -> dict:
        """Torch copies (cached): x0 (N,3), w (N,), sigma (N,), V (M,N,3)."""
        key = (dtype, str(device))
        t = self._torch_cache.get(key)
        if t is None:
            t = {
                "x0": torch.as_tensor(self.coords, dtype=dtype, device=device),
                "w": torch.as_tensor(self.weights, dtype=dtype, device=device),
                "sigma": torch.as_tensor(self.sigma, dtype=dtype, device=device),
                "V": torch.as_tensor(self.vectors, dtype=dtype, device=device),
            }
            self._torch_cache[key] = t
        return t

    # ------------------------------------------------------------------ coarse model
    def coarse(self, cell: float) -> "ElasticModel":
        """Pseudo-atoms lumping the atoms of each cubic cell of edge ``cell`` Å.

        Each pseudo-atom sits at the weighted centroid of its atoms, carries their summed
        weight, has width ``sqrt(mean σ² + per-axis spread²)`` and moves with the weighted
        mean of their mode displacements (exact for the centroid, to first order the
        density's own low-resolution motion). ``cell <= 0`` returns ``self``.
        """
        if cell <= 0 or self.n_atoms == 0:
            return self
        idx = np.floor(self.coords / cell).astype(np.int64)
        _, inverse = np.unique(idx, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        k = int(inverse.max()) + 1
        w = self.weights
        wsum = np.bincount(inverse, weights=w, minlength=k)
        safe = np.where(wsum > 0, wsum, 1.0)

        def wmean(a):  # a (N, ...) -> (k, ...)
            flat = a.reshape(len(a), -1)
            out = np.stack([np.bincount(inverse, weights=w * flat[:, j], minlength=k) for j in range(flat.shape[1])], 1)
            return (out / safe[:, None]).reshape((k,) + a.shape[1:])

        c = wmean(self.coords)
        spread2 = wmean(((self.coords - c[inverse]) ** 2).sum(1, keepdims=True) / 3.0)[:, 0]
        s2 = wmean(self.sigma[:, None] ** 2)[:, 0] + spread2
        V = np.stack([wmean(v) for v in self.vectors]) if self.n_modes else np.zeros((0, k, 3))
        return ElasticModel(c, wsum, np.sqrt(s2), self.mode_numbers, V, source=self.source)

    # ------------------------------------------------------------------ volume
    def volume(self, amplitudes=None, box: int = 64, pixel_size: float = 1.0, extra_sigma: float = 0.0) -> np.ndarray:
        """The deformed model as a voxel volume (box³, [z, y, x]): each Gaussian (widened by
        ``extra_sigma`` Å) integrated over every voxel (exact, separable erf differences),
        divided by the voxel volume. Atoms are placed relative to voxel ``box // 2``."""
        from scipy.special import erf

        X = self.coords if amplitudes is None else self.deform(amplitudes)[0]
        sig = np.sqrt(self.sigma ** 2 + float(extra_sigma) ** 2)
        edges = (np.arange(box + 1) - box // 2 - 0.5) * pixel_size

        def profile(c):  # (N, box)
            z = (edges[None, :] - c[:, None]) / (sig[:, None] * math.sqrt(2))
            return 0.5 * np.diff(erf(z), axis=1)

        gx, gy, gz = profile(X[:, 0]), profile(X[:, 1]), profile(X[:, 2])
        vol = np.zeros((box, box, box))
        for a in range(0, len(X), 512):  # bounded memory: (512, box²) at a time
            sl = slice(a, a + 512)
            yx = np.einsum("ny,nx->nyx", gy[sl] * self.weights[sl, None], gx[sl]).reshape(-1, box * box)
            vol += (gz[sl].T @ yx).reshape(box, box, box)
        return vol / pixel_size ** 3

    # ------------------------------------------------------------------ projection
    def project(self, rotations: torch.Tensor, origins_px: torch.Tensor | None, amplitudes: torch.Tensor | None,
                box: int, pixel_size: float, extra_sigma: float = 0.0) -> torch.Tensor:
        """Projections (B, box, box) of the model deformed by ``amplitudes`` (B, M), rotated by
        ``rotations`` (B, 3, 3), drawn at image centre − ``origins_px`` (B, 2; RELION origins in
        pixels of this box). Differentiable in rotations, origins and amplitudes. ``extra_sigma``
        (Å) widens every Gaussian in quadrature (an anti-aliasing blur matched on the data side).

        Same image as :func:`deephemnma.core.projection.project_gaussians` (tested), computed by
        :func:`splat_gaussians` with a hand-written backward pass and clamped exponents (the
        underflowing Gaussian tails otherwise take the slow path of ``exp``)."""
        dtype = rotations.dtype
        t = self.tensors(dtype, rotations.device)
        B = rotations.shape[0]
        if amplitudes is not None and self.n_modes:
            X = t["x0"][None] + torch.einsum("bm,mnj->bnj", amplitudes.to(dtype), t["V"])
        else:
            X = t["x0"][None].expand(B, -1, -1)
        xy = torch.einsum("bnj,bij->bni", X, rotations[:, :2, :]) / pixel_size + box // 2
        if origins_px is not None:
            xy = xy - origins_px.to(dtype).reshape(-1, 1, 2)
        s = torch.sqrt(t["sigma"] ** 2 + float(extra_sigma) ** 2) / pixel_size   # (N,) pixels
        amp = t["w"] / (2 * math.pi * s * s)
        return splat_gaussians(xy[..., 0], xy[..., 1], s, amp, box)


class _Splat(torch.autograd.Function):
    """I[b, y, x] = Σ_n a_n g(y − py[b,n]; s_n) g(x − px[b,n]; s_n), g(d; s) = exp(−d²/2s²),
    evaluated on a window of W pixels around each atom per axis (beyond ``truncate``·s the
    Gaussian is dropped) and scattered into zero-padded (B, N, D + 2W) profiles whose central
    D columns enter one batched matrix product. Gradients with respect to px and py only."""

    @staticmethod
    def forward(ctx, px, py, s, amp, box, truncate):
        D = int(box)
        W = int(2 * math.ceil(truncate * float(s.max())) + 2)
        B, N = px.shape
        off = torch.arange(W, device=px.device)
        inv = (1.0 / s)[None, :, None]

        def profile(p, scale=None):
            start = torch.clamp(torch.floor(p).long() - (W // 2 - 1), -W, D)        # (B, N)
            idx = start[..., None] + off                                             # (B, N, W)
            a = (idx.to(p.dtype) - p[..., None]) * inv
            g = torch.exp((a * a).mul_(-0.5).clamp_(min=-80.0))
            if scale is not None:
                g = g * scale[None, :, None]
            full = p.new_zeros(B, N, D + 2 * W)
            full.scatter_(2, idx + W, g)
            return idx + W, a, g, full

        ix, ax, gx, fx = profile(px)
        iy, ay, A, fy = profile(py, amp)
        img = torch.bmm(fy[..., W:W + D].transpose(1, 2), fx[..., W:W + D])
        ctx.save_for_backward(ix, ax, gx, fx, iy, ay, A, fy, inv)
        ctx.W, ctx.D = W, D
        return img

    @staticmethod
    def backward(ctx, G):
        ix, ax, gx, fx, iy, ay, A, fy, inv = ctx.saved_tensors
        W, D = ctx.W, ctx.D
        G = G.contiguous()
        Gx = torch.nn.functional.pad(G, (W, W))                                     # (B, D_y, D+2W)
        Gy = torch.nn.functional.pad(G.transpose(1, 2), (W, W))                     # (B, D_x, D+2W)
        dfx = torch.bmm(fy[..., W:W + D], Gx)                                       # Σ_y A[n,y] G[y,x]
        dfy = torch.bmm(fx[..., W:W + D], Gy)                                       # Σ_x gx[n,x] G[y,x]
        dgx = torch.gather(dfx, 2, ix)
        dgy = torch.gather(dfy, 2, iy)
        dpx = (dgx * gx * ax).sum(-1) * inv[..., 0]
        dpy = (dgy * A * ay).sum(-1) * inv[..., 0]
        return dpx, dpy, None, None, None, None


def splat_gaussians(px: torch.Tensor, py: torch.Tensor, s: torch.Tensor, amp: torch.Tensor, box: int,
                    truncate: float = 5.0) -> torch.Tensor:
    """Sum of 2-D Gaussians of widths ``s`` (N,) pixels and peak values ``amp`` (N,) at
    pixel positions (``px``, ``py``) (B, N): images (B, box, box) indexed [y, x],
    differentiable in the positions. Each Gaussian is cut at ``truncate`` widths."""
    return _Splat.apply(px, py, s, amp, int(box), float(truncate))


# ---------------------------------------------------------------------- loading
def model_from_modes(modes, *, select=None, atom_sigma: float | None = None, source=None) -> ElasticModel:
    """Build an :class:`ElasticModel` from a :class:`deephemnma.core.modes.ModeSet` (or any object
    with its fields: ``coords``, ``weights``, ``sigma``, ``mode_numbers``, ``modes`` (vectors),
    optionally ``centre``, ``computed_numbers``/``computed_modes``).

    The coordinates are taken relative to the mode set's ``centre`` (the point that goes to
    the box centre: the atoms' weighted centroid, or a map's box centre), or to the mean of
    the coordinates when it has none. ``select``: mode numbers to use (default: the mode
    set's selected modes; others are taken from its computed modes). ``atom_sigma``: override
    the Gaussian width of every atom (Å).
    """
    def get(name):
        return modes.get(name) if isinstance(modes, dict) else getattr(modes, name, None)

    coords = get("coords")
    vectors = get("modes") if get("vectors") is None else get("vectors")
    numbers = get("mode_numbers")
    if coords is None or vectors is None or numbers is None:
        raise InputError(source, "not a normal-mode set (needs coords, mode_numbers and mode vectors)")
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
    n = len(coords)
    numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
    vectors = np.asarray(vectors, dtype=np.float64).reshape(len(numbers), n, 3)
    if select is not None and len(select):
        comp_n = get("computed_numbers")
        comp_v = get("computed_modes")
        pool_n = np.concatenate([numbers, np.asarray(comp_n if comp_n is not None else [], dtype=np.int64)])
        pool_v = vectors if comp_v is None else np.concatenate([vectors, np.asarray(comp_v, dtype=np.float64).reshape(-1, n, 3)])
        picked = []
        for m in select:
            hit = np.flatnonzero(pool_n == int(m))
            if hit.size == 0:
                have = sorted(set(pool_n.tolist()))
                raise InputError(source, f"mode {int(m)} is not in the mode file (it has modes {have})")
            picked.append(int(hit[0]))
        numbers, vectors = pool_n[picked], pool_v[picked]
    weights = get("weights")
    weights = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    sigma = atom_sigma if atom_sigma is not None else get("sigma")
    if sigma is None:
        sigma = DEFAULT_ATOM_SIGMA
    if not np.isfinite(coords).all() or not np.isfinite(vectors).all():
        raise InputError(source, "non-finite coordinates or mode vectors")
    centre = get("centre")
    centre = coords.mean(axis=0) if centre is None or n == 0 else np.asarray(centre, dtype=np.float64).reshape(3)
    return ElasticModel(coords - centre, weights, sigma, numbers, vectors,
                        source=None if source is None else str(source))


def load_model(path, *, select=None, atom_sigma: float | None = None) -> ElasticModel:
    """Read a mode file written by ``deephemnma nma`` (:func:`deephemnma.core.modes.load_modes`)."""
    from ..core.modes import load_modes

    return model_from_modes(load_modes(path), select=select, atom_sigma=atom_sigma, source=Path(path))
