"""Alignment end to end: recovery of known poses and amplitudes from images simulated through
a voxel volume (Fourier-slice projection, not the alignment's own projector), the command,
resume after an interruption, chunks of one, junk images, flags."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from deephemnma.core import geometry
from deephemnma.core import star as S
from deephemnma.align import AlignSettings, Aligner, FLAG_AT_BOUND, align_star, load_model, progress_dir
from deephemnma.align.synthetic import simulate_images, toy_modes, write_dataset
from deephemnma.core.ctf import CTFParams
from deephemnma.core.mrc import write_stack

BOX, PX = 64, 1.3
#: cheap settings for the tests of the command's mechanics (not of its accuracy)
FAST = ["--set", "data.invert_contrast=false",  # a few particles: too few to detect the polarity (auto)
        "--set", "align.levels=[32]", "--set", "align.iterations=[15]", "--set", "align.candidates=[2]",
        "--set", "align.angular_step=25", "--set", "align.search_amplitude_points=1", "--set", "align.batch_size=2"]
FAST_SETTINGS = AlignSettings(levels=[32], iterations=[15], candidates=[2], angular_step=25,
                              search_amplitude_points=1, batch_size=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


@pytest.fixture(scope="module")
def modes_file(tmp_path_factory):
    return toy_modes(tmp_path_factory.mktemp("toy") / "modes.npz", n_atoms=300, seed=0)


@pytest.fixture(scope="module")
def model(modes_file):
    return load_model(modes_file)


def errors(model, euler, origins, amplitudes, truth):
    Rt = geometry.euler_to_matrix(truth[list(S.ANGLE_COLUMNS)].to_numpy())
    ang = geometry.angular_error(geometry.euler_to_matrix(euler), Rt)
    shift = np.abs(origins - truth[list(S.ORIGIN_COLUMNS)].to_numpy())  # per axis, Å
    qt = truth[[S.amplitude_column(m) for m in model.mode_numbers]].to_numpy()
    return ang, shift, model.rmsd_between(amplitudes, qt)


def ctf_of(n):
    return CTFParams(np.full(n, 5000.0), np.full(n, 5000.0), 0.0, 200.0, 2.0, 0.1, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("flipped", [True, False], ids=["phase_flipped", "raw"])
def test_noise_free_recovery(model, flipped):
    """Noise-free particles (deformations of ~3.5 Å RMS, random orientations and origins):
    pose and amplitudes recovered to the accuracy the model mismatch allows."""
    n = 10 if flipped else 6
    imgs, truth = simulate_images(model, n, BOX, PX, seed=11 if flipped else 12, snr=None, amplitude_std=40,
                                  phase_flip=flipped)
    al = Aligner(model, BOX, PX, AlignSettings(levels=[32, 64], iterations=[40, 25], candidates=[4, 1]))
    r = al.align(imgs, ctf_of(n), "phase_flipped" if flipped else "raw")
    ang, shift, rmsd = errors(model, r.euler, r.origins, r.amplitudes, truth)
    assert ang.max() < 0.6, ang
    assert shift.max() < 0.06, shift
    assert rmsd.max() < 0.2, rmsd
    assert r.converged.all() and not r.at_bound.any()
    assert (r.score > 0.9).all()


@pytest.mark.slow
def test_noisy_set_accuracy(model):
    """96 particles at 64², SNR 0.3 (noise before and after the CTF, phase flipped): the
    default schedule (search with a 3-point amplitude grid, 4 candidates, 32² → 64²)."""
    n = 96
    imgs, truth = simulate_images(model, n, BOX, PX, seed=21, snr=0.3, amplitude_std=40)
    al = Aligner(model, BOX, PX, AlignSettings(levels=[32, 64], iterations=[40, 25], candidates=[4, 1]))
    r = al.align(imgs, ctf_of(n), "phase_flipped")
    ang, shift, rmsd = errors(model, r.euler, r.origins, r.amplitudes, truth)
    good = ang < 5
    assert good.mean() >= 0.95, np.sort(ang)[-8:]
    assert np.median(ang) < 1.0 and ang[good].mean() < 1.2
    assert np.median(shift) < 0.15 and shift[good].mean() < 0.2
    assert np.median(rmsd) < 0.4 and rmsd[good].mean() < 0.5
    # wrong solutions score lower and the correct ones are far above chance
    assert r.significance[good].min() > 10


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("small")
    imgs, truth = simulate_images(model, 5, BOX, PX, seed=31, snr=0.3, amplitude_std=30)
    star, gt = write_dataset(d, imgs, truth, PX)
    return d, star, gt


def test_cli_output_columns_and_determinism(run_cli, modes_file, small_set, tmp_path):
    d, star, _ = small_set
    out1, out2 = tmp_path / "a.star", tmp_path / "b.star"
    for out in (out1, out2):
        proc = run_cli("align", "--particles", star, "--modes", modes_file, "--out", out, *FAST, "--threads", "1")
        assert proc.returncode == 0, proc.stderr
    assert out1.read_bytes() == out2.read_bytes()                      # same inputs, same bytes
    assert not progress_dir(out1).exists()
    inp, res = S.read_star(star), S.read_star(out1)
    p = res.particles
    assert list(p.columns[: len(inp.particles.columns)]) == list(inp.particles.columns)  # input columns kept, first
    others = [c for c in inp.particles.columns if c != S.IMAGE_NAME]
    pd.testing.assert_frame_equal(p[others], inp.particles[others])
    pd.testing.assert_frame_equal(res.optics, inp.optics)
    # the output lives elsewhere: its image names are rebased and still find the same images
    from deephemnma.core.mrc import ParticleImages

    assert np.array_equal(ParticleImages.from_star(res).read(np.arange(5)), ParticleImages.from_star(inp).read(np.arange(5)))
    for c in (*S.POSE_COLUMNS, "dhnmaAmplitude007", "dhnmaAmplitude008", "dhnmaAmplitude009", S.SCORE, S.CONVERGED,
              S.FLAG):
        assert c in p.columns
    assert p[S.FLAG].dtype.kind == "i" and p[S.CONVERGED].isin([0, 1]).all()
    assert (p[S.SCORE] > 0.2).all()


def test_resume_after_interruption_gives_the_same_output(modes_file, small_set, tmp_path):
    _, star, _ = small_set
    torch.set_num_threads(1)
    whole, resumed = tmp_path / "whole.star", tmp_path / "resumed.star"
    align_star(star, modes_file, whole, FAST_SETTINGS, threads=1)
    part = align_star(star, modes_file, resumed, FAST_SETTINGS, threads=1, stop_after=1)  # "killed" after a batch
    assert part["complete"] is False and not resumed.exists()
    pdir = progress_dir(resumed)
    assert sorted(f.name for f in pdir.iterdir()) == ["batch_000000.npz", "state.json"]
    summary = align_star(star, modes_file, resumed, FAST_SETTINGS, threads=1)
    assert summary["resumed_batches"] == 1 and summary["batches"] == 3
    assert resumed.read_bytes() == whole.read_bytes()
    assert not pdir.exists()
    # progress made with other settings is not reused
    align_star(star, modes_file, resumed, FAST_SETTINGS, threads=1, stop_after=1)
    other = AlignSettings(**{**FAST_SETTINGS.as_dict(), "iterations": [14]})
    assert align_star(star, modes_file, resumed, other, threads=1)["resumed_batches"] == 0


def test_killed_run_resumes_to_the_same_output(modes_file, model, tmp_path, run_cli):
    """SIGKILL the command once it has saved its first batch; the rerun finishes the chunk
    and writes the bytes of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import cli_env

    imgs, truth = simulate_images(model, 6, BOX, PX, seed=61, snr=0.3, amplitude_std=30)
    star, _ = write_dataset(tmp_path / "data", imgs, truth, PX)
    args = ["align", "--particles", star, "--modes", modes_file, *FAST[:-2], "--set", "align.batch_size=1",
            "--set", "align.levels=[32,64]", "--set", "align.iterations=[15,10]", "--threads", "1"]
    killed = tmp_path / "killed.star"
    proc = subprocess.Popen([sys.executable, "-m", "deephemnma", *map(str, args), "--out", str(killed)],
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = progress_dir(killed) / "batch_000000.npz"
    t0 = time.monotonic()
    while not first.exists() and proc.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and not killed.exists()
    done = len(list(progress_dir(killed).glob("batch_*.npz")))
    assert 1 <= done < 6
    assert run_cli(*args, "--out", killed).returncode == 0
    whole = tmp_path / "whole.star"
    assert run_cli(*args, "--out", whole).returncode == 0
    assert killed.read_bytes() == whole.read_bytes()
    assert not progress_dir(killed).exists()


def test_single_particle_and_junk_images(run_cli, model, modes_file, tmp_path):
    imgs, truth = simulate_images(model, 2, BOX, PX, seed=41, snr=0.3, amplitude_std=30)
    rng = np.random.default_rng(0)
    junk = np.stack([np.zeros((BOX, BOX), np.float32),                  # empty
                     rng.normal(size=(BOX, BOX)).astype(np.float32),     # pure noise
                     np.full((BOX, BOX), np.nan, np.float32)])           # unreadable
    all_imgs = np.concatenate([imgs, junk])
    t = pd.concat([truth, truth.iloc[:1].assign(**{c: 0.0 for c in S.POSE_COLUMNS})] * 1, ignore_index=True)
    t = pd.concat([t, t.iloc[:2]], ignore_index=True)
    star, _ = write_dataset(tmp_path / "junk", all_imgs, t, PX)
    out = tmp_path / "junk.star"
    args = ["align", "--particles", star, "--modes", modes_file, *FAST[:-2], "--set", "align.levels=[32,64]",
            "--set", "align.iterations=[15,10]", "--threads", "1"]
    # 3 of 5 unusable: more than align.max_flagged_fraction (0.5) stops the chunk loudly, nothing written
    proc = run_cli(*args, "--out", out)
    assert proc.returncode == 2 and not out.exists()
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "3 of 5 particles aligned as junk or unreadable" in line
    assert "contrast polarity" in line and "pixel size" in line
    proc = run_cli(*args, "--out", out, "--set", "align.max_flagged_fraction=1")
    assert proc.returncode == 0, proc.stderr
    p = S.read_star(out).particles
    flags = p[S.FLAG].to_numpy()
    assert (flags[:2] & (S.FLAG_JUNK | S.FLAG_BAD_IMAGE)).tolist() == [0, 0]
    assert flags[2] & S.FLAG_BAD_IMAGE and flags[4] & S.FLAG_BAD_IMAGE       # empty, NaN: not aligned
    assert p[S.SCORE].iloc[2] == 0 and p[S.CONVERGED].iloc[2] == 0
    assert flags[3] & S.FLAG_JUNK and not flags[3] & S.FLAG_BAD_IMAGE       # noise: aligned, flagged junk
    assert p[S.SCORE].iloc[3] < p[S.SCORE].iloc[:2].min()

    # a chunk of one particle
    one = tmp_path / "one"
    star1, _ = write_dataset(one, imgs[:1], truth.iloc[:1], PX)
    out1 = tmp_path / "one.star"
    proc = run_cli("align", "--particles", star1, "--modes", modes_file, "--out", out1, *FAST, "--threads", "1",
                   "--summary", tmp_path / "one.json")
    assert proc.returncode == 0, proc.stderr
    p1 = S.read_star(out1).particles
    assert len(p1) == 1 and p1[S.FLAG].iloc[0] & S.FLAG_BAD_IMAGE == 0
    assert (tmp_path / "one.json").is_file()


def test_amplitude_bound_is_flagged(model):
    """A particle deformed beyond the bound is fitted at the bound and flagged."""
    q = np.array([[3.0, 0.0, 0.0]]) * model.amplitude_scale()          # 3 Å RMS along mode 7
    imgs, truth = simulate_images(model, 1, BOX, PX, seed=51, snr=None, amplitudes=q)
    s = AlignSettings(levels=[32, 64], iterations=[30, 20], candidates=[4, 1], max_amplitude_rmsd=1.5,
                      search_amplitude_rmsd=1.5, coarse_cell=1.5)  # (also exercises the lumped 32² model)
    r = Aligner(model, BOX, PX, s).align(imgs, ctf_of(1), "phase_flipped")
    assert r.at_bound[0]
    assert np.isclose(abs(r.amplitudes[0, 0]), 1.5 * model.amplitude_scale(), rtol=1e-3)
    ang, _, _ = errors(model, r.euler, r.origins, r.amplitudes, truth)
    assert ang[0] < 5
    assert FLAG_AT_BOUND == 8 and FLAG_AT_BOUND not in (S.FLAG_NOT_CONVERGED, S.FLAG_JUNK, S.FLAG_BAD_IMAGE, S.FLAG_OUTLIER)


def test_bad_inputs_are_one_line_errors(run_cli, modes_file, small_set, tmp_path):
    _, star, _ = small_set
    proc = run_cli("align", "--particles", star, "--modes", tmp_path / "missing.npz", "--out", tmp_path / "x.star")
    assert proc.returncode == 2 and "missing.npz" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("align", "--particles", star, "--modes", modes_file, "--out", tmp_path / "x.star",
                   "--set", "align.modes=[7,99]")
    assert proc.returncode == 2 and "mode 99" in proc.stderr
    lonely = tmp_path / "lonely.star"                                   # its image stack is elsewhere
    shutil.copy(star, lonely)
    proc = run_cli("align", "--particles", lonely, "--modes", modes_file, "--out", tmp_path / "x.star")
    assert proc.returncode == 2 and "particles.mrcs" in proc.stderr
    assert not (tmp_path / "x.star").exists() and not progress_dir(tmp_path / "x.star").exists()
