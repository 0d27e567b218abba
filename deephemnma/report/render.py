"""HTML pieces of the results page (each returns a string; values are escaped here)."""
from __future__ import annotations

import base64
import gzip
import html
import json

import numpy as np

from . import svg
from .health import Check
from .particles import group_rgb

STATUS_ORDER = {"bad": 0, "warn": 1, "ok": 2, "info": 3, "na": 4}


def esc(x) -> str:
    """HTML-escaped text of ``x``."""
    return html.escape(str(x))


def fmt(v) -> str:
    """A value for a table cell: 4 significant digits, yes/no, '–' for None."""
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return esc(f"{v:.4g}") if np.isfinite(v) else esc(v)
    return esc(v)


def embed_blob(elem_id: str, data: bytes, dtype: str = "uint8") -> str:
    """A <script type="application/octet-stream"> with base64 data, gzipped when that saves ≥ 10 %."""
    packed, enc = data, "raw"
    if len(data) > 4096:
        z = gzip.compress(data, compresslevel=6, mtime=0)
        if len(z) < 0.9 * len(data):
            packed, enc = z, "gzip"
    b64 = base64.b64encode(packed).decode("ascii")
    return (f'<script type="application/octet-stream" id="{elem_id}" data-dtype="{dtype}" data-enc="{enc}">'
            f"{b64}</script>\n")


def embed_json(elem_id: str, obj) -> str:
    """A <script type="application/json"> holding ``obj`` (safe inside HTML)."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json" id="{elem_id}">{text}</script>\n'


# ------------------------------------------------------------------------------ landscape
EXPLORER = """
<div id="dh-landscape" class="dh-explorer">
 <div class="dh-toolbar">
  <label>x <select class="dh-x"></select></label><label>y <select class="dh-y"></select></label>
  <label>colour <select class="dh-colour"></select></label><span class="sep"></span>
  <button data-mode="box" title="drag a box (shift: add)">▭ box</button>
  <button data-mode="lasso" title="draw a lasso (shift: add)">◌ lasso</button>
  <button data-mode="pan" title="drag to pan; the wheel zooms">✥ pan</button>
  <button class="dh-reset" title="whole landscape (double-click)">⟲ view</button><span class="sep"></span>
  <button class="dh-clear" title="clear the selection">✕ clear</button>
  <button class="dh-save" title="download the selection (JSON) for deephemnma select" disabled>⤓ save selection</button>
 </div>
 <div class="dh-plot"><canvas class="dh-raster"></canvas><canvas class="dh-overlay"></canvas><div class="dh-tip" hidden></div></div>
 <div class="dh-count"></div>
 <div class="dh-legend"></div>
 <p class="dh-howto">Saved selections become RELION STAR files (optics table and every column kept):
 <code>deephemnma select --particles {path} --selection selection.json --out selection.star</code>
 · also <code>--where "{where}"</code>{groups}.</p>
</div>
"""


def landscape_html(meta: dict | None) -> str:
    """The explorer's markup (filled by explorer.js), or 'not available'."""
    if meta is None:
        return '<p class="muted">Not available: no landscape STAR file (landscape/landscape.star) in the results.</p>'
    land = meta["landscape"]
    groups = (" or <code>--groups 1 3</code>" if land.get("file_has_groups") else
              "; each group is already a STAR file, groups/group_NN.star")
    names = [c["name"] for c in meta["columns"]]
    where = f"{names[0]} > 0" + (" and dhnmaFlag == 0" if "dhnmaFlag" in names else "")
    return EXPLORER.replace("{path}", esc(land["path"])).replace("{groups}", groups).replace("{where}", esc(where))


# ------------------------------------------------------------------------------ health
def overall(checks: list[Check]) -> str:
    """The worst status among the checks that made a judgement."""
    worst = min((c.status for c in checks if c.status in ("bad", "warn", "ok")), key=STATUS_ORDER.get, default="na")
    return worst


def health_html(checks: list[Check]) -> str:
    """The health panel: one verdict line, then every check in words."""
    worst = overall(checks)
    n_bad = sum(c.status == "bad" for c in checks)
    n_warn = sum(c.status == "warn" for c in checks)
    words = {"bad": (f"{n_bad} problem makes" if n_bad == 1 else f"{n_bad} problems make")
             + " part of the result untrustworthy: see the red line" + ("." if n_bad == 1 else "s."),
             "warn": f"Usable, with {n_warn} caution{'s' if n_warn > 1 else ''}.", "ok": "Every available check passed.",
             "na": "No check could be made: the stages' summaries are missing."}[worst]
    items = "".join(f'<li class="{c.status}"><span class="topic">{esc(c.topic)}.</span> {esc(c.text)} '
                    f'<span class="src">{esc(c.source)}</span></li>' for c in checks)
    return f'<p class="verdict {worst}">{esc(words)}</p><ul class="checks">{items}</ul>'


