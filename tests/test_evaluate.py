"""Evaluation against ground truth: the paper's metrics, rasterised maps, group-map FSC."""
from __future__ import annotations

import json

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from deephemnma.core.config import validate_config
from deephemnma.nma import run_nma
from deephemnma.core.density import atoms_to_volume
from deephemnma.evaluate import (
    align_tables,
    best_translation,
    centroid_map,
    evaluate_group_maps,
    load_ground_truth,
    parameter_errors,
    shift_volume,
    summarise_errors,
)
from deephemnma.core.geometry import euler_to_matrix, matrix_to_euler, random_rotations
from deephemnma.core.projection import FourierSliceProjector, project_gaussians

from _landsim import optics_table

torch.set_num_threads(1)
COLS = ["dhnmaAmplitude007", "dhnmaAmplitude008", "dhnmaAmplitude009"]


def rot_z(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def test_parameter_errors_known_perturbations():
    rng = np.random.default_rng(0)
    n, N = 200, 50
    truth = pd.DataFrame({"rlnImageName": [f"{i}@s" for i in range(n)]})
    for c in COLS:
        truth[c] = rng.normal(0, 100, n)
    eul = matrix_to_euler(random_rotations(n, rng))
    truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]] = eul
    truth[["rlnOriginXAngst", "rlnOriginYAngst"]] = rng.uniform(-5, 5, (n, 2))
    pred = truth.copy()
    dq = rng.normal(0, 10, (n, 3))
    pred[COLS] += dq
    A_true = euler_to_matrix(eul)
    A_pred = A_true @ rot_z(6.0)  # every row of A rotated by 6° about the body z axis... in the row space
    pred[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]] = matrix_to_euler(A_pred)
    pred[["rlnOriginXAngst", "rlnOriginYAngst"]] += [3.0, -4.0]
    X = rng.normal(0, 10, (N, 3))
    Q, _ = np.linalg.qr(rng.standard_normal((3 * N, 3)))
    V = Q.T.reshape(3, N, 3)
    err = parameter_errors(pred.sample(frac=1, random_state=1).sort_index(), truth, [7, 8, 9], X, V)
    np.testing.assert_allclose(err[["amp_err_007", "amp_err_008", "amp_err_009"]].to_numpy(), np.abs(dq), atol=1e-9)
    # rows of A·Rz(6°): two rows turn by ≤ 6°, the paper's metric averages the three row angles
    expect = np.rad2deg(np.arccos(np.clip(np.einsum("nij,nij->ni", A_true, A_pred), -1, 1))).mean(1)
    np.testing.assert_allclose(err["angle_err"], expect, atol=1e-6)
    assert 0 < err["angle_err"].mean() <= 6.0
    np.testing.assert_allclose(err["shift_err"], 3.5)
    np.testing.assert_allclose(err["shift_dist"], 5.0)
    np.testing.assert_allclose(err["rmsd_amp"], np.linalg.norm(dq, axis=1) / np.sqrt(N), rtol=1e-9)
    direct = np.sqrt(((np.einsum("nij,aj->nai", A_pred, X) - np.einsum("nij,aj->nai", A_true, X)) ** 2).sum(-1).mean(-1))
    np.testing.assert_allclose(err["rmsd_angle"], direct, rtol=1e-9)
    s = summarise_errors(err)
    assert s["n"] == n and s["shift_dist"]["mean"] == pytest.approx(5.0)
    assert s["amp_err_mean_over_modes"] == pytest.approx(np.abs(dq).mean())


def test_atoms_to_volume_matches_projector():
    rng = np.random.default_rng(1)
    X = rng.normal(0, 5, (40, 3))
    w = rng.uniform(1, 8, 40)
    vol = atoms_to_volume(X, box=40, pixel_size=1.2, weights=w, sigma=1.8)
    assert vol.dtype == np.float32 and vol.shape == (40, 40, 40)
    assert vol.sum() == pytest.approx(w.sum(), rel=1e-3)
    g = (np.arange(40) - 20) * 1.2
    com = [float((vol.sum(axis=tuple(a for a in range(3) if a != ax)) * g).sum() / vol.sum()) for ax in (2, 1, 0)]
    np.testing.assert_allclose(com, np.average(X, axis=0, weights=w), atol=0.05)
    R = torch.tensor(random_rotations(5, rng))
    a = FourierSliceProjector(vol).project(R).numpy()
    b = project_gaussians(X, w, 1.8, R, 40, 1.2).numpy()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


