"""Particle selections in the landscape: saved shapes, expressions over columns, group lists.

A *saved selection* is the small JSON file that the results page (``report.html``) writes
with "save selection"::

    {"format": "deephemnma-selection", "version": 1,
     "axes": ["dhnmaPC1", "dhnmaPC2"],                  # the landscape columns of x and y
     "shapes": [{"type": "box", "x": [x0, x1], "y": [y0, y1]},
                {"type": "lasso", "points": [[x, y], ...]}],
     "combine": "union",                                  # a particle is in if inside any shape
     "count": 1234,                                       # particles inside, as the page counted
     "landscape": {"path": "results/groups/particles.star", "n_particles": 1200000,
                   "fingerprint": "sha256:..."},          # which table the shapes were drawn on
     "indices": [0, 17, ...]}                             # 0-based rows (only when few)

The shapes are authoritative: :func:`selection_mask` decides membership from them, on the
coordinates rounded to float32 exactly as the page stores them, with the page's arithmetic
(box: ``x0 <= x <= x1 and y0 <= y <= y1``; lasso: even-odd ray casting), so the command
line picks exactly the particles the page counted. When the table is the one the shapes were
drawn on (same fingerprint), ``count`` and ``indices`` are checked against the result.

:func:`where_mask` evaluates a condition such as ``"dhnmaPC1 > 2 and dhnmaGroup == 3"`` over
the columns of a particle table. It is not Python's ``eval``: the expression is parsed with
:mod:`ast` and only column names (with or without the leading ``_``), numbers, strings,
arithmetic, comparisons, ``and``/``or``/``not``, bitwise ``& | ~`` (flags), ``in [..]`` and the
functions of :data:`FUNCTIONS` are accepted; anything else is an error.

Every problem is an :class:`~deephemnma.core.errors.InputError` naming the file it concerns.

A shared convention (here in core, not in the report stage): the page writes these files, the
``select`` command reads them, and any stage may take a selection or a condition over the
landscape's columns (e.g. groups drawn as boxes) without importing the results page.
"""
from __future__ import annotations

import ast
import hashlib
import json
import operator
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .star import GROUP, IMAGE_NAME

SELECTION_FORMAT = "deephemnma-selection"
SELECTION_VERSION = 1
#: the page stores indices in the saved selection when at most this many particles are in it
MAX_SAVED_INDICES = 20_000

#: functions allowed in --where expressions (elementwise, numpy)
FUNCTIONS = {"abs": np.abs, "sqrt": np.sqrt, "log": np.log, "log10": np.log10, "exp": np.exp,
             "hypot": np.hypot, "minimum": np.minimum, "maximum": np.maximum}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.BitAnd: operator.and_, ast.BitOr: operator.or_, ast.BitXor: operator.xor}
_CMPOPS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
           ast.Eq: operator.eq, ast.NotEq: operator.ne}


# ------------------------------------------------------------------------------ fingerprint
def landscape_fingerprint(particles: pd.DataFrame) -> str:
    """Identity of a particle table: SHA-256 of its image names in order (row count if none)."""
    h = hashlib.sha256()
    if IMAGE_NAME in particles.columns:
        names = particles[IMAGE_NAME].astype(str).to_numpy()
        for start in range(0, len(names), 100_000):
            h.update(("\n".join(names[start:start + 100_000]) + "\n").encode())
    else:
        h.update(f"rows:{len(particles)}".encode())
    return "sha256:" + h.hexdigest()[:32]


# ------------------------------------------------------------------------------ saved selections
def _check_number(v, path, what) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise InputError(path, f"{what} must be a finite number, got {v!r}")
    return float(v)


def _check_shape(shape, k: int, path) -> dict:
    """Validate one shape of a saved selection; return it normalised (floats, sorted box)."""
    what = f"shape {k}"
    if not isinstance(shape, dict) or shape.get("type") not in ("box", "lasso"):
        raise InputError(path, f"{what}: expected an object with \"type\": \"box\" or \"lasso\"")
    if shape["type"] == "box":
        pair = []
        for ax in ("x", "y"):
            v = shape.get(ax)
            if not isinstance(v, list) or len(v) != 2:
                raise InputError(path, f"{what} (box): \"{ax}\" must be a list [min, max]")
            lo, hi = (_check_number(t, path, f"{what} (box) {ax}") for t in v)
            pair.append(sorted((lo, hi)))
        return {"type": "box", "x": pair[0], "y": pair[1]}
    pts = shape.get("points")
    if not isinstance(pts, list) or len(pts) < 3 or not all(isinstance(p, list) and len(p) == 2 for p in pts):
        raise InputError(path, f"{what} (lasso): \"points\" must be a list of at least 3 [x, y] pairs")
    return {"type": "lasso", "points": [[_check_number(a, path, f"{what} (lasso) point"),
                                          _check_number(b, path, f"{what} (lasso) point")] for a, b in pts]}


