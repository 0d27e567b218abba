"""``deephemnma select``: particles picked in the landscape, as a RELION STAR file."""
from __future__ import annotations

from pathlib import Path

NAME = "select"
ORDER = 92
HELP = "particles inside a landscape selection (saved from report.html), an expression or groups, as STAR"
DESCRIPTION = (
    "Write the particles of a landscape STAR file (--particles, also spelled --landscape; e.g.\n"
    "results/groups/particles.star: every particle with its dhnmaPC and dhnmaGroup columns) that\n"
    "satisfy every criterion given, as a RELION 3.1+ STAR file that keeps the optics table and\n"
    "every column:\n"
    "  --selection JSON   the shapes (boxes, lassos) saved with 'save selection' on the results\n"
    "                     page (report.html); membership is decided on the coordinates exactly\n"
    "                     as the page decided it, so the file holds the particles the page counted;\n"
    "  --where EXPR       a condition over columns, e.g. \"dhnmaPC1 > 2 and dhnmaGroup == 3\"\n"
    "                     (names with or without the leading '_'; numbers, strings, + - * / ** %,\n"
    "                     comparisons, and/or/not, & | ~ for flag bits, in [..], abs sqrt log\n"
    "                     log10 exp hypot minimum maximum; nothing else is evaluated);\n"
    "  --groups N ...     landscape groups (column dhnmaGroup; 0 = in no group).\n"
    "An empty result, an unknown column, a malformed selection or a shape outside the landscape\n"
    "is an error (one line naming the file, exit status 2); nothing is written then."
)
EXAMPLES = [
    "deephemnma select --particles results/groups/particles.star --selection selection.json --out picked.star",
    "deephemnma select --particles results/groups/particles.star --where \"dhnmaPC1 > 2 and dhnmaGroup == 3\" "
    "--out picked.star",
    "deephemnma select --landscape results/groups/particles.star --groups 1 3 --out ends.star",
]


def add_arguments(p) -> None:
    p.add_argument("--particles", "--landscape", dest="particles", required=True, metavar="STAR",
                   help="landscape STAR file: groups/particles.star (dhnmaPC and dhnmaGroup columns) or "
                        "landscape/landscape.star; --landscape is the same option")
    p.add_argument("--selection", metavar="JSON", help="selection saved from the results page")
    p.add_argument("--where", metavar="EXPR", help="condition over columns, e.g. \"dhnmaPC1 > 2\"")
    p.add_argument("--groups", type=int, nargs="+", metavar="N", help="keep these groups (dhnmaGroup)")
    p.add_argument("--out", required=True, metavar="STAR", help="output STAR file")


def default_log(args) -> Path | None:
    return None  # a quick command: messages on the terminal only


def run(args, config: dict) -> int:
    """Apply every criterion given; write the kept particles with the optics table."""
    import numpy as np

    from ..core.errors import InputError
    from ..core.fileio import require_file
    from ..core.selection import groups_mask, load_selection, selection_mask, where_mask
    from ..core.star import read_star, write_star

    if args.selection is None and args.where is None and args.groups is None:
        raise InputError(args.particles, "nothing to select by: give --selection, --where and/or --groups")
    sel = load_selection(args.selection) if args.selection else None  # a bad file fails before reading the STAR
    star = read_star(require_file(args.particles, "landscape STAR file"))
    p = star.particles
    if len(p) == 0:
        raise InputError(star.path, "no particles")
    mask = np.ones(len(p), dtype=bool)
    used = []
    if sel is not None:
        m, notes = selection_mask(sel, p, args.selection, star.path)
        for note in notes:
            print(f"note: {note}")
        mask &= m
        used.append((args.selection, f"{int(m.sum())} in the selection's {len(sel['shapes'])} shape(s)"))
    if args.where is not None:
        m = where_mask(args.where, p, star.path)
        mask &= m
        used.append((star.path, f"{int(m.sum())} where {args.where}"))
    if args.groups is not None:
        m = groups_mask(args.groups, p, star.path)
        mask &= m
        used.append((star.path, f"{int(m.sum())} in group(s) {' '.join(map(str, args.groups))}"))
    n = int(mask.sum())
    if n == 0:
        raise InputError(used[0][0], "the selection is empty: " + "; ".join(u[1] for u in used)
                         + f"; none of the {len(p)} particles meets all criteria")
    write_star(args.out, p[mask].reset_index(drop=True), star.optics, source=star.path)
    print(f"{n} of {len(p)} particles selected ({'; '.join(u[1] for u in used)}), written to {args.out}")
    return 0
