"""The particle table of the landscape explorer, packed for embedding in the page.

Every particle is kept (selections must be exact); columns are packed by kind:

* ``coord``: landscape coordinates (``dhnmaPC1`` …, ``dhnmaSpectral1`` …) as float32 — the
  values that selections are decided on, by the page and by ``deephemnma select`` alike;
* ``category``: integer columns with few distinct values (group, image set, flag, optics
  group, …) as uint8/uint16 with a label and colour per level;
* ``numeric``: other numeric columns quantised to uint16 over [min, max] (65535 = missing),
  used for colouring and hover (relative precision 1.5e-5 of the range);
* image names (``NNNNNN@stack``) as a stack dictionary + uint32 image numbers.

Columns are added in :func:`column_priority` order until ``max_bytes`` is reached; the
coordinates, group, image set, flag and score always come first.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.selection import landscape_fingerprint
from ..core.star import CONVERGED, FLAG, GROUP, IMAGE_NAME, PC_PREFIX, SCORE, SOURCE
from .readers import FLAG_BITS

#: landscape coordinates: dhnmaPC1 … (any method), dhnmaSpectral1 … (spectral with compare)
COORD_PREFIXES = (PC_PREFIX, "dhnmaSpectral")
SOURCE_LABELS = {1: "image set 1 (HEMNMA)", 2: "image set 2 (network)"}
MAX_LEVELS = 40
#: colours of categorical levels (Tableau 20 order: strong colours first)
CATEGORY_RGB = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141),
    (158, 218, 229), (199, 199, 199)]
NONE_RGB = (185, 185, 185)


def group_rgb(g: int) -> tuple[int, int, int]:
    """Colour of landscape group ``g`` (0 = in no group: grey), shared by every view of the page."""
    return NONE_RGB if g <= 0 else CATEGORY_RGB[(g - 1) % len(CATEGORY_RGB)]


def is_coord(name: str) -> bool:
    """Whether ``name`` is a landscape coordinate column (dhnmaPC1, dhnmaSpectral2, …)."""
    return any(name.startswith(p) and name[len(p):].isdigit() for p in COORD_PREFIXES)


def column_priority(columns) -> list[str]:
    """Embedding order: coordinates, group, image set, flag, score, amplitudes, the rest."""
    first = [c for c in columns if is_coord(c)]
    first += [c for c in (GROUP, SOURCE, FLAG, SCORE) if c in columns]
    amps = [c for c in columns if c.startswith("dhnmaAmplitude")]
    rest = [c for c in columns if c not in first and c not in amps]
    return first + amps + rest


def _label(name: str) -> str:
    pretty = {GROUP: "group", SOURCE: "image set", FLAG: "flag", SCORE: "score", CONVERGED: "converged"}
    if name in pretty:
        return pretty[name]
    for p, short in (("dhnmaPC", "PC"), ("dhnmaSpectral", "spectral "), ("dhnmaAmplitude", "mode ")):
        if name.startswith(p) and name[len(p):].isdigit():
            return f"{short}{int(name[len(p):])}"
    return name


def _level_label(name: str, v: int) -> str:
    if name == GROUP:
        return "no group" if v == 0 else f"group {v}"
    if name == SOURCE:
        return SOURCE_LABELS.get(v, f"set {v}")
    if name == FLAG:
        return "no flag" if v == 0 else " + ".join(t for b, t in FLAG_BITS.items() if v & b) or f"flag {v}"
    return f"{_label(name)} {v}"


def _level_rgb(name: str, v: int, k: int) -> tuple[int, int, int]:
    if name == GROUP:
        return group_rgb(v)
    if name == FLAG and v == 0:
        return NONE_RGB
    return CATEGORY_RGB[k % len(CATEGORY_RGB)]


def _category(name: str, s: pd.Series):
    """(meta, array) for an integer column with few levels, else None."""
    if not pd.api.types.is_integer_dtype(s.dtype) or s.isna().any():
        return None
    levels = np.unique(s.to_numpy())
    if len(levels) > MAX_LEVELS or levels.min() < 0 or levels.max() > 65535:
        return None
    arr = s.to_numpy().astype(np.uint8 if levels.max() < 256 else np.uint16)
    meta = {"levels": [{"value": int(v), "label": _level_label(name, int(v)), "rgb": list(_level_rgb(name, int(v), k)),
                        "count": int((arr == v).sum())} for k, v in enumerate(levels)]}
    return meta, arr


def _numeric(s: pd.Series):
    """(meta, uint16 array) quantised over the column's finite range, or None if not numeric."""
    v = pd.to_numeric(s, errors="coerce").to_numpy(np.float64)
    ok = np.isfinite(v)
    if not ok.any():
        return None
    lo, hi = float(v[ok].min()), float(v[ok].max())
    step = (hi - lo) / 65534 if hi > lo else 1.0
    q = np.full(len(v), 65535, np.uint16)
    q[ok] = np.clip(np.rint((v[ok] - lo) / step), 0, 65534).astype(np.uint16)
    p1, p99 = np.quantile(v[ok], [0.01, 0.99])
    if p99 <= p1:
        p1, p99 = lo, hi if hi > lo else lo + 1
    return {"quantised": True, "min": lo, "step": step, "lo": float(p1), "hi": float(p99)}, q


