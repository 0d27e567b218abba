"""Landscape: PCA model (fit, transform, inverse, save/load), spectral embedding, command."""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import starfile

from deephemnma.core.star import read_star
from deephemnma.landscape import (
    LandscapeSettings,
    PCAModel,
    SpectralModel,
    build_landscape,
    concat_particle_sets,
    load_model,
)

from _landsim import gaussian_table, optics_table


def helix(n, seed=0, noise=5.0):
    """The paper's AK amplitudes: q7 = −200 r, q8 = 200 sin(πr), q9 = 200 cos(πr)."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(0, 1, n)
    X = np.stack([-200 * r, 200 * np.sin(np.pi * r), 200 * np.cos(np.pi * r)], 1) + rng.normal(scale=noise, size=(n, 3))
    return X, r


def test_pca_model_matches_svd_and_transforms_new_points(tmp_path):
    df = gaussian_table(5000, seed=0)
    cols = ["dhnmaAmplitude007", "dhnmaAmplitude008", "dhnmaAmplitude009"]
    X = df[cols].to_numpy()
    m = PCAModel.fit(X, cols, n_components=2)
    Y = m.transform(X)
    # same subspace and variances as an SVD of the centred data
    Xc = X - X.mean(0)
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    np.testing.assert_allclose(m.explained_variance, s[:2] ** 2 / (len(X) - 1), rtol=1e-8)
    np.testing.assert_allclose(np.abs(m.components @ Vt[:2].T), np.eye(2), atol=1e-8)
    np.testing.assert_allclose(Y.mean(0), 0, atol=1e-8)
    np.testing.assert_allclose(Y.var(0, ddof=1), m.explained_variance, rtol=1e-8)
    assert m.explained_variance_ratio.sum() < 1 and m.explained_variance[0] >= m.explained_variance[1]
    # save / load; transform of new points reproduces the fitted coordinates
    m.save(tmp_path / "model.json")
    m2 = load_model(tmp_path / "model.json")
    np.testing.assert_allclose(m2.transform(X[:100]), Y[:100], atol=1e-9)
    # full-rank model: inverse_transform ∘ transform = identity
    full = PCAModel.fit(X, cols, n_components=3)
    np.testing.assert_allclose(full.inverse_transform(full.transform(X[:50])), X[:50], atol=1e-8)
    # deterministic signs: a permutation of the rows gives the same axes
    perm = np.random.default_rng(1).permutation(len(X))
    np.testing.assert_allclose(PCAModel.fit(X[perm], cols, 2).components, m.components, atol=1e-10)


def test_standardised_pca_is_scale_free():
    X, _ = helix(3000)
    cols = ["a", "b", "c"]
    m1 = PCAModel.fit(X, cols, 2, standardise=True)
    m2 = PCAModel.fit(X * np.array([100.0, 1.0, 0.01]), cols, 2, standardise=True)
    np.testing.assert_allclose(m1.transform(X), m2.transform(X * np.array([100.0, 1.0, 0.01])), atol=1e-8)
    assert not np.allclose(PCAModel.fit(X * np.array([100.0, 1.0, 0.01]), cols, 2).components, m1.components)


def test_spectral_embedding_10k_points_recovers_helix_parameter():
    X, r = helix(10000)
    t0 = time.perf_counter()
    m = SpectralModel.fit(X, ["a", "b", "c"], n_components=2, n_neighbors=15, seed=0)
    dt = time.perf_counter() - t0
    print(f"spectral embedding of 10,000 points: {dt:.2f} s")
    assert dt < 30
    assert abs(np.corrcoef(m.embedding[:, 0], r)[0, 1]) > 0.98  # the 1-D manifold parameter
    assert 0 < m.eigenvalues[0] < m.eigenvalues[1] < 1
    # Nyström placement of training points reproduces their coordinates
    Yn = m.transform(X[:300])
    assert np.corrcoef(Yn[:, 0], m.embedding[:300, 0])[0, 1] > 0.999
    # seeded: same input, same coordinates
    np.testing.assert_allclose(SpectralModel.fit(X, ["a", "b", "c"], 2, 15, seed=0).embedding, m.embedding, atol=1e-6)


def test_build_landscape_combined_and_spectral_compare():
    pred = gaussian_table(800, seed=1)
    hem = gaussian_table(1000, seed=2)
    hem["rlnImageName"] = [f"{i + 1:06d}@hemnma.mrcs" for i in range(1000)]
    settings = LandscapeSettings.from_config({"landscape": {"fit_on": "combined", "n_components": 2, "spectral": {
        "compare": True, "n_neighbors": 10, "max_fit": 500}}})
    table, optics, model, spec = build_landscape(pred, optics_table(), settings, 0, (hem, optics_table()))
    assert len(table) == 1800 and list(table["dhnmaSource"].value_counts().sort_index()) == [1000, 800]
    assert {"dhnmaPC1", "dhnmaPC2", "dhnmaSpectral1", "dhnmaSpectral2"} <= set(table.columns)
    assert model.n_samples == 1800 and len(optics) == 1
    assert np.isfinite(table["dhnmaSpectral1"]).all()
    # optics tables that differ are both kept, the second renumbered
    o2 = optics_table(pix=2.0)
    allp, allo = concat_particle_sets([(pred, optics_table(), 2), (hem, o2, 1)])
    assert list(allo["rlnOpticsGroup"]) == [1, 2] and (allp["rlnOpticsGroup"].iloc[800:] == 2).all()
    # duplicates kept once
    allp, _ = concat_particle_sets([(pred, optics_table(), 2), (pred.iloc[:10], optics_table(), 1)])
    assert len(allp) == 800


def test_landscape_command(tmp_path, run_cli):
    X, r = helix(3000, seed=4)
    df = pd.DataFrame({"rlnImageName": [f"{i + 1}@p.mrcs" for i in range(3000)], "rlnOpticsGroup": 1,
                       "rlnAngleRot": 10.0, "dhnmaAmplitude007": X[:, 0], "dhnmaAmplitude008": X[:, 1],
                       "dhnmaAmplitude009": X[:, 2]})
    starfile.write({"optics": optics_table(), "particles": df}, tmp_path / "pred.star")
    res = run_cli("landscape", "--particles", tmp_path / "pred.star", "--out", tmp_path / "land.star",
                  "--plots", tmp_path / "plots", "--set", "landscape.spectral.compare=true")
    assert res.returncode == 0, res.stderr
    star = read_star(tmp_path / "land.star")
    assert {"dhnmaPC1", "dhnmaPC2", "dhnmaSpectral1", "rlnAngleRot"} <= set(star.particles.columns)
    assert list(star.particles["rlnImageName"]) == list(df["rlnImageName"])
    model = json.loads((tmp_path / "land_model.json").read_text())
    assert model["method"] == "pca" and model["columns"] == ["dhnmaAmplitude007", "dhnmaAmplitude008", "dhnmaAmplitude009"]
    for f in ("landscape.png", "explained_variance.png", "amplitudes.png", "spectral_vs_pca.png"):
        assert (tmp_path / "plots" / f).stat().st_size > 1000
    # place new particles with the saved model: the same coordinates for the same amplitudes
    starfile.write({"optics": optics_table(), "particles": df.iloc[:200]}, tmp_path / "new.star")
    res = run_cli("landscape", "--particles", tmp_path / "new.star", "--apply-model", tmp_path / "land_model.json",
                  "--out", tmp_path / "new_land.star")
    assert res.returncode == 0, res.stderr
    new = read_star(tmp_path / "new_land.star").particles
    np.testing.assert_allclose(new[["dhnmaPC1", "dhnmaPC2"]].to_numpy(),
                               star.particles[["dhnmaPC1", "dhnmaPC2"]].to_numpy()[:200], rtol=1e-6, atol=1e-6)
    # combined without --hemnma is an input error
    res = run_cli("landscape", "--particles", tmp_path / "pred.star", "--out", tmp_path / "x.star",
                  "--set", "landscape.fit_on=combined")
    assert res.returncode == 2 and "--hemnma" in res.stderr
