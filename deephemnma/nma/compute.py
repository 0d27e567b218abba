"""Normal modes of the reference: compute, select, animate (the mode file: core.modes).

Pipeline of ``deephemnma nma`` (:func:`run_nma`):

1. Reference → point set. An atomic model (PDB/mmCIF; chains and atom selection from the
   config ``reference`` section; weights = electrons, Gaussian σ = ``nma.atomic_sigma``),
   or an EM map converted to Gaussian pseudoatoms (:mod:`deephemnma.nma.pseudoatoms`).
2. Elastic network modes (:mod:`deephemnma.nma.enm`): full Hessian below ``nma.rtb_threshold``
   atoms, RTB above (method ``auto``). Modes are numbered from 1; modes 1–6 are the rigid-body
   motions (eigenvalue ≈ 0), stored as an exact orthonormal basis (translations x, y, z, then
   rotations about the principal axes) and never selected. Exactly six zero modes are
   required: a network that falls apart or has floppy parts is an error giving the count.
3. Conventions: every mode is a 3N vector of unit Euclidean norm (ElNemo/Xmipp), so the
   atomic RMSD of a deformation by amplitudes q is ‖Σ q_k v_k‖ / √N (= ‖q‖/√N for
   orthonormal modes); each mode's largest-magnitude component is positive (reruns give
   identical files). Frequencies are √eigenvalue (unit spring constant and masses, relative
   units). Collectivity after Brüschweiler (1995).
4. Output: ONE ``.npz`` file (:func:`save_modes` / :func:`load_modes` → :class:`ModeSet`)
   and a JSON summary of the per-mode figures.

The deformation x(q) = x0 + Σ_k q_k v_k (:func:`deform`) is batched, differentiable torch,
shared by simulation, alignment and animation.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import enm
from ..core.errors import ConfigError, InputError
from ..core.fileio import atomic_path, atomic_write_json, json_default
from ..core.logs import get_logger
from ..core.modes import FORMAT_VERSION, N_RIGID, ModeSet, amplitudes_to_rmsd, deform, load_modes, rmsd_to_amplitude, save_modes
from ..core.structure import Atoms

log = get_logger(__name__)

ATOMIC_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".cif.gz", ".ent.gz", ".mmcif.gz")
MAP_SUFFIXES = (".mrc", ".map", ".mrcs", ".ccp4", ".rec")
# default cutoffs (Å) by atom selection when nma.cutoff is null
DEFAULT_CUTOFF = {"heavy": 8.0, "all": 8.0, "backbone": 8.0, "ca": 12.0, "ca_p": 12.0}
PSEUDOATOM_CUTOFF_FACTOR = 3.0   # × (volume per pseudoatom)^(1/3)
LOCAL_MODE_COLLECTIVITY = 0.1    # selected modes below this are reported as localised


# ----------------------------------------------------------------------------- modes


@dataclass
class ModesResult:
    eigenvalues: np.ndarray       # (K,)
    vectors: np.ndarray           # (K, N, 3) unit norm, sign-fixed
    method: str                   # "full" or "rtb"
    cutoff: float
    info: dict


def compute_modes(coords: np.ndarray, cutoff: float, n_modes: int = 20, method: str = "auto",
                  rtb_threshold: int = 3000, rtb_block: int = 10, blocks: np.ndarray | None = None,
                  residue_index: np.ndarray | None = None, chain_id: np.ndarray | None = None,
                  source: str | None = None, seed: int = 0) -> ModesResult:
    """The ``n_modes`` lowest normal modes (modes 1..n_modes, the first six rigid-body).

    ``method``: "full" (sparse Hessian), "rtb" (blocks of ``rtb_block`` consecutive residues
    per chain from ``residue_index``/``chain_id``, or the given ``blocks``, or, without
    residues, spatial clusters of ``rtb_block`` atoms), "auto" (full up to ``rtb_threshold``
    atoms). Raises InputError (naming ``source``) when the network does not have exactly six
    zero modes.
    """
    import time

    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    if n < 4:
        raise InputError(source, f"only {n} atom(s); normal modes need at least 4")
    if n_modes < N_RIGID + 1:
        raise ConfigError(f"nma.n_modes = {n_modes}: at least {N_RIGID + 1} (six rigid-body modes + one)")
    if method == "auto":
        method = "full" if n <= rtb_threshold else "rtb"
    if method not in ("full", "rtb"):
        raise ConfigError(f"nma.method = {method!r}: expected auto, full or rtb")
    t0 = time.perf_counter()
    pairs = enm.contact_pairs(coords, cutoff)
    if len(pairs):
        dist = np.linalg.norm(coords[pairs[:, 0]] - coords[pairs[:, 1]], axis=1)
        same = np.flatnonzero(dist < 1e-3)
        if len(same):
            i, j = (int(x) + 1 for x in pairs[same[0]])
            raise InputError(source, f"{len(same)} pair(s) of atoms at the same position (e.g. atoms {i} and {j} "
                                     "of the selection, counted from 1): remove duplicates or alternate locations")
    ncomp, labels = enm.network_components(n, pairs)
    if ncomp > 1:
        sizes = np.bincount(labels)
        zero = int(sum(3 if s == 1 else 5 if s == 2 else 6 for s in sizes))
        big = ", ".join(str(s) for s in sorted(sizes, reverse=True)[:5])
        raise InputError(source, f"the elastic network at cutoff {cutoff:g} Å is disconnected: {ncomp} fragments "
                                 f"(sizes {big}{', ...' if ncomp > 5 else ''}) give {zero} zero-frequency modes "
                                 f"instead of 6; raise nma.cutoff")
    t_pairs = time.perf_counter() - t0
    info: dict = {"n_atoms": n, "n_springs": int(len(pairs)), "mean_springs_per_atom": 2.0 * len(pairs) / n}
    k = min(n_modes, 3 * n)
    if method == "full":
        H = enm.hessian(coords, pairs=pairs)
        t_h = time.perf_counter() - t0 - t_pairs
        w, v = enm.lowest_eigenpairs(H, k, seed=seed)
        tol = _full_diag_tol(coords, pairs)
        vecs = v.T.reshape(k, n, 3)
        info["dof"] = 3 * n
    else:
        if blocks is None:
            if residue_index is not None:
                blocks = enm.residue_blocks(residue_index, chain_id if chain_id is not None else np.zeros(n, str),
                                            rtb_block)
            else:
                blocks = enm.spatial_blocks(coords, rtb_block, seed=seed)
        blocks = np.unique(np.asarray(blocks), return_inverse=True)[1].astype(np.int64)
        Pat, keep, nb = enm.rtb_projector(coords, blocks)
        Hr = enm.rtb_hessian(coords, pairs, blocks, Pat, nb)
        Hk = Hr[keep][:, keep]
        t_h = time.perf_counter() - t0 - t_pairs
        k = min(k, Hk.shape[0])
        w, u = enm.lowest_eigenpairs(Hk, k, seed=seed)
        tol = _full_diag_tol(coords, pairs)
        v = enm.rtb_expand(u, blocks, Pat, keep)
        v /= np.linalg.norm(v, axis=0, keepdims=True)
        vecs = v.T.reshape(k, n, 3)
        info.update({"dof": int(Hk.shape[0]), "n_blocks": int(nb), "rtb_block": int(rtb_block)})
    t_eig = time.perf_counter() - t0 - t_pairs - t_h
    n_zero = int((w < tol).sum())
    info.update({"zero_tolerance": tol, "n_zero_modes": n_zero})
    if n_zero > N_RIGID:
        more = "at least " if n_zero == k else ""
        raise InputError(source, f"the elastic network at cutoff {cutoff:g} Å has {more}{n_zero} zero-frequency modes "
                                 f"(eigenvalue < {tol:.3g}) instead of 6: parts of it can move freely; raise nma.cutoff")
    if n_zero < N_RIGID:
        log.warning("%s: only %d eigenvalues below %.3g (expected 6 rigid-body modes); eigenvalues 1-7: %s",
                    source or "network", n_zero, tol, np.array2string(w[:7], precision=3))
    # exact rigid-body basis for modes 1-6; make the others exactly orthogonal to it
    rigid = enm.rigid_body_basis(coords)                       # (3N, 6)
    V = vecs.reshape(k, -1).T.copy()                           # (3N, k)
    overlap = np.linalg.svd(rigid.T @ V[:, :N_RIGID], compute_uv=False)
    info["rigid_subspace_overlap_min"] = float(overlap.min())
    if overlap.min() < 0.99:
        log.warning("%s: computed zero modes overlap the rigid-body motions only %.3f", source or "network", overlap.min())
    V[:, :N_RIGID] = rigid
    rest = V[:, N_RIGID:]
    rest -= rigid @ (rigid.T @ rest)
    rest, _ = np.linalg.qr(rest) if rest.shape[1] else (rest, None)
    V[:, N_RIGID:] = enm.fix_signs(rest) if rest.shape[1] else rest
    V[:, :N_RIGID] = enm.fix_signs(V[:, :N_RIGID])
    vecs = V.T.reshape(k, n, 3)
    info["timing_s"] = {"pairs": t_pairs, "hessian": t_h, "eigen": t_eig}
    log.info("normal modes (%s): %d atoms, %d springs, %d dof, %d modes in %.1f s; eigenvalue of mode 7: %.4g",
             method, n, len(pairs), info["dof"], k, time.perf_counter() - t0, w[N_RIGID] if k > N_RIGID else float("nan"))
    return ModesResult(eigenvalues=w, vectors=vecs, method=method, cutoff=float(cutoff), info=info)


def _full_diag_tol(coords: np.ndarray, pairs: np.ndarray) -> float:
    """Zero tolerance of the full Hessian (its mean diagonal = 2·springs/(3N)), used for RTB too."""
    return enm.ZERO_TOL * 2.0 * len(pairs) / (3.0 * len(coords))


def select_modes(n_computed: int, modes: Sequence[int] | None = None, n_select: int = 3) -> np.ndarray:
    """Selected mode numbers (1-based, ascending): ``modes`` if given, else modes 7..6+n_select.

    Rigid-body modes (1–6) cannot be selected; numbers must be among the computed ones.
    """
    if modes is not None and len(modes) > 0:
        nums = [int(m) for m in modes]
        if len(set(nums)) != len(nums):
            raise ConfigError(f"nma.modes = {nums}: a mode is listed twice")
        rigid = [m for m in nums if m <= N_RIGID]
        if rigid:
            raise ConfigError(f"nma.modes = {nums}: modes 1-6 are rigid-body motions (the pose covers them); "
                              f"select modes from 7 on")
        too_high = [m for m in nums if m > n_computed]
        if too_high:
            raise ConfigError(f"nma.modes = {nums}: mode {too_high[0]} not computed; raise nma.n_modes "
                              f"(now {n_computed}) to at least {max(nums)}")
        return np.asarray(sorted(nums), dtype=np.int64)
    if n_select < 1:
        raise ConfigError(f"nma.n_select = {n_select}: select at least one mode")
    last = N_RIGID + n_select
    if last > n_computed:
        raise ConfigError(f"nma.n_select = {n_select} needs modes 7..{last}; raise nma.n_modes (now {n_computed}) "
                          f"to at least {last}")
    return np.arange(N_RIGID + 1, last + 1, dtype=np.int64)


def reference_kind(path: str | os.PathLike, kind: str = "auto") -> str:
    """"atomic" or "map" from the config's ``reference.kind`` and the file suffix."""
    if kind in ("atomic", "map"):
        return kind
    name = str(path).lower()
    if name.endswith(ATOMIC_SUFFIXES):
        return "atomic"
    if name.endswith(MAP_SUFFIXES):
        return "map"
    raise InputError(path, "cannot tell an atomic model from a map by the suffix (expected .pdb/.cif/.ent/.mmcif "
                           "or .mrc/.map); set reference.kind to atomic or map")


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_reference(path: str | os.PathLike, ref_cfg: dict, nma_cfg: dict) -> tuple[Atoms, np.ndarray, np.ndarray, str, dict]:
    """Reference → (atoms, per-atom sigma Å, centre Å, kind, info) from the config sections."""
    from ..core.structure import load_structure

    kind = reference_kind(path, ref_cfg.get("kind", "auto"))
    if kind == "atomic":
        atoms = load_structure(path, chains=ref_cfg.get("chains"), atoms=ref_cfg.get("atoms", "heavy"),
                               model=int(ref_cfg.get("model", 0)), ligands=bool(ref_cfg.get("ligands", False)))
        sigma = np.full(len(atoms), float(nma_cfg.get("atomic_sigma", 1.0)))
        centre = (atoms.weights @ atoms.coords) / atoms.weights.sum()
        info = {"selection": ref_cfg.get("atoms", "heavy"), "chains": atoms.chains()}
        return atoms, sigma, centre, "atomic", info
    from .pseudoatoms import fit_pseudoatoms, read_map

    pcfg = nma_cfg.get("pseudoatoms", {}) or {}
    vol = read_map(path)
    fit = fit_pseudoatoms(vol, threshold=pcfg.get("threshold"), threshold_std=float(pcfg.get("threshold_std", 1.0)),
                          sigma=pcfg.get("sigma"), resolution=pcfg.get("resolution"),
                          target_error=float(pcfg.get("target_error", 0.05)),
                          max_atoms=int(pcfg.get("max_atoms", 20000)), iterations=int(pcfg.get("iterations", 60)))
    atoms = pseudoatom_atoms(fit.coords, fit.weights, source=str(path))
    sigma = np.full(len(atoms), fit.sigma)
    return atoms, sigma, vol.box_centre, "pseudoatoms", {"pseudoatoms": fit.info, "map_origin_A": vol.origin.tolist()}


