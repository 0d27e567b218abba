"""A synthetic results tree for the results-page tests and bench (helper "pagetree").

``make_results_tree(root, n)`` writes what the page reads, with known values: a landscape of
``n`` particles (three Gaussian clusters in PC1/PC2, groups as bins along PC1, image sets,
flags, scores, amplitudes, poses, CTF), groups.json/csv, small group maps with FSC curves and
summaries (with the reconstruct stage's sign and mask records), multi-model animation PDBs,
a ChimeraX script, and stage summaries as the stages write them: a contrast polarity detected
from the data, and a network that predicts at chance (so the health panel must say so).
"""
from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from deephemnma.core.star import write_star

OPTICS = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                       "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                       "rlnImagePixelSize": [1.3], "rlnImageSize": [64], "rlnImageDimensionality": [2]})


def particle_table(n: int, seed: int = 0, n_groups: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    centres = np.array([[-60.0, -10.0], [0.0, 25.0], [55.0, -5.0]])
    which = rng.integers(0, 3, n)
    Y = centres[which] + rng.normal(0, 14, (n, 2))
    edges = np.quantile(Y[:, 0], np.linspace(0, 1, n_groups + 1))
    group = np.clip(np.searchsorted(edges, Y[:, 0], side="right"), 1, n_groups)
    group[(Y[:, 0] < edges[0] + 3) | (Y[:, 0] > edges[-1] - 3)] = 0  # extremes in no group
    flags = np.where(rng.random(n) < 0.05, 2, 0) | np.where(rng.random(n) < 0.03, 16, 0)
    stack = np.arange(n) // 1000
    return pd.DataFrame({
        "rlnImageName": [f"{i % 1000 + 1:06d}@stacks/chunk_{s:04d}.mrcs" for i, s in zip(range(n), stack)],
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
        "rlnDefocusU": rng.uniform(8000, 20000, n), "rlnAngleRot": rng.uniform(-180, 180, n),
        "rlnAngleTilt": rng.uniform(0, 180, n), "rlnOriginXAngst": rng.normal(0, 2, n),
        "dhnmaAmplitude007": Y[:, 0] * 0.9 + rng.normal(0, 3, n), "dhnmaAmplitude008": Y[:, 1] * 0.8,
        "dhnmaAmplitude009": rng.normal(0, 20, n), "dhnmaScore": rng.normal(0.3, 0.05, n),
        "dhnmaFlag": flags.astype(np.int64), "dhnmaSource": np.where(np.arange(n) < n // 5, 1, 2).astype(np.int64),
        "dhnmaPC1": Y[:, 0], "dhnmaPC2": Y[:, 1], "dhnmaGroup": group.astype(np.int64)})


def write_map(path: Path, box: int, centre_shift: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:box, :box, :box] - box / 2
    vol = np.zeros((box, box, box), np.float32)
    for c in rng.normal(0, box / 10, (6, 3)) + [centre_shift, 0, 0]:
        vol += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * (box / 14) ** 2))
    vol += rng.normal(0, 0.02, vol.shape).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(vol)
        m.voxel_size = 2.0


