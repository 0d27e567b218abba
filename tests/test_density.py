"""Atoms → density: scattering weights, units, centring, agreement with the projectors."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from deephemnma.core import density
from deephemnma.core.density import AtomProfiles, atoms_to_images, atoms_to_volume, scattering_weights
from deephemnma.core.geometry import random_rotations
from deephemnma.core.projection import FourierSliceProjector, project_gaussians

from _sim_helpers import blob


def corr(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def lowpass(images, pixel_size, resolution):
    x = torch.as_tensor(images, dtype=torch.float64)
    D = x.shape[-1]
    ky = torch.fft.fftfreq(D, d=pixel_size, dtype=torch.float64)
    kx = torch.fft.rfftfreq(D, d=pixel_size, dtype=torch.float64)
    keep = (ky[:, None] ** 2 + kx[None] ** 2) <= 1 / resolution ** 2
    return torch.fft.irfft2(torch.fft.rfft2(x) * keep, s=(D, D)).numpy()


@pytest.mark.parametrize("element", ["H", "C", "N", "O", "S", "P"])
def test_single_atom_integrates_to_its_scattering_weight(element):
    rng = np.random.default_rng(1)
    pos = rng.uniform(-0.5, 0.5, (1, 3))  # sub-voxel offsets
    vol = atoms_to_volume(pos, [element], box=32, pixel_size=0.4)
    assert vol.dtype == np.float32 and vol.shape == (32, 32, 32)
    w = scattering_weights([element])[0]
    assert vol.sum() == pytest.approx(w, rel=2e-4)
    # the Peng (1996) forward scattering values (International Tables C 4.3.2.2)
    expected = {"H": 0.5288, "C": 2.5088, "N": 2.2135, "O": 1.9834, "S": 5.1604, "P": 5.4876}[element]
    assert w == pytest.approx(expected, abs=1e-4)
    # centre of mass at the atom (voxel box//2 is the origin), up to the quantisation of its
    # sub-voxel-sharp core (a voxel holds the core's whole weight at its centre)
    g = np.arange(32) - 16
    com = [(vol.sum(axis=(0, 1)) * g).sum() / vol.sum(), (vol.sum(axis=(0, 2)) * g).sum() / vol.sum(),
           (vol.sum(axis=(1, 2)) * g).sum() / vol.sum()]
    np.testing.assert_allclose(np.array(com) * 0.4, pos[0], atol=0.01)


def test_element_ordering_weights_and_peaks():
    els = ["S", "O", "N", "C", "H"]
    w = dict(zip(els, scattering_weights(els)))
    # integrated (forward) electron scattering is not ordered by Z for light atoms
    assert w["S"] > w["C"] > w["N"] > w["O"] > w["H"]
    # the peak density (how compact the atom is) is ordered S > O > N > C > H
    peaks = {}
    for e in els:
        vol = atoms_to_volume(np.zeros((1, 3)), [e], box=24, pixel_size=0.25)
        peaks[e] = vol.max()
    assert peaks["S"] > peaks["O"] > peaks["N"] > peaks["C"] > peaks["H"] > 0
    # a B-factor spreads the atom without changing its integral
    v0 = atoms_to_volume(np.zeros((1, 3)), ["C"], box=40, pixel_size=0.25)
    v1 = atoms_to_volume(np.zeros((1, 3)), ["C"], box=40, pixel_size=0.25, b_factor=30.0)
    assert v1.sum() == pytest.approx(v0.sum(), rel=1e-4) and v1.max() < 0.5 * v0.max()


def test_fourier_transform_of_the_map_is_the_scattering_factor():
    """Guards the b ↔ σ conversion: the map's 3-D DFT at k equals f_e(|k|/2) times the
    transform of the voxel box (sinc per axis), for an atom at the origin."""
    px, D = 0.25, 48
    for e in ("C", "O", "S"):
        vol = atoms_to_volume(np.zeros((1, 3)), [e], box=D, pixel_size=px, b_factor=5.0).astype(np.float64)
        F = np.fft.fftn(np.fft.ifftshift(vol))  # origin at index 0
        k = np.fft.fftfreq(D, d=px)
        for i in range(1, 6):  # |k| up to 0.42 Å⁻¹ along x, then along a diagonal
            for kv, val in (((k[i], 0, 0), F[0, 0, i]), ((k[i], k[i], k[i]), F[i, i, i])):
                s = np.linalg.norm(kv) / 2
                f = density.scattering_factor([e], [s], b_factor=5.0)[0, 0]
                box = np.prod([np.sinc(c * px) for c in kv])
                assert val.real == pytest.approx(f * box, rel=2e-3)
                assert abs(val.imag) < 1e-6 * abs(val.real) + 1e-9


def test_projection_of_volume_equals_direct_projection():
    """atoms_to_images is the z-integral of the voxel map rasterised in the particle's frame."""
    x, el = blob(60, seed=3, radius=6.0)
    prof = AtomProfiles.peng(el, b_factor=10.0)
    vol = atoms_to_volume(x, profiles=prof, box=40, pixel_size=0.7)
    img = atoms_to_images(x, np.eye(3)[None], prof, 40, 0.7)[0].numpy()
    np.testing.assert_allclose(img, vol.sum(axis=0), atol=1e-5 * vol.sum(axis=0).max())
    # a rotation: rasterise the rotated atoms → same as rotating first
    R = random_rotations(1, np.random.default_rng(0))
    volr = atoms_to_volume(x @ R[0].T, profiles=prof, box=40, pixel_size=0.7)
    imgr = atoms_to_images(x, R, prof, 40, 0.7)[0].numpy()
    np.testing.assert_allclose(imgr, volr.sum(axis=0), atol=1e-5 * imgr.max())


