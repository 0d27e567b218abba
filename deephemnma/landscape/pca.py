"""PCA landscape (seed 000 §2.3, the paper's choice).

:class:`PCAModel` — principal axes of the features (M → k coordinates), fitted by an
eigen-decomposition of the M×M covariance (exact, one pass, any number of particles).
``standardise: false`` (default, as HEMNMA) works on the amplitudes themselves, so the
landscape's units are amplitude units and box limits such as the paper's PC1 ∈ [−900, −100]
keep their meaning; ``standardise: true`` divides each feature by its standard deviation
first (a correlation-matrix PCA). Signs are fixed (the largest loading of each axis is
positive), so the same data give the same axes. Saved as JSON (columns, mean, scale,
components, variances); :meth:`PCAModel.transform` places new particles and
:meth:`PCAModel.inverse_transform` maps landscape points back to features (animations,
group centroids).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.fileio import atomic_write_json
from ..core.logs import get_logger
from .methods import LandscapeMethod, register

log = get_logger(__name__)


@register
@dataclass
class PCAModel(LandscapeMethod):
    NAME = "pca"
    AXIS_LABEL = "PC"
    INVERTIBLE = True

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
        """The model of :meth:`to_dict`; ValueError when the arrays' sizes do not agree."""
        columns = [str(c) for c in d["columns"]]
        M = len(columns)
        mean, scale = np.asarray(d["mean"], float), np.asarray(d["scale"], float)
        comps = np.asarray(d["components"], float)
        var, ratio = np.asarray(d["explained_variance"], float), np.asarray(d["explained_variance_ratio"], float)
        if M == 0 or mean.shape != (M,) or scale.shape != (M,) or comps.size == 0 or comps.size % M:
            raise ValueError(f"{M} columns but mean {mean.shape}, scale {scale.shape}, components {comps.shape}")
        comps = comps.reshape(-1, M)
        if var.shape != (len(comps),) or ratio.shape != (len(comps),):
            raise ValueError(f"{len(comps)} components but {var.size} explained variances")
        if not all(np.isfinite(a).all() for a in (mean, scale, comps, var)):
            raise ValueError("non-finite values")
        return cls(columns, mean, scale, comps, var, ratio, bool(d.get("standardise", False)),
                   int(d.get("n_samples", 0)))

    def save(self, path) -> Path:
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def from_saved(cls, d: dict, path: Path) -> "PCAModel":
        return cls.from_dict(d)

    @classmethod
    def fit_features(cls, X, columns, settings, seed: int = 0):
        model = cls.fit(X, columns, settings.n_components, settings.standardise)
        log.info("PCA of %d particles × %d features: variance explained %s", len(X), len(columns),
                 ", ".join(f"PC{i + 1} {100 * r:.1f} %" for i, r in enumerate(model.explained_variance_ratio)))
        return model, model.transform(X)

    def plots(self, outdir, Y, settings, seed: int = 0) -> list[Path]:
        from ..core import plots

        return [plots.explained_variance(Path(outdir) / "explained_variance.png", self.explained_variance_ratio)]
