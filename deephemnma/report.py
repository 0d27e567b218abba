"""A self-contained HTML report of a results tree (figures embedded as base64 PNG).

:func:`build_report` walks the results directory and writes one HTML file with a section per
stage that is present — normal modes, alignment accuracy, training, outlier filter,
landscape, groups, reconstructions (FSC), evaluation against ground truth, animations — and
a last section for anything else it finds. Stages are recognised by their results folders, as
their command modules declare them (``sections``: (title, folder) pairs in pipeline order,
:func:`deephemnma.commands.report.report_sections`); inside them:

* PNG/JPEG/SVG images are embedded;
* JSON files are shown as tables (nested keys flattened, long lists shortened);
* CSV/TSV tables are shown (first ``max_table_rows`` rows); a table with an ``epoch`` column
  and loss columns is drawn as training curves; ``fsc.csv`` files are drawn together as one
  FSC plot per directory tree, and reconstruction ``summary.json`` files are collected into
  one table (particles, resolutions at FSC 0.143 and 0.5);
* a landscape STAR file (``dhnmaPC`` columns) without a figure beside it is plotted.

Anything missing is skipped; a file that cannot be read is reported in the section instead
of failing the report.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from .core.fileio import atomic_write_text
from .core.logs import get_logger

log = get_logger(__name__)

IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
MAX_FILES_PER_SECTION = 200

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#234;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#cde;font-size:13px}
nav{padding:8px 28px;background:#eef2f5;font-size:13px}nav a{margin-right:14px;color:#234}
section{background:#fff;margin:18px 28px;padding:12px 20px;border:1px solid #dde;border-radius:6px}
h2{font-size:18px;border-bottom:1px solid #dde;padding-bottom:4px}h3{font-size:14px;color:#345;margin:14px 0 6px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}td,th{border:1px solid #ccd;padding:2px 6px;text-align:right}
th{background:#eef2f5}td.k{text-align:left;font-family:monospace}
figure{display:inline-block;margin:6px 10px 6px 0;vertical-align:top}figure img{max-width:640px;border:1px solid #eee}
figcaption{font-size:11px;color:#567;font-family:monospace}.warn{color:#a40}.muted{color:#789;font-size:12px}
"""


# ------------------------------------------------------------------------------ rendering
def _esc(x) -> str:
    return html.escape(str(x))


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return _esc(v)


