"""Contrast-polarity detection (deephemnma.core.polarity) on independently simulated particles.

The particles come from tests/_independent_sim.py: its own PDB parser, atom projector and a
CTF written from RELION's formula, nothing from the package. Its CTF is first checked
against deephemnma.core.ctf: two implementations, one answer.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deephemnma.core.ctf import CTFParams, compute_ctf
from deephemnma.core.errors import InputError
from deephemnma.core.polarity import blob_profile, detect_polarity, detect_polarity_star, resolve_invert

import _independent_sim as sim

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ak_atoms():
    if not sim.AK_PDB.is_file():
        pytest.skip(f"{sim.AK_PDB} is absent")
    return sim.read_pdb_atoms()


@pytest.fixture(scope="module")
def reference(ak_atoms):
    class Ref:  # what the detector receives: coordinates (Å) and density weights
        coords = sim.centred(*ak_atoms)
        weights = ak_atoms[1]
    return Ref()


@pytest.fixture(scope="module")
def clean_sets(ak_atoms):
    """Two small independent noise-free sets (120 particles, 64², 1.3 Å, 0.5–2.5 µm)."""
    return [sim.simulate_clean(120, 64, 1.3, seed=s, atoms=ak_atoms) for s in (11, 12)]


def params_of(s) -> CTFParams:
    c = s.ctf
    return CTFParams(c["defocus_u"], c["defocus_v"], c["defocus_angle"], c["voltage"], c["cs"], c["amp_contrast"],
                     c["phase_shift"], c["bfactor"], 1.0)


def test_independent_ctf_matches_package_ctf():
    rng = np.random.default_rng(3)
    for _ in range(12):
        box = int(rng.choice([32, 64, 96, 128]))
        px = float(rng.uniform(0.5, 3.0))
        p = dict(defocus_u=rng.uniform(3000, 40000), defocus_v=rng.uniform(3000, 40000),
                 defocus_angle=rng.uniform(-180, 180), voltage=float(rng.choice([120.0, 200.0, 300.0])),
                 cs=rng.uniform(0.0, 3.0), amp_contrast=rng.uniform(0.02, 0.3), phase_shift=rng.uniform(0, 120),
                 bfactor=rng.uniform(0, 200))
        mine = sim.ctf_2d(box, px, **p)
        theirs = compute_ctf(CTFParams(**p, scale=1.0), box, px, rfft=False, dtype=torch.float64)[0].numpy()
        np.testing.assert_allclose(mine, theirs, atol=1e-6, rtol=0)
    # RELION's sign: CTF(0) = +sin(asin(Q0)) = Q0 > 0
    assert sim.ctf_2d(64, 1.0, 10000, 10000, 0, amp_contrast=0.1)[0, 0] == pytest.approx(0.1)


def test_independent_rotation_matches_package_convention():
    from deephemnma.core import geometry

    e = sim.random_eulers(np.random.default_rng(0), 8)
    for i in range(len(e)):
        np.testing.assert_allclose(sim.euler_matrix(*e[i]), geometry.euler_to_matrix(e[i]), atol=1e-12)


@pytest.mark.parametrize("polarity", ["white", "dark"])
@pytest.mark.parametrize("flipped", [False, True], ids=["raw", "flipped"])
def test_detects_polarity_at_snr_0_1(clean_sets, reference, polarity, flipped):
    for k, cs in enumerate(clean_sets):
        s = sim.add_noise(cs, 0.1, polarity, phase_flipped=flipped, seed=100 + k)
        d = detect_polarity(s.images, params_of(s), s.pixel_size, reference, phase_flipped=flipped)
        assert d.polarity == polarity, d.summary()
        assert d.invert == (polarity == "dark")
        assert abs(d.zscore) > 2 * d.threshold
        assert d.n_particles == len(s)
        # a radius alone (the default sphere) decides too
        d = detect_polarity(s.images, params_of(s), s.pixel_size, None, phase_flipped=flipped)
        assert d.polarity == polarity, d.summary()


def test_premultiplied_and_mixed_flags(clean_sets, reference):
    cs = clean_sets[0]
    a = sim.add_noise(cs, 0.1, "dark", premultiplied=True, seed=5)
    b = sim.add_noise(cs, 0.1, "dark", phase_flipped=True, seed=6)
    half = np.arange(len(cs)) % 2 == 0                   # even rows premultiplied, odd rows flipped
    images = np.where(half[:, None, None], a.images, b.images)
    d = detect_polarity(images, params_of(a), a.pixel_size, reference, phase_flipped=~half, ctf_premultiplied=half)
    assert d.polarity == "dark", d.summary()
    assert d.evidence["modes"] == {"flipped": int((~half).sum()), "premultiplied": int(half.sum())}


@pytest.mark.parametrize("flipped", [False, True], ids=["raw", "flipped"])
def test_inconclusive_on_pure_noise(clean_sets, reference, flipped):
    zs = []
    for k in range(4):
        s = sim.add_noise(clean_sets[k % 2], 0.1, "white", phase_flipped=flipped, signal_scale=0.0, seed=200 + k)
        d = detect_polarity(s.images, params_of(s), s.pixel_size, reference, phase_flipped=flipped)
        assert d.polarity == "inconclusive" and d.invert is None and not d.conclusive, d.summary()
        zs.append(d.zscore)
    assert max(abs(z) for z in zs) < 4


def test_blob_profiles_agree(reference, ak_atoms):
    """Atoms, the same atoms as a map, and the equivalent sphere give similar blobs."""
    k = np.linspace(0, 0.04, 9)
    b_atoms, desc = blob_profile(reference, k)
    vol = sim.rasterise_volume(sim.centred(*ak_atoms), ak_atoms[1], 64, 1.5)
    b_map, _ = blob_profile(vol, k, voxel_size=1.5)
    b_sphere, _ = blob_profile(np.sqrt(5 / 3) * desc["radius_of_gyration"], k)
    assert b_atoms[0] == pytest.approx(1.0) and b_map[0] == pytest.approx(1.0)
    np.testing.assert_allclose(b_map, b_atoms, atol=0.03)
    np.testing.assert_allclose(b_sphere, b_atoms, atol=0.1)
    b_file, d_file = blob_profile(str(sim.AK_PDB), k)      # the config's reference.path, read by the package
    assert d_file["n_points"] == len(ak_atoms[0])
    np.testing.assert_allclose(b_file, b_atoms, atol=1e-6)


def test_from_star_and_resolve(tmp_path, clean_sets, reference):
    """A RELION 3.1 STAR + stack of dark, phase-flipped particles: detected from a sample of
    the file; ``auto`` inverts, explicit settings win, pure noise under ``auto`` is an error."""
    cs = clean_sets[1]
    star = sim.write_relion(sim.add_noise(cs, 0.1, "dark", phase_flipped=True, seed=9), tmp_path / "dark" / "p.star")
    d = detect_polarity_star(star, reference, n_particles=80)
    assert d.polarity == "dark" and d.n_particles == 80, d.summary()
    assert d.evidence["modes"] == {"flipped": 80}
    assert resolve_invert("auto", star, reference, n_particles=80)[0] is True
    assert resolve_invert(False, star, reference) == (False, None)
    assert resolve_invert("true", star, reference) == (True, None)
    noise = sim.write_relion(sim.add_noise(cs, 0.1, "white", signal_scale=0.0, seed=10), tmp_path / "noise" / "p.star")
    with pytest.raises(InputError, match="invert_contrast"):
        resolve_invert("auto", noise, reference, n_particles=40)