def test_batched_volumes_match_single():
    x, el = blob(40, seed=4, radius=5.0)
    X = np.stack([x, x * 1.1, x + 0.3])
    vols = atoms_to_volume(X, el, box=24, pixel_size=0.8)
    assert vols.shape == (3, 24, 24, 24)
    for b in range(3):
        np.testing.assert_allclose(vols[b], atoms_to_volume(X[b], el, box=24, pixel_size=0.8), atol=1e-6)


def test_agrees_with_gaussian_projector_and_fourier_slice():
    """Same atoms, same orientations and origins: the density projections agree with the
    analytic Gaussian projector at low resolution and with the Fourier-slice projection of
    the rasterised volume — units and centring match across the project."""
    x, el = blob(250, seed=5, radius=14.0)
    prof = AtomProfiles.peng(el)
    D, px = 64, 1.0
    rng = np.random.default_rng(7)
    R = random_rotations(4, rng)
    origins = rng.uniform(-3, 3, (4, 2))
    img = atoms_to_images(x, R, prof, D, px, origins).numpy()
    gauss = project_gaussians(torch.as_tensor(x), torch.as_tensor(prof.total), 1.0, torch.as_tensor(R), D, px,
                              torch.as_tensor(origins)).numpy()
    fs = FourierSliceProjector(atoms_to_volume(x, el, box=D, pixel_size=px), oversample=2).project(
        torch.as_tensor(R, dtype=torch.float32), torch.as_tensor(origins)).numpy()
    for i in range(4):
        assert img[i].sum() == pytest.approx(prof.total.sum(), rel=1e-4)  # particle inside the box
        assert img[i].sum() == pytest.approx(gauss[i].sum(), rel=1e-3)
        assert corr(lowpass(img[i], px, 6.0), lowpass(gauss[i], px, 6.0)) > 0.99
        # the Fourier slice interpolates the volume's transform: close, not exact, at full resolution
        assert corr(img[i], fs[i]) > 0.95
        assert corr(lowpass(img[i], px, 3.0), lowpass(fs[i], px, 3.0)) > 0.99
        # a wrong centring or shift sign would decorrelate
        assert corr(lowpass(img[i], px, 6.0), lowpass(np.roll(gauss[i], 3, axis=1), px, 6.0)) < 0.95


def test_gaussian_atoms_mode_and_edges():
    x = np.array([[0.0, 0.0, 0.0], [3.0, -2.0, 1.0]])
    vol = atoms_to_volume(x, weights=[2.0, 3.0], sigma=1.2, box=32, pixel_size=0.5)
    assert vol.sum() == pytest.approx(5.0, rel=1e-4)
    img = project_gaussians(torch.as_tensor(x), torch.tensor([2.0, 3.0]), 1.2, torch.eye(3)[None].double(), 32, 0.5)
    # pixel integrals vs point samples of a 2.4-pixel Gaussian: equal to ~(px/σ)²/12
    np.testing.assert_allclose(vol.sum(axis=0), img[0].numpy(), atol=0.02 * img.max().item())
    # atoms outside the box are dropped, not wrapped
    out = atoms_to_volume(np.array([[30.0, 0, 0]]), ["C"], box=16, pixel_size=1.0)
    assert out.sum() == 0


def test_unknown_element_counts_as_carbon(caplog):
    with caplog.at_level(logging.WARNING, logger="deephemnma"):
        w = scattering_weights(["Xx", "C", "D"])
    assert w[0] == pytest.approx(w[1]) and w[2] == pytest.approx(scattering_weights(["H"])[0])
    assert "carbon" in caplog.text
