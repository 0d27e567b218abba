"""Accuracy against ground truth (synthetic data): the paper's metrics, and map FSCs.

* :func:`centroid_map` — the map "simulated from a structure" against which group
  reconstructions are compared (atoms rasterised by :func:`deephemnma.core.density.atoms_to_volume`).
* :func:`load_ground_truth` — a CSV or STAR table keyed by ``rlnImageName`` with the true
  amplitudes (``dhnmaAmplitude007`` …), angles (``rlnAngleRot/Tilt/Psi``) and shifts
  (``rlnOriginX/YAngst``).
* :func:`parameter_errors` — per particle: absolute amplitude error per mode, angle error
  (the paper's: mean over the three axes of the angle between corresponding rows of the two
  rotation matrices, :func:`deephemnma.core.geometry.angular_error`), shift error (mean absolute
  error over x and y, and Euclidean), and with the reference atoms and modes the RMSD terms
  (atoms displaced with predicted vs true amplitudes; rotated with predicted vs true angles;
  the shift difference).
* :func:`summarise_errors` — means and standard deviations (the paper's Tables 1–4).
* :func:`group_map_fsc` — FSC between a group's map and the map simulated from the group's
  ground-truth centroid structure, with resolutions at 0.5 and 0.143.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .core import fsc as fscmod
from .core.errors import InputError
from .core.density import atoms_to_volume
from .core.geometry import angular_error, euler_to_matrix
from .core.star import ANGLE_COLUMNS, IMAGE_NAME, ORIGIN_COLUMNS, ORIGINAL_IMAGE_NAME

ANGLES = list(ANGLE_COLUMNS)
ORIGINS = list(ORIGIN_COLUMNS)


def load_ground_truth(path) -> pd.DataFrame:
    """Ground-truth table (CSV or STAR) keyed by ``rlnImageName`` (a leading underscore in
    CSV headers is accepted)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "ground-truth table not found")
    if path.suffix.lower() == ".star":
        from .core.star import read_star

        df = read_star(path).particles
    else:
        try:
            df = pd.read_csv(path)
        except Exception as exc:  # noqa: BLE001 - any parser failure is bad input
            raise InputError(path, f"not a readable CSV table ({exc.__class__.__name__})") from None
        df.columns = [c[1:] if c.startswith("_") else c for c in df.columns]
    if IMAGE_NAME not in df.columns:
        raise InputError(path, f"missing column {IMAGE_NAME} (the particle key)")
    if df[IMAGE_NAME].duplicated().any():
        i = int(np.flatnonzero(df[IMAGE_NAME].duplicated().to_numpy())[0])
        raise InputError(path, f"duplicate particle {df[IMAGE_NAME].iloc[i]}", row=i + 1)
    _require_finite(df, truth_columns(df), path, "ground-truth value")
    return df


def truth_columns(df: pd.DataFrame) -> list[str]:
    """The columns of ``df`` that the metrics read: amplitudes, angles, origins."""
    from .core.star import amplitude_columns

    return amplitude_columns(df) + [c for c in ANGLES + ORIGINS if c in df.columns]


def _require_finite(df: pd.DataFrame, cols: list[str], path, what: str) -> None:
    """InputError naming ``path`` and the 1-based row of the first non-numeric or non-finite value."""
    from .core.features import column_matrix

    if cols:
        column_matrix(df, cols, path, what=what)


def _particle_keys(names: pd.Series) -> pd.Index:
    """``NNN@path`` names as comparable keys: the index without zero padding and the path
    normalised (``000001@a/../p.mrcs`` and ``1@p.mrcs`` are the same particle)."""
    def key(name) -> str:
        idx, at, path = str(name).partition("@")
        return f"{int(idx)}@{os.path.normpath(path)}" if at and idx.strip().isdigit() else os.path.normpath(str(name))

    return pd.Index([key(n) for n in names])


