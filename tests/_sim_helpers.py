"""Helpers of the simulation/preprocessing tests: a small reference with synthetic smooth modes.

Until the normal-mode stage's output is used, the tests build a ModeSet-like reference:
adenylate-kinase atoms (or a random compact blob when the demo PDB is unavailable) with
smooth, rigid-body-free, orthonormal displacement fields as modes 7, 8, 9, ...
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from deephemnma.simulate import SimReference


def smooth_modes(coords: np.ndarray, n_modes: int = 3, seed: int = 0) -> np.ndarray:
    """(n_modes, N, 3) orthonormal (over 3N) smooth fields, orthogonal to the 6 rigid-body motions."""
    rng = np.random.default_rng(seed)
    X = coords - coords.mean(0)
    s = X / np.abs(X).max()
    n = len(X)
    rigid = []
    for j in range(3):
        t = np.zeros((n, 3))
        t[:, j] = 1
        rigid.append(t)
    for axis in np.eye(3):
        rigid.append(np.cross(axis, X))
    feats = np.concatenate([s, s ** 2, s[:, [0]] * s[:, [1]], s[:, [1]] * s[:, [2]], s[:, [0]] * s[:, [2]]], 1)  # (N, 9)
    basis = list(rigid)
    out = []
    while len(out) < n_modes:
        v = feats @ rng.standard_normal((feats.shape[1], 3))
        for b in basis:
            v = v - (v * b).sum() / (b * b).sum() * b
        v /= np.linalg.norm(v)
        basis.append(v)
        out.append(v)
    return np.stack(out)


def blob(n: int = 300, seed: int = 0, radius: float = 12.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    x *= radius * rng.uniform(0, 1, (n, 1)) ** (1 / 3) / np.linalg.norm(x, axis=1, keepdims=True)
    el = rng.choice(["C", "N", "O", "S"], size=n, p=[0.6, 0.18, 0.2, 0.02])
    return x, el


def toy_reference(coords=None, elements=None, n_modes: int = 3, seed: int = 0, first_mode: int = 7) -> SimReference:
    if coords is None:
        coords, elements = blob(seed=seed)
    vec = smooth_modes(np.asarray(coords), n_modes, seed)
    return SimReference(coords, elements, np.arange(first_mode, first_mode + n_modes), vec)


def ak_heavy_atoms(path: Path):
    import gemmi

    st = gemmi.read_structure(str(path))
    xyz, el = [], []
    for res in st[0]["A"]:
        for a in res:
            if a.element.name != "H":
                xyz.append(a.pos.tolist())
                el.append(a.element.name)
    return np.array(xyz), np.array(el)
