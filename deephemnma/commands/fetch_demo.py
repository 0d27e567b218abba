"""``deephemnma fetch-demo``: the demo's adenylate-kinase structures from PyPI, verified."""
from __future__ import annotations

from pathlib import Path

NAME = "fetch-demo"
ORDER = 5
HELP = "fetch the demo's adenylate-kinase structures (4AKE open, 1AKE closed), checksum-verified"
DESCRIPTION = (
    "Download the MDAnalysisTests source distribution from PyPI (once; cached in\n"
    "~/.cache/deephemnma), verify its SHA-256 and those of adk_open.pdb (4AKE) and\n"
    "adk_closed.pdb (1AKE), and write them with element columns and chain A into --out."
)
EXAMPLES = ["deephemnma fetch-demo --outdir resources/"]


def add_arguments(p) -> None:
    p.add_argument("--outdir", required=True, metavar="DIR", help="directory for ak_open_4ake.pdb and ak_closed_1ake.pdb")


def default_log(args) -> Path:
    return Path(args.outdir) / "fetch-demo.log"


def run(args, config: dict) -> int:
    from ..core.demo_data import fetch_adenylate_kinase

    for key, path in fetch_adenylate_kinase(args.outdir).items():
        print(f"{key}\t{path}")
    return 0
