"""The demo's reference structures: CHARMM-style PDB normalisation and the verified fetch."""
from __future__ import annotations

from collections import Counter

import gemmi
import pytest

from deephemnma.core import demo_data

CHARMM = """\
ATOM      1 N    MET     1     -11.921  26.307  10.410  1.00 38.38      4AKE
ATOM      2 HT1  MET     1     -11.447  26.741   9.595  1.00  0.00      4AKE
ATOM      3 CA   MET     1     -12.136  24.852  10.671  1.00 39.97      4AKE
ATOM      4 HG1  MET     1     -10.000  24.000  10.000  1.00  0.00      4AKE
ATOM      5 CD1  LEU     2      -9.000  23.000  11.000  1.00  0.00      4AKE
ATOM      6 SD   MET     1     -12.000  22.000  12.000  1.00  0.00      4AKE
END
"""


def test_elements_from_atom_names(tmp_path):
    src = tmp_path / "charmm.pdb"
    src.write_text(CHARMM)
    # gemmi alone misreads these names (CA → calcium, HG1 → mercury, CD1 → cadmium)
    raw = gemmi.read_structure(str(src))
    assert "Ca" in {a.element.name for ch in raw[0] for r in ch for a in r}
    out = tmp_path / "out.pdb"
    assert demo_data.normalise_charmm_pdb(src, out) == 6
    st = gemmi.read_structure(str(out))
    els = Counter(a.element.name for ch in st[0] for r in ch for a in r)
    assert els == Counter({"N": 1, "H": 2, "C": 2, "S": 1})
    assert [ch.name for ch in st[0]] == ["A"]


def test_fetch_from_cache(tmp_path):
    if not (demo_data.cache_dir() / demo_data.SDIST).is_file():
        pytest.skip(f"{demo_data.SDIST} not in {demo_data.cache_dir()} (run 'deephemnma fetch-demo' once, needs PyPI)")
    paths = demo_data.fetch_adenylate_kinase(tmp_path)
    st = gemmi.read_structure(str(paths["open"]))
    st.remove_hydrogens()
    assert sum(1 for ch in st[0] for r in ch for a in r) == 1656  # 4AKE chain A heavy atoms
    assert sum(1 for ch in st[0] for r in ch) == 214
