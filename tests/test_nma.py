"""Normal modes: elastic network, RTB, pseudoatoms, selection, deformation, the modes file, CLI.

Physics check on real data (../shared/data/adenylate_kinase): the open→closed displacement of
adenylate kinase (4AKE → 1AKE, chain A, Cα) lies largely in the lowest non-rigid modes.
"""
from __future__ import annotations

import json

import gemmi
import mrcfile
import numpy as np
import pytest
import torch

from deephemnma.nma import enm
from deephemnma.core.errors import ConfigError, InputError
from deephemnma.core.modes import amplitudes_to_rmsd, deform, load_modes, save_modes
from deephemnma.nma import animate, compute_modes, run_nma, select_modes
from deephemnma.nma.pseudoatoms import MapVolume, fit_pseudoatoms, read_map, render_pseudoatoms
from deephemnma.core.structure import load_structure, match_atoms, superpose


def _random_rotation(seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


@pytest.fixture(scope="module")
def ak_heavy(ak_dir):
    return load_structure(ak_dir / "4ake.pdb", chains=["A"], atoms="heavy")


@pytest.fixture(scope="module")
def ak_full(ak_heavy):
    return compute_modes(ak_heavy.coords, 8.0, n_modes=20, method="full")


@pytest.fixture(scope="module")
def ak_ca(ak_dir):
    return load_structure(ak_dir / "4ake.pdb", chains=["A"], atoms="ca")


def _cols(res):
    return res.vectors.reshape(len(res.eigenvalues), -1).T        # (3N, K)


# ----------------------------------------------------------------------------- ENM basics


def test_hessian_structure(ak_ca):
    H = enm.hessian(ak_ca.coords, 12.0)
    assert H.shape == (3 * 214, 3 * 214)
    assert abs(H - H.T).max() < 1e-12
    # rigid-body motions cost no energy
    B = enm.rigid_body_basis(ak_ca.coords)
    assert np.abs(B.T @ B - np.eye(6)).max() < 1e-12
    assert np.abs(H @ B).max() < 1e-10
    # a spring's energy: stretching one pair changes ½ uᵀHu by ½ (stretch)² per spring
    pairs = enm.contact_pairs(ak_ca.coords, 12.0)
    assert H.diagonal().sum() == pytest.approx(2 * len(pairs))
    assert np.all(np.linalg.norm(ak_ca.coords[pairs[:, 0]] - ak_ca.coords[pairs[:, 1]], axis=1) < 12.0)


def test_six_zero_modes_orthonormal_residuals(ak_heavy, ak_full):
    w = ak_full.eigenvalues
    tol = ak_full.info["zero_tolerance"]
    assert ak_full.info["n_zero_modes"] == 6
    assert np.all(np.abs(w[:6]) < tol)                              # tol = 1e-6 × mean diagonal ≈ 2.5e-5
    assert np.all(np.abs(w[:6]) < 1e-12)                            # in fact at round-off level
    assert w[6] > 100 * tol and np.all(np.diff(w[6:]) > 0)
    V = _cols(ak_full)
    assert np.abs(V.T @ V - np.eye(20)).max() < 1e-10
    H = enm.hessian(ak_heavy.coords, 8.0)
    resid = np.linalg.norm(H @ V - V * w, axis=0)
    assert resid.max() < 1e-8
    # deterministic sign: largest-magnitude component positive
    idx = np.abs(V).argmax(axis=0)
    assert np.all(V[idx, np.arange(20)] > 0)
    coll = enm.collectivity(ak_full.vectors)
    assert np.all((coll > 1 / 1656) & (coll <= 1 + 1e-12))
    assert coll[:3] == pytest.approx(1.0)                           # translations move every atom equally


def test_rotated_input_gives_rotated_modes(ak_heavy, ak_full):
    R = _random_rotation(3)
    rot = compute_modes(ak_heavy.coords @ R.T + np.array([5.0, -3.0, 12.0]), 8.0, n_modes=20, method="full")
    np.testing.assert_allclose(rot.eigenvalues[6:], ak_full.eigenvalues[6:], rtol=1e-8)
    A = (ak_full.vectors @ R.T).reshape(20, -1)                     # rotated original modes
    B = rot.vectors.reshape(20, -1)
    # subspaces of modes 7–12 and (one by one) of the well-separated modes 7–9 agree
    s = np.linalg.svd(A[6:12] @ B[6:12].T, compute_uv=False)
    assert s.min() > 0.999
    for k in range(6, 9):
        assert abs(A[k] @ B[k]) > 0.999
    # the rigid-body subspace is the same
    assert np.linalg.svd(A[:6] @ B[:6].T, compute_uv=False).min() > 1 - 1e-9


def test_open_to_closed_overlap(ak_dir, ak_ca):
    """Adenylate kinase closure 4AKE → 1AKE (Cα): overlap with modes 7–12 and cumulative 7–9."""
    closed = load_structure(ak_dir / "1ake.pdb", chains=["A"], atoms="ca")
    ia, ib = match_atoms(ak_ca, closed)
    assert len(ia) == 214
    x_open = ak_ca.coords[ia]
    x_closed, r = superpose(closed.coords[ib], x_open)
    d = (x_closed - x_open).ravel()
    d /= np.linalg.norm(d)
    res = compute_modes(x_open, 12.0, n_modes=12)                   # Cα network, default Cα cutoff
    V = res.vectors.reshape(12, -1)
    ov = np.abs(V @ d)
    cum = float(np.sqrt((ov[6:9] ** 2).sum()))
    print(f"\nAK open→closed (Cα RMSD {r:.2f} Å), Cα ENM 12 Å: overlaps modes 7–12 "
          f"{np.round(ov[6:12], 3).tolist()}, cumulative 7–9 {cum:.3f}")
    assert cum >= 0.5
    assert ov[6] == ov[6:12].max()                                  # the lowest mode is the closure


def test_open_to_closed_overlap_heavy_atom_modes(ak_dir, ak_heavy, ak_full):
    """The same with the demo's all-heavy-atom modes, read at the Cα atoms."""
    ca = load_structure(ak_dir / "1ake.pdb", chains=["A"], atoms="ca")
    is_ca = ak_heavy.atom_name == "CA"
    open_ca = ak_heavy.subset(is_ca)
    ia, ib = match_atoms(open_ca, ca)
    x_closed, _ = superpose(ca.coords[ib], open_ca.coords[ia])
    d = (x_closed - open_ca.coords[ia]).ravel()
    d /= np.linalg.norm(d)
    V = ak_full.vectors[:, is_ca][:, ia].reshape(20, -1)           # modes restricted to Cα (not unit norm)
    ov = np.abs(V @ d) / np.linalg.norm(V, axis=1)
    Q, _ = np.linalg.qr(V[6:9].T)                                   # cumulative = projection on span(7–9)
    cum = float(np.linalg.norm(Q.T @ d))
    print(f"\nAK open→closed, heavy-atom ENM 8 Å at Cα: overlaps modes 7–12 {np.round(ov[6:12], 3).tolist()}, "
          f"cumulative 7–9 {cum:.3f}")
    assert cum >= 0.5


# ----------------------------------------------------------------------------- RTB


def test_rtb_matches_full_low_modes(ak_heavy, ak_full):
    rtb = compute_modes(ak_heavy.coords, 8.0, n_modes=20, method="rtb", rtb_block=10,
                        residue_index=ak_heavy.residue_index(), chain_id=ak_heavy.chain_id)
    assert rtb.method == "rtb" and rtb.info["n_blocks"] == 21 and rtb.info["n_zero_modes"] == 6
    Vf = ak_full.vectors.reshape(20, -1)
    Vr = rtb.vectors.reshape(20, -1)
    assert np.abs(Vr @ Vr.T - np.eye(20)).max() < 1e-10            # expanded modes orthonormal over 3N
    per_mode = np.abs((Vf[6:9] * Vr[6:9]).sum(1))
    subspace = np.linalg.svd(Vf[6:9] @ Vr[6:9].T, compute_uv=False)
    print(f"\nRTB (10 residues/block) vs full, modes 7–9: |cos| {np.round(per_mode, 3).tolist()}, "
          f"subspace singular values {np.round(subspace, 3).tolist()}")
    assert per_mode.min() > 0.95                                    # measured 0.996, 0.992, 0.977
    assert subspace.min() > 0.95
    # RTB restricts motion, so its frequencies are higher (variational bound)
    assert np.all(rtb.eigenvalues[6:] >= ak_full.eigenvalues[6:] * (1 - 1e-9))


def test_rtb_projector_orthonormal_and_degenerate_blocks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)) * 5
    blocks = np.concatenate([np.repeat(np.arange(9), 4), [9, 10, 10, 11]])   # blocks 9, 11: 1 atom; 10: 2 atoms
    Pat, keep, nb = enm.rtb_projector(x, blocks)
    P = np.zeros((120, 6 * nb))
    for i, b in enumerate(blocks):
        P[3 * i:3 * i + 3, 6 * b:6 * b + 6] = Pat[i]
    P = P[:, keep]
    assert np.abs(P.T @ P - np.eye(P.shape[1])).max() < 1e-10
    assert nb == 12
    assert keep.sum() == 6 * nb - 2 * 3 - 1                         # 1 atom: no rotations; 2 atoms: one fewer


