"""``deephemnma report``: one self-contained HTML page with the figures and tables of a results tree."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "report"
STAGE = Stage(order=95, sections=("landscape",))
HELP = "HTML report of a results directory (figures embedded; works with whatever stages exist)"
DESCRIPTION = (
    "Assemble the figures and tables found in a results directory into one self-contained\n"
    "HTML file (images embedded as base64 PNG): a section per stage present (normal modes,\n"
    "alignment, training curves, outlier filter, landscape, groups, reconstructions with FSC,\n"
    "evaluation, animations) and one for anything else. Missing stages are skipped.\n"
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
    out = build_report(args.results, args.out, report_sections(), rc["title"], rc["max_table_rows"], config["seed"])
    print(f"report written to {out}")
    return 0
