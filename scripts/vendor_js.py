#!/usr/bin/env python3
"""Vendor the results page's JavaScript libraries from the npm registry, reproducibly.

deephemnma/report/vendor/MANIFEST.json pins each package (name, version, the registry's sha512
integrity of its tarball), the file taken from it and that file's sha256; it also names the
packages bundled inside it, whose licence texts are collected. This script fetches the
tarballs with npm's own client (``npm pack``, through npm's cache, so a second run works
offline), checks each tarball's integrity against the manifest, and writes the files and
THIRD_PARTY_LICENSES.txt into deephemnma/report/vendor/ (the package data the page builder
inlines; committed, so building a page never needs npm or a network).

    python scripts/vendor_js.py            # (re)write the vendored files, checking integrity
    python scripts/vendor_js.py --check    # verify the committed files against the registry
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VENDOR = Path(__file__).resolve().parents[1] / "deephemnma" / "report" / "vendor"


def npm_pack(spec: str, dest: Path) -> tuple[Path, str]:
    """Fetch ``name@version``'s tarball into ``dest``; return its path and sha512 integrity."""
    out = subprocess.run(["npm", "pack", spec, "--json", "--pack-destination", str(dest)], check=True,
                         capture_output=True, text=True).stdout
    info = json.loads(out)[0]
    path = dest / info["filename"]
    digest = base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()
    return path, f"sha512-{digest}"


def member(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(tar.getmember(name))
    return f.read() if f else b""


def licence_text(tar: tarfile.TarFile, declared: str) -> str:
    """Every licence file at the package's top level; a note when it ships none."""
    names = sorted(m.name for m in tar.getmembers() if m.isfile() and m.name.count("/") == 1
                   and m.name.split("/")[1].upper().startswith(("LICENSE", "LICENCE")))
    if not names:
        return f"(the package ships no licence file; its package.json declares {declared})"
    return "\n".join(member(tar, n).decode("utf-8", "replace") for n in names)


def vendor(entry: dict, tmp: Path, check: bool) -> list[str]:
    """Fetch, verify and (unless ``check``) write one package's file; return licence sections."""
    spec = f"{entry['name']}@{entry['version']}"
    tgz, integrity = npm_pack(spec, tmp)
    if integrity != entry["integrity"]:
        sys.exit(f"{spec}: tarball integrity {integrity} differs from the manifest's {entry['integrity']}")
    with tarfile.open(tgz) as tar:
        data = member(tar, entry["file"])
        sections = [f"==== {spec} ({entry['license']}), vendored as {entry['vendored_as']}\n\n{licence_text(tar, entry['license'])}"]
    sha = hashlib.sha256(data).hexdigest()
    if sha != entry["sha256"]:
        sys.exit(f"{spec}: {entry['file']} has sha256 {sha}, the manifest says {entry['sha256']}")
    target = VENDOR / entry["vendored_as"]
    if check:
        if not target.is_file() or hashlib.sha256(target.read_bytes()).hexdigest() != sha:
            sys.exit(f"{target} differs from {spec}'s {entry['file']}: run python scripts/vendor_js.py")
    else:
        target.write_bytes(data)
    for dep in entry.get("bundles", []):
        dspec = f"{dep['name']}@{dep['version']}"
        dtgz, _ = npm_pack(dspec, tmp)
        with tarfile.open(dtgz) as tar:
            sections.append(f"==== {dspec} ({dep['license']}), bundled in {entry['vendored_as']}\n\n{licence_text(tar, dep['license'])}")
    return sections


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="verify the committed files; write nothing")
    args = ap.parse_args()
    manifest = json.loads((VENDOR / "MANIFEST.json").read_text())
    sections = []
    with tempfile.TemporaryDirectory() as d:
        for entry in manifest["packages"]:
            sections += vendor(entry, Path(d), args.check)
    text = "Third-party JavaScript inlined into deephemnma's results page.\n\n" + "\n\n".join(sections)
    lic = VENDOR / "THIRD_PARTY_LICENSES.txt"
    if args.check:
        if not lic.is_file() or lic.read_text() != text:
            sys.exit(f"{lic} is out of date: run python scripts/vendor_js.py")
        print("vendored JavaScript matches the registry tarballs")
    else:
        lic.write_text(text)
        print(f"vendored {', '.join(e['name'] + '@' + e['version'] for e in manifest['packages'])} into {VENDOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
