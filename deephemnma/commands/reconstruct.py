"""``deephemnma reconstruct``: 3-D reconstruction of one particle group with half maps and FSC."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "reconstruct"
STAGE = Stage(order=80, sections=("reconstruct",), results="maps", report="Reconstructions and FSC")
HELP = "reconstruct a particle group (direct Fourier inversion): map, half maps, FSC"
DESCRIPTION = (
    "Reconstruct the particles of a STAR file (e.g. groups/group_01.star) from their ORIGINAL-size\n"
    "images (rlnImageName) with their angles, shifts (rlnOriginX/YAngst, divided by the pixel size\n"
    "of the images read) and CTF: direct Fourier inversion with trilinear insertion into a padded\n"
    "Fourier volume, Wiener-style CTF correction, gridding correction, two random half sets\n"
    "(seeded). Writes in --outdir: map.mrc, half1.mrc, half2.mrc, mask.mrc (if masked), fsc.csv,\n"
    "fsc.png and summary.json (resolution at FSC 0.143 and 0.5, counts, timing). Particles are\n"
    "streamed in batches; a GPU is used when there is one. Settings: the reconstruct section."
)
EXAMPLES = [
    "deephemnma reconstruct --particles groups/group_01.star --outdir maps/group_01",
    "deephemnma reconstruct --particles particles.star --outdir maps/all --set reconstruct.mask=none --threads 8",
]


def add_arguments(p) -> None:
    p.add_argument("--particles", required=True, metavar="STAR", help="particles with poses and CTF")
    p.add_argument("--outdir", required=True, metavar="DIR", help="output directory")
    p.add_argument("--data-dir", metavar="DIR", help="directory against which rlnImageName paths are resolved")
    p.add_argument("--pixel-size", type=float, metavar="A",
                   help="pixel size (Å) of the images read, overriding the optics table (RELION 3.0 files without "
                        "one, or an optics table describing downscaled copies of the stacks)")
    p.add_argument("--original", action="store_true",
                   help="read the ORIGINAL-size images of a STAR file written by 'deephemnma preprocess' (or derived "
                        "from one): dhnmaOriginalImageName at dhnmaOriginalPixelSize, resolved through the "
                        "preprocess manifest (--manifest)")
    p.add_argument("--manifest", metavar="JSON",
                   help="with --original: preprocess.json of the preprocessing run (default: beside the STAR file "
                        "or one level up)")
    p.add_argument("--ignore-shifts", action="store_true",
                   help="treat all origins as zero (data whose STAR lists shifts the images do not carry)")


def default_log(args) -> Path:
    return Path(args.outdir) / "reconstruct.log"


def run(args, config: dict) -> int:
    from ..core import plots
    from ..core.star import read_star
    from ..core.fileio import require_file
    from ..reconstruct import ReconstructSettings, reconstruct_star

    settings = ReconstructSettings.from_config(config)
    star = read_star(require_file(args.particles, "particle STAR file"), pixel_size=args.pixel_size,
                     data_dir=args.data_dir)
    images, pixel_size = None, args.pixel_size
    if args.original:
        from ..core.errors import InputError
        from ..preprocess import ORIGINAL_PIXEL_SIZE, original_images

        if ORIGINAL_PIXEL_SIZE not in star.particles.columns:
            raise InputError(star.path, f"--original: no _{ORIGINAL_PIXEL_SIZE} column (not from deephemnma preprocess)")
        images = original_images(star, args.manifest)
        sizes = star.particles[ORIGINAL_PIXEL_SIZE].to_numpy(float)
        pixel_size = float(sizes[0])
        if abs(sizes - pixel_size).max() > 1e-6 * pixel_size:
            raise InputError(star.path, "--original: particles with different original pixel sizes")
    rec = reconstruct_star(star, settings, seed=config["seed"], data_dir=args.data_dir,
                           ignore_shifts=args.ignore_shifts, pixel_size=pixel_size, images=images)
    outdir = Path(args.outdir)
    curves = {"half maps" + (" (masked, corrected)" if rec.mask is not None else ""): (rec.curve.frequency, rec.curve.fsc)}
    if rec.mask is not None:
        curves["half maps (unmasked)"] = (rec.curve.frequency, rec.curve.extra["fsc_unmasked"])
    plots.fsc_curves(outdir / "fsc.png", curves, title=f"{Path(args.particles).stem}: {rec.n_particles} particles")
    rec.write(outdir)
    print(f"{rec.n_particles} particles: FSC 0.143 at {rec.resolution_0143:.2f} Å, 0.5 at {rec.resolution_05:.2f} Å "
          f"({rec.seconds:.1f} s); maps in {outdir}")
    return 0
