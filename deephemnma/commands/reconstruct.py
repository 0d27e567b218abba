"""``deephemnma reconstruct``: 3-D reconstruction of one particle group with half maps and FSC."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "reconstruct"
STAGE = Stage(order=80, sections=("reconstruct", "data.invert_contrast"), results="maps", report="Reconstructions and FSC")
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
    p.add_argument("--reference", metavar="FILE",
                   help="the reference (modes file of 'deephemnma nma', atomic model or map): checks the map's sign "
                        "and the automatic mask against its envelope, and detects the contrast polarity of images "
                        "not written by 'deephemnma preprocess' (data.invert_contrast auto)")
    p.add_argument("--ignore-shifts", action="store_true",
                   help="treat all origins as zero (data whose STAR lists shifts the images do not carry)")


def default_log(args) -> Path:
    return Path(args.outdir) / "reconstruct.log"


def run(args, config: dict) -> int:
    from ..core import plots
    from ..core.fileio import require_file
    from ..core.star import read_star
    from ..reconstruct import ReconstructSettings, reconstruct_star

    settings = ReconstructSettings.from_config(config)
    star = read_star(require_file(args.particles, "particle STAR file"), pixel_size=args.pixel_size,
                     data_dir=args.data_dir)
    images, pixel_size, invert, state = None, args.pixel_size, False, None
    if args.original:
        images, pixel_size, invert, state = _originals(star, args.manifest)
    else:
        invert = _polarity(star, config["data"]["invert_contrast"], args.reference, args.data_dir)
    rec = reconstruct_star(star, settings, seed=config["seed"], data_dir=args.data_dir,
                           ignore_shifts=args.ignore_shifts, pixel_size=pixel_size, images=images, invert=invert,
                           ctf_state=state, envelope=_envelope(args.reference, images, star, pixel_size, args.data_dir))
    outdir = Path(args.outdir)
    curves = {"half maps" + (" (masked, corrected)" if rec.mask is not None else ""): (rec.curve.frequency, rec.curve.fsc)}
    if rec.mask is not None:
        curves["half maps (unmasked)"] = (rec.curve.frequency, rec.curve.extra["fsc_unmasked"])
    plots.fsc_curves(outdir / "fsc.png", curves, title=f"{Path(args.particles).stem}: {rec.n_particles} particles")
    rec.write(outdir)
    masked = f" (masked; unmasked {rec.summary()['resolution_unmasked_fsc0143']:.2f} Å)" if rec.mask is not None else ""
    print(f"{rec.n_particles} particles: FSC 0.143 at {rec.resolution_0143:.2f} Å{masked}, 0.5 at "
          f"{rec.resolution_05:.2f} Å ({rec.seconds:.1f} s); maps in {outdir}")
    return 0


def _originals(star, manifest):
    """The original-size images of a preprocessed STAR: images, pixel size, the preprocess
    run's contrast decision and each image's original CTF state."""
    import numpy as np

    from ..core.errors import InputError
    from ..core.star import ORIGINAL_CTF_STATE
    from ..preprocess import ORIGINAL_PIXEL_SIZE, _find_manifest, original_images

    if ORIGINAL_PIXEL_SIZE not in star.particles.columns:
        raise InputError(star.path, f"--original: no _{ORIGINAL_PIXEL_SIZE} column (not from deephemnma preprocess)")
    if manifest is None:
        manifest = _find_manifest(star.path)
    elif not isinstance(manifest, dict):
        import json

        manifest = json.loads(Path(manifest).read_text())
    images = original_images(star, manifest)
    sizes = star.particles[ORIGINAL_PIXEL_SIZE].to_numpy(float)
    pixel_size = float(sizes[0])
    if abs(sizes - pixel_size).max() > 1e-6 * pixel_size:
        raise InputError(star.path, "--original: particles with different original pixel sizes")
    invert = bool(((manifest or {}).get("polarity") or {}).get("invert", False))
    state = star.particles[ORIGINAL_CTF_STATE].to_numpy(np.int64) if ORIGINAL_CTF_STATE in star.particles.columns \
        else np.zeros(len(star), dtype=np.int64)  # before the column existed preprocess read raw images
    return images, pixel_size, invert, state


def _polarity(star, setting, reference, data_dir) -> bool:
    """Images written by preprocess are white; others follow data.invert_contrast (auto: detected)."""
    from ..core.polarity import resolve_invert
    from ..core.star import ORIGINAL_IMAGE_NAME

    if ORIGINAL_IMAGE_NAME in star.particles.columns:
        return False
    return bool(resolve_invert(setting, star.path, reference, data_dir=data_dir, what="data.invert_contrast")[0])


def _envelope(reference, images, star, pixel_size, data_dir):
    """The reference's density on the map's grid (centred as the particles are), or None."""
    if reference is None:
        return None
    import numpy as np

    from ..core.density import atoms_to_volume
    from ..core.mrc import ParticleImages
    from ..core.star import pixel_sizes

    if Path(reference).suffix.lower() != ".npz":
        return None  # maps and models: the sign and mask checks use the map alone
    from ..core.modes import load_modes

    ms = load_modes(reference)
    box = (images if images is not None else ParticleImages.from_star(star, data_dir)).box
    px = float(pixel_size) if pixel_size is not None else float(np.median(pixel_sizes(star)))
    coords = ms.coords - ms.centre  # the point at the box centre (simulate, align: the mode file's centre)
    return atoms_to_volume(coords, box=box, pixel_size=px, weights=ms.weights, sigma=np.maximum(ms.sigma, px))
