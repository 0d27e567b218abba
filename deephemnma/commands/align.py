"""``deephemnma align``: HEMNMA elastic and rigid-body alignment of one chunk of particles."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "align"
STAGE = Stage(order=30, sections=("align", "data.invert_contrast"), results="align", report="HEMNMA alignment (image set 1)")
HELP = "HEMNMA: per-particle normal-mode amplitudes, angles and shifts (one chunk, CPU)"
DESCRIPTION = (
    "Fit every particle of a STAR file with the reference deformed by its normal modes, rotated,\n"
    "shifted and modulated by the particle's CTF: a global search over orientations, shifts and\n"
    "a coarse grid of conformations at low resolution, then joint refinement of pose and\n"
    "amplitudes, coarse to fine (32², 64², 128²). Writes the input STAR with every column kept\n"
    "plus rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst, dhnmaAmplitudeNNN (one per mode), dhnmaScore,\n"
    "dhnmaConverged and dhnmaFlag (bits: 1 not converged, 2 junk / low score, 4 empty or\n"
    "unreadable image, 8 amplitude at its bound). Phase-flipped data (rlnCtfDataArePhaseFlipped)\n"
    "are fitted with |CTF|, raw data with the CTF. An interrupted run resumes from OUT.progress/.\n"
    "Settings: the align section of the config."
)
EXAMPLES = [
    "deephemnma align --particles preprocess/set1/chunk_0007.star --modes nma/modes.npz --out hemnma/chunk_0007.star",
    "deephemnma align --particles chunk.star --modes modes.npz --out hemnma.star --set 'align.modes=[7,8,9,10,11,12]' --threads 4",
]


def add_arguments(p) -> None:
    p.add_argument("--particles", required=True, metavar="STAR", help="particle STAR file (one chunk)")
    p.add_argument("--modes", required=True, metavar="NPZ", help="normal-mode file written by 'deephemnma nma'")
    p.add_argument("--out", required=True, metavar="STAR", help="output STAR file")
    p.add_argument("--data-dir", metavar="DIR",
                   help="directory image paths are relative to (default: config data.data_dir, else the STAR "
                        "file's directory and its parents)")
    p.add_argument("--pixel-size", type=float, metavar="A",
                   help="pixel size in Å for RELION 3.0 files that give none (default: config data.pixel_size)")
    p.add_argument("--summary", metavar="JSON", help="also write a JSON summary (counts, flags, timing)")


def default_log(args) -> Path | None:
    return Path(args.out).with_suffix(".log") if getattr(args, "out", None) else None


def run(args, config: dict) -> int:
    from ..align import AlignSettings, align_star
    from ..core.fileio import atomic_write_json, require_file

    data = config.get("data", {})
    require_file(args.particles, "particle STAR file")
    summary = align_star(
        args.particles, args.modes, args.out, AlignSettings.from_config(config),
        data_dir=args.data_dir or data.get("data_dir"),
        pixel_size=args.pixel_size if args.pixel_size is not None else data.get("pixel_size"),
        seed=int(config.get("seed", 0)), threads=args.threads, invert=data["invert_contrast"],
    )
    if args.summary:
        atomic_write_json(args.summary, summary)
    return 0
