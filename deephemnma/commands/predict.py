"""``deephemnma predict``: apply a trained network to one shard of particles."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "predict"
STAGE = Stage(order=55, sections=("network",), results="predict", report="Network predictions (image set 2)")
HELP = "predict amplitudes, angles and shifts of particles with a trained network"
DESCRIPTION = """\
Apply a checkpoint written by `deephemnma train` (best.pt) to the particles of one STAR
file (e.g. one shard of image set 2) and write a STAR file with every input column plus:
  _rlnAngleRot/Tilt/Psi    degrees (RELION ZYZ), from the predicted unit quaternion
  _rlnOriginXAngst/YAngst  Å: a physical unit, valid for these (downscaled) images and for
                           the original full-size particles alike
  _dhnmaAmplitudeNNN       one column per normal mode of the training set
Values the input already had in those columns are kept as _dhnmaInput<Name>.
The particles must have the training images' box and pixel size (preprocess them the
same way). Batched, no gradients; on a GPU with mixed precision and channels_last; data
loading overlaps computation (DataLoader workers, pinned memory)."""
EXAMPLES = [
    "deephemnma predict --checkpoint results/network/best.pt --particles set2_shard_000.star --out shard_000_pred.star",
]


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PT", help="checkpoint written by deephemnma train (best.pt)")
    p.add_argument("--particles", required=True, metavar="STAR", help="particles to predict (one STAR file)")
    p.add_argument("--out", required=True, metavar="STAR", help="output STAR file")
    p.add_argument("--data-dir", metavar="DIR", help="directory against which image paths are resolved")
    p.add_argument("--batch-size", type=int, metavar="N", help="batch size (default: network.predict_batch_size)")
    p.add_argument("--workers", type=int, metavar="N", help="data-loading processes (default: 1 on CPU, up to 8 on GPU)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: network.device)")


def default_log(args) -> Path:
    out = Path(args.out)
    return out.with_name(out.stem + ".log")


def run(args, config: dict) -> int:
    from ..network.predict import predict_star

    net = config.get("network", {})
    predict_star(args.checkpoint, args.particles, args.out, data_dir=args.data_dir,
                 batch_size=args.batch_size or net.get("predict_batch_size") or 256,
                 num_workers=args.workers if args.workers is not None else net.get("num_workers"),
                 device=args.device or net.get("device") or "auto")
    return 0
