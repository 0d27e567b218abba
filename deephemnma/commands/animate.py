"""``deephemnma animate``: the reference moved along the landscape axes; group centroid structures."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "animate"
STAGE = Stage(order=85, sections=("landscape",), results="animate", report="Animations")
HELP = "animate the reference along the landscape axes (multi-model PDB for ChimeraX); group centroids"
DESCRIPTION = (
    "Map points along each landscape axis back to normal-mode amplitudes with the fitted\n"
    "landscape model and displace the reference along the modes. Writes in --outdir:\n"
    "axis_01.pdb, axis_02.pdb ... (one model per frame: ChimeraX 'open axis_01.pdb coordsets\n"
    "true', then 'coordset #1'; chimerax.cxc opens and plays them all) and, with --groups, the\n"
    "structure at each group's mean amplitudes (group_01_centroid.pdb ..., centroids.pdb).\n"
    "--particles (the landscape STAR) makes each axis span the particles' range (quantiles);\n"
    "without it, ±2 standard deviations. Settings: landscape.animation."
)
EXAMPLES = [
    "deephemnma animate --model landscape.json --modes modes.npz --particles landscape.star "
    "--groups groups/groups.csv --outdir animations/",
]


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="JSON", help="fitted landscape model (PCA)")
    p.add_argument("--modes", required=True, metavar="FILE", help="normal modes of the reference (nma stage output; holds the atoms)")
    p.add_argument("--particles", metavar="STAR", help="landscape STAR file: axes span the particles' coordinates")
    p.add_argument("--groups", metavar="CSV", help="groups.csv of deephemnma groups: write centroid structures")
    p.add_argument("--outdir", required=True, metavar="DIR", help="output directory")


def default_log(args) -> Path:
    return Path(args.outdir) / "animate.log"


def run(args, config: dict) -> int:
    from ..animate import centroid_structures, read_centroids, write_axis_animations
    from ..core.errors import InputError
    from ..core.features import column_matrix
    from ..core.fileio import require_file
    from ..core.modes import load_modes
    from ..core.star import amplitude_modes, pc_columns, read_star
    from ..landscape import load_model

    # every input is read and checked before anything is written
    model = load_model(args.model)
    if not model.INVERTIBLE:
        raise InputError(args.model, f"animations need a landscape model that maps back to amplitudes (PCA); "
                                     f"{model.NAME} has no inverse map")
    numbers = amplitude_modes(model.columns)
    if len(numbers) != len(model.columns):
        other = [c for c in model.columns if not str(c).startswith("dhnmaAmplitude")]
        raise InputError(args.model, f"animations need a model fitted on normal-mode amplitudes; this one uses "
                                     f"{', '.join(other)}")
    ms = load_modes(require_file(args.modes, "modes file"))
    missing = [m for m in numbers if m not in set(int(n) for n in ms.mode_numbers)]
    if missing:
        raise InputError(args.modes, f"lacks mode(s) {', '.join(map(str, missing))} used by the landscape model "
                                     f"{args.model} (it has {', '.join(str(int(n)) for n in ms.mode_numbers)})")
    atoms = ms.atoms()  # atoms or pseudoatoms, in the frame the modes were computed in
    modes = {int(n): v for n, v in zip(ms.mode_numbers, ms.modes)}
    Y = None
    if args.particles:
        star = read_star(require_file(args.particles, "landscape STAR file"))
        cols = pc_columns(star.particles)
        if len(cols) < model.n_components:
            raise InputError(star.path, f"{len(cols)} landscape coordinate column(s) (dhnmaPC1 ...) but the model "
                                        f"{args.model} has {model.n_components}: run deephemnma landscape first")
        if len(star.particles) == 0:
            raise InputError(star.path, "no particles")
        Y, _ = column_matrix(star.particles, cols[: model.n_components], star.path, what="landscape coordinate")
    cents = read_centroids(args.groups, model.columns) if args.groups else None
    an = config["landscape"]["animation"]
    paths = write_axis_animations(args.outdir, atoms, modes, model, Y, an["n_frames"], an["quantile"], an["bounce"],
                                  source=args.modes)
    if cents is not None:
        paths += centroid_structures(args.outdir, atoms, modes, model.columns, cents)
    print(f"wrote {len(paths)} structure files to {args.outdir}")
    return 0