def align_tables(pred: pd.DataFrame, truth: pd.DataFrame, source=None, truth_source=None
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of ``truth`` in the order of ``pred``, matched by image name: the original
    ``rlnImageName`` kept by preprocess (``dhnmaOriginalImageName``) when ``pred`` has it,
    else ``rlnImageName``. Names are compared as particle index + normalised path; with
    ``source`` (the STAR file ``pred`` was read from) and ``truth_source`` (the truth table's
    path), relative stack paths are first re-expressed from ``source``'s directory to the
    truth's, so a subset STAR written elsewhere (e.g. a group file) still matches.
    Particles without ground truth are an error."""
    key = ORIGINAL_IMAGE_NAME if ORIGINAL_IMAGE_NAME in pred.columns else IMAGE_NAME
    truth_keys = _particle_keys(truth[IMAGE_NAME])
    idx = truth_keys.get_indexer(_particle_keys(pred[key]))
    if (idx < 0).any() and key == IMAGE_NAME and source is not None and truth_source is not None:
        from .core.star import rebase_image_names

        names = rebase_image_names(pred[[IMAGE_NAME]], source, truth_source)[IMAGE_NAME]
        idx = truth_keys.get_indexer(_particle_keys(names))
    if (idx < 0).any():
        i = int(np.flatnonzero(idx < 0)[0])
        raise InputError(source, f"particle {pred[key].iloc[i]} has no ground truth", row=i + 1)
    return pred.reset_index(drop=True), truth.iloc[idx].reset_index(drop=True)


# ----------------------------------------------------------------------------- metrics
def parameter_errors(pred: pd.DataFrame, truth: pd.DataFrame, modes: list[int] | None = None,
                     ref_coords=None, mode_vectors=None) -> pd.DataFrame:
    """Per-particle errors of ``pred`` against ``truth`` (rows aligned, see :func:`align_tables`).

    Columns: ``amp_err_007`` … (absolute), ``angle_err`` (°), ``shift_err`` (Å, mean abs over
    x, y), ``shift_dist`` (Å, Euclidean); with ``ref_coords`` (N, 3) Å centred on the rotation
    centre and ``mode_vectors`` (M, N, 3) for ``modes``: ``rmsd_amp``, ``rmsd_angle``,
    ``rmsd_shift`` (Å)."""
    from .core.star import amplitude_column

    out = {IMAGE_NAME: pred[IMAGE_NAME].to_numpy()}
    if modes is None:
        from .core.star import amplitude_modes

        modes = [m for m in amplitude_modes(pred) if amplitude_column(m) in truth.columns]
    dq = None
    if modes:
        cols = [amplitude_column(m) for m in modes]
        dq = pred[cols].to_numpy(np.float64) - truth[cols].to_numpy(np.float64)
        for m, j in zip(modes, range(len(modes))):
            out[f"amp_err_{m:03d}"] = np.abs(dq[:, j])
    A = B = None
    if all(c in pred.columns and c in truth.columns for c in ANGLES):
        A = euler_to_matrix(pred[ANGLES].to_numpy(np.float64))
        B = euler_to_matrix(truth[ANGLES].to_numpy(np.float64))
        out["angle_err"] = angular_error(A, B)
    ds = None
    if all(c in pred.columns and c in truth.columns for c in ORIGINS):
        ds = pred[ORIGINS].to_numpy(np.float64) - truth[ORIGINS].to_numpy(np.float64)
        out["shift_err"] = np.abs(ds).mean(axis=1)
        out["shift_dist"] = np.sqrt((ds ** 2).sum(axis=1))
    if ref_coords is not None:
        X = np.asarray(ref_coords, np.float64)
        if dq is not None and mode_vectors is not None:
            V = np.asarray(mode_vectors, np.float64)  # (M, N, 3)
            disp = np.einsum("pm,mnk->pnk", dq, V) if len(X) * len(dq) <= 5e7 else None
            if disp is not None:
                out["rmsd_amp"] = np.sqrt((disp ** 2).sum(-1).mean(-1))
            else:  # large: Gram matrix of the modes (M×M): |Σ dq_m v_m|² = dqᵀ G dq
                G = np.einsum("mnk,lnk->ml", V, V) / len(X)
                out["rmsd_amp"] = np.sqrt(np.einsum("pm,ml,pl->p", dq, G, dq))
        if A is not None:
            # RMSD of the reference rotated by A vs by B: ‖(A−B)x‖² averaged over atoms
            C = np.einsum("ni,nj->ij", X, X) / len(X)
            D = A - B
            out["rmsd_angle"] = np.sqrt(np.einsum("pij,jk,pik->p", D, C, D).clip(min=0))
        if ds is not None:
            out["rmsd_shift"] = out["shift_dist"]
    return pd.DataFrame(out)


def summarise_errors(errors: pd.DataFrame) -> dict:
    """Mean and standard deviation of every error column (the paper's tables)."""
    res = {"n": int(len(errors))}
    for c in errors.columns:
        if c == IMAGE_NAME:
            continue
        v = errors[c].to_numpy(np.float64)
        res[c] = {"mean": float(np.mean(v)), "std": float(np.std(v)), "median": float(np.median(v))}
    amp = [c for c in errors.columns if c.startswith("amp_err_")]
    if amp:
        res["amp_err_mean_over_modes"] = float(errors[amp].to_numpy().mean())
    return res


def group_map_fsc(group_map, reference_map, voxel_size: float, mask=None) -> fscmod.FSCCurve:
    """FSC between a group's reconstruction and the map simulated from its ground-truth
    centroid structure (optionally masked); read resolutions with ``curve.resolution(0.5)``."""
    a = np.asarray(group_map, np.float64)
    b = np.asarray(reference_map, np.float64)
    if mask is not None:
        a = a * mask
        b = b * mask
    return fscmod.fsc(a, b, voxel_size)


# ----------------------------------------------------------------------------- map alignment
def best_translation(moving, fixed) -> np.ndarray:
    """Shift (dz, dy, dx voxels) that best superposes ``moving`` on ``fixed`` (cross-correlation
    peak with parabolic sub-voxel refinement)."""
    a = np.asarray(fixed, np.float64)
    b = np.asarray(moving, np.float64)
    cc = np.fft.irfftn(np.fft.rfftn(a) * np.conj(np.fft.rfftn(b)), s=a.shape, axes=(0, 1, 2))
    peak = np.array(np.unravel_index(np.argmax(cc), cc.shape))
    shift = peak.astype(float)
    for ax in range(3):
        n = cc.shape[ax]
        idx = [int(p) for p in peak]
        vals = []
        for d in (-1, 0, 1):
            j = list(idx)
            j[ax] = (idx[ax] + d) % n
            vals.append(cc[tuple(j)])
        den = vals[0] - 2 * vals[1] + vals[2]
        if den < 0:
            shift[ax] += 0.5 * (vals[0] - vals[2]) / den
    shape = np.array(a.shape)
    return np.where(shift > shape / 2, shift - shape, shift)


def shift_volume(vol, shift) -> np.ndarray:
    """Translate a volume by ``shift`` (dz, dy, dx) voxels (Fourier phase ramp, periodic)."""
    v = np.asarray(vol, np.float64)
    k = [np.fft.fftfreq(n) for n in v.shape[:2]] + [np.fft.rfftfreq(v.shape[2])]
    ph = np.exp(-2j * np.pi * (k[0][:, None, None] * shift[0] + k[1][None, :, None] * shift[1]
                               + k[2][None, None, :] * shift[2]))
    return np.fft.irfftn(np.fft.rfftn(v) * ph, s=v.shape, axes=(0, 1, 2))


def centroid_map(ref_coords, mode_vectors, amplitudes, weights, sigma: float, box: int, pixel_size: float,
                 centre=None) -> np.ndarray:
    """Map of the reference displaced by ``amplitudes`` (M,), atoms relative to ``centre``
    (default: the weighted centre of the reference)."""
    X0 = np.asarray(ref_coords, np.float64)
    w = np.ones(len(X0)) if weights is None else np.asarray(weights, np.float64)
    c = np.average(X0, axis=0, weights=w) if centre is None else np.asarray(centre, np.float64)
    X = X0 + np.einsum("m,mnk->nk", np.asarray(amplitudes, np.float64), np.asarray(mode_vectors, np.float64))
    return atoms_to_volume(X - c, box=box, pixel_size=pixel_size, weights=w, sigma=sigma)


def evaluate_group_maps(groups: dict[int, np.ndarray], maps: dict[int, tuple[np.ndarray, float]], ref_coords,
                        mode_vectors, weights=None, sigma: float = 1.0, align: bool = True) -> pd.DataFrame:
    """FSC of each group's map against the map simulated from its ground-truth centroid.

    ``groups``: group → true mean amplitudes (M,); ``maps``: group → (map, voxel size). The
    simulated map is first translated onto the reconstruction (cross-correlation), since the
    two may place the molecule's centre differently. Returns one row per group with the
    resolutions at FSC 0.5 and 0.143 and the applied shift; the curves are in ``.attrs``."""
    rows, curves = [], {}
    for g in sorted(groups):
        if g not in maps:
            continue
        vol, pix = maps[g]
        ref = centroid_map(ref_coords, mode_vectors, groups[g], weights, sigma, vol.shape[0], pix)
        shift = np.zeros(3)
        if align:
            shift = best_translation(ref, vol)
            ref = shift_volume(ref, shift)
        curve = group_map_fsc(vol, ref, pix)
        curves[g] = curve
        rows.append({"group": g, "resolution_fsc05": curve.resolution(0.5), "resolution_fsc0143": curve.resolution(0.143),
                     "shift_A": float(np.linalg.norm(shift) * pix), "voxel_size": pix, "box": int(vol.shape[0])})
    out = pd.DataFrame(rows)
    out.attrs["curves"] = curves
    return out


# ------------------------------------------------------------------------------ stage driver
def evaluate_particles(particles, truth_path, modes_path, outdir) -> tuple[dict, dict]:
    """Per-particle errors of a STAR file against the ground truth: errors.csv and figures in
    ``outdir``; returns (summary, context for :func:`evaluate_group_maps_dir`)."""
    from .core import plots
    from .core.fileio import atomic_path, require_file
    from .core.modes import load_modes, mode_stack
    from .core.star import amplitude_column, amplitude_modes, read_star

    outdir = Path(outdir)
    star = read_star(require_file(particles, "particle STAR file"))
    if len(star.particles) == 0:
        raise InputError(star.path, "no particles to evaluate")
    truth_all = load_ground_truth(truth_path)
    pred, truth = align_tables(star.particles, truth_all, star.path, truth_path)
    modes = [m for m in amplitude_modes(pred) if amplitude_column(m) in truth.columns]
    used = [amplitude_column(m) for m in modes] + [c for c in ANGLES + ORIGINS if c in pred and c in truth]
    if not used:
        raise InputError(star.path, f"nothing to compare with {truth_path}: no amplitude (dhnmaAmplitudeNNN), angle "
                                    f"(rlnAngleRot/Tilt/Psi) or origin (rlnOriginX/YAngst) columns in both")
    _require_finite(pred, used, star.path, "value")
    ms = ref = V = None
    if modes_path:
        ms = load_modes(require_file(modes_path, "modes file"))
        have = {int(n) for n in ms.mode_numbers}
        lacking = [m for m in modes if m not in have]
        if lacking:
            raise InputError(modes_path, f"lacks mode(s) {', '.join(map(str, lacking))} of the amplitudes in "
                                         f"{star.path} (it has {', '.join(str(n) for n in sorted(have))})")
        if ms.modes.ndim != 3 or ms.modes.shape[1] != len(ms.coords):
            raise InputError(modes_path, f"inconsistent normal-mode file: {len(ms.coords)} atoms but mode vectors "
                                         f"of shape {tuple(ms.modes.shape)}")
        ref, mode_dict = ms.coords, {int(n): v for n, v in zip(ms.mode_numbers, ms.modes)}
        V = mode_stack(mode_dict, [amplitude_column(m) for m in modes]) if modes else None
    outdir.mkdir(parents=True, exist_ok=True)
    errors = parameter_errors(pred, truth, modes, ref, V)
    summary = summarise_errors(errors)
    with atomic_path(outdir / "errors.csv") as tmp:
        errors.to_csv(tmp, index=False, float_format="%.6g")
    if modes:
        cols = [amplitude_column(m) for m in modes]
        plots.predicted_vs_true(outdir / "amplitudes_vs_true.png", pred[cols].to_numpy(), truth[cols].to_numpy(), cols)
        plots.amplitude_histograms(outdir / "amplitude_histograms.png", pred[cols].to_numpy(), cols,
                                   truth=truth[cols].to_numpy())
    err_cols = {c: errors[c] for c in ("angle_err", "shift_err", "rmsd_amp") if c in errors.columns}
    if err_cols:
        plots.error_histograms(outdir / "errors.png", err_cols)
    return summary, {"truth": truth_all, "modes": modes, "ref": ref, "V": V, "mode_set": ms}


def read_groups_doc(groups_dir) -> dict:
    """``groups.json`` of a deephemnma groups directory (InputError naming it when it is not one)."""
    import json

    from .core.fileio import require_file

    p = require_file(Path(groups_dir) / "groups.json", "groups.json")
    try:
        doc = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(p, f"not a JSON file ({getattr(exc, 'msg', 'binary content')})") from None
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, dict) or not all(str(g).isdigit() and isinstance(v, dict) and "file" in v
                                               for g, v in groups.items()):
        raise InputError(p, "not the groups.json of deephemnma groups (no 'groups' with a file per group)")
    for info in groups.values():
        require_file(Path(groups_dir) / str(info["file"]), f"group STAR file (listed in {p})")
    return doc


def evaluate_group_maps_dir(groups_dir, maps_dir, ctx: dict, outdir, atom_sigma: float, truth_path=None) -> dict:
    """Each group's map (``maps_dir/group_NN/map.mrc``) against the map of its true centroid
    structure: group_fsc.csv and group_fsc.png in ``outdir``; returns the summary entries."""
    from .core import plots
    from .core.fileio import atomic_path, require_file
    from .core.mrc import read_volume
    from .core.star import amplitude_column, read_star

    if ctx["ref"] is None or not ctx["modes"]:
        raise InputError(groups_dir, "group map FSC needs --modes and amplitude columns in the ground truth")
    gdoc = read_groups_doc(groups_dir)
    cols = [amplitude_column(m) for m in ctx["modes"]]
    centroids, maps = {}, {}
    for g, info in gdoc["groups"].items():
        g = int(g)
        members = read_star(require_file(Path(groups_dir) / info["file"], "group STAR file")).particles
        _, t = align_tables(members, ctx["truth"], Path(groups_dir) / info["file"], truth_path)
        centroids[g] = t[cols].to_numpy(np.float64).mean(axis=0)
        mpath = Path(maps_dir) / f"group_{g:02d}" / "map.mrc"
        if mpath.is_file():
            v = read_volume(mpath)
            maps[g] = (v.data, float(v.voxel_size))
    weights = ctx["mode_set"].weights  # per-atom density weights of the reference the modes belong to
    table = evaluate_group_maps(centroids, maps, ctx["ref"], ctx["V"], weights, atom_sigma)
    with atomic_path(Path(outdir) / "group_fsc.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    out: dict = {}
    curves = table.attrs["curves"]
    if curves:
        plots.fsc_curves(Path(outdir) / "group_fsc.png", {f"group {g}": (c.frequency, c.fsc) for g, c in curves.items()},
                         title="group maps vs maps of their true centroid structures")
        out["group_maps"] = {"n": len(table), "mean_resolution_fsc05": float(table["resolution_fsc05"].mean()),
                             "mean_resolution_fsc0143": float(table["resolution_fsc0143"].mean())}
    missing = sorted(set(centroids) - set(maps))
    if missing:
        out.setdefault("group_maps", {})["missing_maps"] = missing
    return out


#: the position of each simulated particle along its conformational path (``deephemnma simulate``)
TRUE_POSITION = "dhnmaConformation"


def landscape_agreement(landscape: pd.DataFrame, truth: pd.DataFrame, source=None, truth_source=None) -> dict:
    """How well the landscape recovers the simulated path: Spearman rank correlation of each
    landscape axis (``dhnmaPC1`` …) with each particle's true position along the path
    (``dhnmaConformation``), and, per group (``dhnmaGroup``), the spread of the true positions
    of its members next to the spread over all particles (a group of random particles spreads
    as much as all of them). Empty when the truth has no path position."""
    from scipy.stats import spearmanr

    from .core.star import GROUP, pc_columns

    if TRUE_POSITION not in truth.columns:
        return {}
    pred, t = align_tables(landscape, truth, source, truth_source)
    r = pd.to_numeric(t[TRUE_POSITION], errors="coerce").to_numpy(np.float64)
    out: dict = {"n": int(len(r)), "true_position_std": float(np.std(r))}
    for c in pc_columns(pred):
        rho = spearmanr(pred[c].to_numpy(np.float64), r).statistic
        out[f"rank_correlation_{c}"] = float(rho)
    if GROUP in pred.columns:
        g = pred[GROUP].to_numpy()
        out["groups"] = {int(k): {"n": int((g == k).sum()), "true_position_mean": float(r[g == k].mean()),
                                  "true_position_std": float(r[g == k].std())}
                         for k in np.unique(g) if k > 0}
        if out["groups"]:
            out["mean_group_true_position_std"] = float(np.mean([v["true_position_std"] for v in out["groups"].values()]))
    return out


def with_groups(landscape: pd.DataFrame, groups_dir, source=None) -> pd.DataFrame:
    """The landscape table with ``dhnmaGroup`` from the group STAR files of ``groups_dir``
    (``groups.json`` lists them; particles matched by their original image name), 0 = none."""
    from .core.star import GROUP, read_star

    if GROUP in landscape.columns:
        return landscape
    doc = read_groups_doc(groups_dir)
    key = ORIGINAL_IMAGE_NAME if ORIGINAL_IMAGE_NAME in landscape.columns else IMAGE_NAME
    member = {}
    for g, info in doc["groups"].items():
        t = read_star(Path(groups_dir) / info["file"]).particles
        k = ORIGINAL_IMAGE_NAME if ORIGINAL_IMAGE_NAME in t.columns else IMAGE_NAME
        member.update(dict.fromkeys(t[k].astype(str), int(g)))
    out = landscape.copy()
    out[GROUP] = landscape[key].astype(str).map(member).fillna(0).astype(np.int64).to_numpy()
    return out