def load_selection(path) -> dict:
    """Read and validate a saved selection (see the module docstring); InputError if malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "selection file not found")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a JSON file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != SELECTION_FORMAT:
        raise InputError(path, f"not a saved selection (expected \"format\": \"{SELECTION_FORMAT}\")")
    if doc.get("version") != SELECTION_VERSION:
        raise InputError(path, f"selection format version {doc.get('version')!r} is not supported "
                         f"(this deephemnma reads version {SELECTION_VERSION})")
    axes = doc.get("axes")
    if not isinstance(axes, list) or len(axes) != 2 or not all(isinstance(a, str) and a for a in axes):
        raise InputError(path, "\"axes\" must name the two landscape columns, e.g. [\"dhnmaPC1\", \"dhnmaPC2\"]")
    shapes = doc.get("shapes")
    if not isinstance(shapes, list) or not shapes:
        raise InputError(path, "the selection has no shapes (draw a box or a lasso before saving)")
    if doc.get("combine", "union") != "union":
        raise InputError(path, f"\"combine\": {doc.get('combine')!r} is not supported (only \"union\")")
    out = dict(doc)
    out["axes"] = [a.lstrip("_") for a in axes]
    out["shapes"] = [_check_shape(s, k, path) for k, s in enumerate(shapes, 1)]
    return out


def shape_mask(shape: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Particles inside one (validated) shape; the page's arithmetic, in float64."""
    if shape["type"] == "box":
        (x0, x1), (y0, y1) = shape["x"], shape["y"]
        return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    pts = np.asarray(shape["points"], dtype=np.float64)
    inside = np.zeros(len(x), dtype=bool)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    cand = np.flatnonzero((x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]))
    px, py = x[cand], y[cand]
    acc = np.zeros(len(cand), dtype=bool)
    j = len(pts) - 1
    for i in range(len(pts)):  # even-odd rule, same expression as the page's JavaScript
        xi, yi, xj, yj = pts[i, 0], pts[i, 1], pts[j, 0], pts[j, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            cross = ((yi > py) != (yj > py)) & (px < (xj - xi) * (py - yi) / (yj - yi) + xi)
        acc ^= cross
        j = i
    inside[cand] = acc
    return inside


def axis_values(particles: pd.DataFrame, column: str, source) -> np.ndarray:
    """A landscape column rounded to float32 (as the page holds it), as float64."""
    if column not in particles.columns:
        raise InputError(source, f"no column _{column} (the selection's axis); columns: "
                         + ", ".join(c for c in particles.columns if c.startswith("dhnma")))
    v = pd.to_numeric(particles[column], errors="coerce").to_numpy(np.float64)
    return v.astype(np.float32).astype(np.float64)


def selection_mask(sel: dict, particles: pd.DataFrame, sel_path, star_path) -> tuple[np.ndarray, list[str]]:
    """Particles of ``particles`` inside a loaded selection; also notes for the user.

    Raises InputError (naming ``sel_path``) when a shape lies wholly outside the landscape, or
    when the table is the one the selection was drawn on and the count or indices disagree.
    """
    x = axis_values(particles, sel["axes"][0], star_path)
    y = axis_values(particles, sel["axes"][1], star_path)
    mask = np.zeros(len(particles), dtype=bool)
    for k, shape in enumerate(sel["shapes"], 1):
        m = shape_mask(shape, x, y)
        if not m.any():
            xr, yr = (np.nanmin(x), np.nanmax(x)), (np.nanmin(y), np.nanmax(y))
            raise InputError(sel_path, f"shape {k} ({shape['type']}) contains no particle of {star_path}: it lies "
                             f"outside the landscape ({sel['axes'][0]} {xr[0]:.4g}..{xr[1]:.4g}, "
                             f"{sel['axes'][1]} {yr[0]:.4g}..{yr[1]:.4g})")
        mask |= m
    notes = []
    land = sel.get("landscape") if isinstance(sel.get("landscape"), dict) else {}
    same = land.get("fingerprint") == landscape_fingerprint(particles)
    if not same:
        notes.append(f"the selection was drawn on another table ({land.get('path', '?')}, "
                     f"{land.get('n_particles', '?')} particles); its shapes are applied to this one")
    elif isinstance(sel.get("count"), int) and sel["count"] != int(mask.sum()):
        raise InputError(sel_path, f"the page counted {sel['count']} particles in this selection but its shapes "
                         f"contain {int(mask.sum())} of {star_path}")
    elif isinstance(sel.get("indices"), list):
        idx = np.asarray(sel["indices"], dtype=np.int64)
        if not np.array_equal(np.sort(idx), np.flatnonzero(mask)):
            raise InputError(sel_path, f"the selection's particle indices disagree with its shapes on {star_path}")
    return mask, notes


# ------------------------------------------------------------------------------ --where
class _Evaluator:
    """Evaluate a parsed condition over the columns of a table (whitelisted nodes only)."""

    def __init__(self, particles: pd.DataFrame, source, expr: str):
        self.p, self.source, self.expr = particles, source, expr

    def fail(self, msg: str):
        raise InputError(self.source, f"--where {self.expr!r}: {msg}")

    def column(self, name: str):
        col = name.lstrip("_")
        if col not in self.p.columns:
            near = [c for c in self.p.columns if c.lower() == col.lower()]
            hint = f" (did you mean {near[0]}?)" if near else ""
            self.fail(f"unknown column {name}{hint}; columns: {', '.join(map(str, self.p.columns))}")
        s = self.p[col]
        return s.to_numpy() if pd.api.types.is_numeric_dtype(s.dtype) else s.astype(str).to_numpy()

    def __call__(self, node):
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            self.fail(f"{type(node).__name__.lower()} is not allowed (only columns, numbers, strings, "
                      "arithmetic, comparisons, and/or/not, & | ~, in [...], " + ", ".join(FUNCTIONS) + ")")
        return method(node)

    def _Expression(self, n):
        return self(n.body)

    def _Name(self, n):
        if n.id in ("True", "False"):
            return n.id == "True"
        return self.column(n.id)

    def _Constant(self, n):
        if isinstance(n.value, (bool, int, float, str)):
            return n.value
        self.fail(f"constant {n.value!r} is not allowed")

    def _List(self, n):
        return [self(e) for e in n.elts]

    _Tuple = _List

    def _BoolOp(self, n):
        vals = [np.asarray(self(v), dtype=bool) for v in n.values]
        f = np.logical_and if isinstance(n.op, ast.And) else np.logical_or
        out = vals[0]
        for v in vals[1:]:
            out = f(out, v)
        return out

    def _UnaryOp(self, n):
        v = self(n.operand)
        if isinstance(n.op, ast.Not):
            return np.logical_not(v)
        if isinstance(n.op, ast.Invert):
            return np.invert(v) if np.asarray(v).dtype != bool else np.logical_not(v)
        return -np.asarray(v) if isinstance(n.op, ast.USub) else np.asarray(v)

    def _BinOp(self, n):
        op = _BINOPS.get(type(n.op))
        if op is None:
            self.fail(f"operator {type(n.op).__name__} is not allowed")
        try:
            return op(np.asarray(self(n.left)), np.asarray(self(n.right)))
        except TypeError as exc:
            self.fail(str(exc))

    def _Compare(self, n):
        out, left = None, self(n.left)
        for op, right_node in zip(n.ops, n.comparators):
            right = self(right_node)
            if isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(right, list):
                    self.fail("'in' needs a list, e.g. dhnmaGroup in [1, 3]")
                r = np.isin(left, right)
                r = ~r if isinstance(op, ast.NotIn) else r
            elif type(op) in _CMPOPS:
                try:
                    r = _CMPOPS[type(op)](np.asarray(left), np.asarray(right))
                except TypeError as exc:
                    self.fail(str(exc))
            else:
                self.fail(f"comparison {type(op).__name__} is not allowed")
            out = r if out is None else np.logical_and(out, r)
            left = right
        return out

    def _Call(self, n):
        if not isinstance(n.func, ast.Name) or n.func.id not in FUNCTIONS or n.keywords:
            self.fail("only these functions are allowed: " + ", ".join(FUNCTIONS))
        return FUNCTIONS[n.func.id](*[np.asarray(self(a), dtype=np.float64) for a in n.args])


def where_mask(expr: str, particles: pd.DataFrame, source) -> np.ndarray:
    """Rows of ``particles`` where the condition ``expr`` holds (see the module docstring)."""
    if not expr or not expr.strip():
        raise InputError(source, "--where: empty expression")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as exc:
        raise InputError(source, f"--where {expr!r}: not a valid expression ({exc.msg})") from None
    ev = _Evaluator(particles, source, expr)
    with np.errstate(all="ignore"):
        res = np.asarray(ev(tree))
    if res.dtype != bool or res.shape != (len(particles),):
        ev.fail("is not a condition on the particles (it must compare columns, e.g. dhnmaPC1 > 2)")
    return res


def groups_mask(groups, particles: pd.DataFrame, source) -> np.ndarray:
    """Rows whose ``dhnmaGroup`` is one of ``groups`` (1-based; 0 = in no group)."""
    if GROUP not in particles.columns:
        raise InputError(source, f"no column _{GROUP}: --groups needs a table with groups (groups/particles.star); "
                         "each group is also its own file, groups/group_NN.star")
    g = pd.to_numeric(particles[GROUP], errors="coerce").to_numpy()
    present = set(np.unique(g[np.isfinite(g)]).astype(int).tolist())
    missing = [k for k in groups if k not in present]
    if missing:
        raise InputError(source, f"--groups: no group {', '.join(map(str, missing))} "
                         f"(groups present: {', '.join(map(str, sorted(present)))})")
    return np.isin(g, list(groups))
