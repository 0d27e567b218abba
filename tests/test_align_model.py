"""Units of the alignment: model, projector, coarse model, mode loading, template bank, grids."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deephemnma.core import geometry
from deephemnma.align import load_model, model_from_modes
from deephemnma.align.levels import Level, LevelData, crop_rfft, ctf_for_level
from deephemnma.align.refine import rotation_from_vector
from deephemnma.align.search import TemplateBank, _band_index, orientation_grid, shift_grid
from deephemnma.align.synthetic import toy_modes
from deephemnma.core.errors import InputError
from deephemnma.core.modes import load_modes
from deephemnma.core.projection import project_gaussians


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


@pytest.fixture(scope="module")
def modes_file(tmp_path_factory):
    return toy_modes(tmp_path_factory.mktemp("toy") / "modes.npz", n_atoms=120, seed=1, n_modes=4)


@pytest.fixture(scope="module")
def model(modes_file):
    return load_model(modes_file)


def test_model_from_mode_file_centre_and_selection(modes_file):
    ms = load_modes(modes_file)
    m = load_model(modes_file)
    assert m.mode_numbers.tolist() == [7, 8, 9]                      # the file's selection
    np.testing.assert_allclose(m.coords, ms.coords - ms.centre)       # relative to the mode file's centre
    np.testing.assert_allclose(m.vectors, ms.modes)
    np.testing.assert_allclose(np.linalg.norm(m.vectors.reshape(3, -1), axis=1), 1.0, rtol=1e-9)
    m4 = load_model(modes_file, select=[7, 10])                       # mode 10 from the computed modes
    np.testing.assert_allclose(m4.vectors[1], ms.mode(10))
    with pytest.raises(InputError, match="mode 40"):
        load_model(modes_file, select=[7, 40])
    assert load_model(modes_file, atom_sigma=2.5).sigma.tolist() == [2.5] * m.n_atoms


def test_project_matches_project_gaussians_and_gradients(model):
    rng = np.random.default_rng(0)
    R = torch.as_tensor(geometry.random_rotations(3, rng))
    o = torch.as_tensor(rng.normal(size=(3, 2)) * 2)
    o[0] = 40.0  # particle partly outside the box
    q = torch.as_tensor(rng.normal(size=(3, 3)) * 30)
    ours = model.project(R, o, q, 48, 1.2, extra_sigma=0.6)
    X = torch.as_tensor(model.deform(q.numpy()))
    ref = project_gaussians(X, model.weights, np.sqrt(model.sigma ** 2 + 0.36), R, 48, 1.2, o)
    assert float((ours - ref).abs().max()) < 1e-6 * float(ref.abs().max())  # Gaussians cut at 5 σ

    o = o.clone().requires_grad_(True)
    q = q.clone().requires_grad_(True)
    w = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)

    def f(w, o, q):
        return model.project(rotation_from_vector(w) @ R, o, q, 16, 3.0, 1.0)

    assert torch.autograd.gradcheck(f, (w, o, q), eps=1e-6, atol=1e-6)


def test_coarse_model_keeps_mass_and_centroid_motion(model):
    c = model.coarse(4.0)
    assert c.n_atoms < model.n_atoms
    assert np.isclose(c.weights.sum(), model.weights.sum())
    q = np.array([[40.0, -25.0, 10.0]])
    w = model.weights / model.weights.sum()
    full_centroid = (w[:, None] * model.deform(q)[0]).sum(0)
    wc = c.weights / c.weights.sum()
    assert np.allclose((wc[:, None] * c.deform(q)[0]).sum(0), full_centroid, atol=1e-9)
    # the same low-resolution image
    R = torch.as_tensor(geometry.random_rotations(2, np.random.default_rng(1)), dtype=torch.float32)
    qq = torch.as_tensor(np.repeat(q, 2, 0), dtype=torch.float32)
    a = model.project(R, None, qq, 32, 2.6, 1.3).reshape(2, -1)
    b = c.project(R, None, qq, 32, 2.6, 1.3).reshape(2, -1)
    cc = torch.nn.functional.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True))
    assert float(cc.min()) > 0.99


def test_volume_integrates_to_total_weight(model):
    vol = model.volume(None, 48, 1.5)
    assert np.isclose(vol.sum() * 1.5 ** 3, model.weights.sum(), rtol=1e-3)


def test_template_bank_matches_analytic_projection(model):
    lv = Level.make(32, 64, 1.3)
    conf = np.array([[0.0, 0.0, 0.0], [30.0, -20.0, 15.0]])
    bank = TemplateBank(model, lv, 30.0, conf)
    k = _band_index(lv)
    for t in (0, 17, len(bank) - 5):
        e, q = bank.template_pose(np.array([t]))
        P = model.project(torch.as_tensor(geometry.euler_to_matrix(e), dtype=torch.float32), None,
                          torch.as_tensor(q, dtype=torch.float32), 32, lv.pixel_size, lv.blur)
        F = torch.fft.rfft2(P).reshape(-1)[k]
        T = torch.complex(bank.mat[t, :len(k)], bank.mat[t, len(k):])
        cc = float((F.conj() * T).real.sum() / F.abs().pow(2).sum().sqrt() / T.abs().pow(2).sum().sqrt())
        assert cc > 0.999


def test_search_finds_exact_templates(model):
    """Images drawn exactly at grid poses and grid origins are found at their own template."""
    lv = Level.make(32, 32, 2.0)
    bank = TemplateBank(model, lv, 30.0, np.zeros((1, 3)))
    rng = np.random.default_rng(2)
    t = rng.choice(len(bank), 6, replace=False)
    e, q = bank.template_pose(t)
    origins = rng.integers(-2, 3, size=(6, 2)).astype(float) * lv.pixel_size
    imgs = model.project(torch.as_tensor(geometry.euler_to_matrix(e), dtype=torch.float32),
                         torch.as_tensor(origins / lv.pixel_size, dtype=torch.float32),
                         torch.as_tensor(q, dtype=torch.float32), 32, lv.pixel_size, lv.blur)
    data = LevelData.build(torch.fft.rfft2(imgs), ctf_for_level(None, "none", lv, 6), lv)
    cand = bank.search(data, 6.0, 3)  # a disc of 3 px: every origin of the test
    err = geometry.geodesic_angle(geometry.euler_to_matrix(cand.euler[:, 0]), geometry.euler_to_matrix(e))
    assert err.max() < 1e-3
    np.testing.assert_allclose(cand.origins[:, 0], origins, atol=1e-9)
    assert (cand.score[:, 0] > 0.99).all() and (cand.score[:, 0] >= cand.score[:, 1]).all()
    # the other candidates are distinct poses (non-maximum suppression)
    sep = geometry.geodesic_angle(geometry.euler_to_matrix(cand.euler[:, 1]), geometry.euler_to_matrix(cand.euler[:, 0]))
    assert (sep >= 2 * 30.0 - 1e-6).all()


def test_orientation_grid_covers_so3():
    step = 15.0
    grid = geometry.euler_to_matrix(orientation_grid(step))
    rnd = geometry.random_rotations(300, np.random.default_rng(3))
    # nearest grid rotation of each random one
    tr = np.einsum("aij,bij->ab", rnd, grid)
    nearest = np.degrees(np.arccos(np.clip((tr.max(1) - 1) / 2, -1, 1)))
    assert nearest.max() < step


def test_shift_grid_and_fourier_crop():
    g = shift_grid(1.5)
    assert g.shape == (9, 2) and (g[0] == 0).all() and np.abs(g).max() == 1
    img = torch.randn(2, 64, 64, dtype=torch.float64)
    small = torch.fft.irfft2(crop_rfft(torch.fft.rfft2(img), 32), s=(32, 32))
    # a band-limited image is preserved by cropping (same sample values at the coarse grid)
    F = torch.fft.rfft2(img)
    Fb = torch.zeros_like(F)
    Fb[:, :8, :8], Fb[:, -8:, :8] = F[:, :8, :8], F[:, -8:, :8]
    band = torch.fft.irfft2(Fb, s=(64, 64))
    small = torch.fft.irfft2(crop_rfft(Fb, 32), s=(32, 32))
    assert torch.allclose(small, band[:, ::2, ::2], atol=1e-10)


def test_model_from_mapping_without_centre():
    x = np.random.default_rng(4).normal(size=(20, 3)) * 5 + 7
    v = np.random.default_rng(5).normal(size=(2, 20, 3))
    v /= np.linalg.norm(v.reshape(2, -1), axis=1)[:, None, None]
    m = model_from_modes({"coords": x, "mode_numbers": np.array([7, 8]), "modes": v})
    np.testing.assert_allclose(m.coords.mean(0), 0, atol=1e-12)
    assert m.weights.tolist() == [1.0] * 20
