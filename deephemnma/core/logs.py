"""Logging to the console and to a log file, and progress reporting for long loops.

``setup_logging(log_file)`` is called once per CLI command. ``progress(...)`` shows a
tqdm bar on an interactive terminal and, when output goes to a file (cluster jobs,
Snakemake logs), writes a log line every ~10 % or every minute instead of a bar.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

ROOT = "deephemnma"
_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
T = TypeVar("T")


def get_logger(name: str) -> logging.Logger:
    """Logger under the package root: ``get_logger(__name__)``."""
    if not name.startswith(ROOT):
        name = f"{ROOT}.{name}"
    return logging.getLogger(name)


def setup_logging(log_file: str | Path | None = None, verbose: int = 0, quiet: bool = False) -> None:
    root = logging.getLogger(ROOT)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    level = logging.DEBUG if verbose > 0 else logging.INFO
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else level)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if not verbose else _FORMAT))
    root.addHandler(console)
    if log_file is not None:
        log_file = Path(log_file)
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file, mode="a")
        except OSError as exc:
            from .errors import InputError

            raise InputError(log_file, f"cannot write the log file ({exc.strerror or exc.__class__.__name__})") from None
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(fh)
    root.propagate = False


class progress:
    """Progress over an iterable or a manual counter.

    >>> for batch in progress(batches, total=n, desc="align", unit="particle"): ...
    >>> with progress(total=n, desc="write") as bar: bar.update(k)
    """

    def __init__(self, iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", logger: logging.Logger | None = None, interval_s: float = 60.0):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = 0
        self._log = logger or get_logger("progress")
        self._interval = interval_s
        self._t0 = time.monotonic()
        self._last_t = self._t0
        self._last_frac = 0.0
        self._bar = None
        self._closed = False
        self._last_logged = -1
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        frac = self.n / self.total if self.total else 0.0
        if (self.total and frac - self._last_frac >= 0.1) or now - self._last_t >= self._interval:
            self._emit(now)
            self._last_frac = frac
            self._last_t = now

    def _emit(self, now: float) -> None:
        self._last_logged = self.n
        rate = self.n / max(now - self._t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        self._log.info("%s: %d%s %s (%.1f %s/s)", self.desc, self.n, of, self.unit, rate, self.unit)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.n and self.n != self._last_logged:
            self._emit(time.monotonic())

    def __enter__(self) -> "progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
