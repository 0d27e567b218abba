"""Every figure of the project (matplotlib, Agg backend: no display needed).

Each function draws one figure and writes it (PNG by the file suffix, or PDF/SVG) atomically,
returning the path; none keeps figures open. Large inputs are fine: scatter layers are
subsampled to ``max_points`` (seeded), densities use all points.

* :func:`landscape` — landscape scatter over a hexbin density (or binned KDE contours),
  group outlines (convex hulls of the group's points, the dense 98 % of them) with numbers.
* :func:`fsc_curves` — FSC curves with the 0.143 / 0.5 thresholds.
* :func:`amplitude_histograms` — one histogram per mode (optionally true amplitudes overlaid).
* :func:`predicted_vs_true` — predicted against true per parameter, with y = x.
* :func:`error_histograms` — distributions of per-particle errors.
* :func:`explained_variance` — PCA variance per axis.
* :func:`training_curves` — loss per epoch (train / validation) from a history table.
* :func:`embedding_comparison` — PCA and spectral coordinates side by side.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .fileio import atomic_path  # noqa: E402

GROUP_COLOURS = plt.get_cmap("tab10").colors


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def _subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def _hull(points: np.ndarray):
    from scipy.spatial import ConvexHull, QhullError

    if len(points) < 3:
        return None
    try:
        h = ConvexHull(points)
    except QhullError:
        return None
    v = points[h.vertices]
    return np.vstack([v, v[:1]])


def landscape(path, Y, labels=None, density: str = "hexbin", title: str | None = None, axes=(1, 2),
              max_points: int = 20000, axis_label: str = "PC", boxes=None, seed: int = 0) -> Path:
    """Landscape scatter (axes 1-based) with a density layer and group outlines."""
    Y = np.asarray(Y, np.float64)
    if Y.shape[1] == 1:
        Y = np.column_stack([Y[:, 0], np.zeros(len(Y))])
        axes = (1, 2)
    a, b = axes[0] - 1, axes[1] - 1
    x, y = Y[:, a], Y[:, b]
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    if density == "hexbin" and len(x) > 0:
        hb = ax.hexbin(x, y, gridsize=60, bins="log", cmap="Greys", mincnt=1, linewidths=0)
        fig.colorbar(hb, ax=ax, label="particles per cell (log)")
    elif density == "kde" and len(x) > 2:
        from .kde import binned_kde

        D, ex, ey, _ = binned_kde(np.column_stack([x, y]), grid=96)
        cx, cy = (ex[:-1] + ex[1:]) / 2, (ey[:-1] + ey[1:]) / 2
        cs = ax.contourf(cx, cy, D.T, levels=12, cmap="Greys")
        fig.colorbar(cs, ax=ax, label="density")
    sel = _subsample(len(x), max_points, seed)
    if labels is None:
        ax.scatter(x[sel], y[sel], s=2, c="tab:blue", alpha=0.3, linewidths=0)
    else:
        labels = np.asarray(labels)
        lab = labels[sel]
        ax.scatter(x[sel][lab == 0], y[sel][lab == 0], s=2, c="lightgrey", alpha=0.4, linewidths=0, label="no group")
        for g in np.unique(labels[labels > 0]):
            col = GROUP_COLOURS[(g - 1) % len(GROUP_COLOURS)]
            m = lab == g
            ax.scatter(x[sel][m], y[sel][m], s=2, color=col, alpha=0.4, linewidths=0)
            pts = np.column_stack([x[labels == g], y[labels == g]])
            if len(pts) > 50:  # outline of the dense 98 %: drop the 2 % farthest from the centroid
                d = np.linalg.norm((pts - pts.mean(0)) / (pts.std(0) + 1e-12), axis=1)
                pts = pts[d <= np.quantile(d, 0.98)]
            hull = _hull(pts)
            if hull is not None:
                ax.plot(hull[:, 0], hull[:, 1], color=col, lw=1.5)
            cx, cy = np.median(pts, axis=0)
            ax.text(cx, cy, str(int(g)), color="black", fontsize=10, ha="center", va="center", weight="bold",
                    bbox=dict(boxstyle="round,pad=0.15", fc=col, alpha=0.8, lw=0))
    for box in boxes or []:
        lo_x, hi_x = box.get(f"pc{axes[0]}", (x.min(), x.max()))
        lo_y, hi_y = box.get(f"pc{axes[1]}", (y.min(), y.max()))
        ax.add_patch(plt.Rectangle((lo_x, lo_y), hi_x - lo_x, hi_y - lo_y, fill=False, ls="--", color="tab:red"))
    ax.set_xlabel(f"{axis_label}{axes[0]}")
    ax.set_ylabel(f"{axis_label}{axes[1]}")
    ax.set_title(title or f"conformational landscape ({len(x)} particles)")
    return _save(fig, path)


def fsc_curves(path, curves: dict, thresholds=(0.143, 0.5), title: str = "Fourier shell correlation") -> Path:
    """``curves``: name → (frequency 1/Å, fsc)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, (f, c)) in enumerate(curves.items()):
        ax.plot(f, c, label=name, color=GROUP_COLOURS[i % len(GROUP_COLOURS)] if len(curves) <= 10 else None, lw=1.3)
    for t in thresholds:
        ax.axhline(t, color="grey", ls=":", lw=1)
        ax.text(0.0, t + 0.01, f"{t}", color="grey", fontsize=8)
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_title(title)
    ax.set_xlim(left=0)
    ticks = [t for t in ax.get_xticks() if 0 < t <= ax.get_xlim()[1]]
    top = ax.secondary_xaxis("top")
    top.set_xticks(ticks, [f"{1 / t:.3g}" for t in ticks])
    top.set_xlabel("resolution (Å)")
    if curves:
        ax.legend(fontsize=8, ncol=2 if len(curves) > 5 else 1)
    return _save(fig, path)


