"""Mahalanobis outlier filter on normal-mode amplitudes (seed 001, §3.1: threshold 3.2).

The amplitudes of each particle, x (M modes), are compared with the distribution of all
particles through the Mahalanobis distance ``d = sqrt((x − μ)ᵀ Σ⁻¹ (x − μ))``; particles with
``d > threshold`` are dropped. ``method``:

* ``classical`` — μ, Σ: sample mean and covariance of all particles (what the paper
  describes);
* ``robust`` — μ, Σ from scikit-learn's Minimum Covariance Determinant (``MinCovDet``,
  seeded), not pulled by the outliers themselves.

For M-dimensional Gaussian amplitudes ``d²`` follows χ²(M), so the expected kept fraction is
``P(χ_M ≤ threshold)`` (:func:`expected_kept_fraction`; 0.981 for M = 3 at 3.2); the real
amplitude distribution is rarely Gaussian (the paper keeps 18,055 of 20,000 with M = 3).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .core.errors import InputError
from .core.features import amplitude_matrix
from .core.logs import get_logger

log = get_logger(__name__)

from .core.star import FLAG as FLAG_COLUMN  # noqa: E402  "dhnmaFlag"
from .core.star import FLAG_OUTLIER  # noqa: E402  value 16

DISTANCE_COLUMN = "dhnmaMahalanobis"


@dataclass
class MahalanobisFilter:
    """Fitted filter: ``mean`` (M,), ``covariance`` (M, M), ``threshold``, ``columns``."""

    columns: list[str]
    mean: np.ndarray
    covariance: np.ndarray
    threshold: float = 3.2
    method: str = "classical"
    info: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, X: np.ndarray, columns: list[str], threshold: float = 3.2, method: str = "classical",
            seed: int = 0) -> "MahalanobisFilter":
        X = np.asarray(X, np.float64)
        if X.ndim != 2 or len(X) <= X.shape[1]:
            raise ValueError(f"need more particles than modes to estimate a covariance, got {X.shape}")
        if method == "robust":
            from sklearn.covariance import MinCovDet

            mcd = MinCovDet(random_state=seed).fit(X)
            mean, cov = mcd.location_, mcd.covariance_
        elif method == "classical":
            mean = X.mean(axis=0)
            cov = np.cov(X, rowvar=False).reshape(X.shape[1], X.shape[1])
        else:
            raise ValueError(f"unknown method {method!r} (classical or robust)")
        return cls(list(columns), mean, cov, float(threshold), method)

    def distance(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, np.float64)
        d = X - self.mean
        # pseudo-inverse: a degenerate mode (constant amplitude) must not make everything an outlier
        P = np.linalg.pinv(self.covariance, hermitian=True)
        return np.sqrt(np.einsum("ni,ij,nj->n", d, P, d).clip(min=0))

    def keep(self, X: np.ndarray) -> np.ndarray:
        return self.distance(X) <= self.threshold

    def to_dict(self) -> dict:
        return {"columns": self.columns, "mean": self.mean.tolist(), "covariance": self.covariance.tolist(),
                "threshold": self.threshold, "method": self.method, **self.info}


def expected_kept_fraction(threshold: float, n_modes: int) -> float:
    """P(d ≤ threshold) for Gaussian amplitudes in ``n_modes`` dimensions (χ distribution)."""
    from scipy.stats import chi

    return float(chi.cdf(threshold, df=n_modes))


def filter_table(df: pd.DataFrame, threshold: float = 3.2, method: str = "classical", modes=None, seed: int = 0,
                 source=None) -> tuple[pd.DataFrame, pd.DataFrame, MahalanobisFilter]:
    """Split ``df`` into (kept, dropped). Both get ``dhnmaMahalanobis``; dropped rows get the
    outlier bit (2) set in ``dhnmaFlag``. Row order is kept."""
    X, cols = amplitude_matrix(df, modes, source)
    if len(X) <= X.shape[1]:
        raise InputError(source, f"the Mahalanobis filter needs more particles than modes to estimate a covariance: "
                                 f"{len(X)} particle(s), {X.shape[1]} mode(s)")
    filt = MahalanobisFilter.fit(X, cols, threshold, method, seed)
    d = filt.distance(X)
    keep = d <= threshold
    out = df.copy()
    out[DISTANCE_COLUMN] = d
    kept, dropped = out[keep].copy(), out[~keep].copy()
    flags = dropped[FLAG_COLUMN].to_numpy(np.int64) if FLAG_COLUMN in dropped.columns else np.zeros(len(dropped), np.int64)
    dropped[FLAG_COLUMN] = flags | FLAG_OUTLIER
    filt.info = {"n_input": int(len(df)), "n_kept": int(keep.sum()), "n_dropped": int((~keep).sum()),
                 "kept_fraction": float(keep.mean()),
                 "expected_kept_fraction_gaussian": expected_kept_fraction(threshold, len(cols))}
    log.info("Mahalanobis filter (%s, threshold %.3g, %d modes): kept %d of %d (%.1f %%; %.1f %% expected for "
             "Gaussian amplitudes), dropped %d", method, threshold, len(cols), filt.info["n_kept"], len(df),
             100 * filt.info["kept_fraction"], 100 * filt.info["expected_kept_fraction_gaussian"],
             filt.info["n_dropped"])
    return kept, dropped, filt
