"""Grouping in the landscape and export of each group as a RELION STAR file."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import starfile

from deephemnma.core.star import read_star
from deephemnma.core.errors import ConfigError
from deephemnma.groups import GroupSettings, assign_bins, assign_boxes, assign_groups, summarise_groups

from _landsim import optics_table


def blobs(n_per=(3000, 2000, 1000), centres=((-500, 0), (400, 300), (300, -400)), sd=80.0, seed=0):
    rng = np.random.default_rng(seed)
    Y = np.concatenate([rng.normal(c, sd, size=(k, 2)) for k, c in zip(n_per, centres)])
    truth = np.concatenate([np.full(k, i + 1) for i, k in enumerate(n_per)])
    return Y, truth


def test_boxes_as_in_the_paper():
    rng = np.random.default_rng(0)
    Y = rng.uniform(-1200, 1200, size=(5000, 2))
    boxes = [{"pc1": [-900, -100], "pc2": [-900, 900]}, {"pc1": [100, 900], "pc2": [-900, 900]}]
    lab = assign_boxes(Y, boxes)
    in1 = (Y[:, 0] >= -900) & (Y[:, 0] <= -100) & (np.abs(Y[:, 1]) <= 900)
    in2 = (Y[:, 0] >= 100) & (Y[:, 0] <= 900) & (np.abs(Y[:, 1]) <= 900)
    np.testing.assert_array_equal(lab == 1, in1)
    np.testing.assert_array_equal(lab == 2, in2)
    np.testing.assert_array_equal(lab == 0, ~(in1 | in2))
    # overlapping boxes: first wins, no particle in two groups
    lab = assign_boxes(Y, [{"pc1": [-1000, 100]}, {"pc1": [0, 1000]}])
    assert ((lab == 1) == ((Y[:, 0] >= -1000) & (Y[:, 0] <= 100))).all()
    with pytest.raises(ConfigError, match="pc3"):
        assign_boxes(Y, [{"pc3": [0, 1]}])


def test_quasi_uniform_bins_min_size_and_extremes():
    rng = np.random.default_rng(1)
    v = rng.normal(0, 100, 12000)
    lab, ranges = assign_bins(v, n_bins=12, min_size=900, drop_extremes=True)
    sizes = np.bincount(lab)[1:]
    assert (sizes >= 900).all() and len(sizes) >= 4
    assert (lab == 0).sum() > 0  # the sparse tails are dropped
    assert v[lab == 0].min() == v.min() and v[lab == 0].max() == v.max()
    # groups are contiguous, ordered intervals along the axis
    for g in range(1, len(sizes) + 1):
        assert v[lab == g].min() >= ranges[g - 1][0] - 1e-9 and v[lab == g].max() <= ranges[g - 1][1] + 1e-9
        if g > 1:
            assert v[lab == g].min() > v[lab == g - 1].max()
    # without dropping extremes every particle is in a group
    lab2, _ = assign_bins(v, n_bins=12, min_size=900, drop_extremes=False)
    assert (lab2 > 0).all() and (np.bincount(lab2)[1:] >= 900).all()
    # fewer particles than n_bins × min_size (every bin below min_size): only the sparse
    # tails go, not the ends eaten to the middle (the 10⁴ scale run's set 2 lost 79 % so)
    counts = [8, 1031, 602, 552, 438, 471, 494, 701, 700, 3]
    w = np.concatenate([rng.uniform(b, b + 1, c) for b, c in enumerate(counts)])
    w[[0, -1]] = 0.0, 10.0  # the axis' range is exactly the ten unit bins
    lab4, _ = assign_bins(w, n_bins=10, min_size=900, drop_extremes=True)
    assert (lab4 == 0).sum() == 8 + 3 and (np.bincount(lab4)[1:] >= 900).all()
    assert len(np.bincount(lab4)[1:]) >= 4
    # equal-count bins
    lab3, _ = assign_bins(v, n_bins=8, min_size=100, binning="count")
    assert np.ptp(np.bincount(lab3)[1:]) <= 2


@pytest.mark.parametrize("method", ["kmeans", "gmm", "density"])
def test_clusters_recover_blobs(method):
    Y, truth = blobs()
    settings = GroupSettings.from_config({"landscape": {"groups": {"method": method, "k": 3, "dims": 2, "n_init": 2,
                                                                   "level": 0.3}}})
    lab, details = assign_groups(Y, settings, seed=0)
    assert set(np.unique(lab[lab > 0])) == {1, 2, 3}
    # each found group is (almost) one true blob; groups numbered by size (k-means, GMM) / peak height (density)
    for g in (1, 2, 3):
        members = truth[lab == g]
        assert np.bincount(members).max() / len(members) > 0.97
    assert np.bincount(truth[lab == 1]).argmax() == 1  # the largest / densest blob first
    if method == "density":
        assert len(details["peaks"]) == 3 and (lab == 0).sum() > 0
    again, _ = assign_groups(Y, settings, seed=0)
    np.testing.assert_array_equal(lab, again)


def test_summary_table():
    Y, truth = blobs()
    amps = np.column_stack([Y[:, 0] * 2, -Y[:, 1]])
    t = summarise_groups(truth, Y, amps, ["dhnmaAmplitude007", "dhnmaAmplitude008"])
    assert list(t["group"]) == [1, 2, 3] and list(t["size"]) == [3000, 2000, 1000]
    np.testing.assert_allclose(t[["pc1_mean", "pc2_mean"]].to_numpy(), [[-500, 0], [400, 300], [300, -400]], atol=6)
    np.testing.assert_allclose(t["pc1_std"], 80, rtol=0.1)
    np.testing.assert_allclose(t["dhnmaAmplitude007_mean"], 2 * t["pc1_mean"])


def test_groups_command_exports_disjoint_star_files(tmp_path, run_cli):
    Y, _ = blobs(seed=3)
    n = len(Y)
    df = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)], "rlnOpticsGroup": 1,
                       "rlnAngleRot": np.linspace(0, 90, n), "rlnDefocusU": 10000.0, "rlnClassNumber": 1,
                       "dhnmaAmplitude007": Y[:, 0] * 3, "dhnmaPC1": Y[:, 0], "dhnmaPC2": Y[:, 1]})
    starfile.write({"optics": optics_table(pix=1.3), "particles": df}, tmp_path / "land.star")
    inp = read_star(tmp_path / "land.star").particles
    out = tmp_path / "groups"
    res = run_cli("groups", "--particles", tmp_path / "land.star", "--outdir", out,
                  "--set", "landscape.groups.method=bins", "--set", "landscape.groups.min_size=500",
                  "--set", "landscape.groups.n_bins=8")
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "groups.json").read_text())
    names = []
    for g, info in doc["groups"].items():
        # read back with starfile directly (what RELION users' tools do) and with the project reader
        raw = starfile.read(out / info["file"], always_dict=True)
        assert set(raw) == {"optics", "particles"} and float(raw["optics"]["rlnImagePixelSize"][0]) == 1.3
        star = read_star(out / info["file"])
        assert len(star.particles) == info["size"] >= 500
        assert set(df.columns) | {"dhnmaGroup"} <= set(star.particles.columns)
        assert (star.particles["dhnmaGroup"] == int(g)).all()
        # values survive the round trip
        src = inp.set_index("rlnImageName").loc[star.particles["rlnImageName"]]
        np.testing.assert_allclose(star.particles["rlnAngleRot"].to_numpy(), src["rlnAngleRot"].to_numpy(), rtol=0, atol=0)
        names += list(star.particles["rlnImageName"])
    dropped = read_star(out / "dropped.star").particles
    assert (dropped["dhnmaGroup"] == 0).all() and len(dropped) == doc["n_dropped"]
    names += list(dropped["rlnImageName"])
    assert len(names) == n and sorted(names) == sorted(df["rlnImageName"])  # union = input, disjoint
    allp = read_star(out / "particles.star").particles
    assert list(allp["rlnImageName"]) == list(df["rlnImageName"])
    table = pd.read_csv(out / "groups.csv")
    assert table["size"].sum() == n and "dhnmaAmplitude007_mean" in table.columns
    assert (out / "landscape_groups.png").stat().st_size > 1000
    # rerun with fewer groups: no stale group files remain
    res = run_cli("groups", "--particles", tmp_path / "land.star", "--outdir", out,
                  "--set", "landscape.groups.method=boxes", "--set", "landscape.groups.boxes=[{pc1: [-1000, 0]}]")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.glob("group_*.star")) == ["group_01.star"]
    # a landscape without coordinates is an input error
    starfile.write({"optics": optics_table(), "particles": df.drop(columns=["dhnmaPC1", "dhnmaPC2"])}, tmp_path / "x.star")
    res = run_cli("groups", "--particles", tmp_path / "x.star", "--outdir", tmp_path / "g2")
    assert res.returncode == 2 and "dhnmaPC1" in res.stderr
