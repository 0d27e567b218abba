"""The VAE (issue 12) against the regressor and HEMNMA, on the network-accuracy bench's particles.

Runs after ``bench/bench_network_accuracy.py`` in the same work folder: its simulated
particles (``deephemnma simulate``, voxel densities — never the Gaussian renderer the VAE
decodes through), its HEMNMA labels of image set 1, its regressor checkpoint and its answers
for the held-out image set 2 (the regressor alone, HEMNMA). This script trains two VAEs
(``network.model: vae``) with the bench's training settings:

- ``scratch``: no HEMNMA output at all (``vae_init: scratch``; set 1 as preprocessed, before
  HEMNMA's outlier filter): the renderer is calibrated from the images, rendered amplitudes
  come from the thermal prior; the reconstruction sees set 1 and the unlabelled set 2
  (``vae_data: all``) and self-trains on both sets' fits (the default ``vae_pseudo_data: all``),
  as a user without labels would run it (``--only scratch`` needs only the network-accuracy
  bench's particles, and reports HEMNMA and the regressor when they exist);
- ``regressor``: the encoder starts from the regressor's checkpoint (``vae_init: regressor``,
  ``vae_init_checkpoint``) and learns from the images of both sets, under the prior of
  HEMNMA's set-1 amplitudes (``vae_prior: hemnma``: the labels exist, so the prior uses them),
  with the defaults' self-training on set 2 (``vae_pseudo_data: others``: set 2's fits through
  the decoder join set 1's HEMNMA labels in the pose steps — transductive: the VAE sees the
  images it is then tested on, never their truth);

then answers set 2 with each encoder alone (``deephemnma predict --set network.refine=none``)
and with HEMNMA's continuous refinement from the encoder's hypotheses (``network.refine=local``:
no global search, no fallback — for the scratch VAE, a pipeline without any HEMNMA label or
search), and compares the methods with the ground truth (``deephemnma evaluate``): the paper's
angle metric (chance ~90°), shift per axis, deformation RMSD (Å) next to predicting the mean
conformation, with each training's CPU-hours, and per particle each VAE's errors minus the
regressor's (``paired_vs_regressor``: mean ± standard error, fraction of particles better).
The posterior's width (``dhnmaAmplitudeStd*``) is reported next to the actual amplitude error
it should track. ``self_training_fits``: set-2 particles fitted through each VAE's decoder
from its encoder's hypotheses, as its self-training fits them, against the truth next to the
encoder's own answers for them — how much better the decoder's fits are than the encoder.

The oracle (``--oracle``): the grid regressor trained on set 1 with the simulation's exact
labels instead of HEMNMA's, set 2 answered by it alone — the best labels any strategy (HEMNMA's,
the VAE's self-training fits) can give an encoder of that width and budget for its training particles.
With ``--distil CHECKPOINT`` the same encoder trains instead on set 1 labelled by a finished
VAE's own gated self-training fits, every set-1 particle fitted once (no truth read): what the
VAE's fits are worth as labels, separated from how its self-training uses them.

The misfit case (``--misfit-n``, default 2,000): particles simulated the same way but with a
motion outside the fitted modes — the helix on modes 7–9 plus ± 120 on mode 10 (about 3 Å
RMS) — answered by HEMNMA, the regressor and each VAE with the models above; errors on the
fitted modes next to the main case's, and the posterior's width next to its actual error.

    python bench/bench_network_accuracy.py                # first: particles, labels, regressor
    python bench/bench_vae.py                             # ≤ 2 CPU-h for the scratch VAE
    python bench/bench_vae.py --scratch-cpu-hours 0.5 --init-cpu-hours 0.25   # reduced
    python bench/bench_vae.py --gpu --work W   # W: the work folder of bench_network_accuracy.py --gpu
    python bench/bench_vae.py --misfit-n 0     # without the misfit case
    python bench/bench_vae.py --diagnose       # pose-pretraining curves of the scratch VAE's variants
    python bench/bench_vae.py --only scratch --scratch-set network.vae_prior_rmsd=6 \
        --scratch-set network.vae_pretrain=0.7    # a variant of the scratch VAE, in its own folder
    python bench/bench_vae.py --only scratch --scratch-steps 8000 --scratch-set network.vae_prior_rmsd=6 \
        --scratch-set network.vae_pretrain=0.7 --scratch-set network.vae_pseudo_fraction=0.5 \
        --scratch-set network.vae_pseudo_after=0.2 --scratch-set network.vae_pseudo_particles=1024   # self-training

    python bench/bench_vae.py --only regressor --init-set network.lr=1e-4   # a variant of the other
    python bench/bench_vae.py --only regressor --init-set network.vae_pseudo_fraction=0   # no self-training
    python bench/bench_vae.py --oracle --oracle-set network.width=24   # the encoder's ceiling (exact labels)
    python bench/bench_vae.py --oracle --oracle-set network.width=24 --oracle-steps 8000 \
        --distil W/results/bench/vae_scratch_<tag>/best.pt   # the same encoder on a VAE's fits as labels

Writes bench/results/vae.json (vae_gpu.json; a ``--scratch-set`` / ``--init-set`` variant:
vae_scratch_<tag>.json / vae_regressor_<tag>.json; ``--only`` with a VAE's defaults: vae_<only>.json;
``--oracle``: vae_oracle_<tag>.json; with ``--distil``: vae_distil_<tag>.json).
Resumable: a finished training or prediction is not redone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_network_accuracy import (cpu_record, evaluate, hemnma_set2, mean_conformation_rmsd,  # noqa: E402
                                    network_alone, sh)
from common import write_result  # noqa: E402

#: VAE optimiser steps of one rank per CPU-second on this machine (grid encoder, convnet 16 at
#: 32², batch 64 per rank, 2 LM iterations per reconstruction step): the VAE demo's 600 steps
#: on 2 ranks took 616 CPU-s (results_vae/benchmarks/train.tsv)
RANK_STEPS_PER_CPU_S = 2 * 600 / 616
#: the VAE from scratch at its default width (24 channels), pose pretraining and self-training
#: fits included: 8,000 steps in 1.27 CPU-h, one process (vae_scratch_ce6a4e02.json); sizes
#: --scratch-cpu-hours when --scratch-steps is not given
SCRATCH_STEPS_PER_CPU_S = 8000 / (1.27 * 3600)


def train_vae(res: Path, name: str, overrides: dict, cpu_hours: float, ranks: int,
              steps: int | None = None, particles: Path | None = None,
              rate: float = RANK_STEPS_PER_CPU_S) -> tuple[Path, float]:
    """Train one VAE into res/bench/<name> for ``steps`` optimiser steps (default: as many as
    ``cpu_hours`` buy at ``rate``, steps of one rank per CPU-second) on ``particles`` (default:
    set 1 as HEMNMA's filter kept it); returns (best.pt, CPU-hours of this training)."""
    out = res / "bench" / name
    best = out / "best.pt"
    cpu_file = out / "cpu_seconds.json"
    if best.exists() and cpu_file.exists() and (out / "summary.json").exists():
        return best, cpu_record(cpu_file) / 3600
    steps = steps or max(10, int(cpu_hours * 3600 * rate / ranks))
    per_epoch = min(100, steps)
    sets = {"network.model": "vae", "network.epochs": max(1, steps // per_epoch), "network.steps_per_epoch": per_epoch,
            "network.vae_data": "all", "network.vae_particles": [str(res / "preprocess/set2.star")], **overrides}
    return best, train_run(res, out, particles or res / "filter/kept.star", sets, ranks) / 3600


def train_run(res: Path, out: Path, particles: Path, sets: dict, ranks: int = 1) -> float:
    """``deephemnma train`` of ``particles`` into ``out`` with the bench's training config and
    ``sets`` (resumed where a killed run stopped); records and returns its CPU seconds."""
    resumed = (out / "last.pt").exists()
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "deephemnma"] if ranks > 1 else [sys.executable, "-m", "deephemnma"])
    cmd = [*launch, "train", "--particles", particles, "--modes", res / "nma/modes.npz",
           "--outdir", out, "--config", res / "config/train.yaml", "--threads", 1, "--resume", "auto"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v) if isinstance(v, list) else v}"]
    seconds = sh(cmd)
    if resumed:  # a killed training resumed: this process saw only its last epochs; the history has them all
        seconds = max(seconds, json.loads((out / "summary.json").read_text()).get("cpu_seconds", 0.0))
    return cpu_record(out / "cpu_seconds.json", seconds)