def test_translation_alignment_and_group_fsc():
    rng = np.random.default_rng(2)
    N = 60
    X = rng.normal(0, 6, (N, 3))
    Q, _ = np.linalg.qr(rng.standard_normal((3 * N, 2)))
    V = Q.T.reshape(2, N, 3)
    q = np.array([30.0, -20.0])
    ref = centroid_map(X, V, q, None, 1.5, 32, 1.0)
    moved = shift_volume(ref, [2.0, -1.5, 3.25])
    np.testing.assert_allclose(best_translation(ref, moved), [2.0, -1.5, 3.25], atol=0.15)
    table = evaluate_group_maps({1: q, 2: -q}, {1: (moved, 1.0), 2: (moved, 1.0)}, X, V, sigma=1.5)
    assert table.loc[0, "resolution_fsc05"] == pytest.approx(2.0)  # the right centroid: FSC ≥ 0.5 to Nyquist
    assert table.loc[0, "shift_A"] == pytest.approx(np.linalg.norm([2.0, 1.5, 3.25]), abs=0.2)
    assert table.loc[1, "resolution_fsc05"] > table.loc[0, "resolution_fsc05"]  # the wrong centroid is worse


def test_ground_truth_table_errors(tmp_path):
    pd.DataFrame({"_rlnImageName": ["1@a", "1@a"], "x": [1, 2]}).to_csv(tmp_path / "dup.csv", index=False)
    from deephemnma.core.errors import InputError

    with pytest.raises(InputError, match="duplicate"):
        load_ground_truth(tmp_path / "dup.csv")
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "nokey.csv", index=False)
    with pytest.raises(InputError, match="rlnImageName"):
        load_ground_truth(tmp_path / "nokey.csv")


def test_align_tables_matches_rebased_and_padded_names(tmp_path):
    """A group STAR one directory down names ``000002@../p.mrcs``; the truth next to the stack
    names ``2@p.mrcs``: the same particle. A name of another stack has no ground truth."""
    from deephemnma.core.errors import InputError

    (tmp_path / "p.mrcs").write_bytes(b"")
    (tmp_path / "g").mkdir()
    truth = pd.DataFrame({"rlnImageName": ["1@p.mrcs", "2@p.mrcs", "3@p.mrcs"], "v": [10.0, 20.0, 30.0]})
    pred = pd.DataFrame({"rlnImageName": ["000003@../p.mrcs", "000002@../p.mrcs"]})
    _, t = align_tables(pred, truth, tmp_path / "g" / "group_01.star", tmp_path / "truth.csv")
    assert t["v"].tolist() == [30.0, 20.0]
    with pytest.raises(InputError, match="no ground truth"):  # without the locations the paths differ
        align_tables(pred, truth, tmp_path / "g" / "group_01.star")
    with pytest.raises(InputError, match="no ground truth"):
        align_tables(pd.DataFrame({"rlnImageName": ["4@../p.mrcs"]}), truth, tmp_path / "g" / "x.star",
                     tmp_path / "truth.csv")


