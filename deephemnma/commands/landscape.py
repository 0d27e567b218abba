"""``deephemnma landscape``: PCA (or spectral) landscape of the normal-mode amplitudes."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "landscape"
STAGE = Stage(order=70, sections=("landscape",), results="landscape", report="Conformational landscape")
HELP = "conformational landscape: PCA (or Laplacian eigenmaps) of the amplitudes or any per-particle features"
DESCRIPTION = (
    "Fit the conformational landscape of a particle STAR file with amplitude columns\n"
    "(dhnmaAmplitudeNNN), write every particle's coordinates as columns dhnmaPC1, dhnmaPC2 ...\n"
    "of a STAR file keeping all columns and the optics table, and save the fitted model (JSON)\n"
    "so that new particles can be placed later (--apply-model). With landscape.fit_on: combined\n"
    "the HEMNMA particles (--hemnma) are fitted and written together with the predicted ones\n"
    "(column dhnmaSource: 1 HEMNMA, 2 network). --plots DIR draws the landscape, explained\n"
    "variance and amplitude histograms. Settings: the landscape section."
)
EXAMPLES = [
    "deephemnma landscape --particles predicted.star --model landscape.json --out landscape.star --plots plots/",
    "deephemnma landscape --particles predicted.star --hemnma kept.star --set landscape.fit_on=combined "
    "--model landscape.json --out landscape.star",
    "deephemnma landscape --particles more.star --apply-model landscape.json --out more_landscape.star",
]


def add_arguments(p) -> None:
    p.add_argument("--particles", required=True, metavar="STAR", help="particles with amplitude columns (network predictions)")
    p.add_argument("--hemnma", metavar="STAR", help="HEMNMA particles (for landscape.fit_on: combined)")
    p.add_argument("--out", required=True, metavar="STAR", help="output: particles with landscape coordinates")
    p.add_argument("--model", metavar="JSON", help="output: the fitted model (default: <out>_model.json)")
    p.add_argument("--apply-model", metavar="JSON", help="place the particles with this saved model instead of fitting one")
    p.add_argument("--plots", metavar="DIR", help="output: figures in this directory")


def default_log(args) -> Path:
    return Path(args.out).with_suffix(".log")


def run(args, config: dict) -> int:
    from ..core.fileio import require_file
    from ..core.star import read_star, rebase_image_names, write_star
    from ..landscape import LandscapeSettings, apply_model, build_landscape, landscape_plots, load_model

    settings = LandscapeSettings.from_config(config)
    star = read_star(require_file(args.particles, "particle STAR file"))
    out = Path(args.out)
    if args.apply_model:
        model = load_model(args.apply_model)
        table, optics = apply_model(star.particles, model, star.path), star.optics
    else:
        hemnma = None
        if args.hemnma:
            h = read_star(require_file(args.hemnma, "HEMNMA STAR file"))
            hemnma = (rebase_image_names(h.particles, h.path, star.path), h.optics)
        table, optics, model, spectral = build_landscape(star.particles, star.optics, settings, config["seed"],
                                                         hemnma, star.path)
        model_path = Path(args.model) if args.model else out.with_name(out.stem + "_model.json")
        model.save(model_path)
        if spectral is not None:
            spectral.save(model_path.with_name(model_path.stem + "_spectral.json"))
    if args.plots:
        landscape_plots(args.plots, table, model, settings, config["seed"])
    write_star(out, table, optics, source=star.path)
    print(f"{model.NAME} landscape of {len(table)} particles ({model.n_components} coordinates) written to {out}")
    return 0
