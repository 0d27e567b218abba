"""``deephemnma nma``: normal modes of the reference (atomic model or EM map)."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "nma"
STAGE = Stage(order=10, sections=("reference", "nma"), results="nma", report="Normal modes")
HELP = "normal modes of the reference (atomic model or EM map → pseudoatoms)"
DESCRIPTION = (
    "Elastic-network normal modes of the reference. An atomic model (PDB/mmCIF; chains and\n"
    "atom selection from the config's reference section) is used as it is; an EM map is first\n"
    "converted to Gaussian pseudoatoms (nma.pseudoatoms). Writes ONE .npz file holding the\n"
    "reference coordinates, weights and Gaussian widths, the selected mode vectors (unit norm\n"
    "over 3N), all computed eigenvalues, frequencies and collectivities and the settings, plus a\n"
    "JSON summary beside it. Modes are numbered from 1; 1-6 are rigid-body motions.\n"
    "--animate DIR writes one multi-model PDB per selected mode for ChimeraX\n"
    "(open DIR/mode_007.pdb coordsets true; coordset #1)."
)
EXAMPLES = [
    "deephemnma nma --reference 4ake.pdb --out results/nma/modes.npz --set 'reference.chains=[A]'",
    "deephemnma nma --reference 4ake.pdb --out modes.npz --set 'nma.modes=[7, 8, 9, 11]' --animate anim/",
    "deephemnma nma --reference emd_1234.mrc --out modes.npz --set nma.pseudoatoms.resolution=8",
]


def add_arguments(p) -> None:
    p.add_argument("--reference", metavar="FILE",
                   help="PDB/mmCIF model or MRC map (default: the config's reference.path)")
    p.add_argument("--out", metavar="NPZ", required=True, help="output normal-mode file (.npz)")
    p.add_argument("--summary", metavar="JSON", help="per-mode summary (default: OUT with suffix .json)")
    p.add_argument("--animate", metavar="DIR", help="also write DIR/mode_NNN.pdb, one multi-model PDB per selected mode")
    p.add_argument("--pseudoatoms-pdb", metavar="PDB", help="map references: also write the pseudoatoms as a PDB file")


def default_log(args) -> Path | None:
    return Path(args.out).with_suffix(".log") if getattr(args, "out", None) else None


def run(args, config: dict) -> int:
    from ..core.errors import ConfigError
    from ..nma import run_nma

    reference = args.reference or (config.get("reference") or {}).get("path")
    if not reference:
        raise ConfigError("no reference: give --reference FILE or set reference.path in the config")
    run_nma(reference, args.out, config, summary=args.summary, animate_dir=args.animate,
            pseudoatoms_pdb=args.pseudoatoms_pdb)
    return 0
