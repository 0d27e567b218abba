"""Groups of particles with similar conformations, chosen in the landscape (seed 001 suppl. H, Fig. 9).

Every method returns one integer label per particle: 1 … K for the groups, 0 for particles
in no group ("dropped"). So the groups are disjoint and groups + dropped = the input, by
construction. Methods (``landscape.groups.method``):

``boxes``
    Axis-aligned boxes in landscape coordinates, e.g. the paper's two groups
    ``[{pc1: [-900, -100], pc2: [-900, 900]}, {pc1: [100, 900], pc2: [-900, 900]}]``
    (bounds inclusive). A particle inside several boxes goes to the first (a warning counts
    them).
``bins``
    Quasi-uniform bins along one axis (``axis``, 1-based) with at least ``min_size``
    particles each (the paper's Fig. 9: ≥ 900): ``n_bins`` bins of equal width over the
    axis' range (``binning: width``) or of equal count (``binning: count``); with
    ``drop_extremes`` the sparse tails (end bins smaller than ``min_size`` and than half
    the mean bin) are dropped, otherwise merged inwards; then any bin below ``min_size``
    is merged with its smaller neighbour until every group is large enough.
``kmeans`` / ``gmm``
    scikit-learn k-means (``n_init`` restarts) or a Gaussian mixture (full covariances) with
    ``k`` groups on the first ``dims`` coordinates, seeded; groups numbered by decreasing
    size. For ``gmm`` a particle whose largest posterior probability is below
    ``min_probability`` is dropped.
``density``
    Density peaks of a kernel density estimate on the first two coordinates: a binned KDE
    (histogram on a ``grid``² grid smoothed by a Gaussian of ``bandwidth`` × the
    coordinates' standard deviation — Scott's rule when null), local maxima above
    ``min_peak`` × the highest peak (at most ``max_groups``, highest first); every grid
    cell climbs to its peak (steepest ascent), and a particle joins its peak's group when
    the density at its cell is at least ``level`` × that peak's density (the dense core;
    the rest is dropped). Linear in the number of particles.

:func:`summarise_groups` gives size, centroid and spread (standard deviation) of each group
in landscape coordinates and the mean amplitudes (the group's centroid conformation).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .core.errors import ConfigError, InputError
from .core.kde import binned_kde
from .core.logs import get_logger
from .core.settings import schema_settings

log = get_logger(__name__)


# ------------------------------------------------------------------------------ methods
def assign_boxes(Y: np.ndarray, boxes: list[dict]) -> np.ndarray:
    """Labels from boxes: each box maps ``pcN`` (1-based axis) → [lo, hi]."""
    if not boxes:
        raise ConfigError("landscape.groups.boxes is empty: give at least one box, e.g. {pc1: [-900, -100]}")
    n, k = Y.shape
    labels = np.zeros(n, np.int64)
    overlap = 0
    for g, box in enumerate(boxes, start=1):
        inside = np.ones(n, bool)
        for key, bounds in box.items():
            if not key.lower().startswith("pc") or not key[2:].isdigit():
                raise ConfigError(f"landscape.groups.boxes[{g - 1}]: unknown key {key!r} (use pc1, pc2, ...)")
            axis = int(key[2:])
            if not 1 <= axis <= k:
                raise ConfigError(f"landscape.groups.boxes[{g - 1}]: {key} but the landscape has {k} coordinates")
            lo, hi = float(bounds[0]), float(bounds[1])
            if lo > hi:
                raise ConfigError(f"landscape.groups.boxes[{g - 1}].{key}: lower bound {lo} > upper bound {hi}")
            inside &= (Y[:, axis - 1] >= lo) & (Y[:, axis - 1] <= hi)
        overlap += int((inside & (labels > 0)).sum())
        labels[inside & (labels == 0)] = g
    if overlap:
        log.warning("%d particles lie in more than one box: each assigned to the first box containing it", overlap)
    return labels


def assign_bins(values: np.ndarray, n_bins: int = 10, min_size: int = 900, drop_extremes: bool = True,
                binning: str = "width") -> tuple[np.ndarray, np.ndarray]:
    """Labels from quasi-uniform bins along one axis; returns (labels, edges of the groups (K, 2))."""
    v = np.asarray(values, np.float64)
    n = len(v)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, 2))
    if binning == "count":
        edges = np.quantile(v, np.linspace(0, 1, n_bins + 1))
    elif binning == "width":
        edges = np.linspace(v.min(), v.max(), n_bins + 1)
    else:
        raise ConfigError(f"landscape.groups.binning must be width or count, got {binning!r}")
    idx = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    # intervals as [first_bin, last_bin] of the original bins
    groups = [[b, b] for b in range(n_bins)]
    size = list(counts)
    dropped_bins: list[int] = []
    if drop_extremes:
        # a sparse tail: an end bin below min_size that is also sparse next to the bulk (under
        # half the mean bin). Below min_size alone is not enough: with fewer than
        # n_bins × min_size particles every bin is, and the ends would be eaten to the middle.
        sparse = min(min_size, 0.5 * n / n_bins)
        while groups and size[0] < sparse:
            dropped_bins.append(groups[0][0])
            groups.pop(0), size.pop(0)
        while groups and size[-1] < sparse:
            dropped_bins.append(groups[-1][0])
            groups.pop(), size.pop()
    while len(groups) > 1 and min(size) < min_size:
        i = int(np.argmin(size))
        if i == 0:
            j = 1
        elif i == len(groups) - 1:
            j = i - 1
        else:
            j = i - 1 if size[i - 1] <= size[i + 1] else i + 1
        a, b = min(i, j), max(i, j)
        groups[a] = [groups[a][0], groups[b][1]]
        size[a] += size[b]
        groups.pop(b), size.pop(b)
    if groups and size[0] < min_size:  # a single group, still too small
        log.warning("only %d particles in the binned range: fewer than min_size %d, no group formed", size[0], min_size)
        groups, size = [], []
    labels = np.zeros(n, np.int64)
    ranges = []
    for g, (a, b) in enumerate(groups, start=1):
        labels[(idx >= a) & (idx <= b)] = g
        ranges.append((edges[a], edges[b + 1]))
    return labels, np.asarray(ranges).reshape(-1, 2)


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber groups 1..K by decreasing size (ties by old label); 0 stays 0."""
    ids = [g for g in np.unique(labels) if g > 0]
    sizes = {g: int((labels == g).sum()) for g in ids}
    order = sorted(ids, key=lambda g: (-sizes[g], g))
    out = np.zeros_like(labels)
    for new, old in enumerate(order, start=1):
        out[labels == old] = new
    return out


