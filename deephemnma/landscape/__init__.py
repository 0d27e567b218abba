"""The conformational landscape: low-dimensional coordinates of the normal-mode amplitudes.

PCA (seed 000 §2.3, the paper's choice)
    :class:`PCAModel` — principal axes of the amplitudes (M modes → k coordinates), fitted by
    an eigen-decomposition of the M×M covariance (exact, one pass, any number of particles).
    ``standardise: false`` (default, as HEMNMA) works on the amplitudes themselves, so the
    landscape's units are amplitude units and box limits such as the paper's PC1 ∈ [−900,
    −100] keep their meaning; ``standardise: true`` divides each mode by its standard
    deviation first (a correlation-matrix PCA) so that modes with a large spread do not
    dominate — useful when modes of very different stiffness are mixed. Signs are fixed
    (the largest loading of each axis is positive), so the same data give the same axes.
    The model is saved as JSON (columns, mean, scale, components, variances) and places new
    particles with :meth:`PCAModel.transform`; :meth:`PCAModel.inverse_transform` maps
    landscape points back to amplitudes (animations, group centroids).

Spectral (seed 003, Appendix B)
    :class:`SpectralModel` — Laplacian eigenmaps on a sparse symmetric k-nearest-neighbour
    graph of the (optionally standardised) amplitudes: edge weights 1 (``kernel: binary``) or
    ``exp(−‖xi − xj‖² / 2σ²)`` with σ the median neighbour distance (``kernel: gaussian``);
    symmetric normalised Laplacian ``L = I − D^{-1/2} W D^{-1/2}``; coordinates are the
    eigenvectors of the smallest non-zero eigenvalues, mapped by ``D^{-1/2}`` (the
    random-walk eigenvectors, as Belkin & Niyogi) and scaled by √n. New points are placed by
    the Nyström extension (a weighted average of their neighbours' coordinates divided by
    ``1 − λ``).

Per-particle coordinates are written as columns ``dhnmaPC1``, ``dhnmaPC2`` … (the landscape
coordinates whatever the method; ``dhnmaSpectral1`` … when the spectral embedding is added
for comparison).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import InputError
from ..core.fileio import atomic_path, atomic_write_json
from ..core.logs import get_logger

log = get_logger(__name__)

SPECTRAL_PREFIX = "dhnmaSpectral"
SOURCE_COLUMN = "dhnmaSource"  # 1 = HEMNMA (image set 1), 2 = network prediction (image set 2)
SOURCE_HEMNMA, SOURCE_NETWORK = 1, 2


def spectral_column(i: int) -> str:
    return f"{SPECTRAL_PREFIX}{int(i)}"


# ------------------------------------------------------------------------------ PCA
@dataclass
class PCAModel:
    columns: list[str]
    mean: np.ndarray  # (M,)
    scale: np.ndarray  # (M,), ones unless standardised
    components: np.ndarray  # (k, M), orthonormal rows
    explained_variance: np.ndarray  # (k,)
    explained_variance_ratio: np.ndarray  # (k,)
    standardise: bool = False
    n_samples: int = 0

    @classmethod
    def fit(cls, X, columns: list[str], n_components: int = 2, standardise: bool = False) -> "PCAModel":
        X = np.asarray(X, np.float64)
        n, M = X.shape
        if n < 2:
            raise ValueError("PCA needs at least 2 particles")
        k = int(min(n_components, M))
        mean = X.mean(axis=0)
        scale = X.std(axis=0, ddof=1) if standardise else np.ones(M)
        scale = np.where(scale > 0, scale, 1.0)
        # covariance in chunks (no n×M centred copy for 10⁶ particles)
        C = np.zeros((M, M))
        for s in range(0, n, 1 << 18):
            Z = (X[s:s + (1 << 18)] - mean) / scale
            C += Z.T @ Z
        C /= n - 1
        evals, evecs = np.linalg.eigh(C)
        order = np.argsort(evals)[::-1]
        evals, evecs = evals[order].clip(min=0), evecs[:, order]
        comps = evecs[:, :k].T.copy()
        # deterministic signs: largest |loading| positive
        flip = np.sign(comps[np.arange(k), np.argmax(np.abs(comps), axis=1)])
        comps *= np.where(flip == 0, 1, flip)[:, None]
        total = evals.sum()
        return cls(list(columns), mean, scale, comps, evals[:k], evals[:k] / total if total > 0 else np.zeros(k),
                   bool(standardise), int(n))

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def transform(self, X) -> np.ndarray:
        X = np.asarray(X, np.float64)
        return ((X - self.mean) / self.scale) @ self.components.T

    def inverse_transform(self, Y) -> np.ndarray:
        Y = np.asarray(Y, np.float64)
        return (Y @ self.components) * self.scale + self.mean

    def to_dict(self) -> dict:
        return {"method": "pca", "columns": self.columns, "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "components": self.components.tolist(), "explained_variance": self.explained_variance.tolist(),
                "explained_variance_ratio": self.explained_variance_ratio.tolist(),
                "standardise": self.standardise, "n_samples": self.n_samples}

    @classmethod
    def from_dict(cls, d: dict) -> "PCAModel":
        return cls(list(d["columns"]), np.asarray(d["mean"], float), np.asarray(d["scale"], float),
                   np.asarray(d["components"], float).reshape(-1, len(d["columns"])),
                   np.asarray(d["explained_variance"], float), np.asarray(d["explained_variance_ratio"], float),
                   bool(d.get("standardise", False)), int(d.get("n_samples", 0)))

    def save(self, path) -> Path:
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path) -> "PCAModel":
        return load_model(path)


# ------------------------------------------------------------------------------ spectral
@dataclass
class SpectralModel:
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


def load_model(path):
    """Load a saved landscape model (PCA or spectral) from its JSON file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "landscape model not found")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not a JSON landscape model ({exc.msg})") from None
    if d.get("method") == "pca":
        return PCAModel.from_dict(d)
    if d.get("method") == "spectral":
        arrays = np.load(path.parent / d["arrays"])
        return SpectralModel(list(d["columns"]), np.asarray(d["mean"]), np.asarray(d["scale"]), int(d["n_neighbors"]),
                             d["kernel"], float(d["sigma"]), np.asarray(d["eigenvalues"]), arrays["train"],
                             arrays["embedding"], bool(d.get("standardise", False)))
    raise InputError(path, f"unknown landscape model method {d.get('method')!r}")


