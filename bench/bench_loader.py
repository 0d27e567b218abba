"""Data loading at 128² against the network's forward pass: is the loader ever the bottleneck?

    python bench/bench_loader.py                  # 20,000 images in chunk files of 5,000
    python bench/bench_loader.py --n 40000 --chunk 10000 --batch 512

Writes preprocessed-style chunk stacks (MRC, 128², unit-variance images) in float32 (mode 2)
and float16 (mode 12) to a scratch directory, then measures images/s of the project's own
loading path — :class:`deephemnma.core.mrc.ParticleImages` (positioned reads of the chunk files, memory-mapped before 2026-12-06) read
through :class:`deephemnma.network.data.BatchDataset` (per-image normalisation, batches as
tensors) and :func:`deephemnma.network.data.make_loader` (a DataLoader over whole batches):

* ``workers``: 0 (the main process), 1, and all cores;
* ``order``: ``sequential`` (inference: each shard read front to back) and ``random``
  (training: a shuffled permutation of all images per epoch);
* ``cache``: ``warm`` (the files in the page cache) and ``cold`` (the reader closed, then each
  file evicted with posix_fadvise(DONTNEED) before the pass: read from the disk, as far as
  this VM lets us know — its virtual disk may be cached by the host);

against the bare forward pass (no gradient, a resident batch, all cores) of the grid
network (:class:`deephemnma.network.posenet.PoseNet` with the grid recipe's defaults:
convnet of width 16, input averaged down to 32², 192 × 24 grid, heads of 512) and of the
previous ResNet34 joint regressor (:mod:`deephemnma.network.model`, the fast recipe's), both
at 128². Also the bytes per particle of each stage's files. Writes bench/results/loader.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402


NOTES = ("Read rates: the project's loader (ParticleImages over memory-mapped chunk files, BatchDataset "
         "normalisation, DataLoader over whole batches), pin_memory off (no GPU); forward: no gradient, resident "
         "batch, CPU. Taken on the shared 2-core VM with other jobs running (loadavg).")


def write_chunks(d: Path, n: int, chunk: int, box: int, dtype: str, seed: int = 0) -> list[Path]:
    from deephemnma.core.mrc import StackWriter

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for k, a in enumerate(range(0, n, chunk)):
        m = min(chunk, n - a)
        f = d / f"chunk_{k:04d}.mrcs"
        files.append(f)
        if f.exists() and f.stat().st_size == 1024 + m * box * box * np.dtype(dtype).itemsize:
            continue
        with StackWriter(f, m, box, 1.3, dtype=dtype) as w:
            for s in range(0, m, 1000):
                w.append(rng.standard_normal((min(1000, m - s), box, box)).astype(np.float32))
    return files


def evict(files) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def images_of(files):
    from deephemnma.core.mrc import ParticleImages, read_header

    counts = [read_header(f).n for f in files]
    file_idx = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    image_idx = np.concatenate([np.arange(c) for c in counts])
    return ParticleImages(files, file_idx, image_idx)


def loader_pass(images, batch: int, workers: int, order: str, pin: bool, seed: int = 0) -> float:
    """Images per second of one pass over all images (after the first batch: worker start-up
    is not counted)."""
    from deephemnma.network.data import BatchDataset, StepSampler, make_loader

    n = len(images)
    ds = BatchDataset(images, normalize="per_image")
    sampler = StepSampler(n, batch, shuffle=(order == "random"), seed=seed)
    loader = make_loader(ds, sampler, num_workers=workers, pin_memory=pin, prefetch_factor=4)
    it = iter(loader)
    next(it)  # workers started and the first batch in: the steady state is timed
    t0 = time.perf_counter()
    seen = 0
    for b in it:
        seen += b["image"].shape[0]
    return seen / (time.perf_counter() - t0)


def forward_rate(model, box: int, batch: int, seconds: float = 8.0) -> float:
    x = torch.randn(batch, 1, box, box)
    with torch.no_grad():
        model(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            model(x)
            n += 1
    return n * batch / (time.perf_counter() - t0)


def grid_network():
    from deephemnma.core.config import validate_config
    from deephemnma.network.posenet import PoseNet, PoseNetConfig
    from deephemnma.network.train import TrainSettings

    s = TrainSettings.from_config(validate_config({}))  # the defaults, the recipe's and the model's resolved
    cfg = PoseNetConfig(n_amplitudes=3, arch=s.arch, input_box=int(s.input_box), n_directions=int(s.grid_directions),
                        n_inplane=int(s.grid_inplane), hidden=int(s.hidden[0]), width=int(s.width))
    return PoseNet(cfg).eval(), cfg.to_dict()


def resnet34_regressor():
    from deephemnma.network.model import ModelConfig, build_model

    cfg = ModelConfig(n_amplitudes=3, arch="resnet34", mode="joint", hidden=(1000, 512, 128), dropout=0.0)
    return build_model(cfg).eval(), {"arch": "resnet34", "mode": "joint", "hidden": [1000, 512, 128]}


def stage_bytes(scale_json: Path) -> dict:
    """Bytes per particle of each stage's files, from bench_scale's largest complete run."""
    if not scale_json.is_file():
        return {}
    runs = json.loads(scale_json.read_text())["figures"].get("runs", {})
    done = [k for k, r in runs.items() if r.get("complete")] or list(runs)
    if not done:
        return {}
    r = runs[max(done, key=int)]
    return {"N": r["N"], "source": "bench/results/scale.json", **{k: v["bytes_per_particle"] for k, v in r["disk"].items()}}


# ----------------------------------------------------------------------------- float16 vs float32
def _cli(args: list, timeout: float = 3600) -> dict:
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "deephemnma", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise RuntimeError(f"deephemnma {' '.join(map(str, args[:1]))} failed:\n{p.stderr[-3000:]}")
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def float16_accuracy(wd: Path, n_align: int, n_predict: int) -> dict:
    """The same particles preprocessed as float32 and float16 from a finished bench_scale run
    (``wd``: its work directory), then HEMNMA on ``n_align`` particles of set 1's first chunk
    and prediction (network + refinement, the run's checkpoint) on ``n_predict`` of set 2's:
    the answers' differences between the two, next to each one's error against the truth."""
    from deephemnma.core.star import read_star, write_star
    from deephemnma.evaluate import align_tables, load_ground_truth, parameter_errors, summarise_errors

    res = wd / "results"
    out = wd / "float16_check"
    cfg = res / "config"
    fig: dict = {"workdir": str(wd), "n_align": n_align, "n_predict": n_predict}
    truth = load_ground_truth(res / "simulate" / "ground_truth.star")
    answers = {}
    for dtype in ("float32", "float16"):
        d = out / dtype
        t = _cli(["preprocess", "--particles", res / "simulate" / "particles.star", "--outdir", d / "preprocess",
                  "--reference", res / "nma" / "modes.npz", "--chunks", "set1/chunk_0000", "set2/chunk_0000",
                  "--config", cfg / "preprocess.yaml", "--set", f"preprocess.dtype={dtype}", "--threads", "1"])
        fig[f"{dtype}/preprocess_2_chunks"] = t
        fig[f"{dtype}/stack_bytes"] = (d / "preprocess" / "set1" / "chunk_0000.mrcs").stat().st_size
        for which, n, chunk in (("align", n_align, "set1"), ("predict", n_predict, "set2")):
            src = d / "preprocess" / chunk / "chunk_0000.star"
            st = read_star(src)
            sub = d / f"{which}_input.star"
            write_star(sub, st.particles.iloc[:n], st.optics, source=src)
            o = d / f"{which}.star"
            if which == "align":
                t = _cli(["align", "--particles", sub, "--modes", res / "nma" / "modes.npz", "--out", o,
                          "--config", cfg / "align.yaml", "--threads", "1"])
            else:
                t = _cli(["predict", "--checkpoint", res / "network" / "best.pt", "--modes", res / "nma" / "modes.npz",
                          "--reference-scores", res / "filter" / "kept.star", "--particles", sub, "--out", o,
                          "--config", cfg / "predict.yaml", "--threads", "1"])
            fig[f"{dtype}/{which}"] = {**t, "s_per_particle": t["wall_s"] / n}
            answers[(dtype, which)] = read_star(o).particles
    for which in ("align", "predict"):
        a32, a16 = answers[("float32", which)], answers[("float16", which)]
        p32, t32 = align_tables(a32, truth)
        p16, t16 = align_tables(a16, truth)
        fig[f"{which}/float32_vs_truth"] = summarise_errors(parameter_errors(p32, t32))
        fig[f"{which}/float16_vs_truth"] = summarise_errors(parameter_errors(p16, t16))
        fig[f"{which}/float16_vs_float32"] = summarise_errors(parameter_errors(p16, p32))
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="images per dtype (default 20000)")
    ap.add_argument("--chunk", type=int, default=5000, help="images per chunk file (default 5000)")
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/deephemnma_loader"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--forward-seconds", type=float, default=8.0)
    ap.add_argument("--name", default="loader", help="result name (bench/results/<name>.json)")
    ap.add_argument("--accuracy-from", type=Path, metavar="DIR",
                    help="a finished bench_scale work directory (e.g. /tmp/deephemnma_scale/n10000): add the float16 "
                         "vs float32 comparison of HEMNMA and prediction on its particles")
    ap.add_argument("--accuracy-only", action="store_true", help="only the float16 comparison (kept with the "
                    "read figures already in the result)")
    ap.add_argument("--n-align", type=int, default=200)
    ap.add_argument("--n-predict", type=int, default=300)
    a = ap.parse_args()
    if a.accuracy_only:
        if a.accuracy_from is None:
            ap.error("--accuracy-only needs --accuracy-from")
        prev = Path(__file__).resolve().parent / "results" / f"{a.name}.json"
        figures = json.loads(prev.read_text())["figures"] if prev.exists() else {}
        figures["float16_accuracy"] = float16_accuracy(a.accuracy_from, a.n_align, a.n_predict)
        write_result(a.name, figures, NOTES)
        return 0
    cores = len(os.sched_getaffinity(0))
    figures = {"n": a.n, "chunk": a.chunk, "box": a.box, "batch": a.batch, "cores": cores,
               "torch_threads": torch.get_num_threads(), "read": {}, "forward": {}}
    files = {dt: write_chunks(a.dir / dt, a.n, a.chunk, a.box, dt) for dt in ("float32", "float16")}
    figures["file_mb"] = {dt: round(sum(f.stat().st_size for f in fs) / 1e6, 1) for dt, fs in files.items()}
    for dt, fs in files.items():
        images = images_of(fs)
        for workers in sorted({0, 1, cores}):
            for order in ("sequential", "random"):
                for cache in ("warm", "cold"):
                    rates = []
                    for _ in range(a.repeats):
                        if cache == "warm":
                            loader_pass(images, a.batch, 0, "sequential", False)  # bring the files in
                        images.close()  # first: the kernel does not evict pages a live memory map holds
                        if cache == "cold":
                            evict(fs)
                        rates.append(loader_pass(images, a.batch, workers, order, pin=False))
                    key = f"{dt}/workers{workers}/{order}/{cache}"
                    figures["read"][key] = {"images_per_s": float(np.median(rates)), "all": rates,
                                            "mb_per_s": float(np.median(rates)) * a.box * a.box * np.dtype(dt).itemsize / 1e6}
                    print(key, figures["read"][key], flush=True)
    torch.manual_seed(0)
    for name, build in (("grid_posenet", grid_network), ("resnet34_regressor", resnet34_regressor)):
        model, cfg = build()
        rate = forward_rate(model, a.box, a.batch if name == "grid_posenet" else 32, a.forward_seconds)
        figures["forward"][name] = {"images_per_s": rate, "config": cfg,
                                    "parameters": int(sum(p.numel() for p in model.parameters()))}
        print(name, rate, flush=True)
    px = {"original_float32": 4 * (2 * a.box) ** 2, "processed_float32": 4 * a.box ** 2,
          "processed_float16": 2 * a.box ** 2}
    figures["image_bytes_per_particle"] = {f"{k} ({2 * a.box if k.startswith('original') else a.box}²)": v
                                           for k, v in px.items()}
    figures["stage_bytes_per_particle_scale_run"] = stage_bytes(Path(__file__).resolve().parent / "results" / "scale.json")
    if a.accuracy_from is not None:
        figures["float16_accuracy"] = float16_accuracy(a.accuracy_from, a.n_align, a.n_predict)
    write_result(a.name, figures, NOTES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
