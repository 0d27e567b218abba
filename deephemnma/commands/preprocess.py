"""``deephemnma preprocess``: phase flip, downscale, normalise, split and chunk a particle set."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..core.stage import Stage

NAME = "preprocess"
STAGE = Stage(order=25, sections=("data", "preprocess"), results="preprocess", report="Pre-processing")
HELP = "phase-flip, downscale, normalise and split particles into chunked image sets 1 and 2"
DESCRIPTION = (
    "Read any RELION STAR file (3.0-5) and its stacks; per image: CTF phase flip, antialias\n"
    "low-pass and Fourier-crop downscale (pixel size updated, shifts stay in Å), background\n"
    "normalisation (mean 0, std 1 outside 0.9 x box/2), contrast inversion of dark particles\n"
    "(data.invert_contrast: auto detects the polarity from the data against --reference, see\n"
    "deephemnma check; the decision is in DIR/polarity.json and the manifest). Optics groups of\n"
    "different pixel sizes or boxes are brought to one (preprocess.pixel_size). Split\n"
    "into image set 1 (preprocess.set1_size or set1_fraction, seeded) and set 2, each cut\n"
    "into chunks of STAR + MRC stack (DIR/set1/chunk_0000.star ...), with per-set STARs\n"
    "(DIR/set1.star, DIR/set2.star) and a manifest (DIR/preprocess.json). Every input\n"
    "column is kept; dhnmaOriginalImageName / dhnmaOriginalPixelSize point back to the\n"
    "original images. Chunks run in parallel processes and are not redone on re-runs.\n"
    "--plan prints the chunk plan (JSON) without processing anything."
)
EXAMPLES = [
    "deephemnma preprocess --particles results/simulate/particles.star --outdir results/preprocess",
    "deephemnma preprocess --particles run_data.star --outdir prep --set preprocess.set1_fraction=0.1 --threads 8",
]


def add_arguments(p) -> None:
    p.add_argument("--particles", required=True, metavar="STAR", help="RELION particle STAR file")
    p.add_argument("--outdir", required=True, metavar="DIR", help="output directory (created; re-runs resume)")
    p.add_argument("--data-dir", metavar="DIR", help="directory against which image paths are resolved "
                   "(default: data.data_dir, else the STAR file's directory and its parents)")
    p.add_argument("--pixel-size", type=float, metavar="A", help="pixel size for STAR files that give none "
                   "(default: data.pixel_size)")
    p.add_argument("--reference", metavar="FILE",
                   help="what polarity detection compares the particles with: the modes file of 'deephemnma nma', "
                        "an atomic model or a map (default: reference.path; else a sphere of 0.3 × the box)")
    p.add_argument("--chunks", metavar="NAME", nargs="+", help="process only these chunks (e.g. set1/chunk_0000)")
    p.add_argument("--plan", action="store_true", help="print the chunk plan as JSON and exit")


def default_log(args) -> Path | None:
    return None if args.plan else Path(args.outdir) / "preprocess.log"


def run(args, config: dict) -> int:
    from ..preprocess import PreprocessSettings, plan_chunks, preprocess_dataset

    settings = PreprocessSettings.from_config(config)
    data = config.get("data", {})
    data_dir = args.data_dir or data.get("data_dir")
    pixel_size = args.pixel_size or data.get("pixel_size")
    if args.plan:
        from ..core.fileio import require_file
        from ..core.star import read_star

        star = read_star(require_file(args.particles, "particle STAR file"), pixel_size=pixel_size, data_dir=data_dir)
        json.dump(plan_chunks(len(star), settings), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    from ..core.fileio import require_file

    require_file(args.particles, "particle STAR file")
    workers = settings.workers or args.threads or 1
    reference = args.reference or config["reference"]["path"]
    m = preprocess_dataset(args.particles, args.outdir, settings, data_dir=data_dir, pixel_size=pixel_size,
                           workers=workers, only=args.chunks, invert=data["invert_contrast"], reference=reference)
    if m["complete"]:
        for name, s in m["sets"].items():
            print(f"{name}\t{Path(args.outdir) / s['star']}\t{s['n']}")
    return 0
