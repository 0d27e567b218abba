"""Atomic models (PDB / mmCIF) via gemmi: selections, density weights, multi-model PDB output.

:func:`load_structure` reads one model of a PDB or mmCIF file into :class:`Atoms`, a flat
set of per-atom arrays (coordinates in Å, float64, in the file's own frame).

What is kept:

* **Residues**: polymer residues (amino acids, nucleotides, including modified residues
  inside a chain, as classified by gemmi's ``setup_entities``). Waters are always removed;
  other non-polymer residues (ligands, ions) only when ``ligands=True``. A file made only of
  non-polymer residues (e.g. a pseudoatom model) keeps them, with a log line saying so.
* **Alternate locations**: the first conformer of every atom/residue (gemmi
  ``remove_alternative_conformations``).
* **Atoms** (``atoms=``): ``heavy`` (everything but H/D), ``ca`` (Cα of amino acids),
  ``ca_p`` (Cα of amino acids and P of nucleotides), ``backbone`` (N, CA, C, O of amino
  acids; P, OP1, OP2, O5', C5', C4', C3', O3' of nucleotides), ``all`` (hydrogens too).
  Amino acids and nucleotides are recognised by gemmi's residue table or, for names it does
  not classify (CHARMM's HSD/HSE in AK.pdb), by their atoms (a carbon named CA; C1' and C4').

Density weights (:attr:`Atoms.weights`) are the atomic number Z, i.e. the number of
electrons (H = 1, C = 6, N = 7, O = 8, P = 15, S = 16), the integral of each atom's
density in the Gaussian-atom model; unknown elements (``X``) count as carbon (6). Coarse
selections keep the per-atom Z of the kept atom (a Cα weighs 6), the usual choice when
only relative densities matter.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .fileio import atomic_path, require_file
from .logs import get_logger

log = get_logger(__name__)

ATOM_SELECTIONS = ("heavy", "ca", "ca_p", "backbone", "all")
PROTEIN_BACKBONE = frozenset({"N", "CA", "C", "O"})
NUCLEIC_BACKBONE = frozenset({"P", "OP1", "OP2", "O1P", "O2P", "O5'", "C5'", "C4'", "C3'", "O3'"})
UNKNOWN_ELEMENT_Z = 6.0


@dataclass
class Atoms:
    """A flat atom set: per-atom arrays of equal length N.

    ``coords`` (N, 3) float64 Å; ``element`` element symbols ("C", "N", ...);
    ``atom_name``; ``res_name``; ``res_seq`` (int residue numbers); ``ins_code`` (insertion
    codes, "" when none); ``chain_id``; ``weights`` (N,) float64 density weights (electrons,
    see the module docstring). ``source`` is the file the atoms came from, if any.
    """

    coords: np.ndarray
    element: np.ndarray
    atom_name: np.ndarray
    res_name: np.ndarray
    res_seq: np.ndarray
    ins_code: np.ndarray
    chain_id: np.ndarray
    weights: np.ndarray
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.coords = np.ascontiguousarray(self.coords, dtype=np.float64).reshape(-1, 3)
        n = len(self.coords)
        for name in ("element", "atom_name", "res_name", "ins_code", "chain_id"):
            arr = np.asarray(getattr(self, name), dtype=str)
            if arr.shape != (n,):
                raise ValueError(f"Atoms.{name} has shape {arr.shape}, expected ({n},)")
            setattr(self, name, arr)
        self.res_seq = np.asarray(self.res_seq, dtype=np.int64).reshape(n)
        self.weights = np.asarray(self.weights, dtype=np.float64).reshape(n)

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def n_atoms(self) -> int:
        return len(self.coords)

    def subset(self, index) -> "Atoms":
        """Atoms selected by a boolean mask or an index array (order kept)."""
        return Atoms(self.coords[index], self.element[index], self.atom_name[index], self.res_name[index],
                     self.res_seq[index], self.ins_code[index], self.chain_id[index], self.weights[index],
                     source=self.source)

    def with_coords(self, coords: np.ndarray) -> "Atoms":
        coords = np.asarray(coords, dtype=np.float64)
        if coords.shape != self.coords.shape:
            raise ValueError(f"coords shape {coords.shape} != {self.coords.shape}")
        return replace(self, coords=coords.copy())

    def residue_keys(self) -> np.ndarray:
        """One string per atom identifying its residue: ``chain:number[insertion]``."""
        return np.char.add(np.char.add(np.char.add(self.chain_id, ":"), self.res_seq.astype(str)), self.ins_code)

    def residue_index(self) -> np.ndarray:
        """Per-atom index of its residue, counting residues in file order from 0.

        A new residue starts whenever chain, number or insertion code changes from the
        previous atom (the order in which the file lists them).
        """
        n = len(self)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        change = np.ones(n, dtype=bool)
        change[1:] = ((self.chain_id[1:] != self.chain_id[:-1]) | (self.res_seq[1:] != self.res_seq[:-1])
                      | (self.ins_code[1:] != self.ins_code[:-1]))
        return np.cumsum(change) - 1

    def chains(self) -> list[str]:
        seen: dict[str, None] = {}
        for c in self.chain_id:
            seen.setdefault(str(c), None)
        return list(seen)


def element_weights(elements: Sequence[str]) -> np.ndarray:
    """Atomic number Z per element symbol (electrons); unknown symbols count as carbon."""
    import gemmi

    out = np.empty(len(elements), dtype=np.float64)
    cache: dict[str, float] = {}
    for i, sym in enumerate(elements):
        z = cache.get(sym)
        if z is None:
            z = float(gemmi.Element(sym).atomic_number) if sym else 0.0
            cache[sym] = z if z > 0 else UNKNOWN_ELEMENT_Z
            z = cache[sym]
        out[i] = z
    return out


def _keep_atom(selection: str, atom_name: str, is_h: bool, is_aa: bool, is_na: bool) -> bool:
    if selection == "all":
        return True
    if selection == "heavy":
        return not is_h
    if selection == "ca":
        return is_aa and atom_name == "CA"
    if selection == "ca_p":
        return (is_aa and atom_name == "CA") or (is_na and atom_name == "P")
    if selection == "backbone":
        return (is_aa and atom_name in PROTEIN_BACKBONE) or (is_na and atom_name in NUCLEIC_BACKBONE)
    raise ValueError(f"unknown atom selection {selection!r}; choose one of {', '.join(ATOM_SELECTIONS)}")


def _residue_class(res, info) -> tuple[bool, bool]:
    """(amino acid?, nucleotide?) from gemmi's residue table, or, for names it does not
    classify (e.g. CHARMM's HSD/HSE), from the atoms: a carbon named CA (not calcium); C1' and C4'."""
    is_aa = bool(info is not None and info.is_amino_acid())
    is_na = bool(info is not None and info.is_nucleic_acid())
    if not (is_aa or is_na):
        names = {at.name: at.element.name for at in res}
        is_aa = names.get("CA") == "C"
        is_na = "C1'" in names and "C4'" in names
    return is_aa, is_na


def read_gemmi_structure(path: str | os.PathLike):
    """gemmi.read_structure with user-facing errors (missing, unreadable, no models)."""
    import gemmi

    p = require_file(path, "structure file")
    try:
        st = gemmi.read_structure(str(p))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError/IOError with a message
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise InputError(p, f"cannot read as PDB or mmCIF ({msg})") from None
    if len(st) == 0:
        raise InputError(p, "no atomic model found (not a PDB/mmCIF file, or an empty one)")
    return st


def load_structure(path: str | os.PathLike, chains: Sequence[str] | None = None, atoms: str = "heavy",
                   model: int = 0, ligands: bool = False, min_atoms: int = 4) -> Atoms:
    """Read one model of a PDB/mmCIF file into :class:`Atoms` (see the module docstring).

    ``chains``: chain names to keep (None = all); ``atoms``: one of :data:`ATOM_SELECTIONS`;
    ``model``: 0-based index of the model in a multi-model file; ``ligands``: keep
    non-polymer, non-water residues too. Raises :class:`InputError` for a missing or
    unreadable file, an absent model or chain, or fewer than ``min_atoms`` selected atoms.
    """
    import gemmi

    if atoms not in ATOM_SELECTIONS:
        raise ValueError(f"unknown atom selection {atoms!r}; choose one of {', '.join(ATOM_SELECTIONS)}")
    path = Path(path)
    st = read_gemmi_structure(path)
    if not 0 <= model < len(st):
        raise InputError(path, f"model index {model} requested but the file has {len(st)} model(s) (0-based)")
    st.remove_alternative_conformations()
    st.setup_entities()
    mdl = st[model]
    present = [ch.name for ch in mdl]
    if chains is not None:
        chains = [str(c) for c in chains]
        missing = [c for c in chains if c not in present]
        if missing:
            raise InputError(path, f"chain {', '.join(missing)} not found; chains present: {', '.join(dict.fromkeys(present))}")
    wanted = None if chains is None else set(chains)

    polymer = gemmi.EntityType.Polymer
    rows: list[tuple] = []
    other_rows: list[tuple] = []  # non-polymer, non-water residues (ligands) when not kept
    for ch in mdl:
        if wanted is not None and ch.name not in wanted:
            continue
        for res in ch:
            info = gemmi.find_tabulated_residue(res.name)
            if (info is not None and info.is_water()) or res.name in ("HOH", "WAT", "DOD", "H2O"):
                continue
            is_aa, is_na = _residue_class(res, info)
            is_polymer = res.entity_type == polymer
            target = rows if (is_polymer or ligands) else other_rows
            for at in res:
                is_h = at.element.is_hydrogen
                if not _keep_atom(atoms, at.name, is_h, is_aa, is_na):
                    continue
                target.append((at.pos.x, at.pos.y, at.pos.z, at.element.name, at.name, res.name,
                               res.seqid.num, res.seqid.icode.strip(), ch.name))
    if not rows and other_rows:
        log.info("%s: no polymer residues; keeping its %d non-polymer atoms (e.g. a pseudoatom model)",
                 path, len(other_rows))
        rows = other_rows
    where = f"chain(s) {', '.join(chains)}" if chains is not None else "the model"
    if not rows:
        raise InputError(path, f"the atom selection {atoms!r} is empty in {where}")
    if len(rows) < min_atoms:
        raise InputError(path, f"only {len(rows)} atom(s) selected ({atoms!r} in {where}); at least {min_atoms} needed")
    cols = list(zip(*rows))
    coords = np.column_stack([np.asarray(cols[0]), np.asarray(cols[1]), np.asarray(cols[2])])
    element = np.asarray(cols[3], dtype=str)
    out = Atoms(coords=coords, element=element, atom_name=np.asarray(cols[4], dtype=str),
                res_name=np.asarray(cols[5], dtype=str), res_seq=np.asarray(cols[6], dtype=np.int64),
                ins_code=np.asarray(cols[7], dtype=str), chain_id=np.asarray(cols[8], dtype=str),
                weights=element_weights(element), source=str(path))
    log.debug("%s: %d atoms (%s, chains %s, model %d)", path, len(out), atoms, ",".join(out.chains()), model)
    return out


# ----------------------------------------------------------------------------- writing


def to_gemmi_structure(atoms: Atoms, coords_list: Sequence[np.ndarray] | None = None):
    """A gemmi.Structure with one model per coordinate set (default: ``atoms.coords``)."""
    import gemmi

    if coords_list is None:
        coords_list = [atoms.coords]
    st = gemmi.Structure()
    st.name = "deephemnma"
    n = len(atoms)
    # group atoms into chains / residues in file order
    res_idx = atoms.residue_index()
    for k, xyz in enumerate(coords_list):
        xyz = np.asarray(xyz, dtype=np.float64)
        if xyz.shape != (n, 3):
            raise ValueError(f"coordinate set {k} has shape {xyz.shape}, expected ({n}, 3)")
        model = gemmi.Model(k + 1)
        chain = None
        residue = None
        prev_res = -1
        for i in range(n):
            cid = str(atoms.chain_id[i]) or "A"
            if chain is None or chain.name != cid:
                if chain is not None:
                    if residue is not None:
                        chain.add_residue(residue)
                        residue = None
                    model.add_chain(chain)
                chain = gemmi.Chain(cid)
                prev_res = -1
            if res_idx[i] != prev_res:
                if residue is not None:
                    chain.add_residue(residue)
                residue = gemmi.Residue()
                residue.name = str(atoms.res_name[i])
                residue.seqid = gemmi.SeqId(int(atoms.res_seq[i]), (str(atoms.ins_code[i]) or " ")[0])
                residue.het_flag = "A"
                prev_res = res_idx[i]
            at = gemmi.Atom()
            at.name = str(atoms.atom_name[i])
            at.element = gemmi.Element(str(atoms.element[i]) or "C")
            at.pos = gemmi.Position(*xyz[i])
            at.occ = 1.0
            at.b_iso = 0.0
            residue.add_atom(at)
        if residue is not None:
            chain.add_residue(residue)
        if chain is not None:
            model.add_chain(chain)
        st.add_model(model)
    st.setup_entities()
    return st


def write_multimodel_pdb(path: str | os.PathLike, atoms: Atoms, coords_list: Sequence[np.ndarray]) -> Path:
    """Write one PDB file with a MODEL/ENDMDL record per coordinate set (atomic write).

    ChimeraX opens such a file as one model with several coordinate sets, which its
    ``coordset`` command plays as an animation.
    """
    import gemmi

    path = Path(path)
    st = to_gemmi_structure(atoms, coords_list)
    opt = gemmi.PdbWriteOptions(minimal=True, cryst1_record=False)
    with atomic_path(path) as tmp:
        st.write_pdb(str(tmp), opt)
    return path


def write_structure(path: str | os.PathLike, atoms: Atoms) -> Path:
    """Write a single model as PDB (``.pdb``/``.ent``) or mmCIF (``.cif``/``.mmcif``), atomically."""
    path = Path(path)
    st = to_gemmi_structure(atoms)
    with atomic_path(path) as tmp:
        if path.suffix.lower() in (".cif", ".mmcif"):
            st.make_mmcif_document().write_file(str(tmp))
        else:
            import gemmi

            opt = gemmi.PdbWriteOptions(minimal=True, cryst1_record=False)
            st.write_pdb(str(tmp), opt)
    return path


# ----------------------------------------------------------------------------- superposition


def kabsch(mobile: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rotation R (3, 3) and translation t (3,) minimising Σ w‖R·mobile_i + t − target_i‖².

    Proper rotations only (det R = +1). Apply as ``mobile @ R.T + t``.
    """
    P = np.asarray(mobile, dtype=np.float64)
    Q = np.asarray(target, dtype=np.float64)
    if P.shape != Q.shape or P.ndim != 2 or P.shape[1] != 3:
        raise ValueError(f"kabsch needs two (N, 3) arrays of equal shape, got {P.shape} and {Q.shape}")
    w = np.ones(len(P)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    pc = w @ P
    qc = w @ Q
    A = (P - pc).T @ ((Q - qc) * w[:, None])
    U, _, Vt = np.linalg.svd(A)
    d = np.sign(np.linalg.det(U @ Vt)) or 1.0
    R = (U @ np.diag([1.0, 1.0, d]) @ Vt).T
    t = qc - R @ pc
    return R, t


def superpose(mobile: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """``mobile`` optimally rotated and translated onto ``target``, and the RMSD after fitting (Å)."""
    R, t = kabsch(mobile, target, weights)
    moved = np.asarray(mobile, dtype=np.float64) @ R.T + t
    return moved, rmsd(moved, target, weights)


def rmsd(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Root-mean-square deviation between two (N, 3) coordinate sets, without fitting."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d2 = ((a - b) ** 2).sum(axis=-1)
    if weights is None:
        return float(np.sqrt(d2.mean()))
    w = np.asarray(weights, dtype=np.float64)
    return float(np.sqrt((w * d2).sum() / w.sum()))


def match_atoms(a: Atoms, b: Atoms) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of atoms present in both sets, matched by chain, residue number,
    insertion code and atom name (in ``a``'s order)."""
    key_a = np.char.add(np.char.add(a.residue_keys(), "/"), a.atom_name)
    key_b = np.char.add(np.char.add(b.residue_keys(), "/"), b.atom_name)
    pos_b = {k: i for i, k in enumerate(key_b.tolist())}
    ia, ib = [], []
    for i, k in enumerate(key_a.tolist()):
        j = pos_b.get(k)
        if j is not None:
            ia.append(i)
            ib.append(j)
    return np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64)
