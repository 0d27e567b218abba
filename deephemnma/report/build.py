"""Assemble results/report.html from a results tree (see :mod:`deephemnma.report`)."""
from __future__ import annotations

import datetime as _dt
import re
from importlib import resources
from pathlib import Path

import matplotlib
import numpy as np

from .. import __version__
from ..core.fileio import atomic_write_text
from ..core.logs import get_logger
from . import readers, render
from .health import all_checks
from .particles import COORD_PREFIXES, group_rgb, pack_particles
from .results import Results, job_failures, job_times, landscape_table
from .views3d import page_animation, page_map

log = get_logger(__name__)
IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
#: folders that are not a stage's results: shown apart (settings, job times) or only listed
WORKFLOW_FOLDERS = ("config", "logs", "benchmarks")
SKIP_JSON = ("state.json", "chunk_", "polarity.json")
MAX_FIGURE_BYTES, MAX_JSON_BYTES, MAX_CSV_BYTES, MAX_LISTED = 3_000_000, 1_000_000, 20_000_000, 2000


def asset(name: str) -> str:
    """Text of a file shipped with the package (static/, templates/, vendor/); '' if absent."""
    f = resources.files("deephemnma.report").joinpath(name)
    return f.read_text(encoding="utf-8") if f.is_file() else ""


def colour_ramp() -> list[list[int]]:
    """The 256 RGB colours of viridis (numeric colouring and density)."""
    rgba = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))
    return (rgba[:, :3] * 255).round().astype(int).tolist()


def landscape_data(res: Results, max_bytes: int) -> tuple[dict | None, str]:
    """Explorer metadata and the embedded arrays (HTML)."""
    table, rel, has_groups = landscape_table(res)
    if table is None or not any(c.startswith(COORD_PREFIXES) for c in table.columns):
        return None, ""
    shown = f"{res.root.resolve().name}/{rel}"  # the path as seen from the run's working directory
    meta, arrays = pack_particles(table, shown, max_bytes)
    meta["landscape"]["file_has_groups"] = has_groups
    parts, meta["arrays"] = [], []
    for k, (name, arr) in enumerate(arrays.items()):
        eid = f"dh-arr-{k}"
        parts.append(render.embed_blob(eid, arr.tobytes(), arr.dtype.name))
        meta["arrays"].append({"name": name, "id": eid})
    meta["ramp"] = colour_ramp()
    return meta, render.embed_json("dh-landscape-meta", meta) + "".join(parts)


def group_maps(res: Results, max_box: int) -> tuple[list[dict], list[dict], str]:
    """(map entries for the health panel and table, FSC curves, embedded MRC blobs). Each
    entry is :func:`readers.group_map` plus what the 3D view needs; where the stage's summary
    has no sign record (older runs) the report checks the binned map itself (``page_check``)."""
    maps, curves, blobs = [], [], []
    for g, d in res.group_dirs():
        entry = readers.group_map(res, g, d.name)
        if (d / "map.mrc").is_file():
            try:
                data, info = page_map(d / "map.mrc", max_box, entry.get("resolution_fsc0143"))
                entry.update(mean=info["mean"], std=info["std"], level=info["level"], box=info["box"], id=f"dh-map-{g}")
                if entry["sign"] is None:
                    entry["page_check"] = info["sanity"]
                blobs.append(render.embed_blob(entry["id"], data))
            except Exception as exc:  # noqa: BLE001 - one unreadable map must not sink the page
                res.problems.append(f"maps/{d.name}/map.mrc: not shown ({exc})")
        fsc = res.csv(f"maps/{d.name}/fsc.csv")
        if fsc is not None and {"frequency", "fsc"} <= set(fsc.columns):
            curves.append({"label": f"group {g}", "rgb": group_rgb(g), "frequency": fsc["frequency"].to_numpy(),
                           "fsc": fsc["fsc"].to_numpy()})
        maps.append(entry)
    return maps, curves, "".join(blobs)


def group_rows(res: Results, maps: list[dict]) -> list[dict]:
    """One row per group: size and centroid (groups.json, groups.csv) joined with its map."""
    doc = readers.groups_doc(res) or {}
    table = res.csv("groups/groups.csv")
    by_map = {m["group"]: m for m in maps}
    ids = sorted({int(g) for g in doc.get("groups", {})} | set(by_map))
    rows = []
    for g in ids:
        info = doc.get("groups", {}).get(str(g), {})
        row = {"group": g, "size": info.get("size", by_map.get(g, {}).get("n_particles")), **by_map.get(g, {})}
        row["files"] = " ".join(x for x in (f"groups/{info['file']}" if info.get("file") else "",
                                            f"maps/group_{g:02d}/map.mrc" if g in by_map else "") if x)
        if table is not None and "group" in table.columns:
            r = table[table["group"] == g]
            cen = [c for c in table.columns if re.fullmatch(r"pc\d+_mean", c)]
            if len(r):
                row["centroid"] = {f"PC{c[2:-5]} centre": float(r.iloc[0][c]) for c in cen}
        rows.append(row)
    return rows


