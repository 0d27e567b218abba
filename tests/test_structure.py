"""Atomic models via gemmi: selections, weights, errors, mmCIF and multi-model PDB output,
superposition. Real files from ../shared/data/adenylate_kinase (skipped where absent)."""
from __future__ import annotations

import gemmi
import numpy as np
import pytest

from deephemnma.core.errors import InputError
from deephemnma.core.structure import (
    Atoms,
    element_weights,
    kabsch,
    load_structure,
    match_atoms,
    rmsd,
    superpose,
    write_multimodel_pdb,
    write_structure,
)


def _pdb_line(serial, name, resn, chain, resi, x, y, z, element, altloc=" ", occ=1.0, record="ATOM"):
    return (f"{record:<6}{serial:>5} {name:<4}{altloc}{resn:>3} {chain}{resi:>4}    "
            f"{x:8.3f}{y:8.3f}{z:8.3f}{occ:6.2f}{0.0:6.2f}          {element:>2}\n")


@pytest.fixture
def small_pdb(tmp_path):
    """Two alanines (one atom with alternate locations, hydrogens), a ligand and a water."""
    lines = []
    s = 1
    for i, resi in enumerate((1, 2)):
        base = np.array([3.8 * i, 0.0, 0.0])
        for name, el, off in (("N", "N", (-1.2, 0.5, 0)), ("CA", "C", (0, 0, 0)), ("C", "C", (1.3, 0.4, 0)),
                              ("O", "O", (1.6, 1.5, 0)), ("CB", "C", (0, -1.5, 0.3)), ("HA", "H", (0, 0.3, 1.0))):
            x, y, z = base + off
            if name == "CB" and resi == 2:
                lines.append(_pdb_line(s, name, "ALA", "A", resi, x, y, z, el, altloc="A", occ=0.6)); s += 1
                lines.append(_pdb_line(s, name, "ALA", "A", resi, x + 1, y, z, el, altloc="B", occ=0.4)); s += 1
            else:
                lines.append(_pdb_line(s, name, "ALA", "A", resi, x, y, z, el)); s += 1
    lines.append("TER\n")
    lines.append(_pdb_line(s, "ZN", "ZN", "B", 101, 10, 10, 10, "ZN", record="HETATM")); s += 1
    lines.append(_pdb_line(s, "O", "HOH", "C", 201, -10, 0, 0, "O", record="HETATM")); s += 1
    lines.append("END\n")
    p = tmp_path / "small.pdb"
    p.write_text("".join(lines))
    return p


# ----------------------------------------------------------------------------- real files


def test_adenylate_kinase_files_load(ak_dir):
    open_ = load_structure(ak_dir / "4ake.pdb")
    closed = load_structure(ak_dir / "1ake.pdb")
    ak = load_structure(ak_dir / "AK.pdb")
    # heavy atoms of chain A; 1ake.pdb lists 1661 ATOM records, 5 of them second altlocs
    assert len(open_) == 1656 and len(closed) == 1656 and len(ak) == 1656
    assert open_.chains() == ["A"]
    assert len(load_structure(ak_dir / "4ake.pdb", chains=["A"], atoms="ca")) == 214
    assert len(load_structure(ak_dir / "4ake_ca.pdb", atoms="ca")) == 214
    # AK.pdb has no element column and CHARMM histidine names (HSD): elements come from
    # the atom names and its 214 Cα atoms are all found
    assert len(load_structure(ak_dir / "AK.pdb", atoms="ca")) == 214
    assert set(ak.element.tolist()) == {"C", "N", "O", "S"}
    assert ak.weights.sum() == open_.weights.sum() == 1040 * 6 + 289 * 7 + 320 * 8 + 7 * 16
    # AK.pdb is 4AKE chain A in another frame (atoms listed in a slightly different order):
    # matched by residue and atom name, same elements, same shape up to a rigid motion
    ia, ib = match_atoms(ak, open_)
    # not matched by name: 14 isoleucine CD (CD1 in 4ake.pdb) and the C-terminal OT1/OT2 (O/OXT)
    assert len(ia) == 1656 - 16
    assert np.array_equal(ak.element[ia], open_.element[ib])
    _, r = superpose(ak.coords[ia], open_.coords[ib])
    assert r < 1e-3


def test_open_closed_superposition(ak_dir):
    a = load_structure(ak_dir / "4ake.pdb", chains=["A"], atoms="ca")
    b = load_structure(ak_dir / "1ake.pdb", chains=["A"], atoms="ca")
    ia, ib = match_atoms(a, b)
    assert len(ia) == 214
    moved, r = superpose(b.coords[ib], a.coords[ia])
    # the open/closed adenylate kinase Cα RMSD is about 7 Å
    assert 6.0 < r < 8.0
    assert rmsd(moved, a.coords[ia]) == pytest.approx(r)


# ----------------------------------------------------------------------------- selections


