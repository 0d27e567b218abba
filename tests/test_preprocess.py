"""Preprocessing: phase flip, Fourier-crop downscale, normalisation, split, chunks, real data."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from deephemnma.core import imageops
from deephemnma import preprocess as pp
from deephemnma import simulate as sim
from deephemnma.core.config import validate_config
from deephemnma.core.ctf import CTFParams, compute_ctf, phase_flip
from deephemnma.preprocess import PreprocessSettings

from _sim_helpers import toy_reference


def psettings(**kw) -> PreprocessSettings:
    return PreprocessSettings.from_config(validate_config({"seed": 5, "preprocess": kw}))


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A small simulated data set (64² at 0.6 Å) with noise-free stacks."""
    out = tmp_path_factory.mktemp("sim")
    cfg = validate_config({"seed": 2, "simulate": {
        "n_particles": 40, "box": 64, "pixel_size": 0.6, "chunk_size": 16, "snr_calibration": 16,
        "shift_range": 3.0, "write_projections": True, "amplitudes": {"helix_scale": 30.0},
        "ctf": {"defocus_spread": 500.0, "astigmatism": 200.0}}})
    sim.simulate_dataset(toy_reference(), sim.Settings.from_config(cfg), out, workers=1)
    return out


def read_stack(path):
    import mrcfile

    with mrcfile.open(path, permissive=True) as m:
        return np.array(m.data)


def test_phase_flip_is_sign_of_ctf(simulated):
    from deephemnma.core.star import merged, read_star

    star = read_star(simulated / "particles.star")
    ctf = compute_ctf(CTFParams.from_table(merged(star)), 64, 0.6)
    x = read_stack(simulated / "stacks/particles_0000.mrcs")[:6]
    s = psettings(box=None, normalise=False)
    out = pp.process_images(x, None, 0.6, s, ctf[:6], np.ones(6, bool)).numpy()
    F = np.fft.rfft2(x.astype(np.float64)) * np.sign(ctf[:6].numpy())
    np.testing.assert_allclose(out, np.fft.irfft2(F, s=(64, 64)), atol=1e-5 * np.abs(x).max())
    np.testing.assert_allclose(out, phase_flip(torch.as_tensor(x), ctf[:6]).numpy(), atol=1e-5 * np.abs(x).max())
    # particles not to be flipped are left alone
    keep = pp.process_images(x, None, 0.6, s, ctf[:6], np.array([True, False] * 3)).numpy()
    np.testing.assert_allclose(keep[1::2], x[1::2], atol=1e-5 * np.abs(x).max())
    # flipping the clean image makes its low-resolution transform positively correlated with
    # the CTF-free projection in every ring the CTF passes
    clean = read_stack(simulated / "stacks/clean_0000.mrcs")[:6]
    proj = read_stack(simulated / "stacks/projections_0000.mrcs")[:6]
    flipped = pp.process_images(clean, None, 0.6, s, ctf[:6], np.ones(6, bool)).numpy()
    f = imageops.frc(flipped, proj)
    assert np.all(f[1:25] > 0.5)
    assert np.any(imageops.frc(clean, proj)[1:25] < 0)


def test_downscale_keeps_low_frequencies(simulated):
    proj = read_stack(simulated / "stacks/projections_0000.mrcs")[:8]
    s = psettings(phase_flip=False, normalise=False, box=32)
    small = pp.process_images(proj, 32, 0.6, s).numpy()
    assert small.shape == (8, 32, 32)
    f = imageops.frc(imageops.fourier_pad(small, 64), proj)
    assert np.all(f[:14] > 0.999)  # up to the raised-cosine edge below the new Nyquist (16)
    # the edge reaches zero at the new Nyquist: nothing at or beyond it survives
    F = np.abs(np.fft.rfft2(small))
    k = imageops.radial_frequency(32).numpy()
    assert F[:, k >= 16].max() < 1e-4 * F.max()
    # a coarser antialias cutoff (the paper's 1.3 Å for 0.65 Å pixels is the Nyquist default)
    s2 = psettings(phase_flip=False, normalise=False, box=32, lowpass_resolution=4.8)  # 8 Fourier pixels
    F2 = np.abs(np.fft.rfft2(pp.process_images(proj, 32, 0.6, s2).numpy()))
    assert F2[:, k >= 8].max() < 1e-4 * F2.max()


