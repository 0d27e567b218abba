"""``deephemnma merge``: concatenate per-chunk STAR files into one."""
from __future__ import annotations

from pathlib import Path

NAME = "merge"
ORDER = 45
HELP = "concatenate particle STAR files (per-chunk results) into one, image paths rebased"
DESCRIPTION = (
    "Concatenate particle STAR files in the order given (e.g. the per-chunk outputs of\n"
    "'deephemnma align' or 'deephemnma predict') into one RELION 3.1 STAR file. The optics\n"
    "tables must agree; every column is kept; relative image paths are rewritten so that\n"
    "they resolve from the output's directory."
)
EXAMPLES = ["deephemnma merge --particles align/chunk_0000.star align/chunk_0001.star --out align/hemnma.star"]


def add_arguments(p) -> None:
    p.add_argument("--particles", nargs="+", required=True, metavar="STAR", help="STAR files, in order")
    p.add_argument("--out", required=True, metavar="STAR", help="output STAR file")
    p.add_argument("--summary", metavar="JSON",
                   help="also merge the inputs' summaries (the JSON beside each STAR, e.g. predict's): counts and "
                        "seconds summed, fractions recomputed")


def default_log(args) -> Path:
    return Path(args.out).with_suffix(".log")


def run(args, config: dict) -> int:
    from ..core.fileio import require_file
    from ..core.star import concat_stars

    star = concat_stars([require_file(p, "STAR file") for p in args.particles], args.out)
    if args.summary:
        from ..core.fileio import atomic_write_json, merge_summaries

        atomic_write_json(args.summary, merge_summaries([Path(p).with_suffix(".json") for p in args.particles]))
    print(f"{len(star.particles)} particles from {len(args.particles)} files → {args.out}")
    return 0
