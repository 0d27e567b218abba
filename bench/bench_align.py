"""Benchmark of ``deephemnma align`` on the paper's adenylate-kinase recipe (issue 5).

Data: ``deephemnma nma`` on 4AKE chain A (heavy atoms, modes 7–9 selected, 20 computed),
then ``deephemnma simulate`` (the paper's recipe: helix amplitudes on modes 7–9 of scale 200,
Peng-factor voxel densities, 256² at 0.325 Å, uniform orientations, origins within ±5 px,
CTF 200 kV / Cs 2 mm / 5,000 Å underfocus / Q0 0.1, noise before and after the CTF at the
target SNR) and ``deephemnma preprocess`` (phase flip, antialias low-pass, Fourier crop to
128² at 0.65 Å, background normalisation): one chunk per SNR. Then ``deephemnma align``
(default settings) per data set, compared with the ground truth joined on
``dhnmaOriginalImageName``:

* angle error: the paper's metric (:func:`deephemnma.core.geometry.angular_error`), degrees;
* shift error: mean absolute error per axis (the paper's table), Å; also the Euclidean error;
* amplitude error: atomic RMSD (Å) between the reference deformed by the estimated and by the
  true amplitudes (modes absent from the ground truth count as 0), and mean absolute error.

Runs: SNR 0.05, 0.1, 0.3 with modes 7–9; SNR 0.1 with modes 7–12 (6 modes); speed on a
subset with ONE thread (CPU seconds per particle per core, template bank included for the
subset and reported separately) for the schedule ending at 64² and at 128².

``--deephemnma CMD`` sets how the deephemnma commands are run (default: this interpreter,
``python -m deephemnma``), e.g. to take ``simulate`` from another checkout. Results go to
bench/results/align.json (the machine, the command and the load average are recorded: on a
shared machine the timings are noisy).

    python bench/bench_align.py                       # full run (≥ 500 particles per SNR)
    python bench/bench_align.py --n 64 --quick        # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from common import write_result  # noqa: E402

DEFAULT_REFERENCE = Path("/work/shared/data/adenylate_kinase/4ake.pdb")


def sh(cmd: list[str], env=None, cwd=None) -> float:
    t0 = time.perf_counter()
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), check=True, env=env, cwd=cwd)
    return time.perf_counter() - t0


def evaluate(out_star: Path, truth_star: Path, modes_file: Path, modes: list[int] | None) -> dict:
    from deephemnma.core import geometry
    from deephemnma.core import star as S
    from deephemnma.align import load_model

    res = S.read_star(out_star).particles
    gt = S.read_star(truth_star).particles.set_index(S.IMAGE_NAME)
    key = "dhnmaOriginalImageName" if "dhnmaOriginalImageName" in res.columns else S.IMAGE_NAME
    g = gt.loc[res[key].to_numpy()]
    Re = geometry.euler_to_matrix(res[list(S.ANGLE_COLUMNS)].to_numpy())
    Rt = geometry.euler_to_matrix(g[list(S.ANGLE_COLUMNS)].to_numpy())
    ang = geometry.angular_error(Re, Rt)
    d = res[list(S.ORIGIN_COLUMNS)].to_numpy() - g[list(S.ORIGIN_COLUMNS)].to_numpy()
    model = load_model(modes_file, select=modes)
    cols = [S.amplitude_column(int(m)) for m in model.mode_numbers]
    qe = res[cols].to_numpy()
    qt = np.stack([g[c].to_numpy() if c in g.columns else np.zeros(len(g)) for c in cols], 1)
    rmsd = model.rmsd_between(qe, qt)
    flags = res[S.FLAG].to_numpy()
    return {
        "n": int(len(res)),
        "modes": [int(m) for m in model.mode_numbers],
        "angle_error_mean_deg": float(ang.mean()),
        "angle_error_median_deg": float(np.median(ang)),
        "angle_error_p95_deg": float(np.percentile(ang, 95)),
        "fraction_angle_error_over_10deg": float((ang > 10).mean()),
        "shift_error_mean_abs_per_axis_A": float(np.abs(d).mean()),
        "shift_error_mean_abs_x_A": float(np.abs(d[:, 0]).mean()),
        "shift_error_mean_abs_y_A": float(np.abs(d[:, 1]).mean()),
        "shift_error_mean_euclidean_A": float(np.linalg.norm(d, axis=1).mean()),
        "amplitude_rmsd_mean_A": float(rmsd.mean()),
        "amplitude_rmsd_median_A": float(np.median(rmsd)),
        "amplitude_abs_error_mean": float(np.abs(qe - qt).mean()),
        "amplitude_abs_error_mean_per_mode": {str(m): float(np.abs(qe - qt)[:, k].mean())
                                              for k, m in enumerate(model.mode_numbers)},
        "true_deformation_rmsd_mean_A": float(model.rmsd_between(qt, 0 * qt).mean()),
        "score_mean": float(res[S.SCORE].mean()),
        "fraction_converged": float(res[S.CONVERGED].mean()),
        "fraction_flagged": float((flags != 0).mean()),
        "flag_counts": {str(b): int(((flags & b) != 0).sum()) for b in (1, 2, 4, 8)},
    }


def speed(star: Path, modes_file: Path, levels: list[int], n: int) -> dict:
    """CPU seconds per particle, one thread, in this process (template bank timed apart)."""
    import torch

    from deephemnma.core import star as S
    from deephemnma.align import AlignSettings, Aligner, load_model
    from deephemnma.align.run import ctf_setup
    from deephemnma.core.mrc import ParticleImages

    torch.set_num_threads(1)
    st = S.read_star(star)
    table = S.merged(st)
    params, modes = ctf_setup(st, table, "auto")
    idx = np.arange(min(n, len(st)))
    imgs = ParticleImages.from_star(st).read(idx)
    px = float(S.pixel_sizes(st)[0])
    s = AlignSettings(levels=levels)
    al = Aligner(load_model(modes_file), imgs.shape[-1], px, s)
    c0, w0 = time.process_time(), time.perf_counter()
    al.bank
    bank_cpu, bank_wall = time.process_time() - c0, time.perf_counter() - w0
    c0, w0 = time.process_time(), time.perf_counter()
    for a in range(0, len(idx), s.batch_size):
        sl = slice(a, a + s.batch_size)
        al.align(imgs[sl], params[idx[sl]], modes[idx[sl]])
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"levels": levels, "particles": int(len(idx)), "threads": 1,
            "cpu_s_per_particle": cpu / len(idx), "wall_s_per_particle": wall / len(idx),
            "particles_per_s_per_core": len(idx) / cpu,
            "template_bank_cpu_s": bank_cpu, "template_bank_wall_s": bank_wall,
            "template_bank_templates": len(al.bank),
            "cpu_s_per_particle_with_bank_per_1000": cpu / len(idx) + bank_cpu / 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="particles per data set (default 512)")
    ap.add_argument("--snr", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    ap.add_argument("--speed-n", type=int, default=64, help="particles timed per schedule (default 64)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "deephemnma_bench_align"),
                    help="work directory for the data (kept and reused by later runs; default in the temp dir)")
    ap.add_argument("--reference", default=str(DEFAULT_REFERENCE), help="4AKE PDB file")
    ap.add_argument("--deephemnma", default=f"{shlex.quote(sys.executable)} -m deephemnma",
                    help="how to run deephemnma commands (default: this interpreter)")
    ap.add_argument("--threads", type=int, default=2, help="threads of the accuracy runs (default 2)")
    ap.add_argument("--quick", action="store_true", help="skip the 6-mode run")
    ap.add_argument("--data-note", default="", help="free text recorded with the results (where the data came from)")
    args = ap.parse_args()

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    dh = shlex.split(args.deephemnma)
    env = dict(os.environ)
    load0 = os.getloadavg()[0]
    t_start = time.perf_counter()
    modes_file = work / "nma" / "modes.npz"
    if not modes_file.exists():
        sh([*dh, "nma", "--reference", args.reference, "--out", modes_file, "--set", "reference.chains=[A]",
            "--set", "nma.n_modes=20", "--set", "nma.modes=[7,8,9]", "-q"], env, cwd=work)
    figures: dict = {"data": {}, "accuracy": {}, "speed": {}}
    sets = {}
    for i, snr in enumerate(args.snr):
        d = work / f"snr{snr:g}_n{args.n}"
        pre = d / "pre" / "set1" / "chunk_0000.star"
        if not pre.exists():
            sh([*dh, "simulate", "--modes", modes_file, "--outdir", d / "sim", "--set", f"simulate.n_particles={args.n}",
                "--set", f"simulate.snr={snr}", "--set", "simulate.write_clean=false", "--set", f"seed={100 + i}",
                "--threads", str(args.threads), "-q"], env, cwd=work)
            sh([*dh, "preprocess", "--particles", d / "sim" / "particles.star", "--outdir", d / "pre",
                "--set", f"preprocess.set1_size={args.n}", "--set", f"preprocess.chunk_size={args.n}",
                "--threads", str(args.threads), "-q"], env, cwd=work)
        sim_manifest = json.loads((d / "sim" / "simulate.json").read_text())
        figures["data"][f"snr{snr:g}"] = {"dir": str(d), "n": args.n, "snr_target": snr,
                                          "snr_measured": sim_manifest.get("snr_measured"),
                                          "box_in": sim_manifest.get("box"), "pixel_in": sim_manifest.get("pixel_size")}
        sets[snr] = (pre, d / "sim" / "ground_truth.star")

    runs = [(snr, None) for snr in args.snr]
    if not args.quick and 0.1 in sets:
        runs.append((0.1, [7, 8, 9, 10, 11, 12]))
    py_align = [sys.executable, "-m", "deephemnma", "align"]
    env_align = dict(env, PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    for snr, modes in runs:
        pre, truth = sets[snr]
        tag = f"snr{snr:g}_modes{'7-9' if modes is None else '7-12'}"
        out = work / f"{tag}.star"
        extra = [] if modes is None else ["--set", f"align.modes=[{','.join(map(str, modes))}]"]
        wall = sh([*py_align, "--particles", pre, "--modes", modes_file, "--out", out, "--threads", str(args.threads),
                   "--summary", work / f"{tag}.json", *extra, "-q"], env_align)
        r = evaluate(out, truth, modes_file, modes)
        r["wall_s_total"] = wall
        r["threads"] = args.threads
        figures["accuracy"][tag] = r
        print(tag, json.dumps(r), flush=True)

    snr_speed = 0.1 if 0.1 in sets else args.snr[0]
    for levels in ([32, 64], [32, 64, 128]):
        tag = f"final_{levels[-1]}"
        figures["speed"][tag] = speed(sets[snr_speed][0], modes_file, levels, args.speed_n)
        print(tag, json.dumps(figures["speed"][tag]), flush=True)
    # accuracy of the schedule ending at 64² (on the speed subset's data set)
    pre, truth = sets[snr_speed]
    out = work / f"snr{snr_speed:g}_final64.star"
    sh([*py_align, "--particles", pre, "--modes", modes_file, "--out", out, "--threads", str(args.threads),
        "--set", "align.levels=[32,64]", "-q"], env_align)
    figures["accuracy"][f"snr{snr_speed:g}_modes7-9_final64"] = evaluate(out, truth, modes_file, None)

    figures["load_average_start_end"] = [load0, os.getloadavg()[0]]
    figures["total_wall_s"] = time.perf_counter() - t_start
    notes = ("Shared 2-core machine with other jobs running: timings are noisy (CPU seconds of one thread "
             "are reported as s/particle/core). " + args.data_note)
    write_result("align", figures, notes)


if __name__ == "__main__":
    main()
