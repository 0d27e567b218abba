"""Spectral landscape: Laplacian eigenmaps (seed 003, Appendix B).

:class:`SpectralModel` — Laplacian eigenmaps on a sparse symmetric k-nearest-neighbour graph
of the (optionally standardised) features: edge weights 1 (``kernel: binary``) or
``exp(−‖xi − xj‖² / 2σ²)`` with σ the median neighbour distance (``kernel: gaussian``);
symmetric normalised Laplacian ``L = I − D^{-1/2} W D^{-1/2}``; coordinates are the
eigenvectors of the smallest non-zero eigenvalues, mapped by ``D^{-1/2}`` (the random-walk
eigenvectors, as Belkin & Niyogi) and scaled by √n. The embedding is fitted on at most
``spectral.max_fit`` particles (a seeded subset); new points are placed by the Nyström
extension (a weighted average of their neighbours' coordinates divided by ``1 − λ``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.fileio import atomic_path, atomic_write_json
from ..core.logs import get_logger
from .methods import LandscapeMethod, register

log = get_logger(__name__)


@register
@dataclass
class SpectralModel(LandscapeMethod):
    NAME = "spectral"
    AXIS_LABEL = "spectral "
    INVERTIBLE = False

    columns: list[str]
    mean: np.ndarray
    scale: np.ndarray
    n_neighbors: int
    kernel: str
    sigma: float
    eigenvalues: np.ndarray  # (k,) of the normalised Laplacian
    train: np.ndarray = field(repr=False, default=None)  # (n, M) scaled training points
    embedding: np.ndarray = field(repr=False, default=None)  # (n, k)
    standardise: bool = False
    info: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, X, columns: list[str], n_components: int = 2, n_neighbors: int = 15, kernel: str = "binary",
            standardise: bool = False, seed: int = 0) -> "SpectralModel":
        import scipy.sparse as sp
        from scipy.sparse.linalg import eigsh
        from sklearn.neighbors import NearestNeighbors

        X = np.asarray(X, np.float64)
        n, M = X.shape
        k = int(n_components)
        if n <= max(n_neighbors, k + 1):
            raise ValueError(f"spectral embedding needs more than {max(n_neighbors, k + 1)} particles, got {n}")
        mean = X.mean(axis=0)
        scale = X.std(axis=0, ddof=1) if standardise else np.ones(M)
        scale = np.where(scale > 0, scale, 1.0)
        Z = (X - mean) / scale
        nn = NearestNeighbors(n_neighbors=n_neighbors + 1).fit(Z)
        dist, ind = nn.kneighbors(Z)
        dist, ind = dist[:, 1:], ind[:, 1:]
        sigma = float(np.median(dist[:, -1])) or 1.0
        w = np.ones_like(dist) if kernel == "binary" else np.exp(-(dist ** 2) / (2 * sigma ** 2))
        rows = np.repeat(np.arange(n), n_neighbors)
        W = sp.csr_matrix((w.ravel(), (rows, ind.ravel())), shape=(n, n))
        W = W.maximum(W.T)  # symmetric kNN: i~j if either is among the other's neighbours
        deg = np.asarray(W.sum(axis=1)).ravel()
        dinv = 1.0 / np.sqrt(deg)
        S = sp.diags(dinv) @ W @ sp.diags(dinv)  # eigenvalues 1 − λ(L)
        from scipy.sparse.csgraph import connected_components

        ncomp, _ = connected_components(W, directed=False)
        if ncomp > 1:
            log.warning("the %d-nearest-neighbour graph has %d connected components: the first spectral "
                        "coordinates separate them (raise n_neighbors to join them)", n_neighbors, ncomp)
        v0 = np.random.default_rng(seed).standard_normal(n)
        # shift so the wanted (largest) eigenvalues of S are the largest in magnitude
        vals, vecs = eigsh(S + sp.identity(n), k=k + 1, which="LA", v0=v0, tol=1e-8, maxiter=max(1000, 20 * n))
        order = np.argsort(vals)[::-1]
        vals, vecs = vals[order] - 1.0, vecs[:, order]
        lam = 1.0 - vals[1:]
        F = vecs[:, 1:] * dinv[:, None] * np.sqrt(n)  # random-walk eigenvectors, O(1) scale
        flip = np.sign(F[np.argmax(np.abs(F), axis=0), np.arange(k)])
        F *= np.where(flip == 0, 1, flip)[None, :]
        return cls(list(columns), mean, scale, int(n_neighbors), kernel, sigma, lam, Z, F, bool(standardise),
                   {"n_components_graph": int(ncomp)})

    @property
    def n_components(self) -> int:
        return int(self.embedding.shape[1])

    def transform(self, X) -> np.ndarray:
        """Nyström extension: f(x) = Σ_j w(x, x_j) f_j / (Σ_j w(x, x_j) · (1 − λ))."""
        from sklearn.neighbors import NearestNeighbors

        Z = (np.asarray(X, np.float64) - self.mean) / self.scale
        nn = NearestNeighbors(n_neighbors=self.n_neighbors).fit(self.train)
        dist, ind = nn.kneighbors(Z)
        w = np.ones_like(dist) if self.kernel == "binary" else np.exp(-(dist ** 2) / (2 * self.sigma ** 2))
        avg = np.einsum("nk,nkc->nc", w, self.embedding[ind]) / w.sum(axis=1, keepdims=True)
        return avg / (1.0 - self.eigenvalues)[None, :]

    def to_dict(self) -> dict:
        return {"method": "spectral", "columns": self.columns, "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "n_neighbors": self.n_neighbors, "kernel": self.kernel,
                "sigma": self.sigma, "eigenvalues": self.eigenvalues.tolist(), "standardise": self.standardise,
                **self.info}

    def save(self, path) -> Path:
        """JSON with the parameters; the training points and their coordinates go to a
        ``.npz`` beside it (needed by :meth:`transform`)."""
        path = Path(path)
        npz = path.with_suffix(".npz")
        with atomic_path(npz) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, train=self.train, embedding=self.embedding)
        atomic_write_json(path, {**self.to_dict(), "arrays": npz.name})
        return path

    @classmethod
    def from_saved(cls, d: dict, path: Path) -> "SpectralModel":
        from ..core.errors import InputError

        npz = Path(path).parent / str(d["arrays"])
        try:
            arrays = np.load(npz, allow_pickle=False)
            arrays = {k: arrays[k] for k in ("train", "embedding")}
        except FileNotFoundError:
            raise InputError(npz, f"arrays of the spectral landscape model {path} not found") from None
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
            raise InputError(npz, f"not the arrays of a spectral landscape model ({exc.__class__.__name__})") from None
        return cls(list(d["columns"]), np.asarray(d["mean"]), np.asarray(d["scale"]), int(d["n_neighbors"]),
                   d["kernel"], float(d["sigma"]), np.asarray(d["eigenvalues"]), arrays["train"],
                   arrays["embedding"], bool(d.get("standardise", False)))

    @classmethod
    def fit_features(cls, X, columns, settings, seed: int = 0):
        """Fitted on at most ``spectral.max_fit`` particles (seeded subset), the others placed
        by the Nyström extension; returns (model, coordinates of all X)."""
        sp = settings.spectral
        k = settings.n_components
        n = len(X)
        max_fit = int(sp["max_fit"])
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5BEC]))
        fit_idx = np.sort(rng.choice(n, max_fit, replace=False)) if n > max_fit else np.arange(n)
        model = cls.fit(X[fit_idx], columns, k, int(sp["n_neighbors"]), sp["kernel"], settings.standardise, seed)
        Y = np.empty((n, k))
        Y[fit_idx] = model.embedding
        rest = np.setdiff1d(np.arange(n), fit_idx)
        if len(rest):
            Y[rest] = model.transform(X[rest])
        return model, Y