def posterior_vs_error(res: Path, star: Path) -> dict:
    """Per amplitude on set 2: the mean posterior std next to the RMS of its actual error, and
    how the answers follow the truth — correlation ``r`` and ``slope`` of answer on truth (1 when
    unshrunk; a posterior mean pulled toward a prior's centre has a slope below 1)."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from deephemnma.core.star import amplitude_columns, read_star
    from deephemnma.evaluate import align_tables, load_ground_truth

    pred = read_star(star).particles
    p, t = align_tables(pred, load_ground_truth(res / "simulate/ground_truth.star"))
    out = {}
    for c in amplitude_columns(pred):
        sc = c.replace("dhnmaAmplitude", "dhnmaAmplitudeStd")
        if sc in p.columns and c in t.columns:
            a, b = p[c].to_numpy(float), t[c].to_numpy(float)
            out[c] = {"posterior_std_mean": float(p[sc].astype(float).mean()),
                      "actual_error_rms": float(np.sqrt(np.mean((a - b) ** 2))),
                      "r": float(np.corrcoef(a, b)[0, 1]), "slope": float(np.polyfit(b, a, 1)[0])}
    return out


def paired(res: Path, name: str, other: str) -> dict:
    """Per particle, the errors of ``evaluate_<name>`` minus those of ``evaluate_<other>`` (the
    same particles, matched by image name): mean and standard error of the angle (°), shift
    (Å per axis) and deformation RMSD (Å) differences — negative where ``name`` is better. Two
    methods with the same mean can differ on most particles; the pairing removes the spread
    between particles from the comparison."""
    import numpy as np
    import pandas as pd

    cols = {"angle_err": "angle_deg", "shift_err": "shift_A_per_axis", "rmsd_amp": "rmsd_A"}
    a, b = (pd.read_csv(res / "bench" / f"evaluate_{n}" / "errors.csv", usecols=["rlnImageName", *cols])
            for n in (name, other))
    m = a.merge(b, on="rlnImageName", suffixes=("", "_other"))
    out = {"n": int(len(m)), "vs": other}
    for c, key in cols.items():
        d = m[c].to_numpy(float) - m[f"{c}_other"].to_numpy(float)
        out[key] = {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))),
                    "better_fraction": float((d < 0).mean())}
    return out


#: the misfit particles: the bench's helix on modes 7–9 (q7 = −s r, q8 = s sin πr, q9 = s cos πr,
#: s = 200) at five positions r, each with ± MISFIT_Q10 on mode 10 — a motion no method here
#: estimates (they all fit modes 7–9) — and Gaussian jitter of MISFIT_SPREAD on every mode
MISFIT_Q10 = 120.0
MISFIT_SPREAD = 15.0
MISFIT_SEED = 11


def task_from_checkpoint(res: Path, checkpoint: Path, **settings):
    """A finished VAE's training task (one process, CPU) rebuilt from its checkpoint's settings
    (with ``settings`` over them) and training data, its weights, calibration and pool restored."""
    import torch

    sys.path.insert(0, str(REPO))
    from deephemnma.network.checkpoint import load_checkpoint
    from deephemnma.network.engines import make_engine
    from deephemnma.network.train import TrainSettings, make_task

    torch.set_num_threads(1)
    ck = load_checkpoint(checkpoint)
    s = TrainSettings.from_config({"network": {**ck["settings"], "engine": "single", "device": "cpu", **settings}})
    task = make_task(s, make_engine("single", "cpu"), ck["data"]["sources"], modes=res / "nma/modes.npz")
    task.model.load_state_dict(ck["model_state"])
    task.restore(ck)
    return task


def fits_vs_truth(res: Path, checkpoint: Path, n: int = 400) -> dict:
    """Where a VAE's error sits: ``n`` set-2 particles (a seeded draw) fitted through its decoder
    from its encoder's pose hypotheses, exactly as self-training fits them
    (``VAETask.fit_particles``), against the simulation's truth — the fits its gate keeps, all
    fits, and the encoder's own answers for the same particles (what the encoder alone would
    have to learn to match). Built from the checkpoint's settings and training data."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from deephemnma.core.geometry import angular_error
    from deephemnma.evaluate import align_tables, load_ground_truth
    from deephemnma.network.posegrid import labels_of

    task = task_from_checkpoint(res, checkpoint)
    n1 = len(task.train_set)
    rows = np.sort(n1 + np.random.default_rng(0x7E57).permutation(task.n_pool - n1)[:n])
    r = task.fit_particles(rows)
    _, t = align_tables(task.extra.table.iloc[rows - n1].reset_index(drop=True),
                        load_ground_truth(res / "simulate/ground_truth.star"))
    R, _, q = labels_of(t, task.elastic)
    kept = r["kept"]

    def errors(rot, amp, sel) -> dict:
        a, d = angular_error(rot[sel], R[sel]), task.elastic.rmsd_between(amp[sel], q[sel])
        return {"n": int(sel.sum()), "angle_deg": float(a.mean()), "angle_median_deg": float(np.median(a)),
                "rmsd_A": float(d.mean()), "rmsd_median_A": float(np.median(d))}

    enc = (r["hypotheses"]["rotations"][:, 0], r["hypotheses"]["amplitudes"])
    every = np.ones(len(rows), bool)
    return {"particles": int(len(rows)), "kept_fraction": float(kept.mean()),
            "fits_kept": errors(r["fit"]["rotations"], r["fit"]["amplitudes"], kept),
            "fits_all": errors(r["fit"]["rotations"], r["fit"]["amplitudes"], every),
            "encoder_on_kept": errors(*enc, kept), "encoder_all": errors(*enc, every)}


