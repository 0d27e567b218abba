"""``deephemnma report``: the results page (report.html) of a results tree: answer and health first."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "report"
STAGE = Stage(order=95, sections=("landscape",))
HELP = "the results page (report.html): answer and health first, interactive landscape, 3D maps and motions"
DESCRIPTION = (
    "Write one self-contained HTML page (opens from file://, offline; nothing fetched) of a\n"
    "results directory. It leads with the answer: the landscape of every particle (interactive:\n"
    "colour by any column, hover, box/lasso selection saved for 'deephemnma select') beside what\n"
    "was obtained and a health panel that says what can be trusted (HEMNMA flags, the network\n"
    "against predicting the mean and chance, refinement fallbacks, contrast polarity, map sign\n"
    "and mask, failed jobs); then each group's map resolution and FSC, the motion along each\n"
    "axis, the group maps as isosurfaces and the animations in 3D; settings, each stage's\n"
    "summaries, tables and figures collapsed at the bottom. Works with whatever stages exist\n"
    "('not available' for the others).\n"
    "Settings: landscape.report.title / max_table_rows."
)
EXAMPLES = ["deephemnma report --results results --out results/report.html"]


def add_arguments(p) -> None:
    p.add_argument("--results", required=True, metavar="DIR", help="results directory")
    p.add_argument("--out", required=True, metavar="HTML", help="output HTML file")


def default_log(args) -> Path:
    return Path(args.out).with_suffix(".log")


def report_sections() -> list[tuple[str, str]]:
    """(title, results folder) of every stage that has a report section, in pipeline order."""
    from . import stages

    return [(st.report, st.results) for st in stages().values() if st.report and st.results]


def run(args, config: dict) -> int:
    from ..core.errors import InputError
    from ..report import build_report

    if not Path(args.results).is_dir():
        raise InputError(args.results, "results directory not found")
    rc = config["landscape"]["report"]
    out = build_report(args.results, args.out, report_sections(), rc["title"], rc["max_table_rows"])
    print(f"report written to {out}")
    return 0
