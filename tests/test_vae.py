"""The VAE with the physics decoder (issue 12): its decoder is the alignment's projector with the
data's CTF, gradients through it reach pose and amplitudes, and a short CPU training run on
renders of a toy model learns conformations from the images (likelihood + KL), far better
than predicting the mean conformation."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pandas as pd
import pytest
import torch

from deephemnma.align.levels import Level, ctf_for_level
from deephemnma.align.model import ElasticModel
from deephemnma.core.ctf import CTFParams
from deephemnma.core.geometry import angular_error, matrix_to_euler
from deephemnma.network.posenet import PoseNetConfig
from deephemnma.network.render import (
    ParticleRenderer,
    RenderSettings,
    radial_filter,
    raised_cosine_lowpass,
    random_rotations,
    seeded_generator,
)
from deephemnma.network.vae import PhysicsDecoder, PoseVAE, axis_angle_matrix, fit_through_decoder

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_model(seed: int = 0, scale: float = 1.8, sigma: float = 2.5) -> ElasticModel:
    """An asymmetric molecule of 40 Gaussian atoms (a long arm, a short arm, a knob; ~50 Å long)
    with one smooth mode: breathing (every atom moves away from the centre in proportion to its
    distance; unit 3N norm) — a change of size that no rotation mimics. (At 16² and 4 Å/px the grid network finds the orientation of this
    shape in ~1 CPU-minute: ~14° mean after 2,000 steps of 32 renders, where the same shape at
    1/1.8 the size is still at ~40°.)"""
    rng = np.random.default_rng(seed)
    arm1 = np.stack([np.linspace(-14, 14, 16), np.zeros(16), np.zeros(16)], 1)
    arm2 = np.stack([np.zeros(10), np.linspace(1.5, 14, 10), np.zeros(10)], 1) + [6.0, 0, 0]
    knob = rng.normal(scale=2.0, size=(14, 3)) + [-8.0, -4.0, 7.0]
    coords = np.concatenate([arm1, arm2, knob])
    coords = (coords - coords.mean(0)) * scale
    vec = coords / np.linalg.norm(coords)
    return ElasticModel(coords, np.ones(len(coords)), np.full(len(coords), sigma), [7], vec[None])


def decoder_for(model, box, px, ctf=None, ctf_mode="phase_flipped", gain=1.0, transfer=None, noise=None):
    """A decoder with a small (unused) encoder around it: unit noise power unless given."""
    rs = RenderSettings(box=box, pixel_size=px, ctf_mode=ctf_mode if ctf is not None else "none")
    rend = ParticleRenderer(model, rs, None, ctf)
    cfg = PoseNetConfig(n_amplitudes=model.n_modes, arch="convnet", width=4, input_box=16, hidden=16,
                        n_directions=12, n_inplane=4)
    n_t = box // 2 + 1
    vae = PoseVAE(cfg, gain=gain, transfer=np.ones(n_t) if transfer is None else transfer,
                  noise_power=np.ones(4 * n_t) if noise is None else noise, n_transfer=n_t,
                  n_noise=4 * n_t if noise is None else len(noise))
    return PhysicsDecoder(rend, vae)


def test_decoder_image_is_the_align_projector_with_the_particles_ctf():
    model = toy_model()
    box, px, n = 48, 1.5, 6
    du = np.linspace(6000, 20000, n)
    ctf = CTFParams(du, du - 300, 30.0, 200.0, 2.0, 0.1, 0.0, 0.0, 1.0)
    k = np.arange(box // 2 + 1)
    transfer = 1.0 + 0.02 * k
    dec = decoder_for(model, box, px, ctf, gain=-0.7, transfer=transfer)
    g = seeded_generator(0, 0, 0)
    R = random_rotations(n, g)
    o = torch.randn(n, 2, generator=g) * 3.0
    q = torch.randn(n, 1, generator=g) * 20.0
    img = dec.image(R, o, q, torch.arange(n))
    # the alignment's own pieces: its projector, its CTF of phase-flipped particles, and the
    # preprocessing's antialias filter, gain and transfer written out here
    P = model.project(R, o / px, q, box, px)
    C = ctf_for_level(ctf, "phase_flipped", Level.make(box, box, px), n)
    L = raised_cosine_lowpass(box, box / 2.0, 2.0)
    T = -0.7 * radial_filter(transfer, box)
    expect = torch.fft.irfft2(torch.fft.rfft2(P) * C * L * T, s=(box, box))
    err = float((img - expect).abs().max() / expect.abs().max())
    assert err < 1e-5, err
    # and it moves with every parameter: not a constant image
    assert float((img[0] - img[1]).abs().max()) > 0.1 * float(img.abs().max())


def test_gradients_through_the_decoder_recover_pose_and_amplitudes():
    torch.manual_seed(0)
    model = toy_model()
    box, px, n = 40, 2.0, 4
    ctf = CTFParams(np.full(n, 10000.0), 10000.0, 0.0, 200.0, 2.0, 0.1, 0.0, 0.0, 1.0)
    dec = decoder_for(model, box, px, ctf, gain=1.0)
    g = seeded_generator(1, 0, 0)
    R_true = random_rotations(n, g)
    o_true = (torch.rand(n, 2, generator=g) * 2 - 1) * 3.0
    q_true = torch.tensor([[8.0], [-10.0], [5.0], [-7.0]])  # the size changes by 4–8 %
    ci = torch.arange(n)
    with torch.no_grad():
        target = dec.image(R_true, o_true, q_true, ci)
    # gradients reach every input
    Rv = R_true.clone().requires_grad_(True)
    ov = (o_true + 0.5).requires_grad_(True)
    qv = torch.zeros(n, 1, requires_grad=True)
    X = torch.fft.rfft2(target)
    dec.chi2(X, dec.spectrum(Rv, ov, qv, ci)).sum().backward()
    for grad in (Rv.grad[:, :2], ov.grad, qv.grad):  # (the projection reads the first two rows of R)
        assert torch.isfinite(grad).all() and float(grad.abs().min()) > 0
    # start 6° off (random axes), 1 Å off, amplitudes at zero; descend through the decoder alone
    axis = torch.randn(n, 3, generator=g)
    axis = axis / axis.norm(dim=1, keepdim=True)
    R0 = R_true @ axis_angle_matrix(axis * math.radians(6.0))
    o0 = o_true + torch.tensor([[1.0, -0.7]])
    start_angle = angular_error(R0.double().numpy(), R_true.double().numpy())
    res = fit_through_decoder(dec, target, ci, R0, o0, torch.zeros(n, 1), steps=1000, lr=0.05, amplitude_scale=5.0)
    ang = angular_error(res["rotations"].double().numpy(), R_true.double().numpy())
    sh = (res["origins"] - o_true).abs().max(1).values
    dq = (res["amplitudes"] - q_true).abs()[:, 0]
    print(f"angle {start_angle.mean():.2f}° → {ang.mean():.3f}°; shift {sh.max():.4f} Å; amplitude error {dq.max():.3f}")
    assert ang.max() < 0.1 and float(sh.max()) < 0.02 and float(dq.max()) < 0.1


# ----------------------------------------------------------------------------- training
def write_toy_dataset(tmp_path, model, n, box, px, seed, snr_noise_power, name="particles"):
    """Particles rendered through the forward model at known poses and amplitudes (uniform in
    ±20 on the breathing mode: up to ±3.2 Å RMS, ±16 % in size), white noise, normalised like
    the preprocessing; a STAR file with the truth as HEMNMA-style labels. Returns (STAR, truth)."""
    import starfile

    from deephemnma.core.imageops import normalise_background
    from deephemnma.core.mrc import write_stack

    rs = RenderSettings(box=box, pixel_size=px, ctf_mode="none")
    rend = ParticleRenderer(model, rs, None, None)
    g = seeded_generator(seed, 0, 0)
    R = random_rotations(n, g)
    o = (torch.rand(n, 2, generator=g) * 2 - 1) * px
    q = (torch.rand(n, 1, generator=g) * 2 - 1) * 20.0
    with torch.no_grad():
        S = rend.clean(R, o, q, torch.zeros(n, dtype=torch.long))
    noise = torch.randn(n, box, box, generator=g) * math.sqrt(snr_noise_power)
    img = normalise_background(S + noise, 0.9 * box / 2).numpy().astype(np.float32)
    write_stack(tmp_path / f"{name}.mrcs", img, px)
    eul = matrix_to_euler(R.double().numpy())
    table = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{name}.mrcs" for i in range(n)],
                          "rlnAngleRot": eul[:, 0], "rlnAngleTilt": eul[:, 1], "rlnAnglePsi": eul[:, 2],
                          "rlnOriginXAngst": o[:, 0].double().numpy(), "rlnOriginYAngst": o[:, 1].double().numpy(),
                          "dhnmaAmplitude007": q[:, 0].double().numpy(), "rlnOpticsGroup": 1})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [200.0],
                           "rlnSphericalAberration": [2.0], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [px], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    starfile.write({"optics": optics, "particles": table}, tmp_path / f"{name}.star", overwrite=True)
    return tmp_path / f"{name}.star", {"rotations": R.double().numpy(), "amplitudes": q.double().numpy()}


def write_modes(path, model):
    """A modes file of the toy model (eigenvalue 1 for its one mode)."""
    from deephemnma.core.modes import ModeSet, save_modes

    N = model.n_atoms
    ms = ModeSet(coords=model.coords, weights=model.weights, sigma=model.sigma, element=np.full(N, "C"),
                 atom_name=np.full(N, "CA"), res_name=np.full(N, "ALA"), res_seq=np.arange(N), ins_code=np.full(N, ""),
                 chain_id=np.full(N, "A"), mode_numbers=np.array([7]), modes=model.vectors,
                 computed_numbers=np.arange(1, 8), computed_modes=np.concatenate([np.zeros((6, N, 3)), model.vectors]),
                 eigenvalues=np.r_[np.zeros(6), 1.0], frequencies=np.r_[np.zeros(6), 1.0],
                 collectivity=np.ones(7), centre=np.zeros(3), kind="atomic")
    return save_modes(path, ms)


def test_short_vae_training_learns_conformations_from_the_images(tmp_path):
    """A VAE trained from scratch (no label) on 150 + 150 particles — set 1 and set 2, as with
    vae_data all — finds the conformations of set 2's particles from the images. Amplitudes
    come from the evidence lower bound alone (amplitude_weight 0: the rendered particles teach
    pose and shift only; no pseudo-labels, which fit amplitudes through the decoder), so a broken
    likelihood, KL or decoder leaves them at the prior's mean or worse — at or above the
    mean-conformation baseline."""
    from deephemnma.core.star import read_star
    from deephemnma.network.checkpoint import load_checkpoint
    from deephemnma.network.data import load_particles
    from deephemnma.network.train import TrainSettings, train
    from deephemnma.network.vae import answers_of, vae_from_checkpoint

    model = toy_model()
    set1, truth1 = write_toy_dataset(tmp_path, model, n=150, box=16, px=4.0, seed=5, snr_noise_power=0.02, name="set1")
    set2, truth2 = write_toy_dataset(tmp_path, model, n=150, box=16, px=4.0, seed=6, snr_noise_power=0.02, name="set2")
    modes = write_modes(tmp_path / "modes.npz", model)
    net = {"model": "vae", "vae_init": "scratch", "vae_data": "all", "vae_particles": [str(set2)],
           "vae_prior_rmsd": 2.0, "vae_pretrain": 0.62, "vae_refine_iterations": 2, "amplitude_weight": 0.0,
           "arch": "convnet", "width": 16, "input_box": 16, "hidden": [256], "grid_directions": 48, "grid_inplane": 12,
           "grid_sigma": 20.0, "grid_sigma_end": None, "lr": 3e-3, "schedule": "constant", "warmup_epochs": 0, "epochs": 13,
           "steps_per_epoch": 200, "batch_size": 32, "engine": "single", "device": "cpu", "val_fraction": 0.1,
           "test_fraction": 0.0, "tta_turns": 1, "vae_shift_range": 4.0, "vae_pseudo_fraction": 0.0}
    t0 = time.process_time()
    res = train(set1, tmp_path / "net", TrainSettings.from_config({"network": net}), modes=modes, resume=False)
    cpu = time.process_time() - t0
    vae = vae_from_checkpoint(load_checkpoint(tmp_path / "net" / "best.pt"))
    ans = answers_of(vae, load_particles(set2).images, torch.device("cpu"))
    angle = angular_error(ans["rotations"], truth2["rotations"])
    rmsd = model.rmsd_between(ans["amplitudes"], truth2["amplitudes"])
    base = model.rmsd_between(np.broadcast_to(truth1["amplitudes"].mean(0), (150, 1)), truth2["amplitudes"])
    corr = np.corrcoef(ans["amplitudes"][:, 0], truth2["amplitudes"][:, 0])[0, 1]
    print(f"{cpu:.0f} CPU-s (best epoch {res.best_epoch}): set 2: angle {angle.mean():.1f}° (median "
          f"{np.median(angle):.1f}°), deformation RMSD {rmsd.mean():.3f} Å vs mean conformation {base.mean():.3f} Å, "
          f"correlation {corr:.2f}; posterior ±{np.sqrt((ans['std'] ** 2).sum(1)).mean():.2f}")
    assert read_star(set2).particles.shape[0] == 150
    assert np.median(angle) < 20
    # measured: 0.72 × the baseline, correlation 0.70 (amplitudes ignored by the decoder, a KL of the
    # wrong sign or a likelihood against the wrong images: correlation ~0, RMSD ≥ the baseline)
    assert rmsd.mean() < 0.85 * base.mean() and corr > 0.5


def test_pseudo_labels_keep_the_fits_that_found_the_particle(tmp_path):
    """Self-training (network.vae_pseudo_fraction): from the encoder's pose hypotheses, the fits
    through the decoder that found the particle become labels and those that did not are
    dropped. The encoder is replaced by hypotheses made from the truth: for half the particles
    one of the two is 8° and 1 px off with the amplitude at the prior's mean (a fit's basin) —
    the first for some, the second for others — and the other random; for the other half both
    are random (outside it, but for a few). The kept fits must be right, the near ones nearly
    all kept and fitted closer than they started, and the pose steps must then carry those particles with those labels. A gate that
    ranked by anything but how well the fit explains the image, a fit that did not move, or one
    that looked at the first hypothesis only, fails."""
    from deephemnma.network.engines import make_engine
    from deephemnma.network.train import TrainSettings, make_task

    model = toy_model()
    set1, truth = write_toy_dataset(tmp_path, model, n=120, box=16, px=4.0, seed=5, snr_noise_power=0.02, name="set1")
    modes = write_modes(tmp_path / "modes.npz", model)
    net = {"model": "vae", "vae_init": "scratch", "vae_prior_rmsd": 2.0, "vae_pseudo_fraction": 0.5,
           "refine_hypotheses": 2, "arch": "convnet", "width": 4, "input_box": 16, "hidden": [16],
           "grid_directions": 12, "grid_inplane": 4, "epochs": 2, "steps_per_epoch": 2, "batch_size": 32,
           "engine": "single", "device": "cpu", "val_fraction": 0.0, "test_fraction": 0.0, "vae_shift_range": 4.0}
    s = TrainSettings.from_config({"network": net})
    task = make_task(s, make_engine("single", "cpu"), set1, modes=modes)
    n = len(task.train_set)
    assert n == 120
    g = np.random.default_rng(0)
    R_true, q_true = truth["rotations"], truth["amplitudes"]
    o_true = task.train_set.table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    near = np.zeros(n, bool)
    near[g.permutation(n)[: n // 2]] = True
    slot = g.integers(0, 2, n)                      # which hypothesis is the near one
    axis = g.normal(size=(n, 3))
    axis *= math.radians(8.0) / np.linalg.norm(axis, axis=1, keepdims=True)
    R_near = R_true @ axis_angle_matrix(torch.as_tensor(axis)).numpy()
    hyps = random_rotations(2 * n, seeded_generator(9, 0, 0)).double().numpy().reshape(n, 2, 3, 3)
    hyps[near, slot[near]] = R_near[near]
    assert (slot[near] == 1).sum() >= n // 8

    def hypotheses(images, batch=256):
        assert len(images) == n  # every set-1 particle (fewer than vae_pseudo_particles), in order
        return {"rotations": hyps, "origins": o_true + np.where(near[:, None], 4.0, 0.0), "amplitudes": np.zeros((n, 1))}

    task.pose_hypotheses = hypotheses
    task.relabel(1)
    p = task.pseudo
    kept = p["rows"]
    # found: within 20° (at 16² and 4 Å/px the toy's images hardly tell 15° apart: such fits explain the
    # image as well as the truth does); a far start can land in the basin too
    found = angular_error(p["rotations"], R_true[kept]) < 20
    assert found.mean() >= 0.95 and near[kept].sum() >= 0.9 * near.sum()
    nk = kept[near[kept]]
    err_start = angular_error(R_near[nk], R_true[nk])
    err_fit = angular_error(p["rotations"][near[kept]], R_true[nk])
    assert np.median(err_fit) < 0.5 * np.median(err_start)
    assert np.median(err_fit[slot[nk] == 1]) < 0.5 * np.median(err_start)   # found from the second hypothesis
    assert np.abs(p["amplitudes"][near[kept], 0] - q_true[nk, 0]).mean() < 0.5 * np.abs(q_true[nk, 0]).mean()
    # the pose steps: half real pseudo-labelled particles, their images and fitted labels
    b = task.pose_batch(1, 0, 0)
    n_real = int(round(s.batch_size * s.vae_pseudo_fraction))
    real_img = b["image"][-n_real:, 0].numpy()
    imgs = task.train_set.images.read(kept)
    hit = [int(np.flatnonzero(np.all(np.isclose(imgs, x), axis=(1, 2)))[0]) for x in real_img]
    np.testing.assert_allclose(b["rotations"][-n_real:].numpy(), p["rotations"][hit], atol=1e-6)
    np.testing.assert_allclose(b["amplitudes"][-n_real:].numpy(), p["amplitudes"][hit], atol=1e-4)


def test_regressor_start_fits_the_particles_hemnma_did_not_label(tmp_path):
    """Self-training from the regressor's start (vae_init regressor, vae_pseudo_fraction > 0,
    vae_data all): set 1 has HEMNMA's labels, so the fits are of the other particles — set 2,
    the images the VAE then answers — and the pose steps carry both: real_fraction of set 1 with
    HEMNMA's labels and vae_pseudo_fraction of set 2 with its fits. Hypotheses 8° off the truth of
    set 2: the fits kept must be set-2 rows, closer to set 2's truth than they started; the
    prior stays HEMNMA's. A relabel that fitted set 1 again (or read set 1's images under set
    2's rows), or pose steps that dropped either source, fails; so does the setting without
    vae_data all (nothing to fit), with a one-line error."""
    from deephemnma.core.errors import ConfigError
    from deephemnma.network.engines import make_engine
    from deephemnma.network.train import TrainSettings, make_task

    model = toy_model()
    set1, truth1 = write_toy_dataset(tmp_path, model, n=80, box=16, px=4.0, seed=5, snr_noise_power=0.02, name="set1")
    set2, truth2 = write_toy_dataset(tmp_path, model, n=60, box=16, px=4.0, seed=6, snr_noise_power=0.02, name="set2")
    modes = write_modes(tmp_path / "modes.npz", model)
    net = {"model": "vae", "vae_init": "regressor", "vae_prior": "hemnma", "vae_data": "all",
           "vae_particles": [str(set2)], "vae_pseudo_fraction": 0.25, "real_fraction": 0.25, "real_after": 0.0,
           "refine_hypotheses": 1, "arch": "convnet", "width": 4, "input_box": 16, "hidden": [16],
           "grid_directions": 12, "grid_inplane": 4, "epochs": 2, "steps_per_epoch": 2, "batch_size": 32,
           "engine": "single", "device": "cpu", "val_fraction": 0.0, "test_fraction": 0.0, "vae_shift_range": 4.0}
    s = TrainSettings.from_config({"network": net})
    # the regressor start's defaults: self-training on the others when it has them (vae_data all)
    dflt = {k: v for k, v in net.items() if not k.startswith("vae_pseudo")}
    d = TrainSettings.from_config({"network": dflt})
    assert (d.vae_pseudo_fraction, d.vae_pseudo_after, d.vae_pseudo_data, d.vae_pseudo_particles) == \
        (0.25, 0.0, "others", 1024)
    assert TrainSettings.from_config({"network": {**dflt, "vae_data": "set1"}}).vae_pseudo_fraction == 0.0
    sc = TrainSettings.from_config({"network": {**dflt, "vae_init": "scratch"}})  # scratch fits all it has
    assert (sc.vae_pseudo_fraction, sc.vae_pseudo_after, sc.vae_pseudo_data, sc.vae_pseudo_particles) == \
        (0.5, 0.3, "all", 512)
    # the encoder's width, left null: 24 channels for the VAE from scratch, 16 for the regressor (and the
    # VAE from it, whose encoder is the regressor's checkpoint); set explicitly, it wins
    bare = {k: v for k, v in dflt.items() if k != "width"}
    assert [TrainSettings.from_config({"network": {**bare, **m}}).width for m in
            ({}, {"vae_init": "scratch"}, {"model": "regressor"}, {"vae_init": "scratch", "width": 8})] == [16, 24, 16, 8]
    task = make_task(s, make_engine("single", "cpu"), set1, modes=modes)
    n1, n2 = len(task.train_set), len(task.extra)
    assert (n1, n2, task.n_pool) == (80, 60, 140)
    prior = (task.model.prior_mean.clone(), task.model.prior_std().detach().clone())
    g = np.random.default_rng(1)
    axis = g.normal(size=(n2, 3))
    axis *= math.radians(8.0) / np.linalg.norm(axis, axis=1, keepdims=True)
    R_start = truth2["rotations"] @ axis_angle_matrix(torch.as_tensor(axis)).numpy()
    o2 = task.extra.table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)  # set 2's STAR columns

    def hypotheses(images, batch=256):
        assert len(images) == n2
        np.testing.assert_allclose(images, task.extra.images.read(np.arange(n2)))  # set 2's own images
        return {"rotations": R_start[:, None], "origins": o2, "amplitudes": np.zeros((n2, 1))}

    task.pose_hypotheses = hypotheses
    task.set_epoch(1)
    p = task.pseudo
    kept = p["rows"] - n1
    assert p["rows"].min() >= n1 and len(kept) >= 0.8 * n2
    err_fit = angular_error(p["rotations"], truth2["rotations"][kept])
    assert np.median(err_fit) < 0.5 * 8.0
    assert np.abs(p["amplitudes"][:, 0] - truth2["amplitudes"][kept, 0]).mean() < 0.5 * np.abs(truth2["amplitudes"]).mean()
    assert torch.equal(task.model.prior_mean, prior[0]) and torch.equal(task.model.prior_std().detach(), prior[1])
    # the pose step: rendered, then 8 of set 1 with HEMNMA's labels, then 8 of set 2 with their fits
    b = task.pose_batch(1, 0, 0)
    k = int(round(s.batch_size * 0.25))
    img1, img2 = task.train_set.images.read(np.arange(n1)), task.extra.images.read(np.arange(n2))

    def rows_of(imgs, stack):
        return [int(np.flatnonzero(np.all(np.isclose(stack, x), axis=(1, 2)))[0]) for x in imgs]

    h1 = rows_of(b["image"][-2 * k:-k, 0].numpy(), img1)
    np.testing.assert_allclose(b["amplitudes"][-2 * k:-k, 0].numpy(), truth1["amplitudes"][h1, 0], atol=1e-4)
    h2 = rows_of(b["image"][-k:, 0].numpy(), img2)
    fit = {int(r): j for j, r in enumerate(kept)}
    np.testing.assert_allclose(b["rotations"][-k:].numpy(), p["rotations"][[fit[r] for r in h2]], atol=1e-6)
    with pytest.raises(ConfigError, match="vae_data all"):
        make_task(TrainSettings.from_config({"network": {**net, "vae_data": "set1"}}), make_engine("single", "cpu"),
                  set1, modes=modes)
    with pytest.raises(ConfigError, match="set 1 has HEMNMA's labels"):
        make_task(TrainSettings.from_config({"network": {**net, "vae_pseudo_data": "all"}}), make_engine("single", "cpu"),
                  set1, modes=modes)
    # from scratch, vae_pseudo_data all: both sets fitted, each from its own images; the report
    # against HEMNMA's labels (here the truth) counts set 1's fits only
    s = TrainSettings.from_config({"network": {**net, "vae_init": "scratch", "vae_prior": "thermal", "vae_prior_rmsd": 2.0,
                                               "vae_pseudo_data": "all", "vae_pseudo_particles": 140}})
    task = make_task(s, make_engine("single", "cpu"), set1, modes=modes)
    o1 = task.train_set.table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    R_all = np.concatenate([truth1["rotations"], R_start])
    o_all = np.concatenate([o1, o2])

    def both(images, batch=256):
        assert len(images) == n1 + n2
        np.testing.assert_allclose(images[n1:], task.extra.images.read(np.arange(n2)))
        return {"rotations": R_all[:, None], "origins": o_all, "amplitudes": np.zeros((n1 + n2, 1))}

    task.pose_hypotheses = both
    task.relabel(1)
    rows = task.pseudo["rows"]
    assert (rows < n1).sum() >= 0.8 * n1 and (rows >= n1).sum() >= 0.8 * n2
    assert task.pseudo_stats["pseudo_angle_vs_hemnma_deg"] < 3.0  # set 1 started at its truth
    assert task.pseudo_stats["encoder_angle_vs_hemnma_deg"] < 0.05  # its hypotheses: set 1's truth, not set 2's


def test_pseudo_labels_become_the_prior_and_the_rendered_conformations(tmp_path):
    """network.vae_pseudo_prior: once an epoch has enough pseudo-labels, the prior on the
    amplitudes is theirs (mean, per-mode spread) and the pose steps render amplitudes drawn
    from them — a specimen whose conformations all lie far from the reference is no longer
    pulled toward it. Pseudo-labels set 6 prior σ away from the reference: the prior's mean and
    σ follow them, the KL is smallest there, and rendered amplitudes lie among them (within the
    kde jitter), not around the reference. Too few pseudo-labels, or the setting off, leave the
    thermal prior as it was."""
    from deephemnma.network.engines import make_engine
    from deephemnma.network.train import TrainSettings, make_task
    from deephemnma.network.vae_task import PSEUDO_PRIOR_MIN

    model = toy_model()
    set1, truth = write_toy_dataset(tmp_path, model, n=60, box=16, px=4.0, seed=5, snr_noise_power=0.02, name="set1")
    modes = write_modes(tmp_path / "modes.npz", model)
    net = {"model": "vae", "vae_init": "scratch", "vae_prior_rmsd": 2.0, "arch": "convnet", "width": 4,
           "input_box": 16, "hidden": [16], "grid_directions": 12, "grid_inplane": 4, "epochs": 2,
           "steps_per_epoch": 2, "batch_size": 64, "engine": "single", "device": "cpu", "val_fraction": 0.0,
           "test_fraction": 0.0, "vae_shift_range": 4.0}

    def task_with(pseudo_q, **over):
        s = TrainSettings.from_config({"network": {**net, **over}})
        task = make_task(s, make_engine("single", "cpu"), set1, modes=modes)
        n = len(pseudo_q)
        task.pseudo = {"rows": np.arange(n), "rotations": np.tile(np.eye(3), (n, 1, 1)), "origins": np.zeros((n, 2)),
                       "amplitudes": pseudo_q, "correlation": np.ones(n), "cosine": np.ones(n)}
        return task

    thermal = float(task_with(np.zeros((1, 1))).model.prior_std().detach()[0])
    g = np.random.default_rng(3)
    q = (6 * thermal + 0.5 * thermal * g.standard_normal(200))[:, None]
    task = task_with(q)
    task.pseudo_prior()
    vae = task.model
    assert float(vae.prior_mean[0]) == pytest.approx(q.mean(), rel=1e-5)
    assert float(vae.prior_std().detach()[0]) == pytest.approx(q.std(), rel=1e-4)
    mu = torch.linspace(-8 * thermal, 8 * thermal, 321)[:, None]
    std = torch.full_like(mu, 0.1 * thermal)
    assert abs(float(mu[vae.kl(mu, std, torch.log(std)).argmin(), 0]) - q.mean()) < 0.06 * thermal
    r = task.render(1, 0, 400)["amplitudes"].numpy()[:, 0]
    assert abs(r.mean() - q.mean()) < 0.15 * thermal and 0.6 * q.std() < r.std() < 1.6 * q.std()
    assert r.min() > q.min() - 5 * task.s.render_bandwidth * q.std()
    few = task_with(q[: PSEUDO_PRIOR_MIN - 1])
    few.pseudo_prior()
    assert float(few.model.prior_mean[0]) == 0.0 and float(few.model.prior_std().detach()[0]) == pytest.approx(thermal)
    assert abs(float(few.render(1, 0, 400)["amplitudes"].mean())) < 0.3 * thermal
    # at an epoch's start (relabel with hypotheses at the truth: most fits kept), with the setting on and off
    R_true = truth["rotations"]
    for on in (True, False):
        task = task_with(q, vae_pseudo_fraction=0.5, vae_pseudo_prior=on)
        o = task.train_set.table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
        task.pose_hypotheses = lambda images, batch=256: {"rotations": R_true[:, None], "origins": o,
                                                          "amplitudes": np.zeros((len(R_true), 1))}
        task.set_epoch(1)
        kept = task.pseudo["amplitudes"][:, 0]
        assert len(kept) >= PSEUDO_PRIOR_MIN and abs(kept.std() - thermal) > 0.2 * thermal  # the toy's spread is not the prior's
        prior_mean, prior_std = float(task.model.prior_mean[0]), float(task.model.prior_std().detach()[0])
        if on:
            assert prior_mean == pytest.approx(kept.mean(), rel=1e-4) and prior_std == pytest.approx(kept.std(), rel=1e-3)
        else:
            assert prior_mean == 0.0 and prior_std == pytest.approx(thermal) and task.pseudo_render is None


@pytest.mark.parametrize("calibrate_on", ["answers", "fits"])
def test_vae_resume_is_exact_with_pseudo_labels(tmp_path, calibrate_on):
    """A VAE training stopped after an epoch and resumed ends with the same weights, bit for bit,
    as one run straight through — with self-calibration and pseudo-labels (both recomputed from
    the weights at the start of an epoch), reconstruction steps after the first epoch, and a
    pseudo-label pool of two epochs (the earlier epoch's fits come back from the checkpoint)."""
    from deephemnma.network.checkpoint import load_checkpoint
    from deephemnma.network.train import TrainSettings, train

    model = toy_model()
    set1, _ = write_toy_dataset(tmp_path, model, n=80, box=16, px=4.0, seed=5, snr_noise_power=0.02, name="set1")
    modes = write_modes(tmp_path / "modes.npz", model)
    net = {"model": "vae", "vae_init": "scratch", "vae_prior_rmsd": 2.0, "vae_pseudo_fraction": 0.5,
           "vae_pseudo_after": 0.3, "vae_pretrain": 0.34, "vae_refine_iterations": 1,
           "vae_pseudo_particles": 40, "vae_pseudo_memory": 2, "vae_calibrate_on": calibrate_on,
           "arch": "convnet", "width": 4, "input_box": 16, "hidden": [16], "grid_directions": 12, "grid_inplane": 4,
           "epochs": 3, "steps_per_epoch": 3, "batch_size": 16, "engine": "single", "device": "cpu",
           "val_fraction": 0.1, "test_fraction": 0.0, "vae_shift_range": 4.0, "warmup_epochs": 0}
    s = TrainSettings.from_config({"network": net})
    train(set1, tmp_path / "straight", s, modes=modes, resume=False)
    train(set1, tmp_path / "resumed", s, modes=modes, resume=False, max_epochs=2)  # killed with a pool
    train(set1, tmp_path / "resumed", s, modes=modes, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for k, v in a["model_state"].items():
        assert torch.equal(v, b["model_state"][k]), k
    # the pseudo-labels took part: recorded in the metrics of the epochs after the first
    import csv

    rows = list(csv.DictReader(open(tmp_path / "straight" / "metrics.csv")))
    assert rows[0].get("pseudo_fitted") == "" and all(r["pseudo_fitted"] == "40" for r in rows[1:])  # 40 of 72
    assert all(int(r["pseudo_labels"]) > 0 for r in rows[1:])
    # the pool: epoch 2's kept fits, then those of epoch 3 and epoch 2's particles not fitted again
    assert rows[1]["pseudo_pool"] == rows[1]["pseudo_labels"]
    assert int(rows[2]["pseudo_pool"]) > int(rows[2]["pseudo_labels"])
    assert int(a["pseudo_pool"]["epoch"].min()) == 1 and int(a["pseudo_pool"]["epoch"].max()) == 2
    assert len(np.unique(a["pseudo_pool"]["rows"].numpy())) == len(a["pseudo_pool"]["rows"]) == int(rows[2]["pseudo_pool"])
    # the training's CPU time counts every epoch, those before the kill too (summary.json)
    resumed = list(csv.DictReader(open(tmp_path / "resumed" / "metrics.csv")))
    cpu = [float(r["cpu_seconds"]) for r in resumed]
    assert len(cpu) == 3 and min(cpu) > 0
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["cpu_seconds"] == pytest.approx(sum(cpu))


def test_scratch_vae_trains_on_particles_without_any_label(tmp_path):
    """vae_init scratch needs no HEMNMA output: it trains on a STAR file as preprocessing wrote it
    (no angles, origins or amplitudes) — pose steps, pseudo-labels, reconstruction, validation
    and the test split — while the regressor's start on the same file stops with the one-line
    error naming the file and the missing columns."""
    import starfile

    from deephemnma.core.errors import InputError
    from deephemnma.network.checkpoint import load_checkpoint
    from deephemnma.network.train import TrainSettings, train

    model = toy_model()
    labelled, _ = write_toy_dataset(tmp_path, model, n=60, box=16, px=4.0, seed=5, snr_noise_power=0.02, name="set1")
    star = starfile.read(labelled, always_dict=True)
    star["particles"] = star["particles"][["rlnImageName", "rlnOpticsGroup"]]
    bare = tmp_path / "bare.star"
    starfile.write(star, bare, overwrite=True)
    modes = write_modes(tmp_path / "modes.npz", model)
    net = {"model": "vae", "vae_init": "scratch", "vae_pseudo_after": 0.3, "vae_refine_iterations": 1,
           "arch": "convnet", "width": 4, "input_box": 16, "hidden": [16], "grid_directions": 12, "grid_inplane": 4,
           "epochs": 3, "steps_per_epoch": 3, "batch_size": 16, "engine": "single", "device": "cpu",
           "val_fraction": 0.15, "test_fraction": 0.15, "vae_shift_range": 4.0, "warmup_epochs": 0}
    s = TrainSettings.from_config({"network": net})
    assert s.vae_pseudo_fraction == 0.5 and s.vae_prior_rmsd == 6.0 and s.vae_pretrain == 0.7  # scratch defaults
    assert (s.vae_pseudo_data, s.vae_pseudo_particles) == ("set1", 512)
    res = train(bare, tmp_path / "net", s, modes=modes, resume=False)
    ck = load_checkpoint(tmp_path / "net" / "best.pt")
    assert ck["epoch"] >= 1 and res.best_epoch >= 1
    summary = json.loads((tmp_path / "net" / "summary.json").read_text())
    assert summary["data"]["n_test"] > 0 and summary["data"]["n_val"] > 0
    assert "test" not in summary  # no label: the test split gets no figures, and no error
    with pytest.raises(InputError, match=r"bare\.star.*missing label column"):
        train(bare, tmp_path / "net2", TrainSettings.from_config({"network": {**net, "vae_init": "regressor"}}),
              modes=modes, resume=False)
