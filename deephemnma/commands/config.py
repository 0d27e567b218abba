"""``deephemnma config``: validate a configuration and print it with every default filled in."""
from __future__ import annotations

import sys

import yaml

NAME = "config"
ORDER = 1
HELP = "validate a configuration file and print the effective configuration"
DESCRIPTION = (
    "Validate a configuration against workflow/schemas/config.schema.yaml and print the\n"
    "effective configuration: exactly what `snakemake --configfile FILE` runs (the schema's\n"
    "defaults filled in, workflow.train_engine auto resolved on this machine; the demo's\n"
    "config/config.yaml applies only when no configuration is given). Unknown keys and wrong\n"
    "types are errors."
)
EXAMPLES = [
    "deephemnma config --config config/config.yaml",
    "deephemnma config --config my.yaml --set nma.cutoff=10 --out effective.yaml",
]


def add_arguments(p) -> None:
    p.add_argument("--out", metavar="YAML", help="write the effective configuration here instead of stdout")
    p.add_argument("--schema", action="store_true", help="print the JSON schema instead")


def run(args, config: dict) -> int:
    from ..core.config import load_schema, resolve_for_workflow
    from ..core.fileio import atomic_write_text

    obj = load_schema() if args.schema else resolve_for_workflow(config)
    text = yaml.safe_dump(obj, sort_keys=False)
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return 0
