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
    "box, stacks, CTF and pose columns, and the contrast polarity detected from a sample of\n"
    "the particles: what data.invert_contrast auto will do) and exits 0, or prints one line\n"
    "naming the bad file (and row) and exits 2. Options default to the config's data section."
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
    p.add_argument("--reference", metavar="FILE",
                   help="reference for the polarity check (modes file, atomic model or map; default: "
                        "config reference.path, else a sphere of 0.3 × the box)")
    p.add_argument("--no-polarity", action="store_true", help="skip the contrast-polarity detection")


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
    if len(star) == 0:
        from ..core.errors import InputError

        raise InputError(star.path, "no particles")
    if args.require_ctf:
        S.require_columns(star, S.CTF_COLUMNS, "the CTF")
    px = S.pixel_sizes(star)
    groups = ParticleImages.by_box(star, data_dir)
    n_stacks, n_checked = 0, 0
    for _, images in groups.values():
        images.validate(progress_desc="stack headers" if images.n_stacks > 100 else None)
        n_stacks += images.n_stacks
    if not args.no_images and len(star):
        with progress(total=len(star), desc="images", unit="image") as bar:
            for _, images in groups.values():
                for idx, _ in images.iter_batches(args.batch_size):
                    n_checked += len(idx)
                    bar.update(len(idx))
    log.debug("checked %d images", n_checked)
    polarity = None
    if not args.no_polarity and len(star):
        polarity = _polarity(star, args.reference or config["reference"]["path"], data_dir, pixel_size)
    sys.stdout.write(_summary(star, sorted(groups), n_stacks, px, n_checked, S, polarity,
                              config["data"]["invert_contrast"]))
    return 0


def _polarity(star, reference, data_dir, pixel_size):
    from ..core.errors import InputError
    from ..core.polarity import detect_polarity_star

    try:
        return detect_polarity_star(star.path, reference, data_dir=data_dir, pixel_size=pixel_size)
    except InputError as exc:  # e.g. no CTF, odd geometry: report, the rest of the check stands
        return f"not detected ({exc})"


def _fmt(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:g}"


def _summary(star, boxes, n_stacks, px, n_checked, S, polarity, setting) -> str:
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
    if boxes:
        lines.append(f"box: {', '.join(str(b) for b in boxes)} px")
    lines.append(f"image stacks: {n_stacks} (headers valid)")
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
    if polarity is not None:
        lines.append("contrast: " + _polarity_line(polarity, setting))
    return "\n".join(lines) + "\n"


def _polarity_line(d, setting) -> str:
    if isinstance(d, str):
        return d
    if not d.conclusive:
        return (f"{d.summary()}: with data.invert_contrast auto the run would stop; set it to true (dark "
                "particles) or false (white)")
    action = "negated" if d.invert else "kept as they are"
    if setting == "auto":
        return f"{d.summary()} → with data.invert_contrast auto the images are {action}"
    agrees = bool(setting) == bool(d.invert)
    return (f"{d.summary()}; data.invert_contrast is {str(setting).lower()}"
            + ("" if agrees else " — CONTRADICTS the detection: check it"))