def misfit_states() -> list[list[float]]:
    import math

    s = 200.0
    return [[-s * r, s * math.sin(math.pi * r), s * math.cos(math.pi * r), sign * MISFIT_Q10]
            for r in (0.0, 0.25, 0.5, 0.75, 1.0) for sign in (-1.0, 1.0)]


def misfit_particles(work: Path, n: int, cores: int) -> Path:
    """Simulate and preprocess the misfit particles in ``work/misfit`` with the bench's own
    settings (same reference, microscope, noise, preprocessing; another seed), with modes 7–10
    selected for the simulation; returns its results folder (image set 2 is the test)."""
    import yaml

    cfg = yaml.safe_load((work / "bench.yaml").read_text())
    cfg["nma"] = {**cfg.get("nma", {}), "n_select": 4}
    cfg["simulate"] = {**cfg["simulate"], "n_particles": n + 100, "seed": MISFIT_SEED,
                       "amplitudes": {"distribution": "discrete", "modes": [7, 8, 9, 10], "states": misfit_states(),
                                      "state_spread": MISFIT_SPREAD}}
    cfg["preprocess"] = {**cfg["preprocess"], "set1_size": 100}
    mwork = work / "misfit"
    mwork.mkdir(parents=True, exist_ok=True)
    (mwork / "misfit.yaml").write_text(yaml.safe_dump(cfg))
    sh([sys.executable, "-m", "snakemake", "-s", REPO / "Snakefile", "--directory", mwork, "--cores", cores,
        "--rerun-incomplete", "results/preprocess/set2.star", "results/simulate/ground_truth.star",
        "results/nma/modes.npz", "--configfile", mwork / "misfit.yaml"])
    return mwork / "results"


