"""Unit tests of the network stage: model, targets, augmentation, data split and order, schedules."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from deephemnma.core import geometry
from deephemnma.core.errors import InputError
from deephemnma.network import data as ndata
from deephemnma.network.model import ModelConfig, build_model
from deephemnma.network.targets import (
    TargetCodec,
    amplitude_column,
    head_losses,
    mean_prediction_baseline,
    particle_errors,
    quaternion_dot,
    quaternion_l1,
)
from deephemnma.network.train import RECIPES, TrainSettings, lr_factor


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("mode", ["joint", "separate"])
def test_model_outputs_and_paper_mlp(mode):
    torch.manual_seed(0)
    cfg = ModelConfig(n_amplitudes=3, arch="resnet10", mode=mode)
    model = build_model(cfg).eval()
    out = model(torch.randn(5, 1, 32, 32))
    assert out["amplitudes"].shape == (5, 3) and out["quaternion"].shape == (5, 4) and out["shifts"].shape == (5, 2)
    assert torch.allclose(out["quaternion"].norm(dim=-1), torch.ones(5), atol=1e-5)
    assert len(model.branches) == (1 if mode == "joint" else 3)
    # The paper's MLP: ResNet features (512) -> 1000 -> 512 -> 128 -> outputs, dropout 0.5.
    for name, branch in model.branches.items():
        lin = [m for m in branch.mlp if isinstance(m, torch.nn.Linear)]
        assert [(l.in_features, l.out_features) for l in lin][:3] == [(512, 1000), (1000, 512), (512, 128)]
        assert lin[-1].out_features == {"joint": 9, "amplitudes": 3, "quaternion": 4, "shifts": 2}[name]
        assert all(m.p == 0.5 for m in branch.mlp if isinstance(m, torch.nn.Dropout))
        assert branch.features.conv1.in_channels == 1


def test_shared_mode_has_one_resnet_and_three_mlps():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_amplitudes=2, arch="resnet10", mode="shared")).eval()
    out = model(torch.randn(3, 1, 32, 32))
    assert out["amplitudes"].shape == (3, 2) and out["shifts"].shape == (3, 2)
    assert torch.allclose(out["quaternion"], torch.nn.functional.normalize(out["quaternion_raw"], dim=-1))
    shared = model.branches["shared"]
    assert set(shared.mlps) == {"amplitudes", "quaternion", "shifts"}
    n_resnets = sum(isinstance(m, torch.nn.Conv2d) and m.in_channels == 1 for m in model.modules())
    assert n_resnets == 1


def test_resnet34_is_the_feature_extractor():
    model = build_model(ModelConfig(n_amplitudes=2))
    f = model.branches["joint"].features
    assert [len(getattr(f, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]  # ResNet34's blocks


def test_separate_branches_learn_only_from_their_own_loss():
    """Summing the three losses and one optimiser == three independently trained models."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_amplitudes=2, arch="resnet10", mode="separate", dropout=0.0))
    out = model(torch.randn(4, 1, 32, 32))
    out["shifts"].sum().backward()
    for name, branch in model.branches.items():
        g = sum(float(p.grad.abs().sum()) for p in branch.parameters() if p.grad is not None)
        assert (g > 0) == (name == "shifts"), name


# ----------------------------------------------------------------------------- targets
def _label_table(n=50, seed=0):
    rng = np.random.default_rng(seed)
    ang = geometry.random_euler(n, rng)
    return pd.DataFrame({
        "rlnAngleRot": ang[:, 0], "rlnAngleTilt": ang[:, 1], "rlnAnglePsi": ang[:, 2],
        "rlnOriginXAngst": rng.normal(2, 3, n), "rlnOriginYAngst": rng.normal(-1, 2, n),
        amplitude_column(7): rng.normal(10, 50, n), amplitude_column(9): rng.normal(0, 5, n),
    })


