"""Resumable work, one mechanism: fingerprints, per-chunk records and per-batch progress.

Every long stage (simulate, preprocess, align, train, predict) resumes the same way:

1. A **fingerprint** (:func:`fingerprint`) of everything that determines its results — the
   settings, the input data (arrays, file contents, particle names), the code's format
   version. Work done under another fingerprint is never reused.
2. A chunk of a job writes its outputs, then a **record** beside them (:func:`write_record`,
   atomic): the fingerprint and the facts of the chunk (rows, sums, timing). A chunk is done
   when its record carries the same fingerprint and facts and its outputs exist
   (:func:`chunk_done`); a killed chunk has no record and is redone alone.
3. Inside one job, :class:`BatchProgress` saves each finished batch (``batch_NNNNNN.npz``
   beside a ``state.json`` holding the fingerprint) so that a rerun after a kill loads the
   finished batches and computes only the rest; the job writes its output once all batches
   are done and then removes the progress folder.
4. Training checkpoints carry the fingerprint of their data (:func:`fingerprint` with
   ``files=``) so that a rerun continues only an unfinished run of the same training.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np

from .fileio import atomic_path, atomic_write_json
from .logs import get_logger

log = get_logger(__name__)


def fingerprint(*parts, arrays: Iterable = (), files: Iterable = (), length: int = 32) -> str:
    """SHA-256 (hex, ``length`` characters) of JSON-serialisable ``parts`` (dict keys sorted,
    other objects by ``str``), the bytes of numpy ``arrays`` (None allowed) and the contents of
    ``files`` (read in blocks)."""
    h = hashlib.sha256()
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    for a in arrays:
        h.update(b"\x00" if a is None else np.ascontiguousarray(a).tobytes())
        h.update(b"\x01")
    for p in files:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\x00")
    return h.hexdigest()[:length]


def write_record(path, fp: str, **facts) -> dict:
    """Write the completion record of a chunk (after its outputs); returns it."""
    record = {**facts, "fingerprint": fp}
    atomic_write_json(path, record)
    return record


def read_record(path) -> dict | None:
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def chunk_done(record_path, fp: str, outputs: Iterable = (), **facts) -> dict | None:
    """The record of a finished chunk, or None when the chunk must be (re)done: no record,
    another fingerprint, other facts (e.g. ``start``, ``n``) or a missing output file."""
    rec = read_record(record_path)
    if rec is None or rec.get("fingerprint") != fp:
        return None
    if any(rec.get(k) != v for k, v in facts.items()):
        return None
    if any(not Path(o).is_file() for o in outputs):
        return None
    return rec


class BatchProgress:
    """The finished batches of one job, saved as they finish (``<directory>/batch_NNNNNN.npz``).

    ``load()`` returns ``{batch: {name: array}}`` of the batches finished under this
    fingerprint (a folder left by other inputs or settings is discarded); ``save(b, arrays)``
    adds one atomically; ``clear()`` removes the folder once the job's output is written.
    """

    def __init__(self, directory, fp: str, n_batches: int, format_version: int = 1):
        self.dir = Path(directory)
        self.fp = fp
        self.n_batches = int(n_batches)
        self.format_version = format_version

    def load(self) -> dict[int, dict]:
        state = self.dir / "state.json"
        if not state.is_file():
            return {}
        st = read_record(state) or {}
        if st.get("fingerprint") != self.fp or st.get("batches") != self.n_batches:
            log.info("%s: progress from different inputs or settings: starting over", self.dir)
            self.clear()
            return {}
        done = {}
        for b in range(self.n_batches):
            f = self.dir / f"batch_{b:06d}.npz"
            if not f.is_file():
                continue
            try:
                with np.load(f, allow_pickle=False) as z:
                    if str(z["fingerprint"]) == self.fp:
                        done[b] = {k: z[k] for k in z.files if k != "fingerprint"}
            except (OSError, ValueError, KeyError):
                continue
        return done

    def save(self, b: int, arrays: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self.dir / "state.json"
        if not state.is_file():
            atomic_write_json(state, {"fingerprint": self.fp, "batches": self.n_batches,
                                      "format_version": self.format_version})
        with atomic_path(self.dir / f"batch_{b:06d}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, fingerprint=np.asarray(self.fp), **arrays)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