def assign_kmeans(Y: np.ndarray, k: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    from sklearn.cluster import KMeans

    if len(Y) < k:
        raise InputError(None, f"k-means with k = {k} needs at least {k} particles, got {len(Y)}")
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(Y)
    return _relabel_by_size(km.labels_.astype(np.int64) + 1)


def assign_gmm(Y: np.ndarray, k: int, seed: int = 0, n_init: int = 2, min_probability: float = 0.0) -> np.ndarray:
    from sklearn.mixture import GaussianMixture

    if len(Y) < max(k, 2):
        raise InputError(None, f"a {k}-component mixture needs at least {max(k, 2)} particles, got {len(Y)}")
    gm = GaussianMixture(n_components=k, covariance_type="full", n_init=n_init, random_state=seed).fit(Y)
    post = gm.predict_proba(Y)
    labels = post.argmax(axis=1).astype(np.int64) + 1
    labels[post.max(axis=1) < min_probability] = 0
    return _relabel_by_size(labels)


def assign_density(Y: np.ndarray, grid: int = 128, bandwidth: float | None = None, min_peak: float = 0.1,
                   max_groups: int = 10, level: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels from the density peaks of a binned KDE on the first two coordinates; returns
    (labels, peak positions (K, 2))."""
    if Y.shape[1] < 2:
        Y2 = np.column_stack([Y[:, 0], np.zeros(len(Y))])
    else:
        Y2 = Y[:, :2]
    D, ex, ey, cells = binned_kde(Y2, grid, bandwidth)
    G = D.shape[0]
    # steepest ascent: each cell points to the highest of its 3×3 neighbourhood (itself included)
    padded = np.pad(D, 1, constant_values=-1.0)
    best = np.arange(G * G).reshape(G, G)
    best_val = D.copy()
    ii, jj = np.meshgrid(np.arange(G), np.arange(G), indexing="ij")
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            val = padded[1 + di:1 + di + G, 1 + dj:1 + dj + G]
            better = val > best_val
            best_val = np.where(better, val, best_val)
            ni, nj = np.clip(ii + di, 0, G - 1), np.clip(jj + dj, 0, G - 1)
            best = np.where(better, ni * G + nj, best)
    parent = best.ravel()
    root = parent.copy()
    for _ in range(4 * G):  # pointer jumping until every cell points at its peak
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    peaks = np.flatnonzero(root == np.arange(G * G))
    dflat = D.ravel()
    peaks = peaks[dflat[peaks] >= min_peak * dflat.max()]
    peaks = peaks[np.argsort(dflat[peaks])[::-1]][:max_groups]
    label_of_peak = np.zeros(G * G, np.int64)
    label_of_peak[peaks] = np.arange(1, len(peaks) + 1)
    cell = cells[:, 0] * G + cells[:, 1]
    r = root[cell]
    labels = label_of_peak[r]
    labels[dflat[cell] < level * dflat[r]] = 0
    centres = np.stack([(ex[peaks // G] + ex[peaks // G + 1]) / 2, (ey[peaks % G] + ey[peaks % G + 1]) / 2], 1)
    return labels, centres.reshape(-1, 2)


# ------------------------------------------------------------------------------ driver
@schema_settings("landscape.groups")
class GroupSettings:
    """The ``landscape.groups`` section (defaults and meanings: the schema)."""

    method: str
    boxes: list
    axis: int
    n_bins: int
    min_size: int
    drop_extremes: bool
    binning: str
    dims: int
    k: int
    n_init: int
    min_probability: float
    grid: int
    bandwidth: float | None
    min_peak: float
    max_groups: int
    level: float


def _by_boxes(Y, s: GroupSettings, seed: int):
    return assign_boxes(Y, s.boxes or []), {}


def _by_bins(Y, s: GroupSettings, seed: int):
    if not 1 <= s.axis <= Y.shape[1]:
        raise ConfigError(f"landscape.groups.axis = {s.axis} but the landscape has {Y.shape[1]} coordinates")
    labels, ranges = assign_bins(Y[:, s.axis - 1], s.n_bins, s.min_size, s.drop_extremes, s.binning)
    return labels, {"axis": s.axis, "ranges": ranges.tolist()}


def _by_kmeans(Y, s: GroupSettings, seed: int):
    return assign_kmeans(Y[:, :s.dims], s.k, seed, s.n_init), {}


def _by_gmm(Y, s: GroupSettings, seed: int):
    return assign_gmm(Y[:, :s.dims], s.k, seed, s.n_init, s.min_probability), {}


def _by_density(Y, s: GroupSettings, seed: int):
    labels, peaks = assign_density(Y, s.grid, s.bandwidth, s.min_peak, s.max_groups, s.level)
    return labels, {"peaks": peaks.tolist()}


#: grouping methods by the name of ``landscape.groups.method``
GROUPING = {"boxes": _by_boxes, "bins": _by_bins, "kmeans": _by_kmeans, "gmm": _by_gmm, "density": _by_density}


def assign_groups(Y: np.ndarray, settings: GroupSettings, seed: int = 0, source=None) -> tuple[np.ndarray, dict]:
    """Labels (0 = no group) for landscape coordinates ``Y`` (n, k); also returns
    method-specific details (edges, peaks). ``source`` (the landscape STAR file) is named in
    errors about the particles (none, non-finite coordinates, too few for the method)."""
    if settings.method not in GROUPING:
        raise ConfigError(f"unknown grouping method {settings.method!r} ({', '.join(GROUPING)})")
    Y = np.asarray(Y, np.float64)
    if Y.ndim != 2 or len(Y) == 0:
        raise InputError(source, "no particles to group")
    bad = ~np.isfinite(Y).all(axis=1)
    if bad.any():
        raise InputError(source, f"non-finite landscape coordinates ({int(bad.sum())} particle(s); first shown)",
                         row=int(np.flatnonzero(bad)[0]) + 1)
    try:
        labels, details = GROUPING[settings.method](Y, settings, seed)
    except InputError as exc:
        if exc.path is not None or source is None:
            raise
        raise InputError(source, exc.message, exc.row) from None
    return labels.astype(np.int64), {"method": settings.method, **details}


def summarise_groups(labels: np.ndarray, Y: np.ndarray, amplitudes: np.ndarray | None = None,
                     amplitude_names: list[str] | None = None) -> pd.DataFrame:
    """One row per group (and one for group 0 = dropped, when present): size, centroid and
    standard deviation of each landscape coordinate, mean of each amplitude."""
    rows = []
    for g in np.unique(labels):
        sel = labels == g
        row = {"group": int(g), "size": int(sel.sum())}
        for j in range(Y.shape[1]):
            row[f"pc{j + 1}_mean"] = float(Y[sel, j].mean())
            row[f"pc{j + 1}_std"] = float(Y[sel, j].std())
        if amplitudes is not None:
            for j, name in enumerate(amplitude_names or []):
                row[f"{name}_mean"] = float(amplitudes[sel, j].mean())
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ export
def group_file(outdir, g: int):
    from pathlib import Path

    return Path(outdir) / f"group_{g:02d}.star"


def export_groups(outdir, particles: pd.DataFrame, optics: pd.DataFrame | None, labels: np.ndarray,
                  summary: pd.DataFrame, details: dict | None = None, write_all: bool = True,
                  source=None) -> dict:
    """Write ``group_NN.star`` per group, ``dropped.star`` (label 0), ``particles.star``
    (everything, with ``dhnmaGroup``), ``groups.csv`` (summary) and ``groups.json``
    (the list of files, counts, method details). Every STAR keeps all columns and the optics
    table; image paths are rebased from ``source`` (the STAR the particles were read from).
    Returns the JSON content."""
    from pathlib import Path

    from .core.star import GROUP, write_star
    from .core.fileio import atomic_path, atomic_write_json

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    table = particles.copy()
    table[GROUP] = labels.astype(np.int64)
    # remove group files of an earlier run with more groups
    for old in outdir.glob("group_[0-9][0-9]*.star"):
        old.unlink()
    files = {}
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(labels.max(initial=0) + 2))
    for g in range(1, int(labels.max(initial=0)) + 1):
        idx = order[bounds[g]:bounds[g + 1]]
        if len(idx) == 0:
            continue
        p = group_file(outdir, g)
        write_star(p, table.iloc[idx], optics, source=source)
        files[g] = p.name
    dropped_idx = order[bounds[0]:bounds[1]]
    write_star(outdir / "dropped.star", table.iloc[dropped_idx], optics, source=source)
    if write_all:
        write_star(outdir / "particles.star", table, optics, source=source)
    with atomic_path(outdir / "groups.csv") as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")
    doc = {"n_particles": int(len(labels)), "n_groups": len(files), "n_dropped": int(len(dropped_idx)),
           "groups": {str(g): {"file": f, "size": int((labels == g).sum())} for g, f in files.items()},
           "dropped": "dropped.star", "all": "particles.star" if write_all else None, "details": details or {}}
    atomic_write_json(outdir / "groups.json", doc)
    return doc
