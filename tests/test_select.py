"""`deephemnma select` and deephemnma.core.selection: saved shapes, --where, --groups, bad selections;
--particles and its alias --landscape."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from deephemnma.core.errors import InputError
from deephemnma.core.selection import landscape_fingerprint, load_selection, selection_mask, shape_mask, where_mask
from deephemnma.core.star import read_star, write_star

from _pagetree import OPTICS, particle_table


@pytest.fixture(scope="module")
def landscape(tmp_path_factory):
    d = tmp_path_factory.mktemp("sel")
    table = particle_table(2000, seed=3)
    path = d / "particles.star"
    write_star(path, table, OPTICS)
    return path, read_star(path).particles


def save(path, shapes, **extra):
    doc = {"format": "deephemnma-selection", "version": 1, "axes": ["dhnmaPC1", "dhnmaPC2"], "shapes": shapes, **extra}
    path.write_text(json.dumps(doc))
    return path


def f32(v):
    return np.asarray(v, np.float64).astype(np.float32).astype(np.float64)


def test_box_and_lasso_membership_match_brute_force(landscape):
    _, p = landscape
    x, y = f32(p["dhnmaPC1"]), f32(p["dhnmaPC2"])
    box = {"type": "box", "x": [-20.0, 30.0], "y": [-10.0, 40.0]}
    expect = [(-20 <= a <= 30) and (-10 <= b <= 40) for a, b in zip(x, y)]
    assert shape_mask(box, x, y).tolist() == expect
    tri = {"type": "lasso", "points": [[-80.0, -40.0], [80.0, -40.0], [0.0, 60.0]]}
    m = shape_mask(tri, x, y)
    # a point is inside the triangle iff it is on the inner side of all three edges
    P = np.array(tri["points"])
    def side(k):
        (ax, ay), (bx, by) = P[k], P[(k + 1) % 3]
        return (bx - ax) * (y - ay) - (by - ay) * (x - ax) > 0

    sides = [side(k) for k in range(3)]
    assert np.array_equal(m, sides[0] & sides[1] & sides[2]) and 0 < m.sum() < len(m)


def test_selection_checks_count_and_fingerprint(landscape, tmp_path):
    path, p = landscape
    box = {"type": "box", "x": [0, 50], "y": [-30, 30]}
    n = int(shape_mask(load_selection(save(tmp_path / "a.json", [box]))["shapes"][0], f32(p["dhnmaPC1"]),
                       f32(p["dhnmaPC2"])).sum())
    land = {"path": "particles.star", "n_particles": len(p), "fingerprint": landscape_fingerprint(p)}
    good = load_selection(save(tmp_path / "b.json", [box], count=n, landscape=land))
    mask, notes = selection_mask(good, p, tmp_path / "b.json", path)
    assert mask.sum() == n and notes == []
    bad = load_selection(save(tmp_path / "c.json", [box], count=n + 1, landscape=land))
    with pytest.raises(InputError, match="c.json: the page counted"):
        selection_mask(bad, p, tmp_path / "c.json", path)
    other = load_selection(save(tmp_path / "d.json", [box], count=5, landscape=dict(land, fingerprint="sha256:x")))
    mask, notes = selection_mask(other, p, tmp_path / "d.json", path)  # another table: shapes applied, noted
    assert mask.sum() == n and "another table" in notes[0]


@pytest.mark.parametrize("text, message", [
    ("{not json", "not a JSON file"),
    ('{"format": "other"}', "not a saved selection"),
    ('{"format": "deephemnma-selection", "version": 9}', "version 9 is not supported"),
    ('{"format": "deephemnma-selection", "version": 1, "axes": ["dhnmaPC1", "dhnmaPC2"], "shapes": []}', "no shapes"),
    ('{"format": "deephemnma-selection", "version": 1, "axes": ["dhnmaPC1"], "shapes": []}', "axes"),
    ('{"format": "deephemnma-selection", "version": 1, "axes": ["a", "b"], "shapes": [{"type": "circle"}]}', "shape 1"),
    ('{"format": "deephemnma-selection", "version": 1, "axes": ["a", "b"], '
     '"shapes": [{"type": "box", "x": [0, "1"], "y": [0, 1]}]}', "finite number"),
    ('{"format": "deephemnma-selection", "version": 1, "axes": ["a", "b"], '
     '"shapes": [{"type": "lasso", "points": [[0, 0], [1, 1]]}]}', "at least 3"),
])
def test_malformed_selection_files(tmp_path, text, message):
    p = tmp_path / "sel.json"
    p.write_text(text)
    with pytest.raises(InputError, match=message) as e:
        load_selection(p)
    assert str(e.value).startswith(str(p))


def test_where_expressions(landscape):
    path, p = landscape
    m = where_mask("dhnmaPC1 > 2 and dhnmaGroup == 3", p, path)
    assert np.array_equal(m, (p["dhnmaPC1"] > 2).to_numpy() & (p["dhnmaGroup"] == 3).to_numpy())
    m = where_mask("_dhnmaGroup in [1, 3] or not (dhnmaFlag & 2 == 0)", p, path)
    assert np.array_equal(m, p["dhnmaGroup"].isin([1, 3]).to_numpy() | ((p["dhnmaFlag"] & 2) != 0).to_numpy())
    m = where_mask("-10 < dhnmaPC2 <= 10 and hypot(dhnmaPC1, dhnmaPC2) < 40", p, path)
    r = np.hypot(p["dhnmaPC1"], p["dhnmaPC2"]).to_numpy()
    assert np.array_equal(m, ((p["dhnmaPC2"] > -10) & (p["dhnmaPC2"] <= 10)).to_numpy() & (r < 40))
    m = where_mask("rlnImageName == '000001@stacks/chunk_0000.mrcs'", p, path)
    assert m.sum() == 1


@pytest.mark.parametrize("expr, message", [
    ("dhnmaPC5 > 1", "unknown column dhnmaPC5"),
    ("dhnmapc1 > 1", "did you mean dhnmaPC1"),
    ("__import__('os').system('true')", "only these functions"),
    ("dhnmaPC1.__class__", "attribute is not allowed"),
    ("(lambda: 1)()", "only these functions"),
    ("dhnmaPC1[0] > 1", "subscript is not allowed"),
    ("dhnmaPC1 + 1", "is not a condition"),
    ("dhnmaPC1 >", "not a valid expression"),
    ("", "empty expression"),
])
def test_where_rejects(landscape, expr, message):
    path, p = landscape
    with pytest.raises(InputError, match=message):
        where_mask(expr, p, path)


def test_cli_select_keeps_optics_and_columns(landscape, tmp_path, run_cli):
    path, p = landscape
    sel = save(tmp_path / "s.json", [{"type": "box", "x": [-30, 10], "y": [-50, 50]},
                                     {"type": "lasso", "points": [[40, -20], [90, -20], [65, 30]]}])
    out = tmp_path / "picked.star"
    res = run_cli("select", "--particles", path, "--selection", sel, "--where", "dhnmaFlag == 0", "--out", out)
    assert res.returncode == 0, res.stderr
    got = read_star(out)
    x, y = f32(p["dhnmaPC1"]), f32(p["dhnmaPC2"])
    inside = ((x >= -30) & (x <= 10) & (y >= -50) & (y <= 50)) | shape_mask(
        {"type": "lasso", "points": [[40, -20], [90, -20], [65, 30]]}, x, y)
    expect = p[inside & (p["dhnmaFlag"] == 0).to_numpy()]
    assert got.particles["rlnImageName"].tolist() == expect["rlnImageName"].tolist()
    assert list(got.particles.columns) == list(p.columns)
    pd.testing.assert_frame_equal(got.optics, read_star(path).optics)
    res = run_cli("select", "--landscape", path, "--groups", "1", "3", "--out", tmp_path / "g.star")  # the alias
    assert res.returncode == 0 and len(read_star(tmp_path / "g.star")) == int(p["dhnmaGroup"].isin([1, 3]).sum())


@pytest.mark.parametrize("args, where", [
    (["--where", "dhnmaPC9 > 0"], "particles.star"),
    (["--where", "dhnmaPC1 > 1e9"], "particles.star: the selection is empty"),
    (["--groups", "7"], "no group 7"),
    (["--selection", "{bad}"], "sel.json: not a JSON file"),
    (["--selection", "outside"], "sel.json: shape 1 (box) contains no particle"),
    ([], "nothing to select by"),
])
def test_cli_select_errors_are_one_line(landscape, tmp_path, run_cli, args, where):
    path, _ = landscape
    sel = tmp_path / "sel.json"
    if "{bad}" in args:
        sel.write_text("{bad")
        args = ["--selection", sel]
    elif "outside" in args:
        save(sel, [{"type": "box", "x": [1000, 2000], "y": [0, 1]}])
        args = ["--selection", sel]
    out = tmp_path / "x.star"
    res = run_cli("select", "--particles", path, *args, "--out", out)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and where in lines[0], res.stderr
    assert not out.exists()
