"""``deephemnma evaluate``: accuracy against ground truth (synthetic data)."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "evaluate"
STAGE = Stage(order=90, sections=("landscape",), results="evaluate", report="Evaluation against ground truth")
HELP = "compare estimated parameters (and group maps) with the ground truth of synthetic data"
DESCRIPTION = (
    "The paper's accuracy metrics for a particle STAR file against a ground-truth table (CSV or\n"
    "STAR keyed by rlnImageName, with the true dhnmaAmplitudeNNN, rlnAngleRot/Tilt/Psi and\n"
    "rlnOriginX/YAngst): mean absolute amplitude error per mode, angle error (mean over the\n"
    "three axes of the angle between corresponding rows of the rotation matrices), shift error\n"
    "(Å) and, with --modes, the RMSD terms (atoms displaced with estimated vs true amplitudes,\n"
    "rotated with estimated vs true angles, shifted). With --groups and --maps, the FSC of each\n"
    "group's map (maps/group_NN/map.mrc) against the map simulated from the group's ground-truth\n"
    "centroid structure. Writes in --outdir: errors.csv (per particle), summary.json,\n"
    "group_fsc.csv, and figures."
)
EXAMPLES = [
    "deephemnma evaluate --particles predicted.star --truth truth.csv --modes modes.npz --outdir evaluation/",
    "deephemnma evaluate --particles landscape.star --truth truth.csv --modes modes.npz --groups groups/ "
    "--maps maps/ --outdir evaluation/",
]


def add_arguments(p) -> None:
    p.add_argument("--particles", required=True, metavar="STAR", help="estimated parameters")
    p.add_argument("--truth", required=True, metavar="CSV|STAR", help="ground truth keyed by rlnImageName")
    p.add_argument("--outdir", required=True, metavar="DIR", help="output directory")
    p.add_argument("--modes", metavar="FILE", help="normal modes (nma stage output): RMSD terms and group maps")
    p.add_argument("--groups", metavar="DIR", help="output directory of deephemnma groups")
    p.add_argument("--maps", metavar="DIR", help="directory with one reconstruction per group (group_NN/map.mrc)")


def default_log(args) -> Path:
    return Path(args.outdir) / "evaluate.log"


def run(args, config: dict) -> int:
    import json

    import numpy as np

    from ..core import plots
    from ..core.star import amplitude_column, amplitude_modes, read_star
    from ..core.mrc import read_volume
    from ..core.modes import load_modes
    from ..core.modes import mode_stack
    from ..core.errors import InputError
    from ..evaluate import align_tables, evaluate_group_maps, load_ground_truth, parameter_errors, summarise_errors
    from ..core.fileio import atomic_path, atomic_write_json, require_file

    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    star = read_star(require_file(args.particles, "particle STAR file"))
    truth_all = load_ground_truth(args.truth)
    pred, truth = align_tables(star.particles, truth_all, star.path, args.truth)
    modes = [m for m in amplitude_modes(pred) if amplitude_column(m) in truth.columns]
    ref = V = None
    if args.modes:
        ms = load_modes(require_file(args.modes, "modes file"))
        ref, mode_dict = ms.coords, {int(n): v for n, v in zip(ms.mode_numbers, ms.modes)}
        V = mode_stack(mode_dict, [amplitude_column(m) for m in modes]) if modes else None
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

    if args.groups and args.maps:
        if ref is None or not modes:
            raise InputError(args.groups, "group map FSC needs --modes and amplitude columns in the ground truth")
        gdoc = json.loads(require_file(Path(args.groups) / "groups.json", "groups.json").read_text())
        cols = [amplitude_column(m) for m in modes]
        centroids, maps = {}, {}
        for g, info in gdoc["groups"].items():
            g = int(g)
            members = read_star(Path(args.groups) / info["file"]).particles
            _, t = align_tables(members, truth_all, Path(args.groups) / info["file"], args.truth)
            centroids[g] = t[cols].to_numpy(np.float64).mean(axis=0)
            mpath = Path(args.maps) / f"group_{g:02d}" / "map.mrc"
            if mpath.is_file():
                v = read_volume(mpath)
                maps[g] = (v.data, float(v.voxel_size))
        weights = ms.weights  # per-atom density weights of the reference the modes belong to
        table = evaluate_group_maps(centroids, maps, ref, V, weights, config["landscape"]["evaluation"]["atom_sigma"])
        with atomic_path(outdir / "group_fsc.csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.6g")
        curves = table.attrs["curves"]
        if curves:
            plots.fsc_curves(outdir / "group_fsc.png", {f"group {g}": (c.frequency, c.fsc) for g, c in curves.items()},
                             title="group maps vs maps of their true centroid structures")
            summary["group_maps"] = {
                "n": len(table), "mean_resolution_fsc05": float(table["resolution_fsc05"].mean()),
                "mean_resolution_fsc0143": float(table["resolution_fsc0143"].mean())}
        missing = sorted(set(centroids) - set(maps))
        if missing:
            summary.setdefault("group_maps", {})["missing_maps"] = missing
    atomic_write_json(outdir / "summary.json", summary)
    line = [f"{summary['n']} particles"]
    if "amp_err_mean_over_modes" in summary:
        line.append(f"amplitude error {summary['amp_err_mean_over_modes']:.3g}")
    for c, unit in (("angle_err", "°"), ("shift_err", " Å"), ("rmsd_amp", " Å")):
        if c in summary:
            line.append(f"{c} {summary[c]['mean']:.3g}{unit}")
    print("; ".join(line))
    return 0
