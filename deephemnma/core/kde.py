"""A binned 2-D kernel density estimate (landscape plots and density-peak grouping)."""
from __future__ import annotations

import numpy as np


def binned_kde(Y2: np.ndarray, grid: int = 128, bandwidth: float | None = None):
    """Density on a grid: (density (grid, grid) [x-index, y-index], x edges, y edges, cell indices
    (n, 2) of each particle)."""
    from scipy import ndimage

    x, y = Y2[:, 0], Y2[:, 1]
    n = len(x)
    pad_x = 0.05 * (np.ptp(x) or 1.0)
    pad_y = 0.05 * (np.ptp(y) or 1.0)
    ex = np.linspace(x.min() - pad_x, x.max() + pad_x, grid + 1)
    ey = np.linspace(y.min() - pad_y, y.max() + pad_y, grid + 1)
    H, _, _ = np.histogram2d(x, y, bins=[ex, ey])
    bw = bandwidth if bandwidth is not None else n ** (-1.0 / 6.0)  # Scott's rule in 2-D
    sx = bw * (np.std(x) or 1.0) / (ex[1] - ex[0])
    sy = bw * (np.std(y) or 1.0) / (ey[1] - ey[0])
    D = ndimage.gaussian_filter(H, (sx, sy), mode="constant")
    D /= max(D.sum(), 1e-300) * (ex[1] - ex[0]) * (ey[1] - ey[0])
    cx = np.clip(np.searchsorted(ex, x, side="right") - 1, 0, grid - 1)
    cy = np.clip(np.searchsorted(ey, y, side="right") - 1, 0, grid - 1)
    return D, ex, ey, np.stack([cx, cy], 1)
