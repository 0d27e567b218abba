"""Network accuracy (issue 16): HEMNMA, the network alone and the network + refinement on the
same held-out particles, made by ``deephemnma simulate`` (voxel densities with Peng scattering
factors — never the Gaussian renderer the network trains on).

The data: the paper's adenylate-kinase recipe (helix of amplitudes on modes 7–9, uniform
orientations, ±5 px shifts, 200 kV, Cs 2 mm, 0.5 µm underfocus, SNR 0.1) at 128² and
0.65 Å/px, preprocessed to 64² at 1.3 Å/px (``--gpu``: 256² at 0.325 Å → 128², the paper's
sizes). Image set 1 (``--n-set1``, ≥ 5,000) is aligned by HEMNMA and trains the network;
image set 2 (``--n-test``, 2,000) is the test: no stage that trains or chooses sees it.

One snakemake run of the workflow (bench config written to the work folder) does simulate →
preprocess → HEMNMA on set 1 → filter → train (recipe grid, ``--train-cpu-hours`` of
training) → predict set 2 with refinement (network.refine: fallback). Then, on the same
set-2 particles: the network alone (``deephemnma predict --set network.refine=none``), and
HEMNMA itself (``deephemnma align`` on every set-2 chunk). Each is compared with the ground
truth (``deephemnma evaluate``): the paper's angle metric (chance ~90°), shift error per axis
(Å) and the deformation RMSD (Å), next to predicting the mean conformation; with CPU-seconds
per particle and the training's CPU-hours, and the learning curves (network/metrics.csv).

    python bench/bench_network_accuracy.py                         # CPU: ≥ 5,000 + 2,000, ≤ 4 CPU-h of training
    python bench/bench_network_accuracy.py --n-set1 600 --n-test 200 --train-cpu-hours 0.1   # smoke test
    python bench/bench_network_accuracy.py --gpu                   # 128², the paper's split, on a GPU

Writes bench/results/network_accuracy.json (or network_accuracy_gpu.json) and the learning
curves beside it. Resumable: the workflow and the extra steps skip what is done.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import write_result  # noqa: E402

#: training throughput measured on this machine's cores (images per CPU-second, grid recipe,
#: convnet width 16 at 32² input): sizes the number of steps to the CPU budget
IMAGES_PER_CPU_S = 280.0


def sh(cmd, **kw) -> float:
    """Run a command; returns the CPU seconds (user + system) of that child alone — read from its
    own resource usage, so that commands run in parallel threads do not count each other."""
    print("+", " ".join(map(str, cmd)), flush=True)
    proc = subprocess.Popen(list(map(str, cmd)), **kw)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return usage.ru_utime + usage.ru_stime


def cpu_record(path: Path, seconds: float | None = None) -> float:
    """The CPU seconds of a finished step, kept beside its output so a rerun reports them."""
    if seconds is not None:
        path.write_text(json.dumps({"cpu_seconds": seconds}))
    return json.loads(path.read_text())["cpu_seconds"] if path.exists() else 0.0


def bench_config(args) -> dict:
    import yaml

    gpu = args.gpu
    ranks = 1 if gpu else args.ranks
    steps = int(args.train_cpu_hours * 3600 * IMAGES_PER_CPU_S / (64 * ranks)) if not gpu else 20000
    epochs = max(1, steps // 200)
    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.network)}
    return {
        "outdir": "results", "seed": 0, "data": {"source": "simulate", "invert_contrast": False},
        "reference": {"atoms": "heavy"}, "nma": {"n_select": 3},
        "simulate": {"n_particles": args.n_set1 + args.n_test, "box": 256 if gpu else 128,
                     "pixel_size": 0.325 if gpu else 0.65, "chunk_size": 500},
        "preprocess": {"box": 128 if gpu else 64, "set1_size": args.n_set1, "chunk_size": 500},
        "network": {"recipe": "grid", "epochs": epochs, "steps_per_epoch": 200, "batch_size": 64,
                    **({"device": "cuda", "input_box": 64} if gpu else {}), **extra},
        "landscape": {"groups": {"method": "bins", "n_bins": 10, "min_size": 100}},
        "workflow": {"train_engine": "single" if ranks == 1 else "auto", "train_ranks": ranks,
                     "evaluate": "always"},
    }


def cpu_seconds(tsv: Path) -> float:
    """CPU seconds (user + system) of a Snakemake benchmark file."""
    with open(tsv) as fh:
        row = next(csv.DictReader(fh, delimiter="\t"))
    return float(row.get("cpu_time") or 0.0)


def run_workflow(work: Path, cfg_path: Path, cores: int) -> None:
    targets = ["results/predict/predicted.star", "results/evaluate/hemnma/summary.json",
               "results/network/summary.json"]
    sh([sys.executable, "-m", "snakemake", "-s", REPO / "Snakefile", "--directory", work, "--cores", cores,
        "--rerun-incomplete", *targets, "--configfile", cfg_path])


def dh(*args, cwd=None) -> float:
    return sh([sys.executable, "-m", "deephemnma", *map(str, args)], cwd=cwd)


def network_alone(res: Path, chunks: list[str], checkpoint: Path | None = None,
                  name: str = "network_alone", models: Path | None = None, refine: str = "none") -> tuple[Path, float]:
    """A checkpoint's answers for every set-2 chunk of ``res`` without refinement (one thread),
    or with ``refine`` (``network.refine``: ``local``, HEMNMA's continuous refinement from the
    network's hypotheses, no global search and no fallback). ``models``: the results folder whose
    network and modes answer (default ``res``; another folder's particles can be answered by
    this bench's models). Returns the merged STAR and the CPU seconds."""
    models = models or res
    out = res / "bench" / name
    out.mkdir(parents=True, exist_ok=True)
    seconds = 0.0
    for c in chunks:
        star = out / f"{c}.star"
        if not star.exists():
            cpu_record(out / f"{c}.cpu.json", dh(
                "predict", "--checkpoint", checkpoint or models / "network/best.pt", "--modes", models / "nma/modes.npz",
                "--particles", res / f"preprocess/set2/{c}.star", "--out", star, "--set", f"network.refine={refine}",
                "--set", "data.invert_contrast=false", "--threads", 1))
        seconds += cpu_record(out / f"{c}.cpu.json")
    merged = out / "predicted.star"
    dh("merge", "--particles", *[out / f"{c}.star" for c in chunks], "--out", merged)
    return merged, seconds


def hemnma_set2(res: Path, chunks: list[str], cores: int, models: Path | None = None) -> tuple[Path, float]:
    """HEMNMA on every set-2 chunk, one thread per chunk, ``cores`` chunks at a time; returns the
    merged STAR and the CPU seconds of the alignments. ``models``: the results folder whose
    modes and alignment settings are used (default ``res``)."""
    models = models or res
    from concurrent.futures import ThreadPoolExecutor

    out = res / "bench" / "hemnma_set2"
    out.mkdir(parents=True, exist_ok=True)

    def one(c: str) -> None:
        if not (out / f"{c}.star").exists():
            cpu_record(out / f"{c}.cpu.json", dh(
                "align", "--particles", res / f"preprocess/set2/{c}.star", "--modes", models / "nma/modes.npz",
                "--out", out / f"{c}.star", "--summary", out / f"{c}.json", "--config", models / "config/align.yaml",
                "--threads", 1))

    with ThreadPoolExecutor(max(1, cores)) as pool:
        list(pool.map(one, chunks))
    seconds = sum(cpu_record(out / f"{c}.cpu.json") for c in chunks)
    merged = out / "hemnma.star"
    dh("merge", "--particles", *[out / f"{c}.star" for c in chunks], "--out", merged)
    return merged, seconds


def evaluate(res: Path, star: Path, name: str) -> dict:
    out = res / "bench" / f"evaluate_{name}"
    dh("evaluate", "--particles", star, "--truth", res / "simulate/ground_truth.star", "--modes",
       res / "nma/modes.npz", "--outdir", out)
    s = json.loads((out / "summary.json").read_text())
    return {"n": s["n"], "angle_deg": s["angle_err"]["mean"], "angle_deg_median": s["angle_err"]["median"],
            "shift_A_per_axis": s["shift_err"]["mean"], "rmsd_A": s["rmsd_amp"]["mean"],
            "rmsd_A_median": s["rmsd_amp"]["median"]}


def mean_conformation_rmsd(res: Path, models: Path | None = None) -> float:
    """Deformation RMSD (Å) of predicting set 1's mean amplitudes (of ``models``, default
    ``res``) for every set-2 particle of ``res``, on set 1's modes: HEMNMA's mean over the set 1 it
    kept, or before HEMNMA has run, the true mean of set 1's amplitudes (the simulation's)."""
    models = models or res
    import numpy as np

    sys.path.insert(0, str(REPO))
    from deephemnma.core.modes import amplitudes_to_rmsd, load_modes
    from deephemnma.core.star import amplitude_columns, read_star
    from deephemnma.evaluate import align_tables, load_ground_truth

    ms = load_modes(res / "nma/modes.npz")
    truth = load_ground_truth(res / "simulate/ground_truth.star")
    set2 = read_star(res / "preprocess/set2.star").particles
    _, t2 = align_tables(set2, truth)
    if (models / "filter/kept.star").exists():
        set1 = read_star(models / "filter/kept.star").particles
    else:
        _, set1 = align_tables(read_star(models / "preprocess/set1.star").particles,
                               load_ground_truth(models / "simulate/ground_truth.star"))
    cols = amplitude_columns(set1)
    V = np.stack([ms.mode(int(c[-3:])) for c in cols])
    dq = t2[cols].to_numpy(float) - set1[cols].to_numpy(float).mean(0)
    return float(amplitudes_to_rmsd(dq, V).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-set1", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--train-cpu-hours", type=float, default=3.5)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench_network_accuracy")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--ranks", type=int, default=1,
                    help="training ranks on CPU (1: single engine; more: DDP or Horovod, one thread each); "
                         "the step count is sized so the CPU budget holds")
    ap.add_argument("--network", action="append", default=[], metavar="KEY=VALUE",
                    help="network setting for the bench (repeatable), e.g. grid_sigma_end=5")
    ap.add_argument("--gpu", action="store_true", help="128² particles, the paper's split, training on the GPU")
    args = ap.parse_args(argv)
    if args.gpu and args.n_set1 == 5000:
        args.n_set1, args.n_test = 20000, 2000
    import yaml

    args.work.mkdir(parents=True, exist_ok=True)
    cfg_path = args.work / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(bench_config(args)))
    t0 = time.perf_counter()
    run_workflow(args.work, cfg_path, args.cores)
    res = args.work / "results"
    chunks = sorted(p.stem for p in (res / "preprocess/set2").glob("chunk_*.star"))
    alone, alone_s = network_alone(res, chunks)
    hem, hem_s = hemnma_set2(res, chunks, args.cores)
    bench = res / "benchmarks"
    refine_s = sum(cpu_seconds(p) for p in (bench / "predict").glob("chunk_*.tsv"))
    train_cpu_h = cpu_seconds(bench / "train.tsv") / 3600
    figures = {
        "network_alone": {**evaluate(res, alone, "alone"), "cpu_s_per_particle": None},
        "network_refined": {**evaluate(res, res / "predict/predicted.star", "refined")},
        "hemnma": {**evaluate(res, hem, "hemnma"), "cpu_s_per_particle": None},
        "mean_conformation_rmsd_A": mean_conformation_rmsd(res),
        "chance_angle_deg": 90.0,
        "training_cpu_hours": train_cpu_h,
        "network_summary": json.loads((res / "network/summary.json").read_text()),
        "refinement": json.loads((res / "predict/summary.json").read_text()),
        "wall_seconds": time.perf_counter() - t0,
        "config": bench_config(args),
    }
    n = figures["hemnma"]["n"]
    figures["network_alone"]["cpu_s_per_particle"] = alone_s / max(n, 1)
    figures["network_refined"]["cpu_s_per_particle"] = refine_s / max(n, 1)
    figures["hemnma"]["cpu_s_per_particle"] = hem_s / max(n, 1)
    figures["throughput_ratio_vs_hemnma"] = (hem_s / max(refine_s, 1e-9))
    name = "network_accuracy_gpu" if args.gpu else "network_accuracy"
    curves = HERE / "results" / f"{name}_curves.png"
    if (res / "network/curves.png").exists():
        curves.write_bytes((res / "network/curves.png").read_bytes())
    (HERE / "results" / f"{name}_metrics.csv").write_text((res / "network/metrics.csv").read_text())
    write_result(name, figures, notes="set 2 is the held-out test set; errors against the simulation's ground truth")
    print(json.dumps({k: figures[k] for k in ("network_alone", "network_refined", "hemnma",
                                              "mean_conformation_rmsd_A", "training_cpu_hours")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