@pytest.mark.slow
def test_evaluate_command_with_group_reconstructions(ak_dir, tmp_path, run_cli):
    """Two groups of particles simulated from AK (Cα) displaced along 2 random modes; each group
    reconstructed by `deephemnma reconstruct`; `deephemnma evaluate` compares the maps with the
    maps of the groups' true centroid structures."""
    ms = run_nma(ak_dir / "4ake_ca.pdb", tmp_path / "modes.npz", validate_config({"reference": {"atoms": "ca"}}))
    X0, V = ms.coords, ms.modes
    N = len(X0)
    rng = np.random.default_rng(3)
    box, pix, sigma, n_per = 32, 2.5, 2.5, 300
    centre = X0.mean(0)
    rows, images = [], []
    for g, mean_q in ((1, [-60.0, 40.0, 0.0]), (2, [60.0, -40.0, 20.0])):
        q = np.asarray(mean_q) + rng.normal(0, 5, (n_per, 3))
        coords = X0[None] - centre + np.einsum("pm,mnk->pnk", q, V)
        R = random_rotations(n_per, rng)
        origins = rng.uniform(-2, 2, (n_per, 2))
        images.append(project_gaussians(torch.tensor(coords), np.ones(N), sigma, torch.tensor(R), box, pix,
                                        torch.tensor(origins)).float().numpy())
        e = matrix_to_euler(R)
        for i in range(n_per):
            rows.append({"rlnAngleRot": e[i, 0], "rlnAngleTilt": e[i, 1], "rlnAnglePsi": e[i, 2],
                         "rlnOriginXAngst": origins[i, 0] * pix, "rlnOriginYAngst": origins[i, 1] * pix,
                         **{c: q[i, j] for j, c in enumerate(COLS)}, "group": g})
    stack = np.concatenate(images)
    with mrcfile.new(tmp_path / "p.mrcs") as m:
        m.set_data(stack)
    df = pd.DataFrame(rows)
    df.insert(0, "rlnImageName", [f"{i + 1}@p.mrcs" for i in range(len(df))])
    df["rlnOpticsGroup"] = 1
    df.drop(columns=["group"]).to_csv(tmp_path / "truth.csv", index=False)
    pred = df.copy()
    pred[COLS] += rng.normal(0, 2, (len(df), 3))
    pred["dhnmaPC1"] = np.where(df["group"] == 1, -1.0, 1.0)
    starfile.write({"optics": optics_table(pix, box), "particles": pred.drop(columns=["group"])}, tmp_path / "pred.star")
    res = run_cli("groups", "--particles", tmp_path / "pred.star", "--outdir", tmp_path / "groups",
                  "--set", "landscape.groups.method=boxes", "--set", "landscape.groups.boxes=[{pc1: [-2, 0]}, {pc1: [0, 2]}]")
    assert res.returncode == 0, res.stderr
    for g in (1, 2):
        res = run_cli("reconstruct", "--particles", tmp_path / "groups" / f"group_{g:02d}.star",
                      "--outdir", tmp_path / "maps" / f"group_{g:02d}", "--set", "reconstruct.ctf=none",
                      "--set", "reconstruct.mask=sphere")
        assert res.returncode == 0, res.stderr
        assert (tmp_path / "maps" / f"group_{g:02d}" / "fsc.png").is_file()
    res = run_cli("evaluate", "--particles", tmp_path / "pred.star", "--truth", tmp_path / "truth.csv",
                  "--modes", tmp_path / "modes.npz", "--groups", tmp_path / "groups", "--maps", tmp_path / "maps",
                  "--outdir", tmp_path / "eval", "--set", f"landscape.evaluation.atom_sigma={sigma}")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["amp_err_007"]["mean"] == pytest.approx(2 * np.sqrt(2 / np.pi), rel=0.15)
    assert summary["angle_err"]["mean"] < 1e-4 and summary["rmsd_amp"]["mean"] < 1.0
    table = pd.read_csv(tmp_path / "eval" / "group_fsc.csv")
    print(table.to_string())
    assert list(table["group"]) == [1, 2]
    # maps of 300 noise-free particles with ±5 amplitude spread match their centroid maps well
    assert (table["resolution_fsc05"] < 8.0).all()
    for f in ("errors.csv", "amplitudes_vs_true.png", "group_fsc.png", "errors.png"):
        assert (tmp_path / "eval" / f).is_file()


def test_landscape_agreement_with_the_true_path():
    """A landscape whose first axis follows the path ranks it (|ρ| ≈ 1) and groups cut along it
    hold narrow stretches of it; a landscape of noise does neither."""
    from deephemnma.evaluate import landscape_agreement

    rng = np.random.default_rng(0)
    r = rng.uniform(0, 1, 400)
    names = [f"{i + 1}@p.mrcs" for i in range(400)]
    truth = pd.DataFrame({"rlnImageName": names, "dhnmaConformation": r})
    good = pd.DataFrame({"rlnImageName": names, "dhnmaPC1": -300 * r + rng.normal(0, 10, 400),
                         "dhnmaGroup": np.digitize(r, [0.25, 0.5, 0.75]) + 1})
    a = landscape_agreement(good, truth)
    assert a["rank_correlation_dhnmaPC1"] < -0.95
    assert a["mean_group_true_position_std"] < 0.3 * a["true_position_std"]
    noise = good.assign(dhnmaPC1=rng.normal(size=400), dhnmaGroup=rng.integers(1, 5, 400))
    b = landscape_agreement(noise, truth)
    assert abs(b["rank_correlation_dhnmaPC1"]) < 0.2
    assert b["mean_group_true_position_std"] > 0.8 * b["true_position_std"]
    assert landscape_agreement(good, truth.drop(columns=["dhnmaConformation"])) == {}
