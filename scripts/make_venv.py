#!/usr/bin/env python3
"""Create the project's virtual environment, even where Debian's python3-venv is absent.

Usage: python3 scripts/make_venv.py .venv

Debian's python3 ships without ensurepip unless python3-venv is installed, so
``python3 -m venv`` fails there. In that case the environment is created without
pip and pip is bootstrapped from its wheel on PyPI (a wheel is a zip archive that
can run itself: ``python pip.whl/pip install pip``).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import urllib.request
import venv
from pathlib import Path

PYPI_JSON = "https://pypi.org/pypi/pip/json"


def bootstrap_pip(python: Path) -> None:
    with urllib.request.urlopen(PYPI_JSON, timeout=60) as resp:
        meta = json.load(resp)
    wheel = next(u for u in meta["urls"] if u["filename"].endswith("-py3-none-any.whl"))
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / wheel["filename"]
        with urllib.request.urlopen(wheel["url"], timeout=120) as resp:
            target.write_bytes(resp.read())
        subprocess.check_call([str(python), f"{target}/pip", "install", "--no-index", str(target)])


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    dest = Path(sys.argv[1])
    if sys.version_info < (3, 11):
        print(f"error: Python >= 3.11 needed, found {sys.version.split()[0]} ({sys.executable})", file=sys.stderr)
        return 1
    python = dest / "bin" / "python"
    try:
        venv.create(dest, with_pip=True, clear=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"note: venv with pip failed ({exc}); bootstrapping pip from PyPI", file=sys.stderr)
        venv.create(dest, with_pip=False, clear=True)
        bootstrap_pip(python)
    subprocess.check_call([str(python), "-m", "pip", "--version"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