def axes_data(res: Results) -> tuple[list[dict], list[dict], str]:
    """(axis descriptions, animation entries for the viewer, embedded PDB blobs)."""
    model = readers.landscape_model(res)
    cols, comps = model.get("columns") or [], model.get("components") or []
    ratio = model.get("explained_variance_ratio") or []
    anims = dict(res.axis_files())
    axes, viewer, blobs = [], [], []
    for k in sorted(set(range(1, len(comps) + 1)) | set(anims)):
        a = {"axis": k, "label": f"PC{k}", "explained": ratio[k - 1] if k <= len(ratio) else None}
        if k <= len(comps):
            a["loadings"] = [(f"mode {int(c[-3:])}" if c[-3:].isdigit() else c, float(v))
                             for c, v in zip(cols, comps[k - 1])]
        if k in anims:
            try:
                data, info = page_animation(anims[k])
                a.update(rmsd_ends=info["rmsd_ends"], max_displacement=info["max_displacement"])
                eid = f"dh-anim-{k}"
                blobs.append(render.embed_blob(eid, data))
                viewer.append({"id": eid, "name": anims[k].name, "label": f"PC{k} ({anims[k].name})",
                               "frames": info["frames"], "representation": info["representation"], "axis": f"PC{k}",
                               "max_displacement": info["max_displacement"]})
            except Exception as exc:  # noqa: BLE001
                res.problems.append(f"animate/{anims[k].name}: not shown ({exc})")
        axes.append(a)
    return axes, viewer, "".join(blobs)


def answer_line(meta: dict | None, groups: list[dict], checks) -> str:
    """The header's one-sentence answer: what was obtained, and the worst problem if any."""
    bits = []
    if meta:
        ncoord = sum(c["kind"] == "coord" for c in meta["columns"])
        bits.append(f"{meta['n']:,} particles placed on a {ncoord}-D landscape")
    if groups:
        res = [g["resolution_fsc0143"] for g in groups if g.get("resolution_fsc0143")]
        bits.append(f"{len(groups)} groups" + (f", maps at {min(res):.3g}–{max(res):.3g} Å" if res else ""))
    head = "; ".join(bits) + "." if bits else "No landscape or groups in these results yet."
    bad = [c for c in checks if c.status == "bad"]
    if bad:
        first = bad[0].text.split(". ")[0].rstrip(".")  # its first sentence
        tail = f" But: {bad[0].topic.lower()} — {first[:1].lower() + first[1:]}" + \
            (f" (and {len(bad) - 1} more problem{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else "") + "."
    else:
        tail = " Every available health check passed." if any(c.status == "ok" for c in checks) else ""
    return head + tail


def map_view(m: dict) -> dict:
    """What the 3D map viewer needs of one map entry."""
    res = f" · {m['resolution_fsc0143']:.3g} Å" if m.get("resolution_fsc0143") else ""
    return {**{k: m[k] for k in ("id", "name", "mean", "std", "level")}, "label": f"group {m['group']}{res}",
            "rgb": list(group_rgb(m["group"]))}


# ------------------------------------------------------------------------------ details
def _stage_details(res: Results, folder: Path, max_rows: int) -> str:
    """One stage's summaries (JSON), tables (CSV) and figures, each collapsed."""
    root = res.root
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "tensorboard" not in p.parts)
    parts = []
    for p in files:
        rel = str(p.relative_to(root))
        size = p.stat().st_size
        if p.suffix == ".json" and not p.name.startswith(SKIP_JSON) and size < MAX_JSON_BYTES:
            if (obj := res.json(rel)) is not None:
                parts.append(render.details_block(rel, render.json_table(obj)))
        elif p.suffix == ".csv" and size < MAX_CSV_BYTES and (df := res.csv(rel)) is not None:
            parts.append(render.details_block(f"{rel} ({len(df):,} rows)", render.frame_table(df, max_rows)))
    figures = "".join(render.img_tag(p.read_bytes(), IMAGE_SUFFIXES[p.suffix.lower()], str(p.relative_to(root)))
                      for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.stat().st_size < MAX_FIGURE_BYTES)
    if figures:
        parts.append(render.details_block("figures", figures))
    return "".join(parts)


