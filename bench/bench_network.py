"""Inference throughput of the DeepHEMNMA network: the whole predict pipeline vs the bare model.

For each image size (default 128² and 64²) this writes a labelled toy particle stack to a
temporary directory (MRC + STAR), then measures

* ``bare_forward``: the network's forward pass alone on a batch already in (device) memory,
  no gradients — the upper bound;
* ``pipeline``: :func:`deephemnma.network.predict.predict_images` over the stack on disk —
  memory-mapped reads, per-image normalisation and batching in DataLoader workers, transfer,
  forward, decoding of the outputs — in particles/s;

and reports ``pipeline / bare_forward`` (target ≥ 0.9: data loading never the bottleneck).
On a CUDA machine it uses the GPU with bf16 autocast and channels_last (target there:
≥ 20,000 particles/s at 128² on one H100); on CPU, fp32 and all cores.

    python bench/bench_network.py                      # 128 and 64, defaults for the device
    python bench/bench_network.py --sizes 128 --n 50000 --batch 512 --workers 8   # a GPU node

Writes bench/results/network.json (network_<N>thread.json with --threads N).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402


def bare_forward(model, box, batch, device, amp_dtype, channels_last, seconds=10.0, max_iters=200):
    x = torch.randn(batch, 1, box, box, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else (lambda: torch.no_grad())
    with torch.no_grad():
        for _ in range(3):  # warm-up (cuDNN autotune, allocator)
            with ctx():
                model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while n < max_iters and time.perf_counter() - t0 < seconds:
            with ctx():
                out = model(x)
            n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        _ = {k: v.float().cpu() for k, v in out.items()}
        return n * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--n", type=int, default=None, help="particles per stack (default 512 on CPU, 40000 on GPU)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 32 on CPU, 512 on GPU)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: predict's default)")
    ap.add_argument("--arch", default="resnet34")
    ap.add_argument("--mode", default="joint")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from deephemnma.network.data import load_particles
    from deephemnma.network.model import ModelConfig, build_model
    from deephemnma.network.predict import default_predict_workers, pick_device, predict_images
    from deephemnma.network.targets import TargetCodec
    from deephemnma.network.toydata import make_toy_particles

    device = pick_device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (40000 if cuda else 512)
    batch = args.batch or (512 if cuda else 32)
    workers = default_predict_workers(device) if args.workers is None else args.workers
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    if cuda:
        torch.backends.cudnn.benchmark = True
    figures = {"device": str(device), "gpu": torch.cuda.get_device_name(0) if cuda else None,
               "torch_threads": torch.get_num_threads(), "arch": args.arch, "mode": args.mode, "batch": batch,
               "workers": workers, "amp": str(amp_dtype), "channels_last": cuda, "n": n, "sizes": {}}
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_amplitudes=3, arch=args.arch, mode=args.mode)).to(device).eval()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory(prefix="bench_network_") as tmp:
        for box in args.sizes:
            t0 = time.perf_counter()
            star = make_toy_particles(Path(tmp) / f"b{box}", n=n, box=box, pixel_size=256 / box,
                                      stack_size=min(n, 10000), seed=box)
            gen_s = time.perf_counter() - t0
            ps = load_particles(star, labels=True)
            codec = TargetCodec.fit(ps.table)
            bare, pipe = [], []
            for _ in range(args.repeats):
                bare.append(bare_forward(model, box, batch, device, amp_dtype, cuda))
                pred = predict_images(model, codec, ps.images, batch_size=batch, num_workers=workers, device=device,
                                      show_progress=False)
                pipe.append(pred["timing"]["images_per_s"])
            fig = {"bare_forward_particles_per_s": float(np.median(bare)),
                   "pipeline_particles_per_s": float(np.median(pipe)),
                   "ratio_pipeline_over_bare": float(np.median(pipe) / np.median(bare)),
                   "bare_all": bare, "pipeline_all": pipe, "generate_s": gen_s}
            if not cuda:  # the serial variant: loading in the main process, no overlap
                pred = predict_images(model, codec, ps.images, batch_size=batch, num_workers=0, device=device,
                                      show_progress=False)
                fig["pipeline_no_workers_particles_per_s"] = pred["timing"]["images_per_s"]
            figures["sizes"][str(box)] = fig
            print(box, fig, flush=True)
    notes = ("pipeline = predict_images over an MRC stack on disk (memory-mapped, DataLoader workers, "
             "normalisation, decoding); bare = model forward on a resident batch. Taken on a shared machine: "
             "other jobs were running (see loadavg).")
    if cuda:
        notes += f" Target on one H100: >= 20000 particles/s at 128² (got {figures['sizes'].get('128', {}).get('pipeline_particles_per_s')})."
    write_result("network" if not args.threads else f"network_{args.threads}thread", figures, notes)


if __name__ == "__main__":
    main()