def test_rtb_spatial_blocks_without_residues(ak_heavy, ak_full):
    # references without residues (pseudoatoms) use k-means blocks of rtb_block atoms
    rtb = compute_modes(ak_heavy.coords, 8.0, n_modes=12, method="rtb", rtb_block=10)
    assert rtb.info["n_blocks"] == 166 and rtb.info["n_zero_modes"] == 6
    Vf = ak_full.vectors[6:9].reshape(3, -1)
    Vr = rtb.vectors[6:9].reshape(3, -1)
    assert np.linalg.svd(Vf @ Vr.T, compute_uv=False).min() > 0.95


def test_auto_method_switches_to_rtb(ak_heavy):
    small = compute_modes(ak_heavy.coords, 8.0, n_modes=8, method="auto", rtb_threshold=5000)
    big = compute_modes(ak_heavy.coords, 8.0, n_modes=8, method="auto", rtb_threshold=1000,
                        residue_index=ak_heavy.residue_index(), chain_id=ak_heavy.chain_id)
    assert small.method == "full" and big.method == "rtb"


# ----------------------------------------------------------------------------- bad networks


def test_disconnected_network_is_error(ak_ca):
    two = np.concatenate([ak_ca.coords, ak_ca.coords + np.array([200.0, 0, 0])])
    with pytest.raises(InputError, match=r"disconnected: 2 fragments .* 12 zero-frequency modes instead of 6"):
        compute_modes(two, 12.0, source="two.pdb")


