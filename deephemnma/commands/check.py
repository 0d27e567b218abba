"""``deephemnma check``: validate a particle STAR file and every image it refers to."""
from __future__ import annotations

import sys

NAME = "check"
ORDER = 5
HELP = "check a particle STAR file and its image stacks before a run"
DESCRIPTION = (
    "Read a RELION 3.0-5 particle STAR file, resolve every image stack it refers to, validate\n"
    "their headers (format, size, box, image indices) and read every image once to make sure\n"
    "no pixel is NaN or Inf. Prints a summary (RELION version, particles, optics groups,\n"
    "box, stacks, CTF and pose columns) and exits 0, or prints one line naming the bad file\n"
    "(and row) and exits 2. Options default to the config's data section."
)
EXAMPLES = [
    "deephemnma check --particles run_data.star",
    "deephemnma check --particles particles.star --data-dir /data/project --pixel-size 1.06 --require-ctf",
]


def add_arguments(p) -> None:
    p.add_argument("--particles", metavar="STAR", help="particle STAR file (default: config data.particles)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="directory image paths are relative to (default: config data.data_dir, else the "
                        "STAR file's directory and its parents)")
    p.add_argument("--pixel-size", type=float, metavar="A",
                   help="pixel size in Å for RELION 3.0 files that give none (default: config data.pixel_size)")
    p.add_argument("--require-ctf", action="store_true",
                   help="fail if a column needed for the CTF (defocus U/V/angle, voltage, Cs, amplitude "
                        "contrast) is missing")
    p.add_argument("--batch-size", type=int, default=512, metavar="N", help="images read at a time (default 512)")
    p.add_argument("--no-images", action="store_true", help="check headers only, do not read the images")


def default_log(args):
    return None


def run(args, config: dict) -> int:
    from ..core.errors import ConfigError
    from ..core.logs import get_logger, progress
    from ..core.mrc import ParticleImages
    from ..core import star as S

    log = get_logger("check")
    data = config.get("data", {})
    particles = args.particles or data.get("particles")
    if not particles:
        raise ConfigError("no particle file: pass --particles or set data.particles")
    data_dir = args.data_dir or data.get("data_dir")
    pixel_size = args.pixel_size if args.pixel_size is not None else data.get("pixel_size")

    star = S.read_star(particles, pixel_size=pixel_size, data_dir=data_dir)
    if args.require_ctf:
        S.require_columns(star, S.CTF_COLUMNS, "the CTF")
    px = S.pixel_sizes(star)
    images = ParticleImages.from_star(star, data_dir)
    images.validate(progress_desc="stack headers" if images.n_stacks > 100 else None)
    n_checked = 0
    if not args.no_images and len(images):
        with progress(total=len(images), desc="images", unit="image") as bar:
            for idx, _ in images.iter_batches(args.batch_size):
                n_checked += len(idx)
                bar.update(len(idx))
    log.debug("checked %d images", n_checked)
    sys.stdout.write(_summary(star, images, px, n_checked, S))
    return 0


def _fmt(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:g}"


def _summary(star, images, px, n_checked, S) -> str:
    import numpy as np

    p, o = star.particles, star.optics
    lines = [f"{star.path}: RELION {star.version} particle file, {len(p)} particles"]
    counts = p[S.OPTICS_GROUP].value_counts() if S.OPTICS_GROUP in p.columns else None
    lines.append(f"optics groups: {len(o)}")
    cols = [(S.OPTICS_GROUP, "group"), (S.OPTICS_GROUP_NAME, "name"), (S.VOLTAGE, "voltage_kV"),
            (S.SPHERICAL_ABERRATION, "Cs_mm"), (S.AMPLITUDE_CONTRAST, "Q0"), (S.IMAGE_PIXEL_SIZE, "pixel_A"),
            (S.IMAGE_SIZE, "box")]
    present = [(c, h) for c, h in cols if c in o.columns]
    table = [[h for _, h in present] + ["particles"]]
    for _, row in o.iterrows():
        n = int(counts.get(row[S.OPTICS_GROUP], 0)) if counts is not None else len(p)
        table.append([_fmt(row[c]) for c, _ in present] + [str(n)])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
    lo, hi = (float(np.min(px)), float(np.max(px))) if len(px) else (float("nan"),) * 2
    lines.append(f"pixel size: {lo:g} A" if lo == hi else f"pixel size: {lo:g}-{hi:g} A")
    if len(images):
        lines.append(f"box: {images.box} px")
    lines.append(f"image stacks: {images.n_stacks} (headers valid)")
    lines.append(f"images read: {n_checked} (all pixels finite)" if n_checked else "images read: none (--no-images)")
    have = set(p.columns) | set(o.columns)
    ctf = [c for c in S.CTF_COLUMNS + S.CTF_OPTIONAL_COLUMNS if c in have]
    missing = [c for c in S.CTF_COLUMNS if c not in have]
    lines.append("CTF columns: " + (", ".join(ctf) if ctf else "none")
                 + (f" (missing for a CTF: {', '.join(missing)})" if missing else ""))
    pose = [c for c in S.POSE_COLUMNS if c in p.columns]
    lines.append("pose columns: " + (", ".join(pose) if pose else "none"))
    modes = S.amplitude_modes(p)
    if modes:
        lines.append(f"normal-mode amplitudes: modes {', '.join(map(str, modes))}")
    return "\n".join(lines) + "\n"