def test_split_and_plan():
    s = psettings(set1_size=30, chunk_size=8)
    a, b = pp.split_indices(100, s)
    assert len(a) == 30 and len(b) == 70 and not set(a) & set(b) and set(a) | set(b) == set(range(100))
    assert np.all(np.diff(a) > 0)
    a2, _ = pp.split_indices(100, s)
    np.testing.assert_array_equal(a, a2)
    a3, _ = pp.split_indices(100, psettings(set1_size=30, chunk_size=8, seed=6))
    assert not np.array_equal(a, a3)
    plan = pp.plan_chunks(100, s)
    assert [c["name"] for c in plan][:5] == ["set1/chunk_0000", "set1/chunk_0001", "set1/chunk_0002",
                                             "set1/chunk_0003", "set2/chunk_0000"]
    assert [c["n"] for c in plan if c["set"] == "set1"] == [8, 8, 8, 6]
    assert sum(c["n"] for c in plan if c["set"] == "set2") == 70 and len(plan) == 4 + 9
    # the whole config or the section work alike; fractions round
    cfg = validate_config({"preprocess": {"set1_fraction": 0.25, "chunk_size": 10}})
    assert pp.split_sizes(101, PreprocessSettings.from_config(cfg)) == (25, 76)
    assert len(pp.plan_chunks(101, cfg)) == 3 + 8
    assert pp.split_sizes(10, psettings(set1_size=20000)) == (10, 0)
    assert pp.split_sizes(10, psettings(set1_size=None)) == (10, 0)