def write_animation(path: Path, n_atoms: int = 60, frames: int = 11, axis: int = 1) -> None:
    t = np.linspace(0, 4 * np.pi, n_atoms)
    base = np.stack([8 * np.cos(t), 8 * np.sin(t), np.linspace(-15, 15, n_atoms)], axis=1)
    lines = []
    amps = np.concatenate([np.linspace(-1, 1, frames), np.linspace(1, -1, frames)[1:]])  # forward then back
    for k, a in enumerate(amps, 1):
        X = base + a * axis * 3 * np.stack([np.sin(t), np.zeros_like(t), np.cos(t)], axis=1)
        lines.append(f"MODEL     {k:4d}")
        for i, (px, py, pz) in enumerate(X, 1):
            lines.append(f"ATOM  {i:5d}  CA  ALA A{i:4d}    {px:8.3f}{py:8.3f}{pz:8.3f}  1.00  0.00           C")
        lines.append("ENDMDL")
    path.write_text("\n".join(lines) + "\nEND\n")


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_results_tree(root: Path, n: int = 3000, n_groups: int = 4, maps: bool = True, seed: int = 0,
                      all_file: bool = True) -> pd.DataFrame:
    """Write the synthetic tree under ``root``; return the particle table. ``all_file``: one
    groups/particles.star with every particle and dhnmaGroup; else (as the workflow's
    ``groups --no-all``) landscape/landscape.star without dhnmaGroup and groups/group_NN.star."""
    root = Path(root)
    table = particle_table(n, seed, n_groups)
    for d in ("groups", "landscape", "align", "network", "animate"):
        (root / d).mkdir(parents=True, exist_ok=True)
    if all_file:
        write_star(root / "groups" / "particles.star", table, OPTICS)
    else:
        write_star(root / "landscape" / "landscape.star", table.drop(columns="dhnmaGroup"), OPTICS)
        for g in range(1, n_groups + 1):
            write_star(root / "groups" / f"group_{g:02d}.star", table[table["dhnmaGroup"] == g], OPTICS)
    sizes = {g: int((table["dhnmaGroup"] == g).sum()) for g in range(1, n_groups + 1)}
    write_json(root / "groups" / "groups.json", {
        "n_particles": n, "n_groups": n_groups, "n_dropped": int((table["dhnmaGroup"] == 0).sum()),
        "groups": {str(g): {"file": f"group_{g:02d}.star", "size": s} for g, s in sizes.items()}})
    cen = table[table["dhnmaGroup"] > 0].groupby("dhnmaGroup")[["dhnmaPC1", "dhnmaPC2"]].mean()
    pd.DataFrame({"group": cen.index, "size": [sizes[g] for g in cen.index], "pc1_mean": cen["dhnmaPC1"].to_numpy(),
                  "pc2_mean": cen["dhnmaPC2"].to_numpy()}).to_csv(root / "groups" / "groups.csv", index=False)
    write_json(root / "landscape" / "model.json", {
        "method": "pca", "columns": ["dhnmaAmplitude007", "dhnmaAmplitude008", "dhnmaAmplitude009"],
        "components": [[0.95, 0.3, 0.05], [-0.3, 0.94, 0.1]], "explained_variance_ratio": [0.71, 0.22]})
    hem = table[table["dhnmaSource"] == 1]
    write_star(root / "align" / "hemnma.star", hem, OPTICS)
    write_json(root / "filter" / "summary.json", {"threshold": 3.2, "info": {"n_input": len(hem), "n_kept": len(hem) - 20,
                                                                              "n_dropped": 20}})
    write_json(root / "network" / "summary.json", {
        "best_epoch": 12, "best": {"val_angle_error_deg": 89.5, "val_shift_mae_A": 1.0, "val_amplitude_mae": 60.0},
        "mean_prediction_baseline": {"angle": 126.0, "shift": 1.4, "amplitude": 61.0}})
    write_json(root / "preprocess" / "preprocess.json", {"polarity": {
        "invert": True, "setting": "auto",
        "decision": {"polarity": "dark", "zscore": -23.4, "threshold": 5.0, "n_particles": 500,
                     "method": "ctf-blob-ttest", "evidence": {"fraction_positive": 0.12}, "invert": True}}})
    for axis in (1, 2):
        write_animation(root / "animate" / f"axis_{axis:02d}.pdb", axis=axis)
    (root / "animate" / "chimerax.cxc").write_text("open axis_01.pdb coordsets true\ncoordset #1 1,21 loop 10\n")
    if maps:
        for g in range(1, n_groups + 1):
            d = root / "maps" / f"group_{g:02d}"
            d.mkdir(parents=True, exist_ok=True)
            write_map(d / "map.mrc", 32, centre_shift=g, seed=g)
            f = np.linspace(0, 0.25, 17)
            pd.DataFrame({"shell": np.arange(17), "frequency": f,
                          "fsc": 1 / (1 + np.exp((f - 0.12 - 0.01 * g) * 60))}).to_csv(d / "fsc.csv", index=False)
            write_json(d / "summary.json", {
                "n_particles": sizes[g], "resolution_fsc0143": 7.0 - 0.3 * g, "resolution_fsc05": 8.5 - 0.3 * g,
                "resolution_unmasked_fsc0143": 8.0 - 0.3 * g, "resolution_unmasked_fsc05": 9.5 - 0.3 * g,
                "masked": True, "images_negated": True, "ctf_states": {"raw": sizes[g]},
                "sign": {"positive": True, "correlation_with_reference": 0.6 + 0.05 * g},
                "mask": {"kind": "auto", "volume_fraction": 0.12, "holds_centre_of_mass": True,
                         "reference_density_inside": 0.97, "problems": []}})
    return table