def test_codec_roundtrip_and_standardisation():
    table = _label_table()
    codec = TargetCodec.fit(table)
    assert codec.modes == [7, 9]
    enc = codec.encode_table(table)
    assert np.allclose(enc["amplitudes"].mean(0), 0, atol=1e-5) and np.allclose(enc["amplitudes"].std(0), 1, atol=1e-4)
    assert np.allclose(enc["shifts"].mean(0), 0, atol=1e-5) and np.allclose(enc["shifts"].std(0), 1, atol=1e-4)
    # Quaternions are the geometry module's, w >= 0, and represent the label's rotation.
    assert np.all(enc["quaternion"][:, 0] >= 0)
    dec = codec.decode({"amplitudes": enc["amplitudes"], "quaternion": -enc["quaternion"], "shifts": enc["shifts"]})
    raw = codec.raw_labels(table)
    assert np.allclose(dec["amplitudes"], raw["amplitudes"], atol=1e-3)
    assert np.allclose(dec["shifts"], raw["shifts"], atol=1e-4)
    err = particle_errors(dec, raw)
    assert err["angle"].max() < 0.01 and err["shift"].max() < 1e-4
    assert TargetCodec.from_dict(codec.to_dict()).to_dict() == codec.to_dict()


def test_quaternion_losses_treat_q_and_minus_q_alike():
    q = torch.nn.functional.normalize(torch.randn(20, 4), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(20, 4), dim=-1)
    for f in (quaternion_l1, quaternion_dot):
        assert torch.allclose(f(q, t), f(-q, t)) and torch.allclose(f(q, t), f(q, -t))
        assert torch.allclose(f(t, t), torch.zeros(20), atol=1e-6) and torch.allclose(f(-t, t), torch.zeros(20), atol=1e-6)
        assert (f(q, t) > 0).all()
    pred = {"amplitudes": torch.zeros(20, 2), "quaternion": -t, "shifts": torch.ones(20, 2)}
    tgt = {"amplitudes": torch.ones(20, 2), "quaternion": t, "shifts": torch.ones(20, 2)}
    hl = head_losses(pred, tgt)
    assert float(hl["amplitudes"]) == pytest.approx(1.0) and float(hl["quaternion"]) == 0 and float(hl["shifts"]) == 0


def test_mean_prediction_baseline_is_what_it_says():
    table = _label_table(400)
    codec = TargetCodec.fit(table)
    raw = codec.raw_labels(table)
    base = mean_prediction_baseline(raw, raw)
    amp_mae = np.abs(raw["amplitudes"] - raw["amplitudes"].mean(0)).mean()
    assert base["amplitude"] == pytest.approx(amp_mae)
    assert base["shift"] == pytest.approx(np.abs(raw["shifts"] - raw["shifts"].mean(0)).mean())
    assert 60 < base["angle"] < 120  # uniform orientations vs one constant orientation