def outside_rmsd(mres: Path) -> float:
    """Mean deformation RMSD (Å) of the misfit particles' mode-10 motion alone (what no fit of modes 7–9 can explain)."""
    sys.path.insert(0, str(REPO))
    from deephemnma.core.modes import amplitudes_to_rmsd, load_modes
    from deephemnma.core.star import read_star
    from deephemnma.evaluate import align_tables, load_ground_truth

    ms = load_modes(mres / "nma/modes.npz")
    _, t = align_tables(read_star(mres / "preprocess/set2.star").particles,
                        load_ground_truth(mres / "simulate/ground_truth.star"))
    q = t[["dhnmaAmplitude010"]].to_numpy(float)
    return float(amplitudes_to_rmsd(q, ms.mode(10)[None]).mean())


def score_shift(normal: Path, misfit: Path) -> dict:
    """HEMNMA's fit score (``dhnmaScore``) of the misfit particles against that of the in-model
    test particles: medians, and the fraction of misfit particles below the in-model 5th percentile."""
    sys.path.insert(0, str(REPO))
    from deephemnma.core.star import read_star

    a = read_star(normal).particles["dhnmaScore"].astype(float)
    b = read_star(misfit).particles["dhnmaScore"].astype(float)
    return {"median_in_model": float(a.median()), "median_misfit": float(b.median()),
            "misfit_below_in_model_q05": float((b < a.quantile(0.05)).mean())}


def misfit_case(args, res: Path, vaes: list[str]) -> dict:
    """HEMNMA, the regressor and each trained VAE (encoders alone) on the misfit particles."""
    mres = misfit_particles(args.work, args.misfit_n, args.cores)
    chunks = sorted(p.stem for p in (mres / "preprocess/set2").glob("chunk_*.star"))
    hem, hem_s = hemnma_set2(mres, chunks, args.cores, models=res)
    out = {"mode10_amplitude": MISFIT_Q10, "spread": MISFIT_SPREAD, "states": misfit_states(),
           "outside_modes_rmsd_A": outside_rmsd(mres),
           "mean_conformation_rmsd_A": mean_conformation_rmsd(mres, models=res),
           "hemnma": evaluate(mres, hem, "hemnma")}
    out["hemnma"]["cpu_s_per_particle"] = hem_s / max(1, out["hemnma"]["n"])
    out["hemnma"]["score"] = score_shift(res / "bench/hemnma_set2/hemnma.star", hem)
    star, _ = network_alone(mres, chunks, checkpoint=res / "network/best.pt", name="regressor_alone", models=res)
    out["regressor_alone"] = evaluate(mres, star, "regressor_alone")
    for name in vaes:
        star, _ = network_alone(mres, chunks, checkpoint=res / "bench" / name / "best.pt", name=f"{name}_alone",
                                models=res)
        out[name] = {**evaluate(mres, star, name), "posterior_vs_error": posterior_vs_error(mres, star)}
    return out