def test_floppy_network_is_error(ak_heavy):
    # at 4.5 Å the heavy-atom network is connected but one more motion is free
    with pytest.raises(InputError, match=r"7 zero-frequency modes .* instead of 6"):
        compute_modes(ak_heavy.coords, 4.5, n_modes=10, method="full")


def test_coincident_atoms_is_error(ak_ca):
    x = np.concatenate([ak_ca.coords, ak_ca.coords[5:6]])
    with pytest.raises(InputError, match=r"same position \(e.g. atoms 6 and 215"):
        compute_modes(x, 12.0)


def test_too_few_atoms_is_error():
    with pytest.raises(InputError, match=r"only 3 atom\(s\)"):
        compute_modes(np.eye(3), 10.0)


# ----------------------------------------------------------------------------- selection


def test_select_modes():
    assert select_modes(20).tolist() == [7, 8, 9]
    assert select_modes(20, n_select=5).tolist() == [7, 8, 9, 10, 11]
    assert select_modes(20, [11, 7, 8]).tolist() == [7, 8, 11]
    with pytest.raises(ConfigError, match="rigid-body"):
        select_modes(20, [6, 7])
    with pytest.raises(ConfigError, match="raise nma.n_modes"):
        select_modes(20, [7, 25])
    with pytest.raises(ConfigError, match="twice"):
        select_modes(20, [7, 7])
    with pytest.raises(ConfigError, match="raise nma.n_modes"):
        select_modes(10, n_select=5)