def pseudoatom_atoms(coords: np.ndarray, weights: np.ndarray, source: str | None = None) -> Atoms:
    """Pseudoatoms as :class:`Atoms` (atom DENS, residue DEN, chain A, numbered from 1)."""
    n = len(coords)
    return Atoms(coords=coords, element=np.full(n, "C"), atom_name=np.full(n, "DENS"), res_name=np.full(n, "DEN"),
                 res_seq=np.arange(1, n + 1), ins_code=np.full(n, ""), chain_id=np.full(n, "A"), weights=weights,
                 source=source)


def default_cutoff(kind: str, selection: str, info: dict) -> float:
    if kind == "pseudoatoms":
        spacing = info["pseudoatoms"]["volume_per_pseudoatom_A3"] ** (1.0 / 3.0)
        return round(PSEUDOATOM_CUTOFF_FACTOR * spacing, 2)
    return DEFAULT_CUTOFF.get(selection, 8.0)


def run_nma(reference: str | os.PathLike, out: str | os.PathLike, config: dict,
            summary: str | os.PathLike | None = None, animate_dir: str | os.PathLike | None = None,
            pseudoatoms_pdb: str | os.PathLike | None = None) -> ModeSet:
    """``deephemnma nma``: reference → modes file (+ JSON summary, animations, pseudoatom PDB)."""
    from ..core.fileio import require_file

    ref_cfg = dict(config.get("reference", {}) or {})
    cfg = dict(config.get("nma", {}) or {})
    reference = require_file(reference, "reference")
    atoms, sigma, centre, kind, ref_info = build_reference(reference, ref_cfg, cfg)
    cutoff = cfg.get("cutoff")
    cutoff = float(cutoff) if cutoff is not None else default_cutoff(kind, ref_cfg.get("atoms", "heavy"), ref_info)
    n_modes = int(cfg.get("n_modes", 20))
    # select first: a bad selection fails before the (possibly long) computation
    selected = select_modes(n_modes, cfg.get("modes"), int(cfg.get("n_select", 3)))
    res = compute_modes(atoms.coords, cutoff, n_modes=n_modes, method=cfg.get("method", "auto"),
                        rtb_threshold=int(cfg.get("rtb_threshold", 3000)), rtb_block=int(cfg.get("rtb_block", 10)),
                        residue_index=atoms.residue_index() if kind == "atomic" else None,
                        chain_id=atoms.chain_id if kind == "atomic" else None,
                        source=str(reference), seed=int(config.get("seed", 0)))
    k = len(res.eigenvalues)
    if selected.max() > k:
        raise InputError(reference, f"mode {int(selected.max())} selected but the structure has only {k} modes")
    numbers = np.arange(1, k + 1, dtype=np.int64)
    freqs = np.sqrt(np.clip(res.eigenvalues, 0.0, None))
    coll = enm.collectivity(res.vectors)
    local = [int(m) for m in selected if coll[m - 1] < LOCAL_MODE_COLLECTIVITY]
    if local:
        log.warning("%s: selected mode(s) %s are localised (collectivity %s < %.2f): a few loosely connected atoms "
                    "move alone; consider a larger nma.cutoff", reference, ", ".join(map(str, local)),
                    ", ".join(f"{coll[m - 1]:.3f}" for m in local), LOCAL_MODE_COLLECTIVITY)
    info = {k2: v for k2, v in res.info.items() if k2 != "timing_s"}  # timings vary: keep files reproducible
    settings = {
        "format_version": FORMAT_VERSION,
        "reference_path": str(reference),
        "reference_sha256": sha256_of(reference),
        "reference_kind": kind,
        "reference": ref_cfg,
        **ref_info,
        "n_atoms": len(atoms),
        "method": res.method,
        "method_requested": cfg.get("method", "auto"),
        "cutoff_A": res.cutoff,
        "cutoff_from": "config" if cfg.get("cutoff") is not None else "default",
        "spring_constant": 1.0,
        "n_modes": k,
        "n_rigid": N_RIGID,
        "selected_modes": selected.tolist(),
        "selection_rule": "explicit" if cfg.get("modes") else f"first {int(cfg.get('n_select', 3))} non-rigid",
        "mode_norm": "unit Euclidean norm over 3N (ElNemo/Xmipp); RMSD(q) = |sum q_k v_k| / sqrt(N)",
        "sign_convention": "largest-magnitude component of each mode positive",
        "frequency_units": "sqrt(eigenvalue), unit spring constant and masses (relative)",
        "gaussian_sigma_A": float(sigma[0]),
        "network": info,
        "nma_config": cfg,
    }
    ms = ModeSet(coords=atoms.coords, weights=atoms.weights, sigma=sigma, element=atoms.element,
                 atom_name=atoms.atom_name, res_name=atoms.res_name, res_seq=atoms.res_seq, ins_code=atoms.ins_code,
                 chain_id=atoms.chain_id, mode_numbers=selected, modes=res.vectors[selected - 1],
                 computed_numbers=numbers, computed_modes=res.vectors, eigenvalues=res.eigenvalues,
                 frequencies=freqs, collectivity=coll, centre=np.asarray(centre, dtype=np.float64), kind=kind,
                 settings=settings)
    save_modes(out, ms)
    summary = Path(summary) if summary is not None else Path(out).with_suffix(".json")
    write_summary(summary, ms)
    if pseudoatoms_pdb is not None and kind == "pseudoatoms":
        from ..core.structure import write_multimodel_pdb

        write_multimodel_pdb(pseudoatoms_pdb, atoms, [atoms.coords])
    if animate_dir is not None:
        animate(ms, animate_dir, rmsd=float(cfg.get("animate_rmsd", 2.0)), frames=int(cfg.get("animate_frames", 21)))
    log.info("wrote %s: %d %s, modes %s selected of %d", out, len(atoms), kind,
             ", ".join(map(str, selected.tolist())), k)
    return ms


