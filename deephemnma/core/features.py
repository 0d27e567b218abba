"""Per-particle feature matrices from STAR columns (normal-mode amplitudes, or any latent).

A feature spec names the columns: ``"amplitudes"`` (the ``dhnmaAmplitudeNNN`` columns, all of
them or those of given modes), a prefix ending in ``*`` (``"dhnmaLatent*"``: every column that
starts with it, in numeric order of the suffix) or an explicit list of column names. Stages
that fit or apply a model on per-particle features (landscape, filter) read them here.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .errors import InputError


def amplitude_matrix(df: pd.DataFrame, modes: list[int] | None = None, source=None) -> tuple[np.ndarray, list[str]]:
    """Amplitudes (n, M) and their column names: the given ``modes`` or every mode present."""
    from .star import amplitude_column, amplitude_columns

    cols = [amplitude_column(m) for m in modes] if modes else amplitude_columns(df)
    if not cols:
        raise InputError(source, "no amplitude columns (dhnmaAmplitudeNNN) in the particle table")
    return column_matrix(df, cols, source, what="amplitude")


def feature_columns(df: pd.DataFrame, spec, modes: list[int] | None = None, source=None) -> list[str]:
    """The column names a feature ``spec`` selects in ``df`` (see the module docstring)."""
    from .star import amplitude_column, amplitude_columns

    if spec in (None, "amplitudes"):
        cols = [amplitude_column(m) for m in modes] if modes else amplitude_columns(df)
        if not cols:
            raise InputError(source, "no amplitude columns (dhnmaAmplitudeNNN) in the particle table")
        return cols
    if isinstance(spec, str) and spec.endswith("*"):
        prefix = spec[:-1]
        cols = [c for c in df.columns if str(c).startswith(prefix)]
        if not cols:
            raise InputError(source, f"no column starts with {prefix!r} (feature spec {spec!r})")
        return sorted(cols, key=_numeric_suffix)
    cols = [spec] if isinstance(spec, str) else list(spec)
    if not cols:
        raise InputError(source, "the feature spec names no column")
    return cols


def feature_matrix(df: pd.DataFrame, spec="amplitudes", modes: list[int] | None = None,
                   source=None) -> tuple[np.ndarray, list[str]]:
    """Features (n, F) float64 and their column names for a feature ``spec``."""
    return column_matrix(df, feature_columns(df, spec, modes, source), source)


def column_matrix(df: pd.DataFrame, cols: list[str], source=None, what: str = "feature") -> tuple[np.ndarray, list[str]]:
    """The named columns as a finite float64 matrix (InputError naming the first bad row)."""
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InputError(source, f"missing {what} column(s) {', '.join(missing)}")
    X = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(X)
    if bad.any():
        i = int(np.flatnonzero(bad.any(axis=1))[0])
        j = int(np.flatnonzero(bad[i])[0])
        raw = df[cols[j]].iloc[i]
        if isinstance(raw, str) and pd.isna(pd.to_numeric(raw, errors="coerce")):
            raise InputError(source, f"{what} _{cols[j]} = {raw[:40]!r} is not a number", row=i + 1)
        raise InputError(source, f"non-finite {what} (_{cols[j]} = {raw})", row=i + 1)
    return X, list(cols)


def _numeric_suffix(name) -> tuple:
    m = re.search(r"(\d+)$", str(name))
    return (0, int(m.group(1)), str(name)) if m else (1, 0, str(name))
