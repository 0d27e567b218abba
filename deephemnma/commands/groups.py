"""``deephemnma groups``: group particles in the landscape and export each group as a STAR file."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "groups"
STAGE = Stage(order=75, sections=("landscape",), results="groups", report="Groups")
HELP = "group particles in the landscape; one RELION STAR file per group"
DESCRIPTION = (
    "Group the particles of a landscape STAR file (columns dhnmaPC1 ...) by the method of\n"
    "landscape.groups (boxes, quasi-uniform bins along an axis, k-means, Gaussian mixture,\n"
    "density peaks). Writes in --outdir: group_01.star ... (each keeping every column and the\n"
    "optics table, with dhnmaGroup), dropped.star (particles in no group), particles.star (all,\n"
    "with dhnmaGroup; 0 = no group), groups.csv (size, centroid and spread in the landscape,\n"
    "mean amplitudes) and groups.json (files, counts, method details), plus landscape_groups.png.\n"
    "The groups are disjoint and groups + dropped = the input."
)
EXAMPLES = [
    "deephemnma groups --particles landscape.star --outdir groups/",
    "deephemnma groups --particles landscape.star --outdir groups/ --set landscape.groups.method=kmeans "
    "--set landscape.groups.k=10",
    "deephemnma groups --particles landscape.star --outdir groups/ --set landscape.groups.method=boxes "
    "--set 'landscape.groups.boxes=[{pc1: [-900, -100]}, {pc1: [100, 900]}]'",
]


def add_arguments(p) -> None:
    p.add_argument("--particles", required=True, metavar="STAR", help="landscape STAR file (dhnmaPC columns)")
    p.add_argument("--outdir", required=True, metavar="DIR", help="output directory")
    p.add_argument("--no-all", action="store_true", help="do not write particles.star (all particles with dhnmaGroup)")


def default_log(args) -> Path:
    return Path(args.outdir) / "groups.log"


def run(args, config: dict) -> int:
    import numpy as np

    from ..core import plots
    from ..core.star import amplitude_columns, pc_columns, read_star
    from ..core.errors import InputError
    from ..core.features import column_matrix
    from ..core.fileio import require_file
    from ..groups import GroupSettings, assign_groups, export_groups, summarise_groups

    section = config["landscape"]
    gs = GroupSettings.from_config(config)
    star = read_star(require_file(args.particles, "landscape STAR file"))
    cols = pc_columns(star.particles)
    if not cols:
        raise InputError(star.path, "no landscape coordinates (dhnmaPC1 ...): run deephemnma landscape first")
    Y, _ = column_matrix(star.particles, cols, star.path, what="landscape coordinate")
    labels, details = assign_groups(Y, gs, config["seed"], source=star.path)
    amp_cols = amplitude_columns(star.particles)
    summary = summarise_groups(labels, Y, star.particles[amp_cols].to_numpy(np.float64) if amp_cols else None, amp_cols)
    doc = export_groups(args.outdir, star.particles, star.optics, labels, summary, details, write_all=not args.no_all,
                        source=star.path)
    plots.landscape(Path(args.outdir) / "landscape_groups.png", Y, labels, density=section["plots"]["density"],
                    max_points=section["plots"]["max_points"], seed=config["seed"],
                    boxes=gs.boxes if gs.method == "boxes" else None,
                    title=f"{doc['n_groups']} groups ({gs.method}), {doc['n_dropped']} particles in none")
    sizes = ", ".join(str(v["size"]) for v in doc["groups"].values())
    print(f"{doc['n_groups']} groups ({sizes}) and {doc['n_dropped']} particles in no group, written to {args.outdir}")
    return 0