def _names(names: pd.Series):
    """Image names as (meta, stack codes, numbers) when they all read ``NNN@stack`` with one
    number width; else (meta with a plain list, None, None) for small tables; else None."""
    s = names.astype(str)
    parts = s.str.partition("@")
    num = parts[0]
    ok = (parts[1] == "@").all() and num.str.fullmatch(r"\d+").all()
    widths = num.str.len().unique() if ok else []
    if ok and len(widths) == 1:
        codes, stacks = pd.factorize(parts[2], sort=False)
        ctype = np.uint16 if len(stacks) < 65536 else np.uint32
        return {"stacks": [str(x) for x in stacks], "width": int(widths[0])}, codes.astype(ctype), \
            num.astype(np.int64).to_numpy().astype(np.uint32)
    if len(s) <= 200_000:
        return {"list": s.tolist()}, None, None
    return None


def pack_particles(particles: pd.DataFrame, star_path: str, max_bytes: int = 48 << 20):
    """Pack a landscape table for the page: ``(meta, arrays)`` with ``arrays`` a dict of
    ``name -> numpy array`` and ``meta`` the JSON description the explorer reads."""
    n = len(particles)
    cols, arrays, used = [], {}, 0
    for name in column_priority([c for c in particles.columns if c != IMAGE_NAME]):
        s = particles[name]
        if is_coord(name):
            entry, arr = {"kind": "coord"}, pd.to_numeric(s, errors="coerce").to_numpy(np.float32)
            ok = np.isfinite(arr)
            entry.update(min=float(arr[ok].min()) if ok.any() else 0.0, max=float(arr[ok].max()) if ok.any() else 1.0)
        elif (cat := _category(name, s)) is not None:
            entry, arr = {"kind": "category", **cat[0]}, cat[1]
        elif pd.api.types.is_numeric_dtype(s.dtype) and (num := _numeric(s)) is not None:
            entry, arr = {"kind": "numeric", **num[0]}, num[1]
        else:
            continue
        if entry["kind"] != "coord" and used + arr.nbytes > max_bytes:
            continue
        used += arr.nbytes
        cols.append({"name": name, "label": _label(name), **entry})
        arrays[name] = arr
    meta = {"n": n, "columns": cols, "omitted_bytes_limit": max_bytes,
            "landscape": {"path": str(star_path), "n_particles": n, "fingerprint": landscape_fingerprint(particles)}}
    if IMAGE_NAME in particles.columns and (packed := _names(particles[IMAGE_NAME])) is not None:
        meta["names"] = packed[0]
        if packed[1] is not None and used + packed[1].nbytes + packed[2].nbytes <= max_bytes + (16 << 20):
            arrays["__image_stack"], arrays["__image_number"] = packed[1], packed[2]
        elif packed[1] is not None:
            del meta["names"]
    cat_names = [c["name"] for c in cols if c["kind"] == "category"]
    meta["default_colour"] = GROUP if GROUP in arrays else (SOURCE if SOURCE in arrays else "density")
    meta["categories"] = cat_names
    return meta, arrays
