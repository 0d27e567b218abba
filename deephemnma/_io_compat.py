"""STAR / MRC access for the landscape and reconstruction stages.

Uses :mod:`deephemnma.star` and :mod:`deephemnma.mrc` (helper "io") when present; until they
land on main, a minimal stand-in with the same names and semantics (``starfile`` and
``mrcfile`` directly) lets this branch run and be tested. Delete the fallback half when
``star``/``mrc`` are merged: every user imports from here only.
"""
from __future__ import annotations

try:  # pragma: no cover - exercised once deephemnma.star / deephemnma.mrc are on main
    from .mrc import ParticleImages, read_volume, write_volume  # noqa: F401
    from .star import (GROUP, IMAGE_NAME, OPTICS_GROUP, StarData, amplitude_column,  # noqa: F401
                       amplitude_columns, amplitude_modes, merged, pc_column, pc_columns, pixel_sizes,
                       read_star, write_star)
    HAVE_IO = True
except ImportError:
    HAVE_IO = False

if not HAVE_IO:
    import os
    import re
    import warnings
    from dataclasses import dataclass
    from pathlib import Path
    from typing import Iterable

    import numpy as np
    import pandas as pd

    from .errors import InputError
    from .fileio import atomic_path

    IMAGE_NAME = "rlnImageName"
    OPTICS_GROUP = "rlnOpticsGroup"
    GROUP = "dhnmaGroup"
    _AMP = re.compile(r"^dhnmaAmplitude(\d{3})$")
    _PC = re.compile(r"^dhnmaPC(\d+)$")
    _OPTICS_COLS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize",
                    "rlnImageSize", "rlnMagnification", "rlnDetectorPixelSize")

    def amplitude_column(mode: int) -> str:
        return f"dhnmaAmplitude{int(mode):03d}"

    def amplitude_modes(df) -> list[int]:
        cols = df.columns if isinstance(df, pd.DataFrame) else df
        return sorted(int(m.group(1)) for c in cols if (m := _AMP.match(str(c))))

    def amplitude_columns(df) -> list[str]:
        return [amplitude_column(m) for m in amplitude_modes(df)]

    def pc_column(i: int) -> str:
        return f"dhnmaPC{int(i)}"

    def pc_columns(df) -> list[str]:
        cols = df.columns if isinstance(df, pd.DataFrame) else df
        found = sorted(int(m.group(1)) for c in cols if (m := _PC.match(str(c))))
        return [pc_column(i) for i in found]

    @dataclass
    class StarData:
        particles: pd.DataFrame
        optics: pd.DataFrame
        path: Path
        version: str

        def __len__(self) -> int:
            return len(self.particles)

    def read_star(path, *, pixel_size=None, data_dir=None) -> StarData:
        import starfile

        path = Path(path)
        if not path.is_file():
            raise InputError(path, "STAR file not found")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = starfile.read(path, always_dict=True)
        if "optics" in d and "particles" in d:
            p, o, ver = d["particles"].copy(), d["optics"].copy(), "3.1"
        else:
            p = next(iter(d.values())).copy()
            cols = [c for c in _OPTICS_COLS if c in p.columns]
            o = p[cols].iloc[:1].copy().reset_index(drop=True) if cols else pd.DataFrame(index=[0])
            o.insert(0, OPTICS_GROUP, 1)
            p = p.drop(columns=cols)
            p[OPTICS_GROUP] = 1
            if "rlnImagePixelSize" not in o.columns and pixel_size is not None:
                o["rlnImagePixelSize"] = float(pixel_size)
            ver = "3.0"
        if IMAGE_NAME not in p.columns:
            raise InputError(path, f"missing column _{IMAGE_NAME}")
        star = StarData(p, o, path, ver)
        for pix, ang in (("rlnOriginX", "rlnOriginXAngst"), ("rlnOriginY", "rlnOriginYAngst")):
            if pix in p.columns and ang not in p.columns:
                loc = p.columns.get_loc(pix)
                p.insert(loc, ang, p[pix].to_numpy(float) * pixel_sizes(star))
                del p[pix]
        return star

    def merged(star: StarData) -> pd.DataFrame:
        p, o = star.particles, star.optics
        if OPTICS_GROUP not in p.columns or OPTICS_GROUP not in o.columns:
            return p.copy()
        idx = pd.Index(o[OPTICS_GROUP]).get_indexer(p[OPTICS_GROUP])
        if (idx < 0).any():
            i = int(np.flatnonzero(idx < 0)[0])
            raise InputError(star.path, "optics group not defined in data_optics", row=i + 1)
        extra = {c: o[c].to_numpy()[idx] for c in o.columns if c != OPTICS_GROUP and c not in p.columns}
        return pd.concat([p, pd.DataFrame(extra, index=p.index)], axis=1)

    def pixel_sizes(star: StarData) -> np.ndarray:
        m = merged(star)
        if "rlnImagePixelSize" in m.columns:
            px = m["rlnImagePixelSize"].to_numpy(float)
        elif "rlnDetectorPixelSize" in m.columns and "rlnMagnification" in m.columns:
            px = m["rlnDetectorPixelSize"].to_numpy(float) * 1e4 / m["rlnMagnification"].to_numpy(float)
        else:
            raise InputError(star.path, "missing column _rlnImagePixelSize (pixel size)")
        return px

    def write_star(path, particles: pd.DataFrame, optics: pd.DataFrame | None, **kw):
        import starfile

        path = Path(path)
        with atomic_path(path) as tmp:
            blocks = {"optics": optics, "particles": particles} if optics is not None else {"particles": particles}
            starfile.write(blocks, tmp, float_format="%.10g")
        return path

    class ParticleImages:
        """Images by STAR row, memory-mapped stacks (stand-in for deephemnma.mrc.ParticleImages)."""

        def __init__(self, files, file_idx, image_idx):
            self.files = [Path(f) for f in files]
            self.file_idx = np.asarray(file_idx)
            self.image_idx = np.asarray(image_idx)
            self._maps: dict = {}

        @classmethod
        def from_star(cls, star: StarData, data_dir=None) -> "ParticleImages":
            base = Path(data_dir) if data_dir is not None else star.path.parent
            files: dict[str, int] = {}
            fi, ii = [], []
            for name in star.particles[IMAGE_NAME].astype(str):
                if "@" in name:
                    n, f = name.split("@", 1)
                    k = int(n) - 1
                else:
                    f, k = name, 0
                fi.append(files.setdefault(f, len(files)))
                ii.append(k)
            paths = []
            for f in files:
                if os.path.isabs(f) or data_dir is not None:
                    cands = [base / f]
                else:  # as deephemnma.star: the STAR's directory, then up to three parents, then cwd
                    cands = [star.path.parent / f] + [par / f for par in list(star.path.resolve().parents)[:3]] + [Path(f)]
                found = next((c for c in cands if c.is_file()), None)
                if found is None:
                    raise InputError(cands[0], "image stack not found")
                paths.append(found)
            return cls(paths, fi, ii)

        def __len__(self) -> int:
            return len(self.file_idx)

        def _map(self, k):
            import mrcfile

            if k not in self._maps:
                m = mrcfile.mmap(self.files[k], mode="r", permissive=True)
                data = m.data
                self._maps[k] = data if data.ndim == 3 else data[None]
            return self._maps[k]

        @property
        def box(self) -> int:
            return int(self._map(int(self.file_idx[0])).shape[-1])

        def read(self, indices) -> np.ndarray:
            indices = np.asarray(indices, dtype=np.int64)
            out = np.empty((len(indices), self.box, self.box), np.float32)
            for j, i in enumerate(indices):
                out[j] = self._map(int(self.file_idx[i]))[int(self.image_idx[i])]
            return out

    @dataclass
    class Volume:
        data: np.ndarray
        voxel_size: float
        origin: tuple

    def read_volume(path) -> Volume:
        import mrcfile

        with mrcfile.open(path, permissive=True) as m:
            o = m.header.origin
            return Volume(np.asarray(m.data, np.float32).copy(), float(m.voxel_size.x),
                          (float(o.x), float(o.y), float(o.z)))

    def write_volume(path, data, voxel_size: float, origin=None):
        import mrcfile

        data = np.asarray(data, dtype=np.float32)
        path = Path(path)
        with atomic_path(path) as tmp:
            with mrcfile.new(tmp, overwrite=True) as m:
                m.set_data(data)
                m.set_volume()
                m.voxel_size = float(voxel_size)
                if origin is not None:
                    m.header.origin.x, m.header.origin.y, m.header.origin.z = (float(v) for v in origin)
        return path


def images_for(star, data_dir=None) -> "ParticleImages":
    """Lazily memory-mapped images of ``star``'s particles, by row."""
    return ParticleImages.from_star(star, data_dir=data_dir)


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