def test_selections_altloc_water_ligand(small_pdb):
    heavy = load_structure(small_pdb, min_atoms=1)
    assert len(heavy) == 10                                  # 2 × (N CA C O CB), first altloc, no H/ligand/water
    cb2 = heavy.coords[(heavy.atom_name == "CB") & (heavy.res_seq == 2)]
    assert len(cb2) == 1 and cb2[0, 0] == pytest.approx(3.8)  # altloc A kept
    assert len(load_structure(small_pdb, atoms="all", min_atoms=1)) == 12
    assert len(load_structure(small_pdb, atoms="ca", min_atoms=1)) == 2
    assert len(load_structure(small_pdb, atoms="backbone", min_atoms=1)) == 8
    with_lig = load_structure(small_pdb, ligands=True, min_atoms=1)
    assert len(with_lig) == 11 and "ZN" in with_lig.res_name.tolist() and "HOH" not in with_lig.res_name.tolist()
    allh = load_structure(small_pdb, atoms="all", min_atoms=1)
    assert allh.weights[allh.element == "H"].tolist() == [1.0, 1.0]
    assert np.array_equal(element_weights(["C", "N", "O", "P", "S", "H", "X"]), [6, 7, 8, 15, 16, 1, 6])


def test_residue_index_and_keys(small_pdb):
    a = load_structure(small_pdb, min_atoms=1)
    assert a.residue_index().tolist() == [0] * 5 + [1] * 5
    assert a.residue_keys()[0] == "A:1"


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_structure(tmp_path / "nope.pdb")


def test_unreadable_file(tmp_path):
    p = tmp_path / "junk.cif"
    p.write_text("data_x\nloop_\n_atom_site.id\n_atom_site.x\n'unterminated\n")
    with pytest.raises(InputError) as ei:
        load_structure(p)
    assert str(p) in str(ei.value)
    empty = tmp_path / "empty.pdb"
    empty.write_text("REMARK nothing here\n")
    with pytest.raises(InputError, match="empty|no atomic model"):
        load_structure(empty)


def test_chain_not_found_lists_chains(small_pdb):
    with pytest.raises(InputError, match=r"chain X not found; chains present: A, B, C"):
        load_structure(small_pdb, chains=["X"])


def test_too_few_atoms_gives_count(small_pdb):
    with pytest.raises(InputError, match=r"only 2 atom\(s\) selected"):
        load_structure(small_pdb, atoms="ca")


def test_model_out_of_range(small_pdb):
    with pytest.raises(InputError, match="model index 3"):
        load_structure(small_pdb, model=3, min_atoms=1)


# ----------------------------------------------------------------------------- writing


def test_mmcif_round_trip(ak_dir, tmp_path):
    a = load_structure(ak_dir / "4ake.pdb")
    p = write_structure(tmp_path / "ak.cif", a)
    doc = gemmi.cif.read(str(p))                              # a real mmCIF document
    assert doc[0].find_value("_entry.id") is not None
    b = load_structure(p)
    assert len(b) == len(a)
    np.testing.assert_allclose(b.coords, a.coords, atol=1e-3)
    for name in ("element", "atom_name", "res_name", "chain_id"):
        assert np.array_equal(getattr(b, name), getattr(a, name)), name
    assert np.array_equal(b.res_seq, a.res_seq)


def test_multimodel_pdb(ak_dir, tmp_path):
    a = load_structure(ak_dir / "4ake.pdb", atoms="ca")
    shifts = [np.array([0.0, 0.0, 0.0]), np.array([1.0, 0, 0]), np.array([0, 2.0, 0]), np.array([0, 0, 3.0])]
    p = write_multimodel_pdb(tmp_path / "anim.pdb", a, [a.coords + s for s in shifts])
    text = p.read_text()
    assert text.count("\nMODEL ") + text.startswith("MODEL ") == 4 and text.count("ENDMDL") == 4
    st = gemmi.read_structure(str(p))
    assert len(st) == 4
    for k, s in enumerate(shifts):
        xyz = np.array([at.pos.tolist() for res in st[k][0] for at in res])
        np.testing.assert_allclose(xyz, a.coords + s, atol=1e-3)
    assert not list(tmp_path.glob(".*tmp*"))                 # no temporary left behind


def test_atoms_validation():
    with pytest.raises(ValueError):
        Atoms(np.zeros((3, 3)), ["C"] * 2, ["CA"] * 3, ["GLY"] * 3, [1, 2, 3], [""] * 3, ["A"] * 3, [6] * 3)


# ----------------------------------------------------------------------------- superposition


def test_kabsch_recovers_rigid_motion():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3)) * 10
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    t = np.array([3.0, -2.0, 7.0])
    y = x @ q.T + t
    R, tt = kabsch(x, y)
    np.testing.assert_allclose(R, q, atol=1e-10)
    np.testing.assert_allclose(tt, t, atol=1e-9)
    moved, r = superpose(x, y)
    assert r < 1e-9
    # a mirror image cannot be superposed by a proper rotation
    _, r_mirror = superpose(x * np.array([-1, 1, 1]), x)
    assert r_mirror > 1.0
