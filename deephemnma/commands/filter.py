"""``deephemnma filter``: Mahalanobis outlier filter on the HEMNMA amplitudes."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "filter"
STAGE = Stage(order=40, sections=("landscape.filter", "landscape.modes"), results="filter", report="Outlier filter")
HELP = "drop particles whose normal-mode amplitudes are outliers (Mahalanobis distance)"
DESCRIPTION = (
    "Mahalanobis outlier filter on the normal-mode amplitudes (dhnmaAmplitudeNNN columns) of a\n"
    "particle STAR file, usually the HEMNMA results before training (seed 001: threshold 3.2).\n"
    "Writes the kept and the dropped particles as RELION STAR files (every column and the\n"
    "optics table kept; column dhnmaMahalanobis added; dropped rows get flag 16 in dhnmaFlag)\n"
    "and a JSON summary (counts, mean, covariance, the kept fraction expected for Gaussian\n"
    "amplitudes). Settings: landscape.filter.threshold / method, landscape.modes."
)
EXAMPLES = [
    "deephemnma filter --particles hemnma.star --out kept.star --dropped outliers.star",
    "deephemnma filter --particles hemnma.star --out kept.star --set landscape.filter.threshold=3.0",
]


def add_arguments(p) -> None:
    p.add_argument("--particles", required=True, metavar="STAR", help="particles with amplitude columns")
    p.add_argument("--out", required=True, metavar="STAR", help="output: the particles kept")
    p.add_argument("--dropped", metavar="STAR", help="output: particles dropped (default: <out>_dropped.star)")
    p.add_argument("--summary", metavar="JSON", help="output: counts and fitted distribution (default: <out>.json)")


def default_log(args) -> Path:
    return Path(args.out).with_suffix(".log")


def run(args, config: dict) -> int:
    from ..core.star import read_star, write_star
    from ..core.fileio import atomic_write_json, require_file
    from ..filter import filter_table

    section = config["landscape"]
    star = read_star(require_file(args.particles, "particle STAR file"))
    kept, dropped, filt = filter_table(star.particles, section["filter"]["threshold"], section["filter"]["method"],
                                       section["modes"], config["seed"], source=star.path)
    kept_path = Path(args.out)
    dropped_path = Path(args.dropped) if args.dropped else kept_path.with_name(kept_path.stem + "_dropped.star")
    summary_path = Path(args.summary) if args.summary else kept_path.with_suffix(".json")
    write_star(dropped_path, dropped, star.optics, source=star.path)
    atomic_write_json(summary_path, {"input": str(star.path), "kept": str(kept_path), "dropped": str(dropped_path),
                                     **filt.to_dict()})
    write_star(kept_path, kept, star.optics, source=star.path)
    print(f"kept {filt.info['n_kept']} of {filt.info['n_input']} particles, dropped {filt.info['n_dropped']} "
          f"(Mahalanobis distance > {filt.threshold:g})")
    return 0
