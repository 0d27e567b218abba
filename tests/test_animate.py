"""Animations along landscape axes and group centroid structures (multi-model PDB)."""
from __future__ import annotations

import gemmi
import numpy as np
import pandas as pd
import pytest
import starfile

from deephemnma.core.config import validate_config
from deephemnma.nma import run_nma
from deephemnma.animate import axis_frames, centroid_structures, write_axis_animations
from deephemnma.core.modes import displace
from deephemnma.landscape import PCAModel

from _landsim import optics_table

COLS = ["dhnmaAmplitude007", "dhnmaAmplitude008", "dhnmaAmplitude009"]


@pytest.fixture(scope="module")
def setup(ak_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("anim")
    ms = run_nma(ak_dir / "4ake_ca.pdb", tmp / "modes.npz", validate_config({"reference": {"atoms": "ca"}}))
    atoms = ms.atoms()
    n = len(atoms.coords)
    rng = np.random.default_rng(0)
    modes = {int(m): v for m, v in zip(ms.mode_numbers, ms.modes)}
    assert sorted(modes) == [7, 8, 9]
    r = rng.uniform(0, 1, 4000)
    X = np.stack([-200 * r, 200 * np.sin(np.pi * r), 200 * np.cos(np.pi * r)], 1) + rng.normal(scale=5, size=(4000, 3))
    model = PCAModel.fit(X, COLS, 2)
    return dict(tmp=tmp, atoms=atoms, modes=modes, model=model, X=X, Y=model.transform(X), n=n)


def read_models(path):
    st = gemmi.read_structure(str(path))
    return np.array([[[a.pos.x, a.pos.y, a.pos.z] for ch in m for r in ch for a in r] for m in st])


def test_axis_frames_follow_the_model(setup):
    s = setup
    V = np.stack([s["modes"][m] for m in (7, 8, 9)])
    coords, vals, amps = axis_frames(s["model"], 1, s["atoms"].coords, V, s["Y"], n_frames=11, quantile=0.02, bounce=False)
    assert coords.shape == (11, s["n"], 3)
    lo, hi = np.quantile(s["Y"][:, 0], [0.02, 0.98])
    assert vals[0] == pytest.approx(lo) and vals[-1] == pytest.approx(hi)
    # amplitudes are the model's inverse map of (v, 0), and coordinates x0 + Σ q v
    np.testing.assert_allclose(amps, s["model"].inverse_transform(np.column_stack([vals, np.zeros(11)])))
    np.testing.assert_allclose(coords, displace(s["atoms"].coords, V, amps))
    # straight path: equal steps; RMSD between the ends = |Δq| / sqrt(N) for orthonormal modes
    steps = np.sqrt(((np.diff(coords, axis=0)) ** 2).sum(-1).mean(-1))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-9)
    end_rmsd = np.sqrt(((coords[-1] - coords[0]) ** 2).sum(-1).mean())
    assert end_rmsd == pytest.approx(np.linalg.norm(amps[-1] - amps[0]) / np.sqrt(s["n"]), rel=1e-9)
    bounced, bv, _ = axis_frames(s["model"], 1, s["atoms"].coords, V, s["Y"], n_frames=11)
    assert len(bounced) == 20 and np.allclose(bounced[11], bounced[9])


def test_pdb_outputs(setup, tmp_path):
    s = setup
    paths = write_axis_animations(tmp_path, s["atoms"], s["modes"], s["model"], s["Y"], n_frames=5, bounce=False)
    assert [p.name for p in paths] == ["axis_01.pdb", "axis_02.pdb"]
    frames = read_models(paths[0])
    V = np.stack([s["modes"][m] for m in (7, 8, 9)])
    expect, _, _ = axis_frames(s["model"], 1, s["atoms"].coords, V, s["Y"], 5, bounce=False)
    assert frames.shape == (5, s["n"], 3)
    np.testing.assert_allclose(frames, expect, atol=1e-3)  # PDB has 3 decimals
    st = gemmi.read_structure(str(paths[0]))
    assert st[0][0][0].name == "MET" and st[0][0][0][0].name == "CA"
    assert "coordsets true" in (tmp_path / "chimerax.cxc").read_text()
    cents = {1: np.array([-150.0, 60.0, -170.0]), 2: np.array([-20.0, 50.0, 190.0])}
    out = centroid_structures(tmp_path, s["atoms"], s["modes"], COLS, cents)
    assert [p.name for p in out] == ["group_01_centroid.pdb", "group_02_centroid.pdb", "centroids.pdb"]
    np.testing.assert_allclose(read_models(out[1])[0], displace(s["atoms"].coords, V, cents[2])[0], atol=1e-3)
    assert read_models(out[2]).shape[0] == 2


def test_animate_command(setup, ak_dir, tmp_path, run_cli):
    s = setup
    s["model"].save(tmp_path / "model.json")
    df = pd.DataFrame({"rlnImageName": [f"{i + 1}@x.mrcs" for i in range(len(s["Y"]))], "rlnOpticsGroup": 1,
                       "dhnmaPC1": s["Y"][:, 0], "dhnmaPC2": s["Y"][:, 1]})
    starfile.write({"optics": optics_table(), "particles": df}, tmp_path / "land.star")
    pd.DataFrame({"group": [0, 1], "size": [10, 20], "dhnmaAmplitude007_mean": [0.0, -100.0],
                  "dhnmaAmplitude008_mean": [0.0, 150.0], "dhnmaAmplitude009_mean": [0.0, 20.0]}
                 ).to_csv(tmp_path / "groups.csv", index=False)
    res = run_cli("animate", "--model", tmp_path / "model.json",
                  "--modes", s["tmp"] / "modes.npz", "--particles", tmp_path / "land.star",
                  "--groups", tmp_path / "groups.csv", "--outdir", tmp_path / "anim",
                  "--set", "landscape.animation.n_frames=7")
    assert res.returncode == 0, res.stderr
    assert read_models(tmp_path / "anim" / "axis_02.pdb").shape == (12, s["n"], 3)
    assert (tmp_path / "anim" / "group_01_centroid.pdb").is_file()
    assert not (tmp_path / "anim" / "group_00_centroid.pdb").exists()
    # a file that is not a modes file is refused in one line naming it
    res = run_cli("animate", "--model", tmp_path / "model.json", "--modes", tmp_path / "land.star",
                  "--outdir", tmp_path / "anim2")
    assert res.returncode == 2 and "land.star" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "anim2" / "axis_01.pdb").exists()
