"""``deephemnma train``: train the DeepHEMNMA network on image set 1 (HEMNMA labels)."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "train"
STAGE = Stage(order=50, sections=("network",), results="network", report="Network training",
              derived={"network.engine": "workflow.train_engine"})
HELP = "train the ResNet regressor on particles with HEMNMA labels (image set 1)"
DESCRIPTION = """\
Train the DeepHEMNMA network (ResNet34 + MLP; seed 000 §2.2) to predict normal-mode
amplitudes, orientation (a unit quaternion) and in-plane shifts from particle images.

Input: one or more STAR files whose particles carry HEMNMA's labels — _dhnmaAmplitudeNNN,
_rlnAngleRot/Tilt/Psi, _rlnOriginXAngst/YAngst — e.g. image set 1 after the Mahalanobis
filter (rows with a non-zero _dhnmaFlag are left out). A validation set is split off by
particle (network.val_fraction, deterministic from the seed) unless --val is given.

Output directory: last.pt (every epoch), best.pt (best validation loss: give it to
`deephemnma predict`), metrics.csv, curves.png, tensorboard/, summary.json, train.log.
Rerunning the same command resumes from last.pt exactly where it stopped (--no-resume
starts over). Settings: the `network` section of the configuration (recipe fast|paper,
engine, batch size, epochs, ...).

Engines (network.engine, default auto = from the launcher):
  single   deephemnma train ...
  ddp      torchrun --standalone --nproc-per-node N -m deephemnma train ...
  horovod  horovodrun -np N -H localhost:N --gloo python -m deephemnma train ...
           SLURM: srun python -m deephemnma train ... (an MPI build of Horovod, or the gloo
           build: rank 0 then hosts the rendezvous; set network.engine=horovod)
torchrun and horovodrun (argparse) reject `--log` even after the command, as an ambiguous
abbreviation of their own --log-* options ("ambiguous option: --log"): leave --log out
(the log then goes to DIR/train.log and DIR/train.rankN.log) or wrap the command:
  torchrun --no-python --standalone --nproc-per-node 2 sh -c "deephemnma train ... --log L"
  horovodrun -np 2 -H localhost:2 --gloo sh -c "deephemnma train ... --log L"
network.batch_size is per rank; the learning rate is multiplied by the number of ranks
(network.scale_lr: linear). Ranks other than 0 log to <log>.rankN."""
EXAMPLES = [
    "deephemnma train --particles set1_filtered.star --outdir results/network",
    "deephemnma train --particles chunk_000.star chunk_001.star --val val.star --outdir net --set network.recipe=paper",
    "horovodrun -np 2 -H localhost:2 --gloo python -m deephemnma train --particles set1.star --outdir net",
]


def add_arguments(p) -> None:
    p.add_argument("--particles", nargs="+", required=True, metavar="STAR",
                   help="STAR file(s) of the training particles with HEMNMA labels")
    p.add_argument("--val", nargs="+", metavar="STAR", help="validation STAR file(s) (default: split off by particle)")
    p.add_argument("--modes", metavar="NPZ",
                   help="the modes file of the labels (deephemnma nma): the grid recipe renders particles through it; "
                        "the others report the deformation RMSD of their test particles with it")
    p.add_argument("--outdir", required=True, metavar="DIR", help="output directory (checkpoints, metrics, plots)")
    p.add_argument("--data-dir", metavar="DIR", help="directory against which image paths are resolved")
    p.add_argument("--original-pixel-size", type=float, metavar="A",
                   help="pixel size (Å) of the full-size particles, recorded in the checkpoint (default: the training images')")
    p.add_argument("--resume", choices=["yes", "auto", "no"], default="yes",
                   help="yes: continue from DIR/last.pt when it exists (error if its model or data differ); "
                        "auto: continue only an unfinished run with the same data and settings, else start over "
                        "(what the workflow uses); no: start over (default: yes)")
    p.add_argument("--no-resume", action="store_true", help="the same as --resume no")


def _launcher_rank() -> int:
    """This process's rank as the launcher (horovodrun, torchrun, srun) tells it; 0 otherwise."""
    import os

    for var in ("HOROVOD_RANK", "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def default_log(args) -> Path:
    rank = _launcher_rank()
    return Path(args.outdir) / ("train.log" if rank == 0 else f"train.rank{rank}.log")


def run(args, config: dict) -> int:
    from ..core.logs import setup_logging
    from ..network.train import TrainSettings, train

    rank = _launcher_rank()
    if rank and args.log:  # ranks > 0: their own log file, warnings only on the console
        setup_logging(f"{args.log}.rank{rank}", verbose=args.verbose, quiet=True)
    elif rank:
        setup_logging(default_log(args), verbose=args.verbose, quiet=True)

    settings = TrainSettings.from_config(config)
    result = train(args.particles, args.outdir, settings, val_particles=args.val, data_dir=args.data_dir,
                   resume=False if args.no_resume else {"yes": True, "auto": "auto", "no": False}[args.resume],
                   original_pixel_size=args.original_pixel_size, modes=args.modes)
    result.engine.close()
    return 0