#: pose-pretraining diagnostics (``--diagnose``): pose-prediction steps alone (``vae_pretrain`` 1),
#: 1,200 steps each, real set-1 particles validated after every 100 — what limits the scratch
#: VAE's poses: the rendered amplitudes (the prior's width) or the calibration (labels or not)
DIAGNOSTICS = {
    "scratch_prior_2A": {"network.vae_init": "scratch"},
    "scratch_prior_6A": {"network.vae_init": "scratch", "network.vae_prior_rmsd": 6.0},
    "scratch_prior_10A": {"network.vae_init": "scratch", "network.vae_prior_rmsd": 10.0},
    "labelled_no_real": {"network.vae_init": "regressor", "network.vae_prior": "hemnma", "network.real_fraction": 0},
}


def diagnose(res: Path) -> dict:
    """Learning curves of the pose steps alone under each of :data:`DIAGNOSTICS`."""
    import csv

    out = {}
    for name, over in DIAGNOSTICS.items():
        d = res / "bench" / f"diag_{name}"
        if not (d / "summary.json").exists():
            train_vae(res, f"diag_{name}", {**over, "network.vae_pretrain": 1.0}, 0.0, 1, steps=1200)
        rows = list(csv.DictReader(open(d / "metrics.csv")))
        cpu = cpu_record(d / "cpu_seconds.json")
        out[name] = {"settings": over, "training_cpu_hours": cpu / 3600 if cpu else None,
                     "steps": [int(r["global_step"]) for r in rows],
                     "val_angle_deg": [round(float(r["val_angle_error_deg"]), 2) for r in rows],
                     "val_angle_median_deg": [round(float(r["val_angle_median_deg"]), 2) for r in rows]}
    return out


#: the labels an oracle encoder trains on: the simulation's truth for each set-1 particle
ORACLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


def truth_labelled_set1(res: Path) -> Path:
    """Set 1 as preprocessed, with the simulation's true pose and amplitudes as its labels
    (in the columns HEMNMA writes): the training set of the oracle encoder."""
    sys.path.insert(0, str(REPO))
    from deephemnma.core.star import amplitude_columns, read_star, write_star
    from deephemnma.evaluate import align_tables, load_ground_truth

    out = res / "bench" / "oracle_set1.star"
    if out.exists():
        return out
    star = read_star(res / "preprocess/set1.star")
    truth = load_ground_truth(res / "simulate/ground_truth.star")
    _, t = align_tables(star.particles, truth)
    table = star.particles.copy()
    for c in (*ORACLE_COLUMNS, *amplitude_columns(truth)):
        table[c] = t[c].to_numpy(float)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_star(out, table, star.optics, source=star.path)
    return out


def fit_labelled_set1(res: Path, checkpoint: Path, batch: int = 512) -> tuple[Path, dict]:
    """Set 1 labelled by a finished VAE's own self-training fits, no truth read: every set-1
    particle fitted through its decoder from its encoder's pose hypotheses
    (``VAETask.fit_particles``, as self-training fits them), the fits its gate keeps written in
    the columns HEMNMA writes (the others left out) → res/bench/fits_set1_<checkpoint's folder>.star.
    The training set of the distilled encoder (:func:`oracle` with ``labels``): what the VAE's
    fits are worth as labels when every particle has one, next to the exact labels. Returns the
    STAR and its record (kept fraction, the fits' CPU seconds)."""
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(REPO))
    from deephemnma.core.star import read_star, write_star

    out = res / "bench" / f"fits_set1_{checkpoint.parent.name}.star"
    record = out.with_suffix(".json")
    if out.exists() and record.exists():
        return out, json.loads(record.read_text())
    t0 = time.process_time()
    task = task_from_checkpoint(res, checkpoint, val_fraction=0.0, test_fraction=0.0)  # all of set 1 in the pool
    star = read_star(res / "preprocess/set1.star")
    n1 = len(task.train_set)
    if n1 != len(star.particles) or \
            list(task.train_set.table["rlnImageName"]) != list(star.particles["rlnImageName"]):
        raise RuntimeError(f"{checkpoint}: its set 1 is not {res / 'preprocess/set1.star'} row for row")
    parts = []
    for a in range(0, n1, batch):
        r = task.fit_particles(np.arange(a, min(n1, a + batch)))
        parts.append((r["kept"], task.pose_table(r["fit"]["rotations"], r["fit"]["origins"], r["fit"]["amplitudes"])))
        print(f"fits of set 1: {min(n1, a + batch)} / {n1}", file=sys.stderr, flush=True)
    kept = np.concatenate([k for k, _ in parts])
    labels = pd.concat([t for _, t in parts], ignore_index=True)
    table = star.particles.reset_index(drop=True).copy()
    for c in labels.columns:
        table[c] = labels[c].to_numpy(float)
    tmp = out.with_name(out.name + ".tmp")
    write_star(tmp, table[kept].reset_index(drop=True), star.optics, source=star.path)
    rec = {"checkpoint": str(checkpoint), "particles": int(n1), "kept": int(kept.sum()),
           "kept_fraction": float(kept.mean()), "fit_cpu_seconds": time.process_time() - t0}
    os.replace(tmp, out)
    record.write_text(json.dumps(rec, indent=1))
    return out, rec


