"""Mahalanobis outlier filter."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.stats import chi

from deephemnma.core.star import read_star
from deephemnma.core.errors import InputError
from deephemnma.filter import MahalanobisFilter, expected_kept_fraction, filter_table

from _landsim import gaussian_table, optics_table


def test_gaussian_kept_fraction_matches_chi_distribution():
    df = gaussian_table(40000, dims=3, seed=0)
    kept, dropped, filt = filter_table(df, threshold=3.2)
    expected = chi.cdf(3.2, df=3)
    assert expected == pytest.approx(expected_kept_fraction(3.2, 3))
    assert len(kept) / len(df) == pytest.approx(expected, abs=0.003)  # binomial sd 0.0007
    assert len(kept) + len(dropped) == len(df)
    # 1 mode: P(|z| ≤ 2) = 0.9545
    k1, _, _ = filter_table(df.drop(columns=["dhnmaAmplitude008", "dhnmaAmplitude009"]), threshold=2.0)
    assert len(k1) / len(df) == pytest.approx(0.9545, abs=0.005)
    # distances are invariant to the scale of each mode
    d1 = filt.distance(df[filt.columns].to_numpy())
    scaled = df[filt.columns].to_numpy() * np.array([10.0, 0.1, 3.0])
    d2 = MahalanobisFilter.fit(scaled, filt.columns).distance(scaled)
    np.testing.assert_allclose(d1, d2, rtol=1e-9)


@pytest.mark.parametrize("method", ["classical", "robust"])
def test_injected_outliers_are_removed(method):
    df = gaussian_table(3000, dims=3, seed=1)
    rng = np.random.default_rng(2)
    out_idx = rng.choice(len(df), 30, replace=False)
    cols = ["dhnmaAmplitude007", "dhnmaAmplitude008", "dhnmaAmplitude009"]
    df.loc[out_idx, cols] = rng.normal(size=(30, 3)) * 200 + np.array([3000.0, -2500.0, 2000.0])
    kept, dropped, filt = filter_table(df, threshold=3.2, method=method)
    assert set(out_idx) <= set(dropped.index)
    assert len(dropped) < 30 + 0.03 * 3000
    assert (dropped["dhnmaFlag"] & 16).all() and "dhnmaFlag" not in kept.columns
    assert (dropped["dhnmaMahalanobis"] > 3.2).all() and (kept["dhnmaMahalanobis"] <= 3.2).all()
    assert list(kept.index) == sorted(kept.index)  # order kept


def test_bad_input():
    df = gaussian_table(100)
    df.loc[5, "dhnmaAmplitude008"] = np.nan
    with pytest.raises(InputError, match="row 6"):
        filter_table(df, source="x.star")
    with pytest.raises(InputError, match="no amplitude"):
        filter_table(df.drop(columns=[c for c in df.columns if c.startswith("dhnma")]))


def test_filter_command(tmp_path, run_cli):
    df = gaussian_table(2000, seed=3)
    df.loc[:4, "dhnmaAmplitude007"] = 1e5
    df["rlnAngleRot"] = 1.5
    starfile.write({"optics": optics_table(), "particles": df}, tmp_path / "hemnma.star")
    r = run_cli("filter", "--particles", tmp_path / "hemnma.star", "--out", tmp_path / "kept.star",
                "--set", "landscape.filter.threshold=3.5")
    assert r.returncode == 0, r.stderr
    kept = read_star(tmp_path / "kept.star")
    dropped = read_star(tmp_path / "kept_dropped.star")
    summary = json.loads((tmp_path / "kept.json").read_text())
    assert summary["n_kept"] == len(kept) and summary["n_dropped"] == len(dropped) == 2000 - len(kept)
    assert summary["threshold"] == 3.5 and set(range(5)) <= {int(n.split("@")[0]) - 1 for n in dropped.particles["rlnImageName"]}
    assert list(kept.optics["rlnImagePixelSize"]) == [1.0]
    assert set(df.columns) <= set(kept.particles.columns)
    both = pd.concat([kept.particles, dropped.particles])["rlnImageName"]
    assert sorted(both) == sorted(df["rlnImageName"]) and not both.duplicated().any()
    assert "kept" in r.stdout
    # a missing file is one line naming it, exit code 2
    r = run_cli("filter", "--particles", tmp_path / "nope.star", "--out", tmp_path / "k.star")
    assert r.returncode == 2 and "nope.star" in r.stderr and len(r.stderr.strip().splitlines()) == 1
