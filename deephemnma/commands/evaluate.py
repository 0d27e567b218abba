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
    p.add_argument("--landscape", metavar="STAR",
                   help="landscape STAR (dhnmaPC*, dhnmaGroup): rank correlation of each axis with the true position "
                        "along the simulated path (dhnmaConformation) and the spread of that position in each group")


def default_log(args) -> Path:
    return Path(args.outdir) / "evaluate.log"


def run(args, config: dict) -> int:
    from ..core.errors import InputError
    from ..core.fileio import atomic_write_json, require_file
    from ..evaluate import evaluate_group_maps_dir, evaluate_particles, read_groups_doc

    outdir = Path(args.outdir)
    if bool(args.groups) != bool(args.maps):
        raise InputError(args.groups or args.maps, "--groups and --maps go together (the group maps' FSC)")
    if args.groups:  # checked before any output is written
        if not args.modes:
            raise InputError(args.groups, "group map FSC needs --modes (the reference and its normal modes)")
        require_file(args.modes, "modes file")
        read_groups_doc(args.groups)
        if not Path(args.maps).is_dir():
            raise InputError(args.maps, "maps directory not found")
    summary, ctx = evaluate_particles(args.particles, args.truth, args.modes, outdir)
    if args.groups and args.maps:
        summary.update(evaluate_group_maps_dir(args.groups, args.maps, ctx, outdir,
                                               config["landscape"]["evaluation"]["atom_sigma"], args.truth))
    if args.landscape:
        from ..core.star import read_star
        from ..evaluate import landscape_agreement

        land = read_star(require_file(args.landscape, "landscape STAR file"))
        table = land.particles
        if args.groups:
            from ..evaluate import with_groups

            table = with_groups(table, args.groups, land.path)
        agreement = landscape_agreement(table, ctx["truth"], land.path, args.truth)
        if agreement:
            summary["landscape"] = agreement
    atomic_write_json(outdir / "summary.json", summary)
    line = [f"{summary['n']} particles"]
    if "amp_err_mean_over_modes" in summary:
        line.append(f"amplitude error {summary['amp_err_mean_over_modes']:.3g}")
    for c, unit in (("angle_err", "°"), ("shift_err", " Å"), ("rmsd_amp", " Å")):
        if c in summary:
            line.append(f"{c} {summary[c]['mean']:.3g}{unit}")
    if "landscape" in summary and "rank_correlation_dhnmaPC1" in summary["landscape"]:
        line.append(f"landscape axis 1 rank correlation with the true path {summary['landscape']['rank_correlation_dhnmaPC1']:+.2f}")
    print("; ".join(line))
    return 0