def details_html(res: Results, sections: list[tuple[str, str]], max_rows: int) -> str:
    """Collapsed at the bottom: the settings each stage ran with, one block per stage present
    (titled as its command module declares, in pipeline order), other folders, job times,
    the file list and any problem reading the results."""
    root = res.root
    cfg = sorted((root / "config").glob("*.yaml")) if (root / "config").is_dir() else []
    out = [render.details_block(f"Settings each stage ran with ({len(cfg)} files)",
                                "".join(render.details_block(p.name, f"<pre>{render.esc(p.read_text())}</pre>")
                                        for p in cfg))]
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    seen = set(WORKFLOW_FOLDERS)
    for title, folder in sections:
        if (root / folder).is_dir() and folder not in seen:
            seen.add(folder)
            out.append(render.details_block(f"{title} ({folder}/)", _stage_details(res, root / folder, max_rows)))
    for d in dirs:
        if d.name not in seen:
            out.append(render.details_block(f"Other results ({d.name}/)", _stage_details(res, d, max_rows)))
    times = job_times(res)
    if times is not None:
        out.append(render.details_block(f"Job times (benchmarks/, {len(times)} jobs, "
                                        f"{times['wall (s)'].sum():,.0f} s in all)", render.frame_table(times, 500)))
    files = sorted(p for p in root.rglob("*") if p.is_file() and ".snakemake" not in p.parts) if root.is_dir() else []
    listing = "".join(f"<tr><td class='k'>{render.esc(p.relative_to(root))}</td><td>{p.stat().st_size:,}</td></tr>"
                      for p in files[:MAX_LISTED])
    more = f"<p class='muted'>{len(files) - MAX_LISTED:,} more files not listed</p>" if len(files) > MAX_LISTED else ""
    out.append(render.details_block(f"Files ({len(files):,})", f"<table class='t'>{listing}</table>{more}"))
    if res.problems:
        problems = "".join(f"<li>{render.esc(x)}</li>" for x in res.problems)
        out.append(render.details_block(f"Problems reading the results ({len(res.problems)})",
                                        f"<ul>{problems}</ul>", True))
    return "".join(out)


def fill(template: str, slots: dict[str, str]) -> str:
    """The template with each ``<!--slot:NAME-->`` replaced."""
    for k, v in slots.items():
        template = template.replace(f"<!--slot:{k}-->", v)
    return template


def build_report(results, out, sections: list[tuple[str, str]] = (), title: str = "DeepHEMNMA results",
                 max_table_rows: int = 40, max_bytes: int = 48 << 20, max_map_box: int = 80) -> Path:
    """Write the results page of the tree ``results`` to ``out`` (one self-contained HTML file).

    ``sections``: (title, results folder) of each stage, in pipeline order
    (:func:`deephemnma.commands.report.report_sections`), for the collapsed details;
    ``max_bytes`` bounds the particle columns embedded beyond the coordinates (which are
    always all there); ``max_map_box`` the side of the maps shown in 3D (binned).
    """
    res = Results(Path(results))
    meta, land_data = landscape_data(res, max_bytes)
    maps, curves, map_blobs = group_maps(res, max_map_box)
    groups = group_rows(res, maps)
    axes, anims, anim_blobs = axes_data(res)
    checks = all_checks(res, maps, job_failures(res))
    views = {"maps": [map_view(m) for m in maps if "id" in m], "animations": anims}
    cxc = res.path("animate/chimerax.cxc")
    details = details_html(res, list(sections), max_table_rows)  # last: it lists the problems met above
    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    caption = "" if meta is None else f"{meta['n']:,} particles · {render.esc(meta['landscape']['path'])}"
    slots = {
        "title": render.esc(title), "css": asset("static/page.css"),
        "subtitle": render.esc(f"{res.root.resolve()} · deephemnma {__version__} · {now}"),
        "answer": render.esc(answer_line(meta, groups, checks)), "landscape_caption": caption,
        "landscape": render.landscape_html(meta), "health": render.health_html(checks),
        "summary": render.summary_html(groups, axes),
        "groups": render.groups_html(groups, curves),
        "motion": render.motion_html(axes, cxc.read_text() if cxc.is_file() else None),
        "maps3d": render.maps3d_html(views["maps"]), "details": details,
        "footer": render.esc("Self-contained page: nothing is fetched. 3D views: NGL 2.5.0 (MIT), inlined; "
                             "licences in deephemnma/report/vendor/THIRD_PARTY_LICENSES.txt."),
        "data": land_data + render.embed_json("dh-3d-meta", views) + map_blobs + anim_blobs,
        "vendor_js": asset("vendor/ngl.js").replace("</script", "<\\/script") if (views["maps"] or anims) else "",
        "js": "\n".join(asset(f"static/{n}") for n in ("explorer.js", "views3d.js", "page.js")),
    }
    atomic_write_text(out, fill(asset("templates/report.html"), slots))
    log.info("results page written to %s (%d checks, %d maps, %d animations)", out, len(checks), len(maps), len(anims))
    return Path(out)
