"""``deephemnma predict``: apply a trained network to one shard of particles."""
from __future__ import annotations

from pathlib import Path

from ..core.stage import Stage

NAME = "predict"
STAGE = Stage(order=55, sections=("network", "align"), results="predict", report="Network predictions (image set 2)")
HELP = "predict amplitudes, angles and shifts of particles with a trained network (refined by HEMNMA)"
DESCRIPTION = """\
Apply a checkpoint written by `deephemnma train` (best.pt) to the particles of one STAR
file (e.g. one shard of image set 2) and write a STAR file with every input column plus:
  _rlnAngleRot/Tilt/Psi    degrees (RELION ZYZ)
  _rlnOriginXAngst/YAngst  Å: a physical unit, valid for these (downscaled) images and for
                           the original full-size particles alike
  _dhnmaAmplitudeNNN       one column per normal mode of the training set
With a grid checkpoint (the default recipe) each answer is then polished by HEMNMA's
continuous refinement (network.refine: local) and particles whose refined score stays below
the bulk of set 1's HEMNMA scores (--reference-scores, network.fallback_quantile) go through
full HEMNMA (network.refine: fallback; dhnmaFlag bit 32); the output then has HEMNMA's
columns too (dhnmaScore, dhnmaConverged, dhnmaFlag) and dhnmaNetworkConfidence, and a
summary JSON beside it gives the fallback fraction. Refinement uses the align section's
levels and iterations. Resumable per batch after a kill.
The particles must have the training images' box and pixel size (preprocess them the
same way)."""
EXAMPLES = [
    "deephemnma predict --checkpoint results/network/best.pt --modes results/nma/modes.npz "
    "--reference-scores results/filter/kept.star --particles set2/chunk_0000.star --out predict/chunk_0000.star",
    "deephemnma predict --checkpoint best.pt --modes modes.npz --particles shard.star --out pred.star "
    "--set network.refine=none",
]


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PT", help="checkpoint written by deephemnma train (best.pt)")
    p.add_argument("--particles", required=True, metavar="STAR", help="particles to predict (one STAR file)")
    p.add_argument("--out", required=True, metavar="STAR", help="output STAR file")
    p.add_argument("--modes", metavar="NPZ", help="the modes file of the training labels (grid checkpoints: refinement)")
    p.add_argument("--reference-scores", metavar="STAR",
                   help="HEMNMA's output for image set 1 (its dhnmaScore sets the fallback threshold)")
    p.add_argument("--data-dir", metavar="DIR", help="directory against which image paths are resolved")
    p.add_argument("--batch-size", type=int, metavar="N", help="batch size (default: network.predict_batch_size)")
    p.add_argument("--workers", type=int, metavar="N", help="data-loading processes (default: 1 on CPU, up to 8 on GPU)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: network.device)")


def default_log(args) -> Path:
    out = Path(args.out)
    return out.with_name(out.stem + ".log")


def run(args, config: dict) -> int:
    from ..align import AlignSettings
    from ..core.device import pick_device
    from ..network.amortise import fallback_threshold
    from ..network.predict import predict_star

    net = config["network"]
    amortise = {"align_settings": AlignSettings.from_config(config), "refine": net["refine"],
                "hypotheses": net["refine_hypotheses"], "turns": net["tta_turns"],
                "fallback_score": fallback_threshold(args.reference_scores, net["fallback_quantile"])
                if net["refine"] == "fallback" else None,
                "batch_size": min(64, args.batch_size or 64)}
    predict_star(args.checkpoint, args.particles, args.out, data_dir=args.data_dir,
                 batch_size=args.batch_size or net.get("predict_batch_size") or 256,
                 num_workers=args.workers if args.workers is not None else net.get("num_workers"),
                 device=args.device or net.get("device") or "auto", modes=args.modes, amortise=amortise)
    return 0
