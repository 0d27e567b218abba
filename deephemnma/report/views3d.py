"""Maps and motions prepared for the page's 3D views (NGL in the browser).

* :func:`page_map`: a group map binned to at most ``max_box`` voxels a side, low-pass filtered
  to its FSC 0.143 resolution (as maps are shown), and quantised to
  65,001 levels stored as float32 (MRC mode 2, which NGL reads; integral values compress well
  with gzip; the isosurface level is set in standard deviations, which quantisation keeps),
  with its statistics and a sign check.
* :func:`page_animation`: a multi-model PDB along a landscape axis, reduced for the page (the
  forward half of a back-and-forth loop, at most ``max_frames`` frames, only Cα/P atoms for large
  structures), with each atom's largest distance from its mean position (Å) written as its B-factor so the viewer
  colours what moves.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import mrcfile
import numpy as np

from ..core.mrc import read_volume

MAX_PAGE_ATOMS = 20_000


def bin_volume(data: np.ndarray, max_box: int) -> tuple[np.ndarray, int]:
    """Average ``f³`` blocks with the smallest integer ``f`` that brings every side to ≤ max_box."""
    f = int(np.ceil(max(data.shape) / max_box))
    if f <= 1:
        return data, 1
    z, y, x = (s // f * f for s in data.shape)
    d = data[:z, :y, :x].reshape(z // f, f, y // f, f, x // f, f)
    return d.mean(axis=(1, 3, 5)), f


def lowpass(data: np.ndarray, voxel_size: float, resolution: float | None) -> np.ndarray:
    """``data`` filtered to ``resolution`` (Å) with a raised-cosine edge one tenth of Nyquist
    wide, as a map is shown at its FSC resolution; unchanged when no resolution is given or it
    is beyond Nyquist."""
    if not resolution or resolution <= 2 * voxel_size:
        return data
    n = data.shape
    f = np.sqrt(sum(np.meshgrid(*[np.fft.fftfreq(k) ** 2 for k in n[:2]], np.fft.rfftfreq(n[2]) ** 2,
                                indexing="ij")))
    cut, width = voxel_size / resolution, 0.05
    w = np.clip((cut + width / 2 - f) / width, 0, 1)
    w = 0.5 - 0.5 * np.cos(np.pi * w)
    return np.fft.irfftn(np.fft.rfftn(data) * w, s=n, axes=(0, 1, 2))


def display_level(data: np.ndarray, mask: np.ndarray | None) -> float:
    """A starting isosurface level (σ units): enclosing a sixth of the mask's volume, or the
    top 3 % of voxels without a mask."""
    frac = (mask > 0.5).mean() / 6 if mask is not None and mask.shape == data.shape else 0.03
    level = (np.quantile(data, 1 - max(frac, 1e-3)) - data.mean()) / (data.std() or 1.0)
    return float(np.clip(round(level, 1), 0.5, 8.0))


def map_sanity(data: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Cheap checks of a map: is the strongest density positive (protein white), and how much
    of it lies inside the mask."""
    v = data.ravel()
    lo, hi = np.quantile(v, [0.001, 0.999])
    out = {"positive": bool(hi - np.median(v) >= np.median(v) - lo),
           "q999": float(hi), "q001": float(lo), "median": float(np.median(v))}
    if mask is not None and mask.shape == data.shape:
        top = data >= np.quantile(v, 0.99)
        out["mask_fraction"] = float((mask > 0.5).mean())
        out["top_density_in_mask"] = float((mask[top] > 0.5).mean()) if top.any() else None
    return out


