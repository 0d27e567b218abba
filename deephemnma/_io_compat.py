"""Stand-ins for what the nma helper's modules will provide (structures and normal modes).

``load_structure`` / ``write_multimodel_pdb`` come from :mod:`deephemnma.structure` when it
is present; until then a minimal gemmi-based version with the same call signature is used.
``load_modes`` reads the normal modes (see its docstring) — to be replaced by the nma
module's loader when it lands (then this module goes).
"""
from __future__ import annotations

# ------------------------------------------------------------------ structures and modes
try:  # pragma: no cover - exercised once deephemnma.structure is on main
    from .structure import load_structure, write_multimodel_pdb  # noqa: F401
    HAVE_STRUCTURE = True
except ImportError:
    HAVE_STRUCTURE = False

if not HAVE_STRUCTURE:
    from dataclasses import dataclass as _dc
    from pathlib import Path as _Path

    import numpy as _np

    from .fileio import atomic_path as _atomic_path

    @_dc
    class _Atoms:
        coords: _np.ndarray
        source: str
        atoms: str

        def __len__(self) -> int:
            return len(self.coords)

    def _select(atoms: str, at, res):
        import gemmi

        info = gemmi.find_tabulated_residue(res.name)
        if info is not None and info.is_water():
            return False
        if atoms == "ca":
            return at.name == "CA"
        if atoms == "heavy":
            return not at.element.is_hydrogen
        return True

    def load_structure(path, chains=None, atoms: str = "heavy", model: int = 0, **kw):
        import gemmi

        st = gemmi.read_structure(str(path))
        st.remove_alternative_conformations()
        xyz = [(a.pos.x, a.pos.y, a.pos.z) for ch in st[model] if chains is None or ch.name in chains
               for r in ch for a in r if _select(atoms, a, r)]
        return _Atoms(_np.asarray(xyz, float), str(path), atoms)

    def write_multimodel_pdb(path, atoms, coords_list):
        import gemmi

        st = gemmi.read_structure(atoms.source)
        st.remove_alternative_conformations()
        base = st[0]
        out = gemmi.Structure()
        for k, xyz in enumerate(coords_list):
            m = gemmi.Model(k + 1)
            i = 0
            for ch in base:
                c = gemmi.Chain(ch.name)
                for r in ch:
                    nr = gemmi.Residue()
                    nr.name, nr.seqid = r.name, r.seqid
                    for a in r:
                        if _select(atoms.atoms, a, r):
                            na = a.clone()
                            na.pos = gemmi.Position(*xyz[i])
                            nr.add_atom(na)
                            i += 1
                    if len(nr):
                        c.add_residue(nr)
                if len(c):
                    m.add_chain(c)
            out.add_model(m)
        with _atomic_path(path) as tmp:
            out.write_pdb(str(tmp), gemmi.PdbWriteOptions(minimal=True, cryst1_record=False))
        return _Path(path)


def load_modes(path):
    """Normal modes for the animation: ``(reference coordinates (N, 3), {mode: (N, 3)})``.

    Reads an ``.npz`` with ``coords`` (N, 3), ``modes`` (M, N, 3) or (M, 3N) and
    ``mode_numbers`` (M,). TODO(lead): switch to the nma module's ModeSet loader when it lands.
    """
    import numpy as np

    from .errors import InputError

    try:
        z = np.load(path)
        coords = np.asarray(z["coords"], float)
        vecs = np.asarray(z["modes"], float).reshape(len(z["mode_numbers"]), -1, 3)
        numbers = [int(m) for m in z["mode_numbers"]]
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(path, f"not a modes file with coords/modes/mode_numbers ({exc})") from None
    if vecs.shape[1] != len(coords):
        raise InputError(path, f"modes have {vecs.shape[1]} atoms but the reference has {len(coords)}")
    return coords, dict(zip(numbers, vecs))