# ----------------------------------------------------------------------------- deformation


def test_deform_and_rmsd(ak_heavy, ak_full):
    x0 = torch.as_tensor(ak_heavy.coords)
    modes = torch.as_tensor(ak_full.vectors[6:9])
    q = torch.tensor([[-200.0, 0.0, 200.0], [10.0, 20.0, 30.0]], dtype=torch.float64, requires_grad=True)
    x = deform(x0, modes, q)
    assert x.shape == (2, 1656, 3) and x.dtype == torch.float64
    expect = ak_heavy.coords + np.einsum("bm,mnk->bnk", q.detach().numpy(), ak_full.vectors[6:9])
    np.testing.assert_allclose(x.detach().numpy(), expect, atol=1e-10)
    x[1].sum().backward()                                           # differentiable: d(sum)/dq_k = sum(v_k)
    np.testing.assert_allclose(q.grad[1].numpy(), ak_full.vectors[6:9].sum(axis=(1, 2)), atol=1e-10)
    # float32 in, float32 out; single amplitude vector → (N, 3)
    x32 = deform(x0.float(), modes.float(), torch.tensor([1.0, 2.0, 3.0]))
    assert x32.dtype == torch.float32 and x32.shape == (1656, 3)
    # RMSD between the two deformed structures equals amplitudes_to_rmsd of the difference
    direct = float(torch.sqrt(((x[0] - x[1]) ** 2).sum(-1).mean()).detach())
    dq = (q[0] - q[1]).detach()
    assert float(amplitudes_to_rmsd(dq, modes)) == pytest.approx(direct, rel=1e-10)
    assert amplitudes_to_rmsd(dq.numpy(), ak_full.vectors[6:9]) == pytest.approx(direct, rel=1e-10)
    # DESIGN.md §4 scale: q = 200 on one mode of all-heavy-atom AK is ≈ 4.9 Å RMS
    assert amplitudes_to_rmsd(np.array([200.0, 0, 0]), ak_full.vectors[6:9]) == pytest.approx(200 / np.sqrt(1656))
    assert 200 / np.sqrt(1656) == pytest.approx(4.915, abs=1e-3)
    batch = amplitudes_to_rmsd(np.ones((4, 5, 3)), ak_full.vectors[6:9])
    assert batch.shape == (4, 5)


# ----------------------------------------------------------------------------- pseudoatoms


def _gaussian_map(centres, heights, sigma_vox, shape=(24, 24, 24)):
    z, y, x = np.indices(shape, dtype=np.float64)
    out = np.zeros(shape)
    for (cx, cy, cz), h in zip(centres, heights):
        out += h * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma_vox ** 2))
    return out


def test_pseudoatoms_synthetic_map():
    rng = np.random.default_rng(0)
    centres = 7 + rng.uniform(0, 10, size=(12, 3))
    data = _gaussian_map(centres, rng.uniform(1, 2, 12), 1.0)
    vol = MapVolume(data=data, voxel=1.5, origin=np.array([-18.0, -18.0, -18.0]))
    fit = fit_pseudoatoms(vol, sigma=1.5, target_error=0.05)
    assert fit.reached_target and fit.error <= 0.05 and fit.n_atoms >= 4
    model = render_pseudoatoms(fit.coords, fit.weights, fit.sigma, vol)
    assert np.corrcoef(model.ravel(), data.ravel())[0, 1] > 0.99
    # total mass is kept: Σ weights ≈ ∫ map (same units: map value × Å³)
    assert fit.weights.sum() == pytest.approx(data.sum() * 1.5 ** 3, rel=0.05)
    # coordinates in Å in the map frame: the model's centre of mass is the map's
    zyx = np.indices(data.shape).reshape(3, -1)
    com_map = -18.0 + 1.5 * (zyx[::-1] @ data.ravel()) / data.sum()
    np.testing.assert_allclose(fit.weights @ fit.coords / fit.weights.sum(), com_map, atol=0.1)