def mrc_bytes(data: np.ndarray, voxel_size: float) -> bytes:
    """An MRC file (mode 2, float32) of ``data`` as bytes."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.mrc"
        with mrcfile.new(p, overwrite=True) as m:
            m.set_data(np.ascontiguousarray(data, dtype=np.float32))
            m.voxel_size = voxel_size
        return p.read_bytes()


def page_map(path: Path, max_box: int = 80, resolution: float | None = None) -> tuple[bytes, dict]:
    """``(MRC bytes, info)`` of the map at ``path`` for the page: binned, low-pass filtered to
    ``resolution`` (Å; its FSC 0.143 resolution), quantised."""
    vol = read_volume(path)
    data, f = bin_volume(vol.data.astype(np.float64), max_box)
    data = lowpass(data, float(vol.voxel_size) * f, resolution)
    mask = None
    if (path.parent / "mask.mrc").is_file():
        mask = bin_volume(read_volume(path.parent / "mask.mrc").data.astype(np.float64), max_box)[0]
    mean, std = float(data.mean()), float(data.std())
    scale = 32000.0 / max(float(np.abs(data).max()), 1e-30)
    info = {"box": int(data.shape[0]), "binning": f, "voxel_size": float(vol.voxel_size) * f, "lowpass": resolution,
            "mean": mean, "std": std, "level": display_level(data, mask), "sanity": map_sanity(data, mask)}
    return mrc_bytes(np.rint(data * scale), float(vol.voxel_size) * f), info


def _models(text: str) -> tuple[list[list[str]], list[str]]:
    """Atom lines per model of a PDB text, and the lines before the first model."""
    models, cur, head = [], None, []
    for line in text.splitlines():
        rec = line[:6]
        if rec.startswith("MODEL"):
            cur = []
        elif rec.startswith("ENDMDL"):
            if cur is not None:
                models.append(cur)
            cur = None
        elif rec in ("ATOM  ", "HETATM"):
            (cur if cur is not None else head).append(line)
    if not models and head:  # a single model without MODEL records
        models, head = [head], []
    return models, head


def _coords(lines: list[str]) -> np.ndarray:
    return np.array([[float(ln[30:38]), float(ln[38:46]), float(ln[46:54])] for ln in lines])


def forward_frames(X: np.ndarray) -> int:
    """Number of frames of the forward pass when the animation goes forward then back
    (``0..m, m-1..0`` or the seamless ``0..m, m-1..1``); all frames otherwise."""
    F = len(X)
    for m in sorted({F // 2, (F - 1) // 2}):
        tail = X[m + 1:]
        if 1 <= m < F - 1 and len(tail) <= m and np.allclose(tail, X[m - 1::-1][:len(tail)], atol=1e-3):
            return m + 1
    return F


def page_animation(path: Path, max_frames: int = 21) -> tuple[bytes, dict]:
    """``(PDB bytes, info)`` of a multi-model animation for the page (see the module docstring)."""
    models, _ = _models(path.read_text())
    if not models:
        raise ValueError(f"{path}: no atoms")
    X = np.stack([_coords(m) for m in models])  # (F, N, 3)
    F = forward_frames(X)
    X, models = X[:F], models[:F]
    keep_f = np.unique(np.linspace(0, F - 1, min(F, max_frames)).round().astype(int))
    atoms = np.arange(X.shape[1])
    if X.shape[1] > MAX_PAGE_ATOMS:
        atoms = np.array([i for i, ln in enumerate(models[0]) if ln[12:16].strip() in ("CA", "P")])
    disp = np.linalg.norm(X[:, atoms] - X[:, atoms].mean(axis=0), axis=2).max(axis=0)
    rmsd_ends = float(np.sqrt(((X[-1, atoms] - X[0, atoms]) ** 2).sum(axis=1).mean()))
    full_atom = len(atoms) == X.shape[1] and any(models[0][a][12:16].strip() == "N" for a in atoms)
    out = []
    for k, f in enumerate(keep_f, 1):
        out.append(f"MODEL     {k:4d}")
        for j, a in enumerate(atoms):
            ln = models[f][a].ljust(80)
            out.append(f"{ln[:60]}{min(disp[j], 999.99):6.2f}{ln[66:]}".rstrip())
        out.append("ENDMDL")
    out.append("END")
    info = {"frames": int(len(keep_f)), "atoms": int(len(atoms)), "all_atoms": int(X.shape[1]),
            "max_displacement": float(disp.max()), "rmsd_ends": rmsd_ends,
            "representation": "cartoon" if full_atom else "backbone"}
    return ("\n".join(out) + "\n").encode(), info