def mode_table(ms: ModeSet) -> list[dict]:
    sel = set(ms.mode_numbers.tolist())
    n = ms.n_atoms
    return [{"mode": int(m), "eigenvalue": float(ms.eigenvalues[i]), "frequency": float(ms.frequencies[i]),
             "collectivity": float(ms.collectivity[i]), "rigid": bool(m <= N_RIGID), "selected": m in sel,
             "amplitude_per_A_rmsd": math.sqrt(n)}
            for i, m in enumerate(ms.computed_numbers.tolist())]


def write_summary(path: str | os.PathLike, ms: ModeSet) -> Path:
    """Human-readable JSON: settings and one row per computed mode."""
    doc = {"kind": ms.kind, "n_atoms": ms.n_atoms, "selected_modes": ms.mode_numbers.tolist(),
           "settings": ms.settings, "modes": mode_table(ms)}
    atomic_write_json(path, doc)
    return Path(path)


def animate(ms: ModeSet, out_dir: str | os.PathLike, rmsd: float = 2.0, frames: int = 21,
            numbers: Sequence[int] | None = None) -> list[Path]:
    """One multi-model PDB per selected mode (``mode_007.pdb``, ...): the reference deformed
    along the mode from −``rmsd`` to +``rmsd`` Å RMS displacement in ``frames`` steps.

    In ChimeraX: ``open mode_007.pdb coordsets true`` then ``coordset #1`` to play it.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    numbers = ms.mode_numbers.tolist() if numbers is None else list(numbers)
    frames = max(2, int(frames))
    amax = rmsd_to_amplitude(rmsd, ms.n_atoms)
    q = torch.linspace(-amax, amax, frames, dtype=torch.float64)[:, None]
    atoms = ms.atoms()
    paths = []
    from ..core.structure import write_multimodel_pdb

    for m in numbers:
        v = torch.as_tensor(ms.mode(int(m)))[None]
        xyz = deform(torch.as_tensor(ms.coords), v, q).numpy()
        p = out_dir / f"mode_{int(m):03d}.pdb"
        write_multimodel_pdb(p, atoms, list(xyz))
        paths.append(p)
    log.info("animations: %d file(s) in %s (±%.2f Å RMSD, %d frames)", len(paths), out_dir, rmsd, frames)
    return paths