def test_pseudoatoms_nothing_above_threshold(tmp_path):
    p = tmp_path / "flat.mrc"
    with mrcfile.new(str(p)) as m:
        m.set_data(np.full((16, 16, 16), 0.25, dtype=np.float32))
        m.voxel_size = 2.0
    vol = read_map(p)
    with pytest.raises(InputError, match=r"no voxel above the threshold 1 \(map maximum 0.25\)"):
        fit_pseudoatoms(vol, threshold=1.0)


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_read_map_errors(tmp_path):
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"not a map" * 10)
    with pytest.raises(InputError, match="cannot read as an MRC map"):
        read_map(bad)
    with pytest.raises(InputError, match="not found"):
        read_map(tmp_path / "absent.mrc")
    nan = tmp_path / "nan.mrc"
    data = np.zeros((8, 8, 8), np.float32)
    data[1, 2, 3] = np.nan
    with mrcfile.new(str(nan)) as m:
        m.set_data(data)
        m.voxel_size = 1.0
    with pytest.raises(InputError, match="1 NaN"):
        read_map(nan)


def test_pseudoatoms_real_map(ak_dir):
    """1ake.mrc (64³, 2 Å/voxel): the default fit reaches the 5 % target; pseudoatoms sit on the atoms."""
    from scipy.spatial import cKDTree

    vol = read_map(ak_dir / "1ake.mrc")
    assert vol.voxel == 2.0 and vol.data.shape == (64, 64, 64)
    fit = fit_pseudoatoms(vol)
    print(f"\n1ake.mrc: {fit.n_atoms} pseudoatoms (σ {fit.sigma:.2f} Å), relative error {fit.error:.4f}")
    assert fit.reached_target and fit.error <= 0.05
    assert 300 < fit.n_atoms < 3000
    # the map was computed from 1AKE centred on its atoms' centroid (origin −64 Å: box centre at 0)
    atoms = load_structure(ak_dir / "1ake.pdb")
    x = atoms.coords - atoms.coords.mean(axis=0)
    dist, _ = cKDTree(x).query(fit.coords)
    assert np.median(dist) < 1.5
    res = compute_modes(fit.coords, 3.0 * fit.info["volume_per_pseudoatom_A3"] ** (1 / 3), n_modes=10)
    assert res.info["n_zero_modes"] == 6


# ----------------------------------------------------------------------------- modes file


def _config(**nma):
    from deephemnma.core.config import validate_config

    return validate_config({"reference": {"chains": ["A"]}, "nma": nma})


def test_run_nma_file_contents_and_reproducible(ak_dir, tmp_path):
    cfg = _config(modes=[7, 8, 9, 11])
    ms = run_nma(ak_dir / "4ake.pdb", tmp_path / "a.npz", cfg)
    run_nma(ak_dir / "4ake.pdb", tmp_path / "b.npz", cfg)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()   # same config, same bytes
    z = np.load(tmp_path / "a.npz", allow_pickle=False)
    assert z["coords"].shape == (1656, 3) and z["modes"].shape == (4, 1656, 3)
    assert z["computed_modes"].shape == (20, 1656, 3)
    assert z["mode_numbers"].tolist() == [7, 8, 9, 11]
    np.testing.assert_array_equal(z["modes"][3], z["computed_modes"][10])
    assert str(z["kind"]) == "atomic"
    np.testing.assert_allclose(z["sigma"], 1.0)
    settings = json.loads(str(z["settings_json"]))
    assert settings["cutoff_A"] == 8.0 and settings["method"] == "full" and settings["selected_modes"] == [7, 8, 9, 11]
    assert len(settings["reference_sha256"]) == 64
    back = load_modes(tmp_path / "a.npz")
    np.testing.assert_array_equal(back.modes, ms.modes)
    assert back.atoms().atom_name.tolist() == ms.atom_name.tolist()
    assert back.with_selection([10]).modes.shape == (1, 1656, 3)
    np.testing.assert_allclose(np.linalg.norm(back.modes.reshape(4, -1), axis=1), 1.0)
    summary = json.loads((tmp_path / "a.json").read_text())
    assert [m["mode"] for m in summary["modes"]] == list(range(1, 21))
    assert [m["mode"] for m in summary["modes"] if m["selected"]] == [7, 8, 9, 11]
    x = back.deform(torch.zeros(2, 4))
    assert x.shape == (2, 1656, 3)