def _img_tag(data: bytes, mime: str, caption: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="data:{mime};base64,{b64}" alt="{_esc(caption)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _figure_to_tag(draw, caption: str) -> str:
    """Render a figure drawn by ``draw(path)`` (a :mod:`deephemnma.core.plots` function) to an <img>."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fig.png"
        draw(p)
        return _img_tag(p.read_bytes(), "image/png", caption)


def _flatten(obj, prefix="", depth=0, out=None):
    out = {} if out is None else out
    if isinstance(obj, dict) and depth < 3:
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1, out)
    elif isinstance(obj, list):
        if len(obj) <= 8 and all(not isinstance(v, (dict, list)) for v in obj):
            out[prefix] = ", ".join(_fmt(v) for v in obj)
        elif all(isinstance(v, list) for v in obj) and len(obj) <= 8:
            out[prefix] = "; ".join("[" + ", ".join(_fmt(x) for x in v[:8]) + ("…" if len(v) > 8 else "") + "]"
                                    for v in obj)
        else:
            out[prefix] = f"[{len(obj)} items]"
    else:
        out[prefix] = obj
    return out


def json_table(obj) -> str:
    flat = _flatten(obj)
    rows = "".join(f'<tr><td class="k">{_esc(k)}</td><td>{_fmt(v)}</td></tr>' for k, v in flat.items())
    return f"<table>{rows}</table>"


def frame_table(df: pd.DataFrame, max_rows: int = 40) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>"
                   for row in df.head(max_rows).itertuples(index=False))
    more = f'<p class="muted">{len(df) - max_rows} more rows not shown</p>' if len(df) > max_rows else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


# ------------------------------------------------------------------------------ content
class _Section:
    def __init__(self, title: str, anchor: str):
        self.title, self.anchor, self.parts = title, anchor, []

    def add(self, html_text: str) -> None:
        self.parts.append(html_text)

    def warn(self, msg: str) -> None:
        self.parts.append(f'<p class="warn">{_esc(msg)}</p>')

    def html(self) -> str:
        return f'<section id="{self.anchor}"><h2>{_esc(self.title)}</h2>{"".join(self.parts)}</section>'


def _is_training_history(df: pd.DataFrame) -> bool:
    return "epoch" in df.columns and any("loss" in str(c).lower() for c in df.columns)


def _render_dir(sec: _Section, root: Path, d: Path, max_rows: int, seed: int) -> None:
    from .core import plots

    files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))[:MAX_FILES_PER_SECTION]
    imgs = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    fsc_files = [p for p in files if p.name == "fsc.csv"]
    summaries = [p for p in files if p.name == "summary.json" and (p.parent / "fsc.csv").is_file()]
    if summaries:  # reconstructions: one table
        rows = []
        for p in summaries:
            try:
                s = json.loads(p.read_text())
                rows.append({"map": str(p.parent.relative_to(root)), "particles": s.get("n_particles"),
                             "box": s.get("box"), "voxel size (Å)": s.get("voxel_size"),
                             "FSC 0.143 (Å)": s.get("resolution_fsc0143"), "FSC 0.5 (Å)": s.get("resolution_fsc05"),
                             "masked": s.get("masked"), "time (s)": s.get("seconds")})
            except Exception as exc:  # noqa: BLE001
                sec.warn(f"{p}: {exc}")
        if rows:
            sec.add("<h3>reconstructions</h3>" + frame_table(pd.DataFrame(rows), max_rows))
    if len(fsc_files) > 1 or (fsc_files and not any(p.parent == fsc_files[0].parent for p in imgs)):
        curves = {}
        for p in fsc_files:
            try:
                t = pd.read_csv(p)
                curves[str(p.parent.relative_to(d)) or p.parent.name] = (t["frequency"].to_numpy(), t["fsc"].to_numpy())
            except Exception as exc:  # noqa: BLE001
                sec.warn(f"{p}: {exc}")
        if curves:
            sec.add(_figure_to_tag(lambda path: plots.fsc_curves(path, curves, title="half-map FSC"),
                                   f"{d.relative_to(root)}: FSC of {len(curves)} map(s)"))
    for p in imgs:
        try:
            sec.add(_img_tag(p.read_bytes(), IMAGE_SUFFIXES[p.suffix.lower()], str(p.relative_to(root))))
        except OSError as exc:
            sec.warn(f"{p}: {exc}")
    for p in files:
        rel = p.relative_to(root)
        try:
            if p.suffix.lower() == ".json" and p not in summaries and p.stat().st_size < 2_000_000:
                obj = json.loads(p.read_text())
                sec.add(f"<h3>{_esc(rel)}</h3>" + json_table(obj))
            elif p.suffix.lower() in (".csv", ".tsv") and p.name != "fsc.csv" and p.stat().st_size < 50_000_000:
                df = pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",")
                if _is_training_history(df):
                    sec.add(_figure_to_tag(lambda path, df=df: plots.training_curves(path, df, title=str(rel)),
                                           f"{rel}: training curves"))
                if p.name == "errors.csv" or len(df) > 5 * max_rows:
                    num = df.select_dtypes("number")
                    if len(num.columns):
                        desc = num.describe().T.reset_index().rename(columns={"index": "column"})
                        sec.add(f"<h3>{_esc(rel)} ({len(df)} rows, summary)</h3>" + frame_table(desc, max_rows))
                else:
                    sec.add(f"<h3>{_esc(rel)}</h3>" + frame_table(df, max_rows))
            elif p.suffix.lower() == ".star" and "landscape" in p.name and not any(i.parent == p.parent for i in imgs):
                _landscape_from_star(sec, p, rel, seed)
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not sink the report
            sec.warn(f"{rel}: could not be shown ({exc.__class__.__name__}: {exc})")
    other = [p for p in files if p.suffix.lower() in (".mrc", ".pdb", ".cxc", ".star", ".mrcs", ".cif")]
    if other:
        listing = ", ".join(_esc(p.relative_to(root)) for p in other[:60])
        sec.add(f'<p class="muted">files: {listing}{" …" if len(other) > 60 else ""}</p>')


def _landscape_from_star(sec: _Section, p: Path, rel, seed: int) -> None:
    from .core import plots
    from .core.star import GROUP, pc_columns, read_star

    star = read_star(p)
    cols = pc_columns(star.particles)
    if not cols:
        return
    Y = star.particles[cols].to_numpy(np.float64)
    labels = star.particles[GROUP].to_numpy() if GROUP in star.particles.columns else None
    sec.add(_figure_to_tag(lambda path: plots.landscape(path, Y, labels, seed=seed), f"{rel}: landscape"))


def build_report(results, out, sections_spec: list[tuple[str, str]], title: str = "DeepHEMNMA results",
                 max_table_rows: int = 40, seed: int = 0) -> Path:
    """Write the HTML report of the results tree ``results`` to ``out``; ``sections_spec``:
    (section title, results folder) of each stage, in pipeline order."""
    results = Path(results)
    sections: list[_Section] = []
    seen: set[Path] = set()
    dirs = sorted(p for p in results.iterdir() if p.is_dir() and not p.name.startswith(".")) if results.is_dir() else []
    for title_s, folder in sections_spec:
        matched = [d for d in dirs if d not in seen and d.name == folder]
        if not matched:
            continue
        sec = _Section(title_s, title_s.lower().split()[0])
        for d in matched:
            seen.add(d)
            try:
                _render_dir(sec, results, d, max_table_rows, seed)
            except Exception as exc:  # noqa: BLE001
                sec.warn(f"{d}: could not be read ({exc.__class__.__name__}: {exc})")
        if sec.parts:
            sections.append(sec)
    rest = [d for d in dirs if d not in seen]
    loose = [p for p in results.iterdir() if p.is_file()] if results.is_dir() else []
    if rest or loose:
        sec = _Section("Other results", "other")
        for d in rest:
            try:
                _render_dir(sec, results, d, max_table_rows, seed)
            except Exception as exc:  # noqa: BLE001
                sec.warn(f"{d}: could not be read ({exc})")
        for p in loose:
            if p.suffix.lower() in IMAGE_SUFFIXES:
                sec.add(_img_tag(p.read_bytes(), IMAGE_SUFFIXES[p.suffix.lower()], p.name))
            elif p.suffix.lower() in (".yaml", ".yml") and p.stat().st_size < 200_000:
                sec.add(f"<h3>{_esc(p.name)}</h3><pre>{_esc(p.read_text(errors='replace'))}</pre>")
        if sec.parts:
            sections.append(sec)
    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    from . import __version__

    nav = "".join(f'<a href="#{s.anchor}">{_esc(s.title)}</a>' for s in sections)
    body = "".join(s.html() for s in sections) or \
        f'<section><p class="warn">No results found in {_esc(results)}.</p></section>'
    doc = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
           f"<style>{CSS}</style></head><body><header><h1>{_esc(title)}</h1>"
           f"<p>{_esc(results.resolve())} · deephemnma {_esc(__version__)} · {now}</p></header>"
           f"<nav>{nav}</nav>{body}</body></html>\n")
    atomic_write_text(out, doc)
    log.info("report with %d section(s) written to %s", len(sections), out)
    return Path(out)
