"""The normal-mode file and the deformation it defines (one convention, used by every stage).

A :class:`ModeSet` is everything later stages need from the normal-mode analysis, stored as
one ``.npz`` file (:func:`save_modes` / :func:`load_modes`). Modes are numbered from 1; modes
1–6 are the rigid-body motions; every mode is a 3N vector of unit Euclidean norm (the
ElNemo/Xmipp convention), so the atomic RMSD of a deformation by amplitudes q is
‖Σ q_k v_k‖ / √N (:func:`amplitudes_to_rmsd`). The deformation x(q) = x0 + Σ_k q_k v_k
(:func:`deform`) is batched, differentiable torch, shared by simulation, alignment, the
network and animation.
"""
from __future__ import annotations

import io
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .fileio import atomic_path, json_default
from .structure import Atoms

FORMAT_VERSION = 1
N_RIGID = 6


# ----------------------------------------------------------------------------- mode set


@dataclass
class ModeSet:
    """Everything later stages need from the normal-mode analysis (one ``.npz`` file).

    Arrays (N atoms or pseudoatoms, M selected modes, K computed modes):

    * ``coords`` (N, 3) float64 Å — reference coordinates (file frame; maps: the map's frame)
    * ``weights`` (N,) float64 — density weight = integral of each Gaussian (atoms: electrons)
    * ``sigma`` (N,) float64 Å — Gaussian standard deviation per atom for the projector
    * ``element``, ``atom_name``, ``res_name``, ``chain_id``, ``ins_code`` (N,) str;
      ``res_seq`` (N,) int64 — to write PDB files
    * ``mode_numbers`` (M,) int64 — selected modes, numbered from 1 (7 = first non-rigid)
    * ``modes`` (M, N, 3) float64 — selected mode vectors, unit norm over 3N
    * ``computed_numbers`` (K,) int64 = 1..K; ``computed_modes`` (K, N, 3) float64
    * ``eigenvalues``, ``frequencies``, ``collectivity`` (K,) float64
    * ``centre`` (3,) float64 Å — the map's box centre (map references) or the weighted
      centroid of the atoms (atomic references)
    * ``kind`` — "atomic" or "pseudoatoms"; ``settings`` — dict (cutoff, method, selection,
      input path and SHA-256, fit figures, ...)
    """

    coords: np.ndarray
    weights: np.ndarray
    sigma: np.ndarray
    element: np.ndarray
    atom_name: np.ndarray
    res_name: np.ndarray
    res_seq: np.ndarray
    ins_code: np.ndarray
    chain_id: np.ndarray
    mode_numbers: np.ndarray
    modes: np.ndarray
    computed_numbers: np.ndarray
    computed_modes: np.ndarray
    eigenvalues: np.ndarray
    frequencies: np.ndarray
    collectivity: np.ndarray
    centre: np.ndarray
    kind: str
    settings: dict = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return len(self.coords)

    @property
    def n_modes(self) -> int:
        return len(self.mode_numbers)

    def atoms(self) -> Atoms:
        return Atoms(self.coords, self.element, self.atom_name, self.res_name, self.res_seq,
                     self.ins_code, self.chain_id, self.weights)

    def mode(self, number: int) -> np.ndarray:
        """Vector (N, 3) of computed mode ``number`` (1-based)."""
        i = np.flatnonzero(self.computed_numbers == number)
        if len(i) == 0:
            raise KeyError(f"mode {number} was not computed (1..{len(self.computed_numbers)})")
        return self.computed_modes[i[0]]

    def with_selection(self, numbers: Sequence[int]) -> "ModeSet":
        """A copy selecting other computed modes."""
        numbers = np.asarray(list(numbers), dtype=np.int64)
        vecs = np.stack([self.mode(int(n)) for n in numbers]) if len(numbers) else np.zeros((0, self.n_atoms, 3))
        out = ModeSet(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        out.mode_numbers, out.modes = numbers, vecs
        out.settings = {**self.settings, "selected_modes": numbers.tolist()}
        return out

    def deform(self, q, x0=None):
        """Torch: reference deformed by amplitudes ``q`` (B, M) or (M,) along the selected modes."""
        import torch

        q = torch.as_tensor(q)
        dtype = q.dtype if q.is_floating_point() else torch.float64
        x0 = torch.as_tensor(self.coords if x0 is None else x0, dtype=dtype, device=q.device)
        modes = torch.as_tensor(self.modes, dtype=dtype, device=q.device)
        return deform(x0, modes, q.to(dtype))


_STR_FIELDS = ("element", "atom_name", "res_name", "ins_code", "chain_id")
_ARRAY_FIELDS = ("coords", "weights", "sigma", "res_seq", "mode_numbers", "modes", "computed_numbers",
                 "computed_modes", "eigenvalues", "frequencies", "collectivity", "centre")


def save_modes(path: str | os.PathLike, ms: ModeSet) -> Path:
    """Write a :class:`ModeSet` as ``.npz`` atomically and byte-reproducibly.

    The zip members carry a fixed date, so the same inputs give the same bytes. Readable
    with ``np.load(path)`` (no pickles); ``settings_json`` holds the settings as JSON text.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for name in _ARRAY_FIELDS:
        arr = np.asarray(getattr(ms, name))
        arrays[name] = np.ascontiguousarray(arr.astype(np.int64) if arr.dtype.kind in "iu" else arr.astype(np.float64))
    for name in _STR_FIELDS:
        arrays[name] = np.asarray(getattr(ms, name)).astype(str)
    arrays["kind"] = np.asarray(ms.kind)
    arrays["format_version"] = np.asarray(FORMAT_VERSION, dtype=np.int64)
    arrays["settings_json"] = np.asarray(json.dumps(ms.settings, sort_keys=True, default=json_default))
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            for name in sorted(arrays):
                buf = io.BytesIO()
                np.lib.format.write_array(buf, arrays[name], allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue())
    return path


def load_modes(path: str | os.PathLike) -> ModeSet:
    """Read a file written by :func:`save_modes` (InputError when it is not one)."""
    from .fileio import require_file

    p = require_file(path, "normal-mode file")
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:
        raise InputError(p, f"not a normal-mode .npz file ({exc.__class__.__name__}: {exc})") from None
    missing = [k for k in (*_ARRAY_FIELDS, *_STR_FIELDS, "kind", "settings_json") if k not in data]
    if missing:
        raise InputError(p, f"not a deephemnma normal-mode file: missing {', '.join(missing)}")
    version = int(data.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise InputError(p, f"written by a newer deephemnma (format {version} > {FORMAT_VERSION})")
    kw = {k: data[k] for k in (*_ARRAY_FIELDS, *_STR_FIELDS)}
    n = len(kw["coords"])
    for name in ("modes", "computed_modes"):
        if kw[name].ndim != 3 or kw[name].shape[1:] != (n, 3):
            raise InputError(p, f"{name} have shape {tuple(kw[name].shape)}, not (M, {n}, 3) for the {n} atoms")
    return ModeSet(**kw, kind=str(data["kind"]), settings=json.loads(str(data["settings_json"])))


# ----------------------------------------------------------------------------- deformation


def deform(x0, modes, q):
    """Batched deformation x = x0 + Σ_k q_k v_k (torch, differentiable).

    ``x0`` (N, 3), ``modes`` (M, N, 3), ``q`` (B, M) → (B, N, 3); ``q`` (M,) → (N, 3).
    The result's dtype follows torch's promotion of the inputs (float32 stays float32).
    """
    import torch

    x0 = torch.as_tensor(x0)
    modes = torch.as_tensor(modes)
    q = torch.as_tensor(q)
    dtype = torch.promote_types(torch.promote_types(x0.dtype, modes.dtype), q.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    x0, modes, q = x0.to(dtype), modes.to(dtype), q.to(dtype)
    if modes.ndim != 3 or modes.shape[1:] != x0.shape or x0.shape[-1] != 3:
        raise ValueError(f"deform: modes {tuple(modes.shape)} must be (M, N, 3) with x0 {tuple(x0.shape)} = (N, 3)")
    single = q.ndim == 1
    if single:
        q = q[None]
    if q.shape[-1] != modes.shape[0]:
        raise ValueError(f"deform: q has {q.shape[-1]} amplitudes per row, modes has {modes.shape[0]}")
    disp = (q @ modes.reshape(modes.shape[0], -1)).reshape(q.shape[0], *x0.shape)
    out = x0[None] + disp
    return out[0] if single else out


def amplitudes_to_rmsd(dq, modes):
    """Atomic RMSD (Å) between the reference deformed by two amplitude vectors whose
    difference is ``dq`` (..., M): ‖Σ_k dq_k v_k‖ / √N, with ``modes`` (M, N, 3).

    numpy in → numpy out; torch in → torch out (differentiable).
    """
    try:
        import torch

        is_torch = isinstance(dq, torch.Tensor) or isinstance(modes, torch.Tensor)
    except ImportError:  # pragma: no cover
        is_torch = False
    if is_torch:
        dq = torch.as_tensor(dq)
        modes = torch.as_tensor(modes)
        dtype = torch.promote_types(dq.dtype, modes.dtype)
        if not dtype.is_floating_point:
            dtype = torch.float64
        V = modes.to(dtype).reshape(modes.shape[0], -1)
        G = V @ V.T
        dq = dq.to(dtype)
        ss = ((dq @ G) * dq).sum(-1)
        return torch.sqrt(torch.clamp(ss, min=0) / modes.shape[1])
    modes = np.asarray(modes, dtype=np.float64)
    V = modes.reshape(modes.shape[0], -1)
    G = V @ V.T
    dq = np.asarray(dq, dtype=np.float64)
    ss = ((dq @ G) * dq).sum(-1)
    return np.sqrt(np.maximum(ss, 0.0) / modes.shape[1])


def rmsd_to_amplitude(rmsd: float, n_atoms: int) -> float:
    """Amplitude along one unit-norm mode that displaces the atoms by ``rmsd`` Å RMS."""
    return float(rmsd) * math.sqrt(n_atoms)


# ----------------------------------------------------------------------------- modes by column


def displace(ref_coords, mode_vectors, amplitudes) -> np.ndarray:
    """Coordinates (F, N, 3) = ref + Σ_m amplitudes[f, m] · mode_vectors[m] (M, N, 3)."""
    X0 = np.asarray(ref_coords, np.float64)
    V = np.asarray(mode_vectors, np.float64)
    Q = np.atleast_2d(np.asarray(amplitudes, np.float64))
    return X0[None] + np.einsum("fm,mnk->fnk", Q, V)


def mode_stack(modes: dict[int, np.ndarray], columns: list[str]) -> np.ndarray:
    """Mode vectors (M, N, 3) in the order of the model's amplitude columns."""
    from .star import amplitude_modes

    numbers = amplitude_modes(columns)
    if len(numbers) != len(columns):
        raise ValueError(f"landscape model columns {columns} are not all amplitude columns")
    missing = [m for m in numbers if m not in modes]
    if missing:
        raise InputError(None, f"the modes file lacks mode(s) {missing} used by the landscape model")
    return np.stack([np.asarray(modes[m], np.float64).reshape(-1, 3) for m in numbers])