def test_load_modes_rejects_other_files(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, a=np.zeros(3))
    with pytest.raises(InputError, match="missing"):
        load_modes(p)
    (tmp_path / "y.npz").write_text("not a zip")
    with pytest.raises(InputError, match="not a normal-mode"):
        load_modes(tmp_path / "y.npz")


def test_save_modes_atomic_on_error(ak_dir, tmp_path):
    cfg = _config()
    ms = run_nma(ak_dir / "4ake.pdb", tmp_path / "m.npz", cfg)
    ms.settings = {"bad": object()}                                 # not JSON-serialisable
    with pytest.raises(TypeError):
        save_modes(tmp_path / "broken.npz", ms)
    assert not (tmp_path / "broken.npz").exists() and not list(tmp_path.glob(".broken*"))


# ----------------------------------------------------------------------------- CLI


def test_cli_nma_with_animation(ak_dir, tmp_path, run_cli):
    out = tmp_path / "nma" / "modes.npz"
    proc = run_cli("nma", "--reference", ak_dir / "4ake.pdb", "--out", out, "--animate", tmp_path / "anim",
                   "--set", "reference.chains=[A]", "--set", "nma.animate_frames=5")
    assert proc.returncode == 0, proc.stderr
    ms = load_modes(out)
    assert ms.mode_numbers.tolist() == [7, 8, 9] and ms.n_atoms == 1656
    for m in (7, 8, 9):
        st = gemmi.read_structure(str(tmp_path / "anim" / f"mode_{m:03d}.pdb"))
        assert len(st) == 5 and st[0].count_atom_sites() == 1656
        xyz = np.array([[a.pos.x, a.pos.y, a.pos.z] for r in st[4][0] for a in r])
        rms = np.sqrt(((xyz - ms.coords) ** 2).sum(1).mean())
        assert rms == pytest.approx(2.0, abs=0.01)                  # last frame: +animate_rmsd Å
    assert (tmp_path / "nma" / "modes.json").is_file() and (tmp_path / "nma" / "modes.log").is_file()


def test_cli_nma_map_reference(tmp_path, run_cli):
    rng = np.random.default_rng(1)
    data = _gaussian_map(6 + rng.uniform(0, 12, size=(40, 3)), rng.uniform(1, 2, 40), 1.2)
    p = tmp_path / "blob.mrc"
    with mrcfile.new(str(p)) as m:
        m.set_data(data.astype(np.float32))
        m.voxel_size = 2.0
    out = tmp_path / "modes.npz"
    proc = run_cli("nma", "--reference", p, "--out", out, "--pseudoatoms-pdb", tmp_path / "pa.pdb",
                   "--set", "nma.pseudoatoms.sigma=2.4")
    assert proc.returncode == 0, proc.stderr
    ms = load_modes(out)
    assert ms.kind == "pseudoatoms" and ms.settings["pseudoatoms"]["relative_error"] <= 0.05
    np.testing.assert_allclose(ms.sigma, 2.4)
    assert gemmi.read_structure(str(tmp_path / "pa.pdb"))[0].count_atom_sites() == ms.n_atoms


@pytest.mark.parametrize("args, match", [
    (["--reference", "missing.pdb"], "missing.pdb: reference not found"),
    (["--set", "reference.chains=[Z]"], "chain Z not found; chains present: A"),
    (["--set", "nma.modes=[3, 7]"], "nma.modes.0: 3 is less than the minimum of 7"),
    (["--set", "nma.modes=[7, 30]"], "mode 30 not computed; raise nma.n_modes"),
    (["--set", "reference.atoms=ca", "--set", "nma.cutoff=3"], "disconnected"),
])
def test_cli_bad_input_one_line(ak_dir, tmp_path, run_cli, args, match):
    if "--reference" not in args:
        args = ["--reference", str(ak_dir / "4ake.pdb"), *args]
    out = tmp_path / "modes.npz"
    proc = run_cli("nma", *args, "--out", out, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], proc.stderr
    assert not out.exists()