def oracle(res: Path, name: str, sets: dict, steps: int, labels: Path | None = None) -> dict:
    """The ceiling of an amortised encoder at this budget: the grid regressor (the bench's
    training settings, one process) trained in res/bench/<name> on set 1 with the simulation's
    exact labels instead of HEMNMA's (or on ``labels``: a set-1 STAR labelled otherwise, e.g. by
    :func:`fit_labelled_set1`), then set 2 answered by it alone. No label strategy
    (HEMNMA's, a VAE's self-training fits) gives the training particles better labels."""
    out = res / "bench" / name
    per_epoch = min(200, steps)
    over = {"network.model": "regressor", "network.epochs": max(1, steps // per_epoch),
            "network.steps_per_epoch": per_epoch, **sets}
    if not (out / "best.pt").exists() or not (out / "cpu_seconds.json").exists():
        train_run(res, out, labels or truth_labelled_set1(res), over)
    chunks = sorted(p.stem for p in (res / "preprocess/set2").glob("chunk_*.star"))
    star, _ = network_alone(res, chunks, checkpoint=out / "best.pt", name=f"{name}_alone")
    return {"settings": over, "training_cpu_hours": cpu_record(out / "cpu_seconds.json") / 3600,
            **evaluate(res, star, name), "summary": json.loads((out / "summary.json").read_text())}


def variant_folder(base: str, sets: dict) -> str:
    """A VAE's name: ``base`` (``scratch``, ``regressor``), or ``<base>_<tag>`` for a variant with
    settings ``sets`` (a tag of the sorted settings, so a variant never reuses another's training)."""
    if not sets:
        return base
    import hashlib

    return f"{base}_" + hashlib.sha1(json.dumps(sorted(sets.items())).encode()).hexdigest()[:8]


def result_name(gpu: bool, only: str | None, run: list[str]) -> str:
    """The JSON's name: ``vae`` (``vae_gpu``) for the defaults of both VAEs, else with the run
    VAEs' variant tags (``vae_scratch_<tag>``, ``vae_regressor_<tag>``) or ``_<only>`` — vae.json
    stays the record of both defaults."""
    tags = [n for n in run if n not in ("scratch", "regressor")]
    return ("vae_gpu" if gpu else "vae") + "".join(f"_{t}" for t in tags or ([only] if only else []))


def regressor_cpu_hours(res: Path, prev: dict) -> float | None:
    """The regressor's training CPU-hours: the work folder's Snakemake benchmark of its training
    (all ranks), else the network-accuracy bench's last record."""
    tsv = res / "benchmarks/train.tsv"
    if tsv.exists():
        from bench_network_accuracy import cpu_seconds

        return cpu_seconds(tsv) / 3600
    return prev.get("figures", {}).get("training_cpu_hours")


def key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--scratch-set`` (argparse exits 2 with one line otherwise)."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. network.vae_prior_rmsd=6")
    return key, value


