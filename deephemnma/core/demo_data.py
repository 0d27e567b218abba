"""The demo's reference structures: adenylate kinase, open (4AKE) and closed (1AKE).

The project must run without ../shared, so the embedded default fetches real coordinates at
set-up time from a package registry: the PyPI source distribution of MDAnalysisTests ships
``adk_open.pdb`` (4AKE) and ``adk_closed.pdb`` (1AKE), CHARMM-style PDB files. The sdist and
both files are verified by SHA-256, then normalised for cryo-EM use:

* the files carry no element column and left-justified atom names (``HT1``, ``CA``), which
  PDB readers misread (gemmi reads ``CA`` as calcium, ``HG`` as mercury); elements are set
  from the first letter of each atom name (all residues are standard amino acids),
* the blank chain identifier becomes ``A`` (the segment ``4AKE``),
* hydrogens are kept (atom selection happens later).

The download (57 MB) is cached in ``~/.cache/deephemnma`` (or ``$DEEPHEMNMA_CACHE``).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from .errors import InputError
from .fileio import atomic_path
from .logs import get_logger

log = get_logger(__name__)

MDAT_VERSION = "2.9.0"
SDIST = f"mdanalysistests-{MDAT_VERSION}.tar.gz"
SDIST_SHA256 = "8e4942ec3aaef5e93aeb39690293764ab9995550135ff1bd0df2f40cb95c0626"
MEMBERS = {
    "adk_open.pdb": "d988a6845a7489f8641ce8918471e4b2a19e94f46490571bb33522041fc48f9a",
    "adk_closed.pdb": "e5f4b595e93662f2915630a54769d65ca92566cf7c5cd66646e22a6139aa01fd",
}
OUTPUT_NAMES = {"adk_open.pdb": "ak_open_4ake.pdb", "adk_closed.pdb": "ak_closed_1ake.pdb"}


def cache_dir() -> Path:
    return Path(os.environ.get("DEEPHEMNMA_CACHE", Path.home() / ".cache" / "deephemnma"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _make_dir(path: Path, what: str) -> Path:
    """``mkdir -p`` with an InputError naming the directory when it cannot be created."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(path, f"cannot create the {what} ({exc.strerror or exc.__class__.__name__})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(path, f"the {what} is not writable")
    return path


def _download_sdist(dest: Path) -> Path:
    target = dest / SDIST
    if target.is_file():
        if sha256(target) == SDIST_SHA256:
            return target
        log.info("%s: checksum mismatch (a damaged download?): downloading it again", target)
        target.unlink()
    _make_dir(dest, "download cache directory (DEEPHEMNMA_CACHE)")
    log.info("downloading MDAnalysisTests %s source distribution from PyPI (57 MB, once)", MDAT_VERSION)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"MDAnalysisTests=={MDAT_VERSION}", "-d", str(dest), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not target.is_file():
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(target, f"could not download MDAnalysisTests {MDAT_VERSION} from PyPI (no network? "
                                 f"copy the file here by hand): {reason}")
    if sha256(target) != SDIST_SHA256:
        target.unlink()
        raise InputError(target, f"checksum mismatch of the download (expected {SDIST_SHA256}); removed, try again")
    return target


def normalise_charmm_pdb(src: Path, dst: Path, chain: str = "A") -> int:
    """Write ``src`` with elements from atom names and a chain id; returns the atom count."""
    import gemmi

    st = gemmi.read_structure(str(src))
    n = 0
    for model in st:
        for ch in model:
            ch.name = chain
            for res in ch:
                for atom in res:
                    letters = [c for c in atom.name if c.isalpha()]
                    atom.element = gemmi.Element(letters[0] if letters else "X")
                    n += 1
        break
    st.setup_entities()
    with atomic_path(dst) as tmp:
        st.write_pdb(str(tmp))
    return n


def fetch_adenylate_kinase(out_dir: str | Path) -> dict[str, Path]:
    """Fetch, verify and normalise the open and closed AK structures into ``out_dir``.

    Returns ``{"open": path, "closed": path}``. Idempotent: existing outputs are reused.
    """
    out_dir = Path(out_dir)
    outputs = {"open": out_dir / OUTPUT_NAMES["adk_open.pdb"], "closed": out_dir / OUTPUT_NAMES["adk_closed.pdb"]}
    if all(p.is_file() for p in outputs.values()):
        return outputs
    _make_dir(out_dir, "output directory")  # before the download: fail fast
    sdist = _download_sdist(cache_dir())
    extracted = _make_dir(cache_dir() / f"mdanalysistests-{MDAT_VERSION}-adk", "download cache directory")
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name in MEMBERS and member.isfile():
                target = extracted / name
                if not (target.is_file() and sha256(target) == MEMBERS[name]):
                    with tar.extractfile(member) as fh, atomic_path(target) as tmp:
                        tmp.write_bytes(fh.read())
    for name, digest in MEMBERS.items():
        path = extracted / name
        if not path.is_file():
            raise InputError(sdist, f"{name} not found in the archive")
        if sha256(path) != digest:
            raise InputError(path, f"checksum mismatch (expected {digest}); delete it to extract it again")
    for name, key in (("adk_open.pdb", "open"), ("adk_closed.pdb", "closed")):
        n = normalise_charmm_pdb(extracted / name, outputs[key])
        log.info("wrote %s (%d atoms)", outputs[key], n)
    return outputs