def test_preprocess_simulated_dataset(simulated, tmp_path):
    from deephemnma.core.mrc import ParticleImages
    from deephemnma.core.star import read_star

    out = tmp_path / "prep"
    s = psettings(box=32, set1_size=25, chunk_size=10)
    m = pp.preprocess_dataset(simulated / "particles.star", out, s, workers=1)
    assert m["complete"] and m["box_in"] == 64 and m["box_out"] == 32 and m["pixel_size_out"] == [1.2]
    plan = pp.plan_chunks(40, s)
    for c in plan:
        assert (out / c["star"]).is_file() and (out / c["stack"]).is_file()
    assert read_stack(out / "set1/chunk_0002.mrcs").shape == (5, 32, 32)
    src = read_star(simulated / "particles.star")
    set1, set2 = read_star(out / "set1.star"), read_star(out / "set2.star")
    assert len(set1) == 25 and len(set2) == 15
    for st in (set1, set2):
        assert st.optics["rlnImagePixelSize"].tolist() == [1.2] and st.optics["rlnImageSize"].tolist() == [32]
        assert st.optics["rlnCtfDataArePhaseFlipped"].tolist() == [1]
        for col in src.particles.columns:  # every input column kept
            assert col in st.particles.columns
    names = set(set1.particles["dhnmaOriginalImageName"]) | set(set2.particles["dhnmaOriginalImageName"])
    assert names == set(src.particles["rlnImageName"])  # verbatim: the key of the ground truth
    assert (set1.particles["dhnmaOriginalPixelSize"] == 0.6).all()
    # per-set STAR, chunk STAR and original image agree
    imgs = ParticleImages.from_star(set1).read(np.arange(25))
    chunk = read_star(out / "set1/chunk_0001.star")
    np.testing.assert_array_equal(ParticleImages.from_star(chunk).read(np.arange(10)), imgs[10:20])
    bg = ~imageops.circular_mask(32, 0.9 * 16).numpy()
    np.testing.assert_allclose(imgs[:, bg].mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(imgs[:, bg].std(1), 1, atol=1e-4)
    # back to the original images (from a set STAR or a chunk STAR); redo the first by hand
    orig_all = pp.original_images(set1).read(np.arange(25))
    full = ParticleImages.from_star(src).read(np.arange(40))
    pos = {n: i for i, n in enumerate(src.particles["rlnImageName"])}
    np.testing.assert_array_equal(orig_all, full[[pos[n] for n in set1.particles["dhnmaOriginalImageName"]]])
    np.testing.assert_array_equal(pp.original_images(out / "set1/chunk_0001.star").read(np.arange(10)), orig_all[10:20])
    orig = orig_all[0]
    cp = CTFParams.from_table(set1.particles.iloc[[0]].assign(rlnVoltage=200.0, rlnSphericalAberration=2.0,
                                                              rlnAmplitudeContrast=0.1))
    want = pp.process_images(orig[None], 32, 0.6, s, compute_ctf(cp, 64, 0.6), np.ones(1, bool)).numpy()[0]
    np.testing.assert_allclose(imgs[0], want, atol=1e-5)
    # shifts stay in Å, the split keeps the input order
    key = dict(zip(src.particles["rlnImageName"], src.particles["rlnDefocusU"]))
    assert [key[n] for n in set1.particles["dhnmaOriginalImageName"]] == set1.particles["rlnDefocusU"].tolist()
    assert [pos[n] for n in set1.particles["dhnmaOriginalImageName"]] == sorted(pos[n] for n in set1.particles[
        "dhnmaOriginalImageName"])
    # preprocessing a preprocessed set keeps the way back to the first originals
    again = pp.preprocess_dataset(out / "set1.star", tmp_path / "again", psettings(box=16, set1_size=5), workers=1)
    assert again["original_star"] == str((simulated / "particles.star").resolve())
    twice = read_star(tmp_path / "again/set2.star")
    np.testing.assert_array_equal(pp.original_images(twice).read([0]),
                                  full[[pos[twice.particles["dhnmaOriginalImageName"].iloc[0]]]])
    assert (twice.particles["dhnmaOriginalPixelSize"] == 0.6).all() and twice.optics["rlnImagePixelSize"].tolist() == [2.4]
    manifest = json.loads((out / "preprocess.json").read_text())
    assert manifest["sets"]["set1"]["n"] == 25 and len(manifest["chunks"]) == len(plan)


def test_same_bytes_any_workers_resume_and_chunks(simulated, tmp_path):
    s = psettings(box=32, set1_size=20, chunk_size=10)
    a, b = tmp_path / "a", tmp_path / "b"
    pp.preprocess_dataset(simulated / "particles.star", a, s, workers=1)
    pp.preprocess_dataset(simulated / "particles.star", b, s, workers=2)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.suffix in (".mrcs", ".star"))
    assert len(files) == 4 * 2 + 2
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    # resume
    t0 = (a / "set1/chunk_0000.mrcs").stat().st_mtime_ns
    (a / "set2/chunk_0001.mrcs").unlink()
    pp.preprocess_dataset(simulated / "particles.star", a, s, workers=1)
    assert (a / "set1/chunk_0000.mrcs").stat().st_mtime_ns == t0
    assert (a / "set2/chunk_0001.mrcs").read_bytes() == (b / "set2/chunk_0001.mrcs").read_bytes()
    # one chunk at a time (as cluster jobs would); a final call without ``only`` writes the index STARs
    c = tmp_path / "c"
    m = pp.preprocess_dataset(simulated / "particles.star", c, s, only=["set2/chunk_0000"])
    assert not m["complete"] and (c / "set2/chunk_0000.star").is_file() and not (c / "set1.star").exists()
    m = pp.preprocess_dataset(simulated / "particles.star", c, s, only=["set1/chunk_0000", "set1/chunk_0001",
                                                                        "set2/chunk_0001"])
    assert not m["complete"] and not (c / "set1.star").exists()
    t1 = (c / "set1/chunk_0000.mrcs").stat().st_mtime_ns
    m = pp.preprocess_dataset(simulated / "particles.star", c, s)
    assert (c / "set1/chunk_0000.mrcs").stat().st_mtime_ns == t1  # nothing redone
    assert m["complete"] and (c / "set1.star").read_bytes() == (a / "set1.star").read_bytes()


@pytest.mark.peer
def test_real_relion31_data(peer_dir, tmp_path, run_cli):
    from deephemnma.core.star import read_star

    out = tmp_path / "prep"
    r = run_cli("preprocess", "--particles", peer_dir / "relion31.star", "--outdir", out,
                "--set", "preprocess.set1_size=3", "--set", "preprocess.chunk_size=2", "--set", "data.invert_contrast=true")
    assert r.returncode == 0, r.stderr
    s1 = read_star(out / "set1.star")
    assert len(s1) == 3 and s1.optics["rlnImagePixelSize"].tolist() == [pytest.approx(5.612)]
    assert s1.optics["rlnMicrographOriginalPixelSize"].tolist() == [1.403]
    src = read_star(peer_dir / "relion31.star").particles.set_index("rlnImageOriginalName")
    for _, row in s1.particles.iterrows():  # every value of the input row kept, shifts in Å unchanged
        o = src.loc[row["rlnImageOriginalName"]]
        assert row["rlnOriginXAngst"] == o["rlnOriginXAngst"] and row["rlnDefocusU"] == o["rlnDefocusU"]
        assert row["dhnmaOriginalImageName"].endswith("@relion31.mrcs")
    x = read_stack(out / "set1/chunk_0000.mrcs")
    assert x.shape == (2, 128, 128) and np.isfinite(x).all()
    plan = run_cli("preprocess", "--particles", peer_dir / "relion31.star", "--outdir", out, "--plan",
                   "--set", "preprocess.set1_size=3", "--set", "preprocess.chunk_size=2")
    assert [c["name"] for c in json.loads(plan.stdout)] == ["set1/chunk_0000", "set1/chunk_0001", "set2/chunk_0000"]
    # a box larger than the input is an input error, one line, exit 2
    bad = run_cli("preprocess", "--particles", peer_dir / "relion31.star", "--outdir", tmp_path / "bad",
                  "--set", "preprocess.box=512")
    assert bad.returncode == 2 and "smaller than preprocess.box" in bad.stderr