# ------------------------------------------------------------------------------ tables
def concat_particle_sets(parts: list[tuple[pd.DataFrame, pd.DataFrame, int]], source=None):
    """Concatenate (particles, optics, source_code) sets into one table with ``dhnmaSource``.

    Identical optics tables are shared; otherwise the later set's optics groups are
    renumbered after the earlier ones. A particle (``rlnImageName``) present in several
    sets is kept once, from the first set that has it."""
    from ..core.star import IMAGE_NAME, OPTICS_GROUP

    out_p, out_o = [], None
    for particles, optics, code in parts:
        p = particles.copy()
        p[SOURCE_COLUMN] = code
        o = optics.copy() if optics is not None else None
        if out_o is None:
            out_o = o
        elif o is not None and not _same_table(o, out_o):
            offset = int(out_o[OPTICS_GROUP].max())
            mapping = {g: g + offset for g in o[OPTICS_GROUP]}
            o[OPTICS_GROUP] = o[OPTICS_GROUP].map(mapping)
            if "rlnOpticsGroupName" in o.columns:
                o["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in o[OPTICS_GROUP]]
            p[OPTICS_GROUP] = p[OPTICS_GROUP].map(mapping)
            out_o = pd.concat([out_o, o], ignore_index=True)
        out_p.append(p)
    allp = pd.concat(out_p, ignore_index=True)
    dup = allp[IMAGE_NAME].duplicated(keep="first")
    if dup.any():
        log.warning("%d particles appear in more than one input set: each kept once, from the first set", int(dup.sum()))
        allp = allp[~dup].reset_index(drop=True)
    return allp, out_o


def _same_table(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return False
    return all(np.array_equal(a[c].to_numpy(), b[c].to_numpy()) for c in a.columns)


def add_coordinates(df: pd.DataFrame, Y: np.ndarray, prefix: str = "pc") -> pd.DataFrame:
    """Write coordinates as columns ``dhnmaPC1..k`` (``prefix="pc"``) or ``dhnmaSpectral1..k``
    (replacing any previous ones of that kind)."""
    from ..core.star import pc_column, pc_columns

    out = df.copy()
    if prefix == "pc":
        out = out.drop(columns=pc_columns(out))
        names = [pc_column(i + 1) for i in range(Y.shape[1])]
    else:
        out = out.drop(columns=[c for c in out.columns if str(c).startswith(SPECTRAL_PREFIX)])
        names = [spectral_column(i + 1) for i in range(Y.shape[1])]
    for j, c in enumerate(names):
        out[c] = Y[:, j]
    return out


# ------------------------------------------------------------------------------ stage driver
def fit_spectral_subset(X, columns, settings: dict, n_components: int, standardise: bool, seed: int):
    """Spectral embedding fitted on at most ``max_fit`` particles (seeded subset), the
    others placed by the Nyström extension; returns (model, coordinates of all X)."""
    n = len(X)
    max_fit = int(settings.get("max_fit", 20000))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5BEC]))
    fit_idx = np.sort(rng.choice(n, max_fit, replace=False)) if n > max_fit else np.arange(n)
    model = SpectralModel.fit(X[fit_idx], columns, n_components, int(settings.get("n_neighbors", 15)),
                              settings.get("kernel", "binary"), standardise, seed)
    Y = np.empty((n, n_components))
    Y[fit_idx] = model.embedding
    rest = np.setdiff1d(np.arange(n), fit_idx)
    if len(rest):
        Y[rest] = model.transform(X[rest])
    return model, Y


