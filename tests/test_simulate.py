"""Synthetic data sets: parameters, image formation, SNR, ground truth, determinism, resume."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from deephemnma import simulate as sim
from deephemnma.core.config import validate_config
from deephemnma.core.ctf import CTFParams, compute_ctf
from deephemnma.core.errors import ConfigError
from deephemnma.core.imageops import circular_mask
from deephemnma.simulate import Settings, SimReference

from _sim_helpers import ak_heavy_atoms, toy_reference

AMP = [f"dhnmaAmplitude{m:03d}" for m in (7, 8, 9, 10)]


def settings(**kw) -> Settings:
    base = {"n_particles": 96, "box": 64, "pixel_size": 0.6, "shift_range": 3.0, "chunk_size": 32,
            "snr_calibration": 256, "batch_size": 16, "write_projections": True,
            "amplitudes": {"helix_scale": 30.0}}
    amp = kw.pop("amplitudes", {})
    ctf = kw.pop("ctf", {})
    base.update(kw)
    base["amplitudes"] = {**base["amplitudes"], **amp}
    if ctf:
        base["ctf"] = ctf
    cfg = validate_config({"seed": 3, "simulate": base})
    return Settings.from_config(cfg)


@pytest.fixture(scope="module")
def ref() -> SimReference:
    return toy_reference(n_modes=4)  # modes 7, 8, 9, 10 on a 300-atom blob


@pytest.fixture(scope="module")
def dataset(ref, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    s = settings()
    manifest = sim.simulate_dataset(ref, s, out, workers=1)
    return out, s, manifest


def read_stack(path):
    import mrcfile

    with mrcfile.open(path, permissive=True) as m:
        return np.array(m.data)


def stack_of(out: Path, kind: str) -> np.ndarray:
    files = sorted((out / "stacks").glob(f"{kind}_*.mrcs"))
    return np.concatenate([read_stack(f) for f in files])


# ------------------------------------------------------------------------ parameters
def test_helix_parameters_and_ranges(ref):
    s = settings(n_particles=2000, shift_range=5.0)
    df = sim.sample_parameters(s, ref, 2000, np.random.default_rng(0))
    r = df["dhnmaConformation"].to_numpy()
    assert r.min() >= 0 and r.max() <= 1 and abs(r.mean() - 0.5) < 0.03
    np.testing.assert_allclose(df[AMP[0]], -30 * r)
    np.testing.assert_allclose(df[AMP[1]], 30 * np.sin(np.pi * r))
    np.testing.assert_allclose(df[AMP[2]], 30 * np.cos(np.pi * r))
    assert (df[AMP[3]] == 0).all()  # mode 10 is in the file but not driven
    o = df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 0.6
    assert np.abs(o).max() <= 5.0 and np.abs(o).max() > 4.9
    assert (df["rlnDefocusU"] == 5000).all() and (df["rlnDefocusV"] == 5000).all()
    # uniform on SO(3): the mean rotation matrix vanishes, tilt follows sin(tilt)
    from deephemnma.core.geometry import euler_to_matrix

    A = euler_to_matrix(df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())
    assert np.abs(A.mean(0)).max() < 0.05
    assert abs(np.cos(np.deg2rad(df["rlnAngleTilt"])).mean()) < 0.05
    # the paper's literal Euler sampling is available and different (tilt uniform in degrees)
    e = sim.sample_parameters(settings(rotations="euler_uniform"), ref, 2000, np.random.default_rng(0))
    assert e["rlnAngleTilt"].between(0, 180).all() and abs(e["rlnAngleTilt"].mean() - 90) < 4
    assert abs(np.cos(np.deg2rad(e["rlnAngleTilt"])).mean()) < 0.05
    assert np.abs(np.cos(np.deg2rad(e["rlnAngleTilt"]))).mean() > 0.6  # vs 0.5 when uniform on SO(3)


def test_other_distributions_and_ctf_spread(ref):
    rng = np.random.default_rng(1)
    d = sim.sample_parameters(settings(amplitudes={"distribution": "discrete", "states": [[-50, 0], [50, 10]],
                                                   "state_weights": [1, 3]}), ref, 4000, rng)
    k = d["dhnmaConformation"].to_numpy()
    assert set(np.unique(k)) == {1, 2} and abs((k == 2).mean() - 0.75) < 0.03
    np.testing.assert_allclose(d.loc[k == 2, AMP[0]], 50)
    np.testing.assert_allclose(d.loc[k == 2, AMP[1]], 10)
    assert (d[AMP[2]] == 0).all()
    u = sim.sample_parameters(settings(amplitudes={"distribution": "uniform", "uniform_range": [-20, 40]}), ref, 4000, rng)
    q = u[AMP].to_numpy()
    assert q.min() >= -20 and q.max() <= 40 and abs(q.mean() - 10) < 1.5 and "dhnmaConformation" not in u
    g = sim.sample_parameters(settings(amplitudes={"distribution": "gaussian", "gaussian_std": 7.0, "modes": [8, 10]}),
                              ref, 4000, rng)
    assert abs(g[AMP[1]].std() - 7) < 0.4 and abs(g[AMP[3]].std() - 7) < 0.4 and (g[AMP[0]] == 0).all()
    c = sim.sample_parameters(settings(ctf={"defocus_spread": 1000.0, "astigmatism": 400.0}), ref, 4000, rng)
    mean = (c["rlnDefocusU"] + c["rlnDefocusV"]) / 2
    assert mean.between(4000, 6000).all() and mean.std() > 500
    ast = c["rlnDefocusU"] - c["rlnDefocusV"]
    assert ast.between(0, 400).all() and c["rlnDefocusAngle"].between(0, 180).all()
    with pytest.raises(ConfigError):
        sim.driven_modes(settings(amplitudes={"modes": [7, 8]}), ref)  # the helix needs three
    with pytest.raises(ConfigError):
        sim.driven_modes(settings(amplitudes={"distribution": "uniform", "modes": [7, 12]}), ref)


def test_parameters_are_per_chunk_deterministic(ref):
    s = settings()
    a = sim.chunk_parameters(s, ref, 1, 32, 64)
    b = sim.chunk_parameters(s, ref, 1, 32, 64)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.index) == list(range(32, 64))
    c = sim.chunk_parameters(s, ref, 0, 0, 32)
    assert not np.allclose(a[AMP[0]].to_numpy(), c[AMP[0]].to_numpy())
    assert sim.chunk_ranges(70000, 1000)[-1] == (69000, 70000) and sim.chunk_ranges(5, 2) == [(0, 2), (2, 4), (4, 5)]
    plan = sim.plan_chunks(None, validate_config({"simulate": {"n_particles": 2500}}))
    assert [c["n"] for c in plan] == [1000, 1000, 500]
    assert plan[2]["particles"] == "stacks/particles_0002.mrcs" and plan[2]["clean"] == "stacks/clean_0002.mrcs"
    assert "projections" not in plan[0]


# ------------------------------------------------------------------------ images
def test_outputs_and_star_files(dataset):
    import starfile

    from deephemnma.core.mrc import ParticleImages
    from deephemnma.core.star import read_star

    out, s, manifest = dataset
    for c in range(3):
        for kind in ("particles", "clean", "projections"):
            assert (out / f"stacks/{kind}_{c:04d}.mrcs").is_file()
    star = read_star(out / "particles.star")
    assert star.version == "3.1" and len(star) == 96
    assert star.optics["rlnImagePixelSize"].tolist() == [0.6] and star.optics["rlnImageSize"].tolist() == [64]
    assert star.optics["rlnVoltage"].tolist() == [200.0] and star.optics["rlnSphericalAberration"].tolist() == [2.0]
    assert star.optics["rlnAmplitudeContrast"].tolist() == [0.1]
    assert "rlnAngleRot" not in star.particles  # the answers are only in the ground truth
    raw = starfile.read(out / "particles.star")
    assert set(raw) == {"optics", "particles"} and len(raw["particles"]) == 96
    truth = read_star(out / "ground_truth.star")
    assert list(truth.particles["rlnImageName"]) == list(star.particles["rlnImageName"])
    for col in ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                "dhnmaConformation", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", *AMP]:
        assert col in truth.particles.columns, col
    assert len(starfile.read(out / "ground_truth.star")["particles"]) == 96
    imgs = ParticleImages.from_star(star).read([0, 40, 95])
    noisy = stack_of(out, "particles")
    np.testing.assert_array_equal(imgs, noisy[[0, 40, 95]])
    for kind in ("clean", "projections"):  # noise-free controls, same rows
        st = read_star(out / f"{kind}.star")
        np.testing.assert_array_equal(ParticleImages.from_star(st).read([5, 90]), stack_of(out, kind)[[5, 90]])
    assert "rlnDefocusU" in read_star(out / "clean.star").particles
    assert "rlnDefocusU" not in read_star(out / "projections.star").particles
    assert manifest["n_particles"] == 96 and len(manifest["chunks"]) == 3
    assert json.loads((out / "simulate.json").read_text())["fingerprint"] == manifest["fingerprint"]


def test_snr_matches_target(dataset):
    """Measured independently from the stacks: in-mask variance of the clean images over that
    of (image − clean), averaged over the data set."""
    out, s, manifest = dataset
    clean, noisy = stack_of(out, "clean"), stack_of(out, "particles")
    mask = circular_mask(64, manifest["noise"]["mask_radius_px"]).numpy()
    sig = clean[:, mask].astype(np.float64).var(axis=1).mean()
    noise = (noisy - clean)[:, mask].astype(np.float64).var(axis=1).mean()
    assert sig / noise == pytest.approx(0.1, rel=0.10)
    assert manifest["snr_measured"] == pytest.approx(sig / noise, rel=1e-3)
    # both noise terms are present: half of the noise variance is CTF-filtered (coloured)
    n = (noisy - clean).astype(np.float64)
    assert n.mean() == pytest.approx(0, abs=0.02 * n.std())
    P = (np.abs(np.fft.rfft2(n)) ** 2).mean(0)
    ctf = compute_ctf(CTFParams.constant(1, 5000.0, 200.0, 2.0, 0.1), 64, 0.6)[0].numpy()
    hi, lo = np.abs(ctf) > 0.95, np.abs(ctf) < 0.1
    sb, sa = manifest["noise"]["sigma_before"], manifest["noise"]["sigma_after"]
    D2 = 64 * 64
    expect_hi = (sb ** 2 * (ctf[hi] ** 2).mean() + sa ** 2) * D2  # noise power per frequency
    expect_lo = (sb ** 2 * (ctf[lo] ** 2).mean() + sa ** 2) * D2
    assert P[hi].mean() == pytest.approx(expect_hi, rel=0.05)
    assert P[lo].mean() == pytest.approx(expect_lo, rel=0.05)
    assert P[hi].mean() / P[lo].mean() > 2.5  # noise before the CTF is coloured by it


def test_ground_truth_reproduces_noise_free_images(dataset, ref):
    from deephemnma.core.star import read_star

    out, s, _ = dataset
    truth = read_star(out / "ground_truth.star").particles
    rows = [3, 50, 77]
    imgs = sim.render(ref, sim.profiles_for(ref, s), truth.iloc[rows], s)
    clean, proj = stack_of(out, "clean"), stack_of(out, "projections")
    np.testing.assert_allclose(imgs["clean"].numpy(), clean[rows], atol=1e-5 * np.abs(clean).max())
    np.testing.assert_allclose(imgs["projections"].numpy(), proj[rows], atol=1e-5 * proj.max())
    # the clean image is the projection modulated by the particle's CTF
    cp = CTFParams.from_table(truth.iloc[rows].assign(rlnVoltage=200.0, rlnSphericalAberration=2.0,
                                                      rlnAmplitudeContrast=0.1))
    ctf = compute_ctf(cp, 64, 0.6)
    redo = torch.fft.irfft2(torch.fft.rfft2(torch.as_tensor(proj[rows])) * ctf, s=(64, 64)).numpy()
    np.testing.assert_allclose(redo, clean[rows], atol=1e-5 * np.abs(clean).max())
    # another amplitude gives another image: the amplitudes really drive the images
    other = truth.iloc[[3]].copy()
    other[AMP[0]] += 15.0
    moved = sim.render(ref, sim.profiles_for(ref, s), other, s)["projections"].numpy()[0]
    assert np.abs(moved - proj[3]).max() > 0.05 * proj[3].max()


def test_same_seed_same_bytes_any_workers_and_resume(ref, tmp_path):
    s = settings(n_particles=24, chunk_size=8, box=32, pixel_size=1.0, snr_calibration=16)
    a, b = tmp_path / "a", tmp_path / "b"
    sim.simulate_dataset(ref, s, a, workers=1)
    sim.simulate_dataset(ref, s, b, workers=2)
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file() and p.suffix in (".mrcs", ".star"))
    assert len(names) == 3 * 3 + 4
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    # resume: a missing chunk is redone, complete ones are not touched
    keep = a / "stacks/particles_0000.mrcs"
    t_keep = keep.stat().st_mtime_ns
    ref_bytes = (a / "stacks/particles_0001.mrcs").read_bytes()
    (a / "stacks/particles_0001.mrcs").unlink()
    m = sim.simulate_dataset(ref, s, a, workers=1)
    assert keep.stat().st_mtime_ns == t_keep
    assert (a / "stacks/particles_0001.mrcs").read_bytes() == ref_bytes
    assert m["chunks"][1]["n"] == 8
    # other settings: every chunk is redone
    s2 = settings(n_particles=24, chunk_size=8, box=32, pixel_size=1.0, snr_calibration=16, snr=0.5)
    sim.simulate_dataset(ref, s2, a, workers=1)
    assert (a / "stacks/particles_0000.mrcs").read_bytes() != (b / "stacks/particles_0000.mrcs").read_bytes()


def test_projectors_padding_and_contrast(ref):
    s = settings(box=48, pixel_size=0.8)
    params = sim.sample_parameters(s, ref, 3, np.random.default_rng(4))
    prof = sim.profiles_for(ref, s)
    grid = sim.project(ref, prof, params, s).numpy()
    fs = sim.project(ref, prof, params, settings(box=48, pixel_size=0.8, projector="fourier_slice")).numpy()
    for i in range(3):
        c = np.corrcoef(grid[i].ravel(), fs[i].ravel())[0, 1]
        assert c > 0.97
    # CTF padding: same projection in the box, CTF applied in a larger field then cropped
    pad = sim.render(ref, prof, params, settings(box=48, pixel_size=0.8, ctf={"padding": 2}))
    one = sim.render(ref, prof, params, s)
    np.testing.assert_allclose(pad["projections"].numpy(), one["projections"].numpy(), atol=1e-5 * grid.max())
    assert not np.allclose(pad["clean"].numpy(), one["clean"].numpy(), atol=1e-3 * one["clean"].abs().max().item())
    inv = sim.render(ref, prof, params, settings(box=48, pixel_size=0.8, invert_contrast=True))
    np.testing.assert_allclose(inv["clean"].numpy(), -one["clean"].numpy())


def test_conformation_map_is_the_simulated_density(ref):
    s = settings(box=48, pixel_size=0.8)
    params = sim.sample_parameters(s, ref, 1, np.random.default_rng(9))
    params[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]] = 0.0
    vol = sim.conformation_map(ref, params[AMP].to_numpy()[0], s)
    assert vol.shape == (48, 48, 48) and vol.sum() == pytest.approx(sim.profiles_for(ref, s).total.sum(), rel=1e-3)
    proj = sim.project(ref, sim.profiles_for(ref, s), params, s).numpy()[0]
    np.testing.assert_allclose(vol.sum(axis=0), proj, atol=1e-4 * proj.max())


def test_no_noise_no_ctf(ref, tmp_path):
    s = settings(n_particles=4, chunk_size=4, box=32, pixel_size=1.0, snr=None, ctf={"enabled": False},
                 write_clean=False, write_projections=False)
    m = sim.simulate_dataset(ref, s, tmp_path, workers=1)
    assert m["noise"] is None and m["snr_measured"] is None
    assert (tmp_path / "stacks/clean_0000.mrcs").is_file() and not (tmp_path / "stacks/particles_0000.mrcs").exists()
    from deephemnma.core.star import read_star

    st = read_star(tmp_path / "particles.star")
    assert "rlnDefocusU" not in st.particles and st.particles["rlnImageName"][0] == "000001@stacks/clean_0000.mrcs"
    from deephemnma.core.mrc import ParticleImages

    assert ParticleImages.from_star(st).read([3]).shape == (1, 32, 32)
    assert not (tmp_path / "clean.star").exists() and not (tmp_path / "projections.star").exists()


def test_reference_from_mode_set_object():
    class Modes:  # the attributes of deephemnma.core.modes.ModeSet used here
        coords = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
        element = np.array(["C", "O"])
        mode_numbers = np.array([7])
        modes = np.array([[[1.0, 0, 0], [0, 0, 0]]])
        weights = np.array([6.0, 8.0])
        sigma = np.array([1.0, 1.0])
        centre = np.array([2.0, 2.0, 1.0])  # weighted centroid, not the mean
        kind = "atomic"

    r = SimReference.from_modes(Modes())
    np.testing.assert_allclose(r.centre, [2, 2, 1])
    np.testing.assert_allclose(r.coords, [[-1, 0, 2], [1, 0, 0]])
    np.testing.assert_allclose(r.deform([[2.0]])[0, 0], [1, 0, 2])
    assert r.radius == pytest.approx(np.sqrt(5))
    s = settings()
    assert sim.profiles_for(r, s).weights.shape == (2, 5)  # atomic: Peng
    Modes.kind = "pseudoatoms"
    p = SimReference.from_modes(Modes())
    prof = sim.profiles_for(p, s)  # pseudo-atoms: the mode file's Gaussians
    assert prof.weights.shape == (2, 1) and prof.total.tolist() == [6.0, 8.0]


def test_paper_defaults_on_adenylate_kinase(ak_dir, tmp_path):
    """The schema's defaults (256², 0.325 Å, helix 200, SNR 0.1, CTF 200 kV / 2 mm / 5000 Å)
    on the 1,656 heavy atoms of AK, a few particles."""
    xyz, el = ak_heavy_atoms(ak_dir / "4ake.pdb")
    ref = toy_reference(xyz, el, n_modes=3)
    cfg = validate_config({"simulate": {"n_particles": 6, "chunk_size": 6, "snr_calibration": 8}})
    s = Settings.from_config(cfg)
    assert (s.box, s.pixel_size, s.helix_scale, s.snr, s.voltage, s.cs, s.defocus) == (256, 0.325, 200.0, 0.1, 200.0, 2.0, 5000.0)
    m = sim.simulate_dataset(ref, s, tmp_path, workers=1)
    clean = read_stack(tmp_path / "stacks/clean_0000.mrcs")
    assert clean.shape == (6, 256, 256) and np.isfinite(clean).all()
    assert m["reference"]["n_atoms"] == 1656 and 0.05 < m["snr_measured"] < 0.2


@pytest.mark.slow
def test_cli_nma_simulate_preprocess(ak_dir, tmp_path, run_cli):
    """The commands chained as the workflow will: nma → simulate → preprocess."""
    from deephemnma.core.modes import load_modes
    from deephemnma.core.star import read_star

    modes = tmp_path / "modes.npz"
    r = run_cli("nma", "--reference", ak_dir / "4ake.pdb", "--out", modes, "--set", "reference.chains=[A]")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "sim"
    args = ["--set", "simulate.n_particles=12", "--set", "simulate.chunk_size=5", "--set", "simulate.box=64",
            "--set", "simulate.pixel_size=1.3", "--set", "simulate.snr_calibration=8"]
    r = run_cli("simulate", "--modes", modes, "--outdir", out, *args, "--threads", "2")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "simulate.json").read_text())
    ms = load_modes(modes)
    assert m["reference"]["n_atoms"] == ms.n_atoms and m["reference"]["driven_modes"] == [7, 8, 9]
    np.testing.assert_allclose(m["reference"]["centre"], ms.centre)  # the mode file's centre is the box centre
    truth = read_star(out / "ground_truth.star").particles
    assert len(truth) == 12 and "dhnmaAmplitude009" in truth
    assert (out / "simulate.log").is_file() and len(list((out / "stacks").glob("particles_*.mrcs"))) == 3
    prep = ["--particles", out / "particles.star", "--outdir", tmp_path / "prep",
            "--set", "preprocess.box=32", "--set", "preprocess.set1_size=8", "--set", "preprocess.chunk_size=4"]
    # 12 particles are too few to detect the contrast polarity: one line saying so, no output
    r = run_cli("preprocess", *prep)
    assert r.returncode == 2 and "fewer than 20 particles" in r.stderr and "invert_contrast" in r.stderr, r.stderr
    assert not (tmp_path / "prep" / "set1.star").exists()
    r = run_cli("preprocess", *prep, "--set", "data.invert_contrast=false")
    assert r.returncode == 0, r.stderr
    assert len(read_star(tmp_path / "prep/set1.star")) == 8 and len(read_star(tmp_path / "prep/set2.star")) == 4
    bad = run_cli("simulate", "--modes", tmp_path / "missing.npz", "--outdir", tmp_path / "x")
    assert bad.returncode == 2 and "missing.npz" in bad.stderr