def missing(path: Path, work: Path) -> int:
    print(f"error: {path}: missing — run bench/bench_network_accuracy.py --work {work} first", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench_network_accuracy",
                    help="the work folder of bench_network_accuracy.py (run it first)")
    ap.add_argument("--scratch-cpu-hours", type=float, default=2.0)
    ap.add_argument("--scratch-steps", type=int,
                    help="optimiser steps of the scratch VAE (default: as many as --scratch-cpu-hours buy at the "
                         "rate measured for its default width, 1.75 steps per CPU-s; the JSON has the measured time)")
    ap.add_argument("--init-cpu-hours", type=float, default=1.0,
                    help="sizes the VAE from the regressor by its optimiser steps' rate (0.25 → 1,700 steps); the "
                         "self-training fits come on top (0.25 → 0.44 CPU-h measured): the JSON has the measured time")
    ap.add_argument("--ranks", type=int, default=2, help="training ranks (DDP, one thread each)")
    ap.add_argument("--gpu", action="store_true",
                    help="the work folder of a `bench_network_accuracy.py --gpu` run: the VAEs train on its GPU "
                         "(network.device of its config), one rank, 20,000 steps each")
    ap.add_argument("--only", choices=["scratch", "regressor"], help="train one of the two VAEs only")
    ap.add_argument("--train-only", action="store_true",
                    help="train and stop (the scratch VAE needs only set 1's STAR: it can train while the "
                         "network-accuracy bench trains the regressor)")
    ap.add_argument("--misfit-n", type=int, default=2000,
                    help="misfit test particles (motion on mode 10, outside the fitted modes 7–9); 0: skip")
    ap.add_argument("--scratch-set", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                    help="a setting of the scratch VAE (repeatable, e.g. network.vae_prior_rmsd=6): the variant "
                         "trains in its own folder, vae_scratch_<tag>, and the JSON names its settings")
    ap.add_argument("--init-set", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                    help="a setting of the VAE initialised from the regressor (repeatable, e.g. network.lr=1e-4): "
                         "the variant trains in its own folder, vae_regressor_<tag>")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="parallel jobs for the misfit particles")
    ap.add_argument("--oracle", action="store_true",
                    help="only the oracle encoder: the grid regressor trained on set 1's true labels (the "
                         "simulation's), the ceiling of an encoder trained on other particles' labels; vae_oracle_<tag>.json")
    ap.add_argument("--oracle-steps", type=int, default=20400,
                    help="the oracle's optimiser steps, one process (default: the network-accuracy bench's "
                         "regressor, 102 x 200)")
    ap.add_argument("--oracle-set", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                    help="a setting of the oracle (repeatable, e.g. network.width=24)")
    ap.add_argument("--distil", type=Path, metavar="CHECKPOINT",
                    help="with --oracle: train it on set 1 labelled by this finished VAE's gated self-training "
                         "fits (every set-1 particle fitted once, no truth read) instead of the exact labels; "
                         "vae_distil_<tag>.json")
    ap.add_argument("--diagnose", action="store_true",
                    help="only the pose-pretraining diagnostics (1,200 pose steps per variant; vae_diagnostics.json)")
    args = ap.parse_args(argv)
    if args.distil and not args.oracle:
        ap.error("--distil trains the oracle's encoder on a VAE's fits: give --oracle too")
    if args.distil and not args.distil.is_file():
        print(f"error: {args.distil}: no such checkpoint (a finished VAE's best.pt)", file=sys.stderr)
        return 2
    res = args.work / "results"
    if args.diagnose:
        if not (res / "filter/kept.star").exists():
            return missing(res / "filter/kept.star", args.work)
        write_result("vae_diagnostics", diagnose(res), notes="pose steps alone; validation on real set-1 particles "
                                                              "against HEMNMA's answers (chance ~90°)")
        return 0
    if args.oracle:
        if not (res / "simulate/ground_truth.star").exists():
            return missing(res / "simulate/ground_truth.star", args.work)
        sets = dict(args.oracle_set)
        labels, fits = fit_labelled_set1(res, args.distil) if args.distil else (None, None)
        name = variant_folder("distil" if fits else "oracle",
                              {**sets, "steps": str(args.oracle_steps), **({"labels": labels.name} if fits else {})})
        figures = {"mean_conformation_rmsd_A": mean_conformation_rmsd(res), "chance_angle_deg": 90.0,
                   "oracle": oracle(res, name, sets, args.oracle_steps, labels), **({"fits": fits} if fits else {})}
        write_result(f"vae_{name}", figures, notes=(
            f"the grid regressor trained on set 1 labelled by the gated self-training fits of {args.distil} "
            "(no truth read), set 2 answered by it alone" if fits else
            "the grid regressor trained on set 1's exact labels (the simulation's truth), set 2 answered by it "
            "alone: the ceiling of an amortised encoder"))
        print(json.dumps({k: v for k, v in figures["oracle"].items() if k != "summary"}, indent=1))
        return 0
    t0 = time.perf_counter()
    scratch_sets = dict(args.scratch_set)
    scratch = variant_folder("scratch", {**scratch_sets, **({"steps": str(args.scratch_steps)} if args.scratch_steps else {})})
    init_sets = dict(args.init_set)
    init = variant_folder("regressor", init_sets)
    # the scratch VAE sees no HEMNMA output at all: set 1 as preprocessed, before HEMNMA's outlier filter
    variants = {
        scratch: ({"network.vae_init": "scratch", **scratch_sets}, args.scratch_cpu_hours, res / "preprocess/set1.star"),
        init: ({"network.vae_init": "regressor", "network.vae_init_checkpoint": str(res / "network/best.pt"),
                "network.vae_prior": "hemnma", **init_sets},
               args.init_cpu_hours, res / "network/best.pt"),
    }
    run = [n for n in variants if not args.only or n.startswith(args.only)]
    need = [res / "bench/network_alone/predicted.star", res / "bench/hemnma_set2/hemnma.star"]
    for name in run:
        over, hours, needs = variants[name]
        if not needs.exists():
            return missing(needs, args.work)
        steps = 20000 if args.gpu else args.scratch_steps if name == scratch else None
        train_vae(res, f"vae_{name}", over, hours, 1 if args.gpu else args.ranks, steps=steps,
                  particles=needs if name == scratch else None,
                  rate=SCRATCH_STEPS_PER_CPU_S if name == scratch else RANK_STEPS_PER_CPU_S)
    if args.train_only:
        return 0
    for p in need:  # --only: the other methods' rows when they exist
        if not p.exists() and not args.only:
            return missing(p, args.work)
    chunks = sorted(p.stem for p in (res / "preprocess/set2").glob("chunk_*.star"))
    if args.only == "regressor" and not need[0].exists():  # the regressor's own row, beside its VAE
        network_alone(res, chunks)
    prev = json.loads((HERE / "results/network_accuracy.json").read_text()) if (
        HERE / "results/network_accuracy.json").exists() else {}
    figures: dict = {"mean_conformation_rmsd_A": mean_conformation_rmsd(res), "chance_angle_deg": 90.0}
    if need[1].exists():
        figures["hemnma"] = evaluate(res, need[1], "hemnma")
    if need[0].exists():
        figures["regressor_alone"] = {**evaluate(res, need[0], "alone"),
                                      "training_cpu_hours": regressor_cpu_hours(res, prev)}
    for name in run:
        out = res / "bench" / f"vae_{name}"
        if not (out / "best.pt").exists():
            continue
        cpu_h = cpu_record(out / "cpu_seconds.json") / 3600
        star, _ = network_alone(res, chunks, checkpoint=out / "best.pt", name=f"vae_{name}_alone")
        local, local_s = network_alone(res, chunks, checkpoint=out / "best.pt", name=f"vae_{name}_local", refine="local")
        refined = evaluate(res, local, f"vae_{name}_local")
        figures[f"vae_{name}"] = {**evaluate(res, star, f"vae_{name}"), "training_cpu_hours": cpu_h,
                                  "settings": variants[name][0],
                                  "refined_local": {**refined, "cpu_s_per_particle": local_s / max(1, refined["n"])},
                                  "posterior_vs_error": posterior_vs_error(res, star),
                                  "summary": json.loads((out / "summary.json").read_text())}
        figures[f"vae_{name}"]["self_training_fits"] = fits_vs_truth(res, out / "best.pt")
        if "regressor_alone" in figures:  # per particle, VAE − regressor (± s.e.)
            figures[f"vae_{name}"]["paired_vs_regressor"] = paired(res, f"vae_{name}", "alone")
    if args.misfit_n > 0 and (res / "network/best.pt").exists():
        figures["misfit"] = misfit_case(args, res, [f"vae_{n}" for n in run
                                                    if (res / "bench" / f"vae_{n}" / "best.pt").exists()])
    figures["wall_seconds"] = time.perf_counter() - t0
    write_result(result_name(args.gpu, args.only, run), figures,
                 notes="image set 2 of the network-accuracy bench is the test; errors against the simulation's "
                       "ground truth; encoders alone, and refined_local: + HEMNMA's continuous refinement from "
                       "their hypotheses")
    shown = ("angle_deg", "shift_A_per_axis", "rmsd_A", "training_cpu_hours", "refined_local", "paired_vs_regressor")
    print(json.dumps({k: {m: v for m, v in f.items() if m in shown}
                      if isinstance(f, dict) else f for k, f in figures.items() if k != "wall_seconds"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