# ------------------------------------------------------------------------------ summary
def summary_html(groups: list[dict], axes: list[dict]) -> str:
    """The compact answer beside the landscape: each group's size and resolution, each axis's motion."""
    parts = []
    if groups:
        rows = "".join(
            f"<tr><td class='k'><span class='dh-sw' style='background:rgb({','.join(map(str, group_rgb(g['group'])))})'>"
            f"</span>{g['group']}</td><td>{fmt(g.get('size'))}</td><td>{fmt(g.get('resolution_fsc0143'))}</td></tr>"
            for g in groups)
        parts.append(f"<table class='t'><tr><th class='k'>group</th><th>particles</th><th>map (Å, FSC 0.143)</th></tr>"
                     f"{rows}</table>")
    for a in axes:
        bits = [f"{100 * a['explained']:.0f} % of the variance" if a.get("explained") is not None else None,
                f"end-to-end RMSD {a['rmsd_ends']:.2f} Å" if a.get("rmsd_ends") is not None else None]
        top = sorted(a.get("loadings", []), key=lambda t: -abs(t[1]))[:2]
        if top:
            bits.append("mostly " + " and ".join(t[0] for t in top))
        parts.append(f"<p><b>{esc(a['label'])}</b>: {esc(', '.join(b for b in bits if b))}.</p>")
    return "".join(parts) or '<p class="muted">Not available yet: no groups or landscape axes.</p>'


# ------------------------------------------------------------------------------ groups and maps
def _sign_cell(g: dict) -> str:
    """The map's sign as the reconstruct stage (or, for old summaries, the report) judged it."""
    sign = g.get("sign") or g.get("page_check")
    if not sign or sign.get("positive") is None:
        return "–"
    how = esc(sign.get("how") or ("checked by the report" if g.get("page_check") else ""))
    word = "positive" if sign["positive"] else '<span class="bad">negative: inverted?</span>'
    return f'{word}<br><span class="muted">{how}</span>' if how else word


def _mask_cell(g: dict) -> str:
    m = g.get("mask")
    if not m:
        return "–"
    text = esc(m["kind"])
    if m.get("rejected"):
        text = f'<span class="warn">{text}</span>'
    if m.get("reference_density_inside") is not None:
        text += f'<br><span class="muted">{100 * m["reference_density_inside"]:.0f} % of the reference inside</span>'
    return text


def groups_html(groups: list[dict], fsc_curves: list[dict]) -> str:
    """Table of groups (size, centre, resolutions, sign, mask, files) beside their FSC curves."""
    if not groups:
        return '<p class="muted">Not available: no groups (groups/groups.json) or maps (maps/group_NN/).</p>'
    pcs = sorted({k for g in groups for k in g.get("centroid", {})})
    head = ("<tr><th class='k'>group</th><th>particles</th>" + "".join(f"<th>{esc(k)}</th>" for k in pcs)
            + "<th>FSC 0.143 (Å)</th><th>FSC 0.5 (Å)</th><th>unmasked FSC 0.143 (Å)</th><th class='k'>mask</th>"
              "<th class='k'>density sign</th><th class='k'>files</th></tr>")
    rows = []
    for g in groups:
        sw = f'<span class="dh-sw" style="background:rgb({",".join(map(str, group_rgb(g["group"])))})"></span>'
        rows.append(f"<tr><td class='k'>{sw}group {g['group']}</td><td>{fmt(g.get('size'))}</td>"
                    + "".join(f"<td>{fmt(g.get('centroid', {}).get(k))}</td>" for k in pcs)
                    + f"<td>{fmt(g.get('resolution_fsc0143'))}</td><td>{fmt(g.get('resolution_fsc05'))}</td>"
                    f"<td>{fmt(g.get('resolution_unmasked_fsc0143'))}</td><td class='k'>{_mask_cell(g)}</td>"
                    f"<td class='k'>{_sign_cell(g)}</td><td class='k'><code>{esc(g.get('files', ''))}</code></td></tr>")
    table = f"<table class='t'>{head}{''.join(rows)}</table>"
    chart = svg.fsc_chart(fsc_curves)
    return (f'<div class="row"><div>{table}<p class="muted">Resolution from the half-map FSC of each group\'s '
            f'reconstruction (original images, predicted poses).</p></div>'
            f'<div>{chart}<p class="muted">Half-map FSC per group (colours as in the landscape).</p></div></div>')


