"""``deephemnma simulate``: synthetic particles with ground truth (the paper's AK benchmark)."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "simulate"
STAGE = Stage(order=20, sections=("simulate",), results="simulate", report="Simulated data")
HELP = "simulate particle images with known conformations, poses and CTF (the paper's benchmark)"
DESCRIPTION = (
    "Deform the reference along its normal modes (amplitudes from simulate.amplitudes: the\n"
    "paper's helix by default), rasterise each conformation with Peng (1996) electron\n"
    "scattering factors, project it at a uniformly random orientation and shift, apply the\n"
    "CTF and add noise before and after it to reach simulate.snr. Writes a RELION 3.1 STAR\n"
    "(particles.star) with MRC stacks in chunks (stacks/), the ground truth keyed by\n"
    "rlnImageName (ground_truth.star) and a manifest (simulate.json). Chunks are rendered in\n"
    "parallel processes and are not redone when the command is re-run; the same seed gives\n"
    "the same bytes whatever the number of processes. All settings: the config's simulate\n"
    "section (deephemnma config --schema)."
)
EXAMPLES = [
    "deephemnma simulate --modes results/nma/modes.npz --outdir results/simulate",
    "deephemnma simulate --modes modes.npz --outdir sim --set simulate.n_particles=2000 --set simulate.box=128 "
    "--set simulate.pixel_size=0.65 --threads 2",
]


def add_arguments(p) -> None:
    p.add_argument("--modes", required=True, metavar="FILE", help="mode file written by 'deephemnma nma'")
    p.add_argument("--outdir", required=True, metavar="DIR", help="output directory (created; re-runs resume)")


def default_log(args) -> Path:
    return Path(args.outdir) / "simulate.log"


def run(args, config: dict) -> int:
    from ..simulate import Settings, load_reference, simulate_dataset

    settings = Settings.from_config(config)
    reference = load_reference(args.modes)
    workers = settings.workers or args.threads or 1
    manifest = simulate_dataset(reference, settings, args.outdir, workers=workers)
    print(f"particles\t{Path(args.outdir) / manifest['particles_star']}")
    print(f"ground_truth\t{Path(args.outdir) / manifest['ground_truth_star']}")
    return 0
