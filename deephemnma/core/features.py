"""Per-particle feature matrices from STAR columns (normal-mode amplitudes, or any latent)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import InputError


def amplitude_matrix(df: pd.DataFrame, modes: list[int] | None = None, source=None) -> tuple[np.ndarray, list[str]]:
    """Amplitudes (n, M) and their column names: the given ``modes`` or every mode present."""
    from .star import amplitude_column, amplitude_columns

    cols = [amplitude_column(m) for m in modes] if modes else amplitude_columns(df)
    if not cols:
        raise InputError(source, "no amplitude columns (dhnmaAmplitudeNNN) in the particle table")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InputError(source, f"missing amplitude column(s) {', '.join(missing)}")
    X = df[cols].to_numpy(np.float64)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise InputError(source, "non-finite amplitude", row=int(np.flatnonzero(bad)[0]) + 1)
    return X, cols
