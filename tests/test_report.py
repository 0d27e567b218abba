"""The HTML report: self-contained, a section per stage present, tolerant of missing/broken parts."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import starfile

from deephemnma.core import plots
from deephemnma.commands.report import report_sections
from deephemnma.report import build_report

from _landsim import optics_table


def make_tree(root):
    rng = np.random.default_rng(0)
    (root / "nma").mkdir(parents=True)
    (root / "nma" / "summary.json").write_text(json.dumps({"n_atoms": 214, "modes": [7, 8, 9], "cutoff": 8.0}))
    plots.explained_variance(root / "nma" / "spectrum.png", [0.5, 0.3, 0.2])
    (root / "network").mkdir()
    pd.DataFrame({"epoch": np.arange(1, 21), "train_loss": np.exp(-np.arange(20) / 5),
                  "val_loss": np.exp(-np.arange(20) / 6)}).to_csv(root / "network" / "history.csv", index=False)
    (root / "landscape").mkdir()
    Y = rng.normal(0, 100, (3000, 2))
    df = pd.DataFrame({"rlnImageName": [f"{i + 1}@s.mrcs" for i in range(3000)], "rlnOpticsGroup": 1,
                       "dhnmaPC1": Y[:, 0], "dhnmaPC2": Y[:, 1], "dhnmaGroup": (Y[:, 0] > 0).astype(int) + 1})
    starfile.write({"optics": optics_table(), "particles": df}, root / "landscape" / "landscape.star")
    (root / "landscape" / "landscape_model.json").write_text(json.dumps(
        {"method": "pca", "columns": ["dhnmaAmplitude007"], "explained_variance_ratio": [0.7, 0.2]}))
    (root / "landscape" / "broken.json").write_text("{not json")
    for g in (1, 2):
        d = root / "maps" / f"group_{g:02d}"
        d.mkdir(parents=True)
        f = np.linspace(0, 0.25, 17)
        pd.DataFrame({"shell": np.arange(17), "frequency": f, "fsc": 1 / (1 + np.exp((f - 0.15 + 0.02 * g) * 60))}
                     ).to_csv(d / "fsc.csv", index=False)
        (d / "summary.json").write_text(json.dumps({"n_particles": 900 + g, "box": 32, "voxel_size": 2.0,
                                                    "resolution_fsc0143": 6.1 + g, "resolution_fsc05": 7.2 + g,
                                                    "masked": True, "seconds": 1.5}))
        (d / "map.mrc").write_bytes(b"")
    (root / "evaluate").mkdir()
    (root / "evaluate" / "summary.json").write_text(json.dumps({"n": 2000, "angle_err": {"mean": 2.5, "std": 1.0}}))
    (root / "misc").mkdir()
    (root / "misc" / "notes.csv").write_text("a,b\n1,2\n")
    (root / "config.yaml").write_text("seed: 0\n")


def test_report_sections_and_self_contained(tmp_path):
    make_tree(tmp_path / "results")
    out = build_report(tmp_path / "results", tmp_path / "report.html", report_sections(), title="test run")
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<title>test run</title>" in text
    for title in ("Normal modes", "Network training", "Conformational landscape", "Reconstructions and FSC",
                  "Evaluation against ground truth", "Other results"):
        assert f"<h2>{title}</h2>" in text
    for absent in ("Animations", "Groups</h2>", "HEMNMA alignment"):
        assert f"<h2>{absent}" not in text
    # images embedded, nothing fetched from elsewhere
    imgs = re.findall(r'<img src="([^"]+)"', text)
    assert len(imgs) >= 4 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script" not in text
    assert "training curves" in text  # drawn from history.csv
    assert "FSC of 2 map(s)" in text and "maps/group_02" in text and "8.1" in text  # reconstruction table
    assert "landscape/landscape.star: landscape" in text  # plotted from the STAR file
    assert "broken.json: could not be shown" in text  # reported, not fatal
    assert "n_atoms" in text and "214" in text and "seed: 0" in text


def test_report_of_empty_or_partial_tree(tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    out = build_report(tmp_path / "empty", tmp_path / "e.html", report_sections())
    assert "No results found" in out.read_text()
    (tmp_path / "partial" / "groups").mkdir(parents=True)
    pd.DataFrame({"group": [1, 2], "size": [10, 20]}).to_csv(tmp_path / "partial" / "groups" / "groups.csv", index=False)
    res = run_cli("report", "--results", tmp_path / "partial", "--out", tmp_path / "p.html")
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "p.html").read_text()
    assert "<h2>Groups</h2>" in text and "<td>20</td>" in text
    res = run_cli("report", "--results", tmp_path / "nowhere", "--out", tmp_path / "x.html")
    assert res.returncode == 2 and "nowhere" in res.stderr and not (tmp_path / "x.html").exists()
