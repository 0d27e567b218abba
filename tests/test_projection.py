"""Projectors: axis conventions, analytic Gaussian vs Fourier slice, shifts, back-projection."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deephemnma.core.ctf import CTFParams, compute_ctf
from deephemnma.core.geometry import euler_to_matrix, random_rotations
from deephemnma.core.projection import (
    FourierAccumulator,
    FourierSliceProjector,
    fourier_shift,
    project_gaussians,
    recenter,
)


def blob_volume(coords, weights, sigma, box, pix):
    """Rasterised Gaussian atoms: integrated density per voxel, [z, y, x]."""
    g = (np.arange(box) - box // 2) * pix
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    vol = np.zeros((box,) * 3)
    norm = (2 * np.pi * sigma ** 2) ** 1.5
    for c, w in zip(coords, weights):
        vol += w * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * sigma ** 2)) / norm * pix ** 3
    return vol


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    box, pix, sigma = 40, 1.5, 2.0
    coords = rng.normal(scale=7.0, size=(25, 3))
    weights = rng.uniform(0.5, 2.0, 25)
    return dict(box=box, pix=pix, sigma=sigma, coords=coords, weights=weights,
                vol=blob_volume(coords, weights, sigma, box, pix))


def ncc(a, b):
    a = a - a.mean(axis=(-2, -1), keepdims=True)
    b = b - b.mean(axis=(-2, -1), keepdims=True)
    return (a * b).sum((-2, -1)) / np.sqrt((a * a).sum((-2, -1)) * (b * b).sum((-2, -1)))


def test_identity_projection_is_sum_over_z(model):
    img = FourierSliceProjector(model["vol"], 2).project(torch.eye(3)[None]).numpy()[0]
    np.testing.assert_allclose(img, model["vol"].sum(axis=0), atol=0.05 * model["vol"].sum(axis=0).max())
    assert ncc(img, model["vol"].sum(axis=0)) > 0.999


def test_tilt_90_projects_along_x(model):
    # A = Euler(0, 90, 0): an atom at (x, y, z) lands at (-z, y): image[y, x'] = Σ_x vol[z = -x', y, x]
    vol, box = model["vol"], model["box"]
    img = FourierSliceProjector(vol, 2).project(torch.tensor(euler_to_matrix([0, 90, 0]))[None]).numpy()[0]
    s = vol.sum(axis=2)  # [z, y]
    zi = (box - np.arange(box)) % box  # z index for x' index
    expected = s[zi, :].T
    np.testing.assert_allclose(img, expected, atol=0.05 * expected.max())
    assert ncc(img, expected) > 0.999


def test_single_atom_lands_at_rotated_position_minus_origin():
    box, pix = 64, 1.0
    r = np.array([[6.0, -4.0, 9.0]])
    A = euler_to_matrix([[30.0, 60.0, -20.0]])
    origin = np.array([[2.0, -3.0]])
    img = project_gaussians(r, [1.0], 1.0, torch.tensor(A), box, pix, origins_px=torch.tensor(origin))[0].numpy()
    y, x = np.unravel_index(np.argmax(img), img.shape)
    expected = (A[0] @ r[0])[:2] + box // 2 - origin[0]
    assert abs(x - expected[0]) <= 0.5 and abs(y - expected[1]) <= 0.5
    assert img.sum() == pytest.approx(1.0, rel=1e-6)


def test_gaussian_projector_matches_fourier_slice(model):
    rng = np.random.default_rng(1)
    R = torch.tensor(random_rotations(12, rng))
    origins = torch.tensor(rng.uniform(-3, 3, (12, 2)))
    fs = FourierSliceProjector(model["vol"], 2).project(R, origins).numpy()
    ga = project_gaussians(model["coords"], model["weights"], model["sigma"], R, model["box"], model["pix"], origins).numpy()
    assert ncc(fs, ga).min() > 0.999
    # a wrong convention is clearly worse
    gt = project_gaussians(model["coords"], model["weights"], model["sigma"], R.transpose(1, 2), model["box"], model["pix"], origins).numpy()
    gs = project_gaussians(model["coords"], model["weights"], model["sigma"], R, model["box"], model["pix"], -origins).numpy()
    assert ncc(fs, gt).mean() < 0.9 and ncc(fs, gs).mean() < 0.95


def test_fourier_shift_integer_is_exact_roll():
    rng = np.random.default_rng(2)
    img = torch.tensor(rng.standard_normal((2, 32, 32)))
    out = fourier_shift(img, torch.tensor([[3.0, -5.0], [0.0, 7.0]]))
    np.testing.assert_allclose(out[0].numpy(), np.roll(img[0].numpy(), (-5, 3), axis=(0, 1)), atol=1e-10)
    np.testing.assert_allclose(out[1].numpy(), np.roll(img[1].numpy(), (7, 0), axis=(0, 1)), atol=1e-10)


def test_recenter_undoes_origin(model):
    rng = np.random.default_rng(3)
    R = torch.tensor(random_rotations(4, rng))
    origins = torch.tensor(rng.uniform(-4, 4, (4, 2)))
    proj = FourierSliceProjector(model["vol"], 2)
    shifted = proj.project(R, origins)
    np.testing.assert_allclose(recenter(shifted, origins).numpy(), proj.project(R).numpy(), atol=1e-4 * shifted.abs().max().item())


def test_backprojection_reconstructs_volume(model):
    rng = np.random.default_rng(4)
    n = 600
    R = torch.tensor(random_rotations(n, rng))
    origins = torch.tensor(rng.uniform(-3, 3, (n, 2)))
    imgs = FourierSliceProjector(model["vol"], 2).project(R, origins)
    acc = FourierAccumulator(model["box"], oversample=2)
    acc.insert(imgs, R, origins)
    rec = acc.reconstruct().numpy()
    assert np.corrcoef(rec.ravel(), model["vol"].ravel())[0, 1] > 0.99
    # the wrong shift sign in reconstruction is clearly worse
    bad = FourierAccumulator(model["box"], oversample=2)
    bad.insert(imgs, R, -origins)
    assert np.corrcoef(bad.reconstruct().numpy().ravel(), model["vol"].ravel())[0, 1] < 0.9


def test_backprojection_with_ctf(model):
    rng = np.random.default_rng(5)
    n, box, pix = 600, model["box"], model["pix"]
    R = torch.tensor(random_rotations(n, rng))
    defocus = rng.uniform(5000, 15000, n)
    ctf = compute_ctf(CTFParams.constant(n, defocus=0.0, voltage=300, cs=2.7, amp_contrast=0.1).__class__(
        defocus, defocus, 0.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0), box, pix)
    imgs = FourierSliceProjector(model["vol"], 2).project(R, ctf=ctf)
    acc = FourierAccumulator(box, oversample=2)
    acc.insert(imgs, R, ctf=ctf)
    rec = acc.reconstruct().numpy()
    assert np.corrcoef(rec.ravel(), model["vol"].ravel())[0, 1] > 0.97