# ------------------------------------------------------------------------------ motions
def motion_html(axes: list[dict], chimerax: str | None) -> str:
    """Per axis: variance, RMSD, mode composition; the animation viewer; the ChimeraX script."""
    if not axes:
        body = '<p class="muted">Not available: no landscape model (landscape/model.json) or animations (animate/).</p>'
    else:
        parts = []
        for a in axes:
            ev = a.get("explained")
            bars = svg.bars(a.get("loadings", []))
            stats = []
            if ev is not None:
                stats.append(f"{100 * ev:.1f} % of the amplitude variance")
            if a.get("rmsd_ends") is not None:
                stats.append(f"end-to-end RMSD {a['rmsd_ends']:.2f} Å, largest atomic excursion "
                             f"{a['max_displacement']:.2f} Å from the mean")
            parts.append(f'<div class="axis"><h3>{esc(a["label"])}</h3><p>{esc("; ".join(stats)) or "–"}.</p>'
                         f'{bars}<p class="muted">normal-mode composition of the axis (unit vector)</p></div>')
        body = '<div class="row"><div style="flex:1 1 300px">' + "".join(parts) + "</div>" + MOTION_VIEWER + "</div>"
    if chimerax:
        body += ("<details><summary>ChimeraX script (animate/chimerax.cxc)</summary><p>Run "
                 "<code>chimerax results/animate/chimerax.cxc</code> to play every axis with the group maps.</p>"
                 f"<pre>{esc(chimerax)}</pre></details>")
    return body


MOTION_VIEWER = """
<div id="dh-motion3d" class="dh-3d" style="flex:2 1 420px">
 <div class="dh-toolbar"><label>axis <select class="dh-anim-pick"></select></label>
  <button class="dh-play">▶ play</button><input class="dh-frame" type="range" min="0" max="1" step="1" value="0">
  <span class="dh-frame-out muted"></span></div>
 <div class="dh-stage"></div>
 <p class="muted">Colour: each atom's largest distance from its mean position along the axis (blue still, red moving).</p>
</div>
"""

MAP_VIEWER = """
<div id="dh-maps3d" class="dh-3d">
 <div class="dh-toolbar"><label>map <select class="dh-map-pick"></select></label>
  <label>level <input class="dh-level" type="range" min="0.5" max="8" step="0.1" value="3"></label>
  <span class="dh-level-out muted"></span></div>
 <div class="dh-stage"></div>
 <p class="muted">Maps binned and low-pass filtered to their FSC 0.143 resolution for the page;
 the originals are maps/group_NN/map.mrc.</p>
</div>
"""


def maps3d_html(maps: list[dict]) -> str:
    """The map viewer's markup (filled by views3d.js), or 'not available'."""
    if not maps:
        return '<p class="muted">Not available: no maps (maps/group_NN/map.mrc).</p>'
    return MAP_VIEWER


# ------------------------------------------------------------------------------ details
def flatten(obj, prefix: str = "", depth: int = 0, out: dict | None = None) -> dict:
    """Nested JSON as ``{dotted.key: formatted value}`` (long lists summarised)."""
    out = {} if out is None else out
    if isinstance(obj, dict) and depth < 4:
        for k, v in obj.items():
            flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1, out)
    elif isinstance(obj, list):
        short = len(obj) <= 8 and all(not isinstance(v, (dict, list)) for v in obj)
        out[prefix] = ", ".join(fmt(v) for v in obj) if short else f"[{len(obj)} items]"
    else:
        out[prefix] = fmt(obj)
    return out


def json_table(obj) -> str:
    """A JSON document as a two-column table."""
    rows = "".join(f"<tr><td class='k'>{esc(k)}</td><td class='k'>{v}</td></tr>" for k, v in flatten(obj).items())
    return f"<table class='t'>{rows}</table>"


def frame_table(df, max_rows: int = 40) -> str:
    """The first ``max_rows`` rows of a DataFrame as a table."""
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>"
                   for row in df.head(max_rows).itertuples(index=False))
    more = f'<p class="muted">{len(df) - max_rows} more rows not shown</p>' if len(df) > max_rows else ""
    return f"<table class='t'><tr>{head}</tr>{body}</table>{more}"


def img_tag(data: bytes, mime: str, caption: str) -> str:
    """An embedded image with its caption."""
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<figure><img loading="lazy" src="data:{mime};base64,{b64}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def details_block(title: str, inner: str, open_: bool = False) -> str:
    """A collapsed <details> block ('' when there is nothing inside)."""
    return f"<details{' open' if open_ else ''}><summary>{esc(title)}</summary>{inner}</details>" if inner else ""
