"""Atomic file output: write to a temporary name beside the target, rename when complete.

A crash or an error leaves either the previous file or nothing, never a partial file
that looks complete. ``os.replace`` is atomic on POSIX within one file system.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError


def temp_path_for(path: str | os.PathLike) -> Path:
    """A unique temporary path in the same directory (same file system) as ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InputError(path, f"cannot write here ({exc.strerror or exc.__class__.__name__})") from None
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    os.close(fd)
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to ``path``, on error remove it.

    The temporary path keeps the target's suffix last (``.name.XXXX.tmp.mrcs`` style is
    not used because some writers infer the format from the suffix): the yielded name is
    ``.<name>.<random>.tmp<suffix>``.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    tmp_with_suffix = tmp.with_name(tmp.name + path.suffix)
    tmp.rename(tmp_with_suffix)
    try:
        yield tmp_with_suffix
        os.replace(tmp_with_suffix, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            if tmp_with_suffix.is_dir():
                shutil.rmtree(tmp_with_suffix)
            else:
                tmp_with_suffix.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def json_default(obj):
    """``json.dumps(default=...)`` for numpy scalars and arrays and paths."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``Path(path)`` if it is an existing file, else raise InputError naming it."""
    from .errors import InputError

    p = Path(path)
    if not p.exists():
        raise InputError(p, f"{what} not found")
    if not p.is_file():
        raise InputError(p, f"{what} is not a regular file")
    return p


def merge_summaries(paths) -> dict:
    """One summary of per-chunk JSON summaries (those that exist): top-level numbers summed
    (particles, counts, seconds), ``*_fraction`` recomputed from the matching count over
    ``particles``, ``*_per_particle`` from the sums, ``median_*`` dropped (not mergeable);
    ``settings`` and other values kept from the first; ``chunks`` counted."""
    docs = [json.loads(Path(p).read_text()) for p in paths if Path(p).is_file()]
    out: dict = {"chunks": len(docs)}
    for d in docs:
        for k, v in d.items():
            if k.startswith("median_"):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(("_fraction", "_per_particle")):
                out[k] = out.get(k, 0) + v
            elif k not in out:
                out[k] = v
    n = out.get("particles") or 0
    for k in list(out):
        if k.endswith("_fraction") and k[: -len("_fraction")] in out and n:
            out[k] = out[k[: -len("_fraction")]] / n
        if k == "seconds_per_particle" and n:
            out[k] = out.get("seconds", 0) / n
    return out