@pytest.mark.peer
def test_optics_groups_of_different_pixel_sizes_and_boxes(tmp_path, shared_data, run_cli):
    """Three optics groups, the same particles imaged at 64² × 1.3 Å, 80² × 1.04 Å (the same
    field of view) and 72² × 1.3 Å (a larger one), by an independent simulator, noise-free:
    preprocessing brings all to one box and pixel size (the largest field of view over the
    box), and each particle's images then agree."""
    import pandas as pd
    import starfile

    import _independent_sim as isim
    from deephemnma.core.star import read_star

    a = isim.simulate(n=12, box=64, pixel_size=1.3, snr=float("inf"), seed=3, max_shift_px=0.0)
    b = isim.simulate(n=12, box=80, pixel_size=1.04, snr=float("inf"), seed=3, max_shift_px=0.0)
    c = isim.simulate(n=12, box=72, pixel_size=1.3, snr=float("inf"), seed=3, max_shift_px=0.0)
    tables = []
    for k, (sim_, name) in enumerate(((a, "a"), (b, "b"), (c, "c"))):
        t = starfile.read(isim.write_relion(sim_, tmp_path / f"{name}.star", f"{name}.mrcs"), always_dict=True)
        t["optics"]["rlnOpticsGroup"], t["optics"]["rlnOpticsGroupName"] = [k + 1], [f"opticsGroup{k + 1}"]
        t["particles"]["rlnOpticsGroup"] = k + 1
        tables.append(t)
    starfile.write({"optics": pd.concat([t["optics"] for t in tables], ignore_index=True),
                    "particles": pd.concat([t["particles"] for t in tables], ignore_index=True)}, tmp_path / "abc.star")
    out = tmp_path / "prep"
    r = run_cli("preprocess", "--particles", tmp_path / "abc.star", "--outdir", out, "--set", "preprocess.box=32",
                "--set", "preprocess.set1_size=36", "--set", "preprocess.chunk_size=36", "--set", "data.invert_contrast=false")
    assert r.returncode == 0, r.stderr
    s1 = read_star(out / "set1.star")
    assert s1.optics["rlnImagePixelSize"].tolist() == [pytest.approx(72 * 1.3 / 32)] * 3
    assert s1.optics["rlnImageSize"].tolist() == [32] * 3
    x = read_stack(out / "set1/chunk_0000.mrcs")
    name = s1.particles["dhnmaOriginalImageName"].tolist()
    idx = {g: [name.index(f"{i + 1:06d}@{g}.mrcs") for i in range(12)] for g in "abc"}
    def cc(g, h):
        return np.array([np.corrcoef(x[i].ravel(), x[j].ravel())[0, 1] for i, j in zip(idx[g], idx[h])])

    other = np.array([np.corrcoef(x[i].ravel(), x[j].ravel())[0, 1] for i, j in zip(idx["a"], np.roll(idx["c"], 1))])
    print(f"same particle: a~b {cc('a', 'b').min():.4f}, a~c {cc('a', 'c').min():.3f}; other particles "
          f"{np.abs(other).max():.2f}")
    assert cc("a", "b").min() > 0.99  # the same field of view at other samplings: the same image
    # c sees more of the CTF's delocalised fringes (a larger field of view) but the same particle
    assert cc("a", "c").min() > 0.94 and cc("b", "c").min() > 0.94 and np.abs(other).max() < 0.8
    assert s1.particles["dhnmaOriginalPixelSize"].round(3).isin([1.3, 1.04]).all()