def build_landscape(particles: pd.DataFrame, optics: pd.DataFrame | None, settings: dict, seed: int = 0,
                    hemnma: tuple[pd.DataFrame, pd.DataFrame] | None = None, source=None):
    """Fit the landscape of the ``landscape`` config section.

    Returns (table with coordinate columns, optics, model, spectral model or None). With
    ``fit_on: combined`` the HEMNMA particles (``hemnma`` = (particles, optics)) are
    concatenated first (column ``dhnmaSource``)."""
    from ..core.features import amplitude_matrix

    if settings.get("fit_on", "predicted") == "combined":
        if hemnma is None:
            raise InputError(source, "landscape.fit_on is combined: the HEMNMA particles are needed (--hemnma)")
        particles, optics = concat_particle_sets([(particles, optics, SOURCE_NETWORK),
                                                  (hemnma[0], hemnma[1], SOURCE_HEMNMA)], source)
    X, cols = amplitude_matrix(particles, settings.get("modes"), source)
    k = int(settings.get("n_components", 2))
    std = bool(settings.get("standardise", False))
    spec_settings = settings.get("spectral", {}) or {}
    spectral = None
    if settings.get("method", "pca") == "pca":
        model = PCAModel.fit(X, cols, k, std)
        out = add_coordinates(particles, model.transform(X), "pc")
        log.info("PCA of %d particles × %d modes: variance explained %s", len(X), len(cols),
                 ", ".join(f"PC{i + 1} {100 * r:.1f} %" for i, r in enumerate(model.explained_variance_ratio)))
        if spec_settings.get("compare", False):
            spectral, Ys = fit_spectral_subset(X, cols, spec_settings, k, std, seed)
            out = add_coordinates(out, Ys, "spectral")
    else:
        model, Ys = fit_spectral_subset(X, cols, spec_settings, k, std, seed)
        out = add_coordinates(particles, Ys, "pc")
    return out, optics, model, spectral


def landscape_plots(outdir, table: pd.DataFrame, model, settings: dict, seed: int = 0) -> list[Path]:
    """landscape.png, explained_variance.png (PCA), amplitudes.png, spectral_vs_pca.png (when present)."""
    from ..core import plots
    from ..core.star import pc_columns

    outdir = Path(outdir)
    ps = settings.get("plots", {}) or {}
    Y = table[pc_columns(table)].to_numpy(np.float64)
    paths = [plots.landscape(outdir / "landscape.png", Y, density=ps.get("density", "hexbin"),
                             max_points=int(ps.get("max_points", 20000)), seed=seed,
                             axis_label="PC" if isinstance(model, PCAModel) else "spectral ")]
    if isinstance(model, PCAModel):
        paths.append(plots.explained_variance(outdir / "explained_variance.png", model.explained_variance_ratio))
    paths.append(plots.amplitude_histograms(outdir / "amplitudes.png", table[model.columns].to_numpy(), model.columns))
    spec = [c for c in table.columns if str(c).startswith(SPECTRAL_PREFIX)]
    if spec and isinstance(model, PCAModel):
        paths.append(plots.embedding_comparison(outdir / "spectral_vs_pca.png", Y, table[spec].to_numpy(),
                                                colour=Y[:, 0], max_points=int(ps.get("max_points", 20000)), seed=seed))
    return paths
