"""Animations of the reference along the landscape axes, and group centroid structures.

A point ``y`` of the landscape is mapped back to normal-mode amplitudes by the fitted PCA
model (``q = model.inverse_transform(y)``), and the reference is displaced along the modes:
``x = x0 + Σ_m q_m · v_m`` (modes as unit-norm 3N vectors, the convention of the nma stage).

* :func:`axis_frames` — for landscape axis ``a``: ``n_frames`` points from the low to the
  high end of the data along that axis (quantiles ``q`` and ``1 − q`` of the particles'
  coordinates; ±2 standard deviations of the axis when no data are given), the other axes at
  the data centre (0); written as one multi-model PDB (``axis_01.pdb`` …), forward then back
  when ``bounce`` so the loop is seamless. ChimeraX: ``open axis_01.pdb coordsets true`` then
  ``coordset #1 1,N loop 10`` (``chimerax.cxc`` does this for every axis).
* :func:`centroid_structures` — the structure at each group's mean amplitudes
  (``group_01_centroid.pdb`` …, and all of them as the models of ``centroids.pdb``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .core.fileio import atomic_write_text
from .core.logs import get_logger
from .core.modes import displace, mode_stack

log = get_logger(__name__)


def axis_values(model, axis: int, Y=None, n_frames: int = 21, quantile: float = 0.02) -> np.ndarray:
    """Coordinates along ``axis`` (1-based) spanning the data (quantiles) or ±2 SD."""
    if Y is not None and len(Y):
        v = np.asarray(Y, np.float64)[:, axis - 1]
        lo, hi = np.quantile(v, [quantile, 1 - quantile])
    else:
        sd = float(np.sqrt(model.explained_variance[axis - 1]))
        lo, hi = -2 * sd, 2 * sd
    return np.linspace(lo, hi, n_frames)


def axis_frames(model, axis: int, ref_coords, mode_vectors, Y=None, n_frames: int = 21, quantile: float = 0.02,
                bounce: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coordinates (F, N, 3), landscape values (F,), amplitudes (F, M)) along one axis."""
    vals = axis_values(model, axis, Y, n_frames, quantile)
    Yf = np.zeros((len(vals), model.n_components))
    Yf[:, axis - 1] = vals
    amps = model.inverse_transform(Yf)
    coords = displace(ref_coords, mode_vectors, amps)
    if bounce and len(vals) > 2:
        coords = np.concatenate([coords, coords[-2:0:-1]])
        vals = np.concatenate([vals, vals[-2:0:-1]])
        amps = np.concatenate([amps, amps[-2:0:-1]])
    return coords, vals, amps


def write_axis_animations(outdir, atoms, modes: dict[int, np.ndarray], model, Y=None, n_frames: int = 21,
                          quantile: float = 0.02, bounce: bool = True, axes=None, source=None) -> list[Path]:
    """One multi-model PDB per landscape axis (``axis_01.pdb`` …) and ``chimerax.cxc``.
    ``source`` (the modes file) is named when atoms and modes disagree."""
    from .core.structure import write_multimodel_pdb

    outdir = Path(outdir)
    V = mode_stack(modes, model.columns)
    if V.shape[1] != len(atoms.coords):
        from .core.errors import InputError

        raise InputError(source if source is not None else getattr(atoms, "source", None),
                         f"the reference has {len(atoms.coords)} atoms but the modes {V.shape[1]}: "
                         f"use the atom selection the modes were computed with")
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    lines = ["# ChimeraX: open this file (File > Open) to play the landscape axes"]
    for a in axes or range(1, model.n_components + 1):
        coords, vals, _ = axis_frames(model, a, atoms.coords, V, Y, n_frames, quantile, bounce)
        p = outdir / f"axis_{a:02d}.pdb"
        write_multimodel_pdb(p, atoms, list(coords))
        paths.append(p)
        rms = float(np.sqrt(((coords - atoms.coords[None]) ** 2).sum(-1).mean(-1)).max())
        log.info("axis %d: %d frames, coordinate %.4g … %.4g, max RMSD from the reference %.2f Å",
                 a, len(coords), vals.min(), vals.max(), rms)
        lines += [f"open {p.name} coordsets true", f"coordset #{len(paths)} 1,{len(coords)} loop 10"]
    atomic_write_text(outdir / "chimerax.cxc", "\n".join(lines) + "\n")
    return paths


def read_centroids(path, columns: list[str]) -> dict[int, np.ndarray]:
    """Group → mean amplitudes over ``columns`` from a ``groups.csv`` of deephemnma groups
    (columns ``group`` and ``<column>_mean``); group 0 (no group) is left out. InputError
    naming the file (and the 1-based data row) when the table is not one."""
    import pandas as pd

    from .core.errors import InputError
    from .core.features import column_matrix
    from .core.fileio import require_file

    p = require_file(path, "groups table")
    try:
        table = pd.read_csv(p)
    except UnicodeDecodeError:
        raise InputError(p, "not a CSV table (binary content)") from None
    except pd.errors.EmptyDataError:
        raise InputError(p, "empty file: expected the groups.csv of deephemnma groups") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise InputError(p, f"not a readable CSV table ({str(exc).splitlines()[0][:80]})") from None
    cols = ["group"] + [f"{c}_mean" for c in columns]
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise InputError(p, f"missing column(s) {', '.join(missing)} (expected the groups.csv of deephemnma groups)")
    X, _ = column_matrix(table.rename(columns=lambda c: str(c)), cols, p, what="groups table value")
    out = {}
    for i, row in enumerate(X):
        g = int(row[0])
        if g != row[0] or g < 0:
            raise InputError(p, f"group {row[0]:g} is not a non-negative integer", row=i + 1)
        if g > 0:
            out[g] = row[1:]
    return out


def centroid_structures(outdir, atoms, modes: dict[int, np.ndarray], columns: list[str], centroids: dict[int, np.ndarray]
                        ) -> list[Path]:
    """``group_NN_centroid.pdb`` for each group (mean amplitudes ``centroids[g]`` over
    ``columns``) and ``centroids.pdb`` with all of them as models (in group order)."""
    from .core.structure import write_multimodel_pdb

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    V = mode_stack(modes, columns)
    groups = sorted(centroids)
    if not groups:
        return []
    coords = displace(atoms.coords, V, np.stack([centroids[g] for g in groups]))
    paths = []
    for g, xyz in zip(groups, coords):
        p = outdir / f"group_{g:02d}_centroid.pdb"
        write_multimodel_pdb(p, atoms, [xyz])
        paths.append(p)
    write_multimodel_pdb(outdir / "centroids.pdb", atoms, list(coords))
    return paths + [outdir / "centroids.pdb"]