# ----------------------------------------------------------------------------- augmentation
@pytest.fixture(scope="module")
def projector():
    """A voxel volume of an asymmetric Gaussian-atom molecule, projected by Fourier slices."""
    from deephemnma.network.toydata import toy_molecule
    from deephemnma.core.projection import FourierSliceProjector

    D, px = 32, 3.0
    coords, _ = toy_molecule(n_atoms=20, radius=20)
    g = (np.arange(D) - D // 2) * px
    Z, Y, X = np.meshgrid(g, g, g, indexing="ij")
    vol = sum(np.exp(-((X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2) / (2 * 4.0**2)) for c in coords)
    P = FourierSliceProjector(vol)

    def project(angles, origins):
        A = torch.as_tensor(geometry.euler_to_matrix(np.atleast_2d(angles)))
        return P.project(A, origins_px=torch.as_tensor(np.atleast_2d(origins))).numpy()

    return project


def test_rot90_augmentation_labels_match_projections(projector):
    """Rotating the image by k·90° == projecting with the transformed pose (psi and origin)."""
    rng = np.random.default_rng(1)
    ang, org = geometry.random_euler(3, rng), rng.uniform(-2.5, 2.5, (3, 2))
    imgs = projector(ang, org)
    scale = np.abs(imgs).max()
    for j in range(3):
        for k in (1, 2, 3):
            im2, a2, o2 = ndata.rot90_augment(imgs[j], ang[j], org[j], k)
            ref = projector(a2, o2)[0]
            assert np.abs(im2 - ref).max() < 1e-3 * scale
            # the pose is psi + 90k (RELION's Rz(90°) is np.rot90's in-plane rotation)
            assert geometry.angular_error(geometry.euler_to_matrix(a2), geometry.euler_to_matrix(ang[j] + [0, 0, 90 * k])) < 1e-6
            # negative controls: labels left alone, the opposite rotation, no half-pixel term
            for wrong_psi in ([0] if k == 2 else [0, -90 * k]):
                wrong = projector(ang[j] + [0, 0, wrong_psi], o2)[0]
                assert np.abs(im2 - wrong).max() > 0.1 * scale
            R = ndata.rot90_matrix(k)
            no_delta = projector(a2, R @ org[j])[0]
            assert np.abs(im2 - no_delta).max() > 20 * np.abs(im2 - ref).max()


def test_dataset_augmentation_is_consistent_and_seeded(tmp_path):
    from deephemnma.network.toydata import make_toy_particles

    star = make_toy_particles(tmp_path, n=24, box=32, seed=3)
    ps = ndata.load_particles(star, labels=True)
    codec = TargetCodec.fit(ps.table)
    raw = codec.raw_labels(ps.table)
    plain = ndata.BatchDataset(ps.images, raw, codec, ps.pixel_size, normalize="none")
    aug = ndata.BatchDataset(ps.images, raw, codec, ps.pixel_size, normalize="none", augment="rot90", seed=5)
    idx = np.arange(24)
    a, b = aug[((0, 0, 0), idx)], aug[((0, 0, 0), idx)]
    assert torch.equal(a["image"], b["image"])  # same key, same batch (workers cannot change it)
    assert not torch.equal(a["image"], aug[((0, 1, 0), idx)]["image"])
    p = plain[((0, 0, 0), idx)]
    ks = []
    for j in range(24):
        x0 = p["image"][j, 0].numpy()
        k = next(k for k in range(4) if np.array_equal(np.rot90(x0, k), a["image"][j, 0].numpy()))
        ks.append(k)
        _, a2, o2 = ndata.rot90_augment(x0, raw["angles"][j], raw["shifts"][j] / ps.pixel_size, k)
        exp = codec.encode({"amplitudes": raw["amplitudes"][j:j + 1], "angles": a2[None], "shifts": o2[None] * ps.pixel_size})
        assert np.allclose(a["shifts"][j].numpy(), exp["shifts"][0], atol=1e-5)
        assert abs(abs(float((a["quaternion"][j] * torch.as_tensor(exp["quaternion"][0])).sum())) - 1) < 1e-5
        assert torch.equal(a["amplitudes"][j], p["amplitudes"][j])
    assert len(set(ks)) > 1


def test_normalise_per_image():
    x = np.random.default_rng(0).normal(3, 5, (4, 16, 16)).astype(np.float32)
    y = ndata.normalise_images(x, "per_image")
    assert np.allclose(y.mean(axis=(1, 2)), 0, atol=1e-5) and np.allclose(y.std(axis=(1, 2)), 1, atol=1e-4)
    assert ndata.normalise_images(x, "none") is x


# ----------------------------------------------------------------------------- split and order
def test_split_by_particle_never_shares_a_particle():
    keys = np.repeat(np.arange(100), 2)  # every particle listed twice (e.g. in two STAR chunks)
    tr, va = ndata.split_by_particle(keys, 0.2, seed=4)
    assert len(np.intersect1d(keys[tr], keys[va])) == 0
    assert len(np.unique(keys[va])) == 20 and len(tr) + len(va) == 200
    tr2, va2 = ndata.split_by_particle(keys, 0.2, seed=4)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, ndata.split_by_particle(keys, 0.2, seed=5)[1])


def test_step_sampler_accumulation_equals_ranks_and_resume():
    single = list(ndata.StepSampler(50, 4, accumulate=2, seed=9))
    ranks = [list(ndata.StepSampler(50, 4, world_size=2, rank=r, seed=9)) for r in range(2)]
    # step s: single's micro-batch k == rank k's micro-batch; tags (epoch, step, slot) agree too
    for s in range(len(ranks[0])):
        for r in range(2):
            t1, i1 = single[2 * s + r]
            t2, i2 = ranks[r][s]
            assert t1 == t2 and np.array_equal(i1, i2)
    seen = np.concatenate([i for _, i in single])
    assert len(seen) == 48 and len(np.unique(seen)) == 48  # 6 steps of 8, no repeats, last 2 dropped
    smp = ndata.StepSampler(50, 4, accumulate=2, seed=9)
    smp.set_epoch(1)
    e1 = [i for _, i in smp]
    assert not np.array_equal(np.concatenate(e1), seen)
    smp.set_epoch(1, start_step=2)
    assert all(np.array_equal(a, b) for a, b in zip([i for _, i in smp], e1[4:]))
    ev = [list(ndata.StepSampler(11, 4, world_size=2, rank=r, shuffle=False)) for r in range(2)]
    got = np.sort(np.concatenate([i for part in ev for _, i in part]))
    assert np.array_equal(got, np.arange(11))  # evaluation: every particle exactly once


# ----------------------------------------------------------------------------- recipes
def test_recipes_and_lr_schedules():
    paper = TrainSettings.from_config({"seed": 1, "network": {"recipe": "paper"}})
    assert (paper.optimizer, paper.lr, paper.weight_decay, paper.batch_size, paper.epochs, paper.mode, paper.dropout) == \
        ("adam", 1e-5, 1e-5, 2, 400, "separate", 0.5)
    spe = 10
    f = [lr_factor(s, 400 * spe, 0, paper, spe) for s in (0, 80 * spe - 1, 80 * spe, 160 * spe, 399 * spe)]
    assert f == pytest.approx([1, 1, 0.1, 0.01, 1e-4])
    fast = TrainSettings.from_config({"seed": 1, "network": {"recipe": "fast"}})
    total, warm = fast.epochs * spe, fast.warmup_epochs * spe
    assert lr_factor(0, total, warm, fast, spe) == pytest.approx(1 / warm)
    assert lr_factor(warm - 1, total, warm, fast, spe) == pytest.approx(1)
    assert lr_factor(total - 1, total, warm, fast, spe) == pytest.approx(fast.min_lr_ratio, abs=1e-3)
    assert TrainSettings.from_config({"network": {"recipe": "paper", "lr": 3e-4}}).lr == 3e-4  # explicit beats the recipe
    assert set(RECIPES) == {"grid", "fast", "paper"}


def test_schema_defaults_resolve():
    from deephemnma.core.config import defaults

    s = TrainSettings.from_config({**defaults(), "seed": 7})
    assert s.seed == 7 and s.recipe == "grid" and s.formulation == "posegrid" and s.arch == "convnet"
    fast = TrainSettings.from_config({**defaults(), "network": {"recipe": "fast"}})
    assert fast.mode == "joint" and fast.arch == "resnet34" and fast.hidden == [1000, 512, 128]


# ----------------------------------------------------------------------------- input errors
def test_missing_labels_and_flagged_rows(tmp_path):
    import starfile

    from deephemnma.network.toydata import make_toy_particles

    star = make_toy_particles(tmp_path, n=10, box=32, seed=2)
    d = starfile.read(star)
    p = d["particles"].drop(columns=["rlnAnglePsi"])
    starfile.write({"optics": d["optics"], "particles": p}, tmp_path / "nopsi.star", overwrite=True)
    with pytest.raises(InputError, match="rlnAnglePsi"):
        ndata.load_particles(tmp_path / "nopsi.star", labels=True)
    p = d["particles"].copy()
    p["dhnmaFlag"] = [0, 2] * 5
    starfile.write({"optics": d["optics"], "particles": p}, tmp_path / "flag.star", overwrite=True)
    ps = ndata.load_particles(tmp_path / "flag.star", labels=True)
    assert len(ps) == 5 and (ps.table["dhnmaFlag"] == 0).all()
    assert len(ndata.load_particles(tmp_path / "flag.star", labels=True, exclude_flagged=False)) == 10
    p = d["particles"].copy()
    p.loc[3, amplitude_column(8)] = np.nan
    starfile.write({"optics": d["optics"], "particles": p}, tmp_path / "nan.star", overwrite=True)
    with pytest.raises(InputError, match=r"row 4"):
        ndata.load_particles(tmp_path / "nan.star", labels=True)