def amplitude_histograms(path, amplitudes, names, truth=None, bins: int = 60) -> Path:
    A = np.asarray(amplitudes, np.float64).reshape(len(amplitudes), -1)
    M = A.shape[1]
    fig, axs = plt.subplots(1, M, figsize=(3.2 * M, 3.0), squeeze=False)
    for j in range(M):
        ax = axs[0, j]
        ax.hist(A[:, j], bins=bins, color="tab:blue", alpha=0.7, label="estimated")
        if truth is not None:
            ax.hist(np.asarray(truth)[:, j], bins=bins, histtype="step", color="black", label="true")
        ax.set_title(names[j], fontsize=9)
        ax.set_xlabel("amplitude")
    axs[0, 0].set_ylabel("particles")
    if truth is not None:
        axs[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def predicted_vs_true(path, pred, true, names, max_points: int = 5000, seed: int = 0) -> Path:
    P = np.asarray(pred, np.float64).reshape(len(pred), -1)
    T = np.asarray(true, np.float64).reshape(len(true), -1)
    sel = _subsample(len(P), max_points, seed)
    M = P.shape[1]
    fig, axs = plt.subplots(1, M, figsize=(3.2 * M, 3.2), squeeze=False)
    for j in range(M):
        ax = axs[0, j]
        ax.scatter(T[sel, j], P[sel, j], s=3, alpha=0.4, linewidths=0)
        lo = np.nanmin([T[:, j].min(), P[:, j].min()])
        hi = np.nanmax([T[:, j].max(), P[:, j].max()])
        ax.plot([lo, hi], [lo, hi], color="black", lw=1)
        r = np.corrcoef(T[:, j], P[:, j])[0, 1] if len(T) > 1 else np.nan
        ax.set_title(f"{names[j]} (r = {r:.3f})", fontsize=9)
        ax.set_xlabel("true")
    axs[0, 0].set_ylabel("predicted")
    fig.tight_layout()
    return _save(fig, path)


def error_histograms(path, errors: dict, bins: int = 60) -> Path:
    """``errors``: name → per-particle values."""
    names = list(errors)
    fig, axs = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    for j, n in enumerate(names):
        v = np.asarray(errors[n], np.float64)
        axs[0, j].hist(v, bins=bins, color="tab:orange", alpha=0.8)
        axs[0, j].axvline(np.mean(v), color="black", lw=1)
        axs[0, j].set_title(f"{n}: mean {np.mean(v):.3g}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def explained_variance(path, ratios) -> Path:
    r = np.asarray(ratios, np.float64)
    fig, ax = plt.subplots(figsize=(4.0, 3.0))
    ax.bar(np.arange(1, len(r) + 1), 100 * r, color="tab:blue")
    ax.plot(np.arange(1, len(r) + 1), 100 * np.cumsum(r), "o-", color="black", ms=3, label="cumulative")
    ax.set_xlabel("principal axis")
    ax.set_ylabel("variance explained (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    return _save(fig, path)


def training_curves(path, history, title: str = "training") -> Path:
    """``history``: a table (DataFrame) with an ``epoch`` column and loss columns."""
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    x = history["epoch"].to_numpy() if "epoch" in history.columns else np.arange(len(history))
    for c in history.columns:
        if c == "epoch" or not np.issubdtype(history[c].dtype, np.number):
            continue
        if "loss" in c.lower() or "err" in c.lower():
            ax.plot(x, history[c].to_numpy(), label=c, lw=1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    vals = history.select_dtypes("number").drop(columns=[c for c in ("epoch",) if c in history.columns])
    if len(vals) and (vals.to_numpy() > 0).all() and vals.to_numpy().max() / max(vals.to_numpy().min(), 1e-300) > 100:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def embedding_comparison(path, Y_pca, Y_spec, colour=None, max_points: int = 20000, seed: int = 0) -> Path:
    sel = _subsample(len(Y_pca), max_points, seed)
    c = None if colour is None else np.asarray(colour)[sel]
    fig, axs = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, Y, name in ((axs[0], Y_pca, "PC"), (axs[1], Y_spec, "spectral ")):
        Y = np.asarray(Y)
        yy = Y[sel, 1] if Y.shape[1] > 1 else np.zeros(len(sel))
        sc = ax.scatter(Y[sel, 0], yy, s=2, c=c, cmap="viridis", alpha=0.5, linewidths=0)
        ax.set_xlabel(f"{name}1")
        ax.set_ylabel(f"{name}2")
    if c is not None:
        fig.colorbar(sc, ax=axs, label="PC1")
    axs[0].set_title("PCA")
    axs[1].set_title("Laplacian eigenmaps")
    return _save(fig, path)
