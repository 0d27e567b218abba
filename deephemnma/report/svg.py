"""Small inline SVG charts for the page (no library: crisp at any zoom, a few kB each)."""
from __future__ import annotations

import html

import numpy as np


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** np.floor(np.log10(raw))
    step = mag * min((s for s in (1, 2, 5, 10) if s * mag >= raw), default=10)
    start = np.ceil(lo / step) * step
    return [float(t) for t in np.arange(start, hi + step * 1e-9, step)]


def fsc_chart(curves: list[dict], width: int = 460, height: int = 260) -> str:
    """FSC curves ``[{label, rgb, frequency (1/Å), fsc}]`` with the 0.143 and 0.5 lines; the x
    axis is labelled in Å."""
    if not curves:
        return ""
    L, R, T, B = 44, 10, 10, 38
    fmax = max(float(np.nanmax(c["frequency"])) for c in curves) or 1.0
    w, h = width - L - R, height - T - B

    def X(f):
        return L + f / fmax * w

    def Y(v):
        return T + (1.05 - v) / 1.15 * h

    out = [f'<svg class="dh-chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="FSC curves">',
           f'<rect x="{L}" y="{T}" width="{w}" height="{h}" fill="none" stroke="#889"/>']
    for v, dash in ((0.143, "4 3"), (0.5, "2 3")):
        out.append(f'<line x1="{L}" x2="{L + w}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#999" stroke-dasharray="{dash}"/>'
                   f'<text x="{L + w - 2}" y="{Y(v) - 3:.1f}" text-anchor="end" class="dh-ax">{v}</text>')
    for v in (0, 0.5, 1):
        out.append(f'<text x="{L - 4}" y="{Y(v) + 4:.1f}" text-anchor="end" class="dh-ax">{v:g}</text>')
    for f in _ticks(0, fmax, 5)[1:]:
        out.append(f'<line x1="{X(f):.1f}" x2="{X(f):.1f}" y1="{T + h}" y2="{T + h + 4}" stroke="#889"/>'
                   f'<text x="{X(f):.1f}" y="{T + h + 15}" text-anchor="middle" class="dh-ax">{1 / f:.3g}</text>')
    out.append(f'<text x="{L + w / 2}" y="{height - 4}" text-anchor="middle" class="dh-ax">resolution (Å)</text>')
    for c in curves:
        f, v = np.asarray(c["frequency"], float), np.asarray(c["fsc"], float)
        ok = np.isfinite(f) & np.isfinite(v)
        pts = " ".join(f"{X(a):.1f},{Y(max(-0.1, min(1.05, b))):.1f}" for a, b in zip(f[ok], v[ok]))
        rgb = ",".join(map(str, c["rgb"]))
        out.append(f'<polyline fill="none" stroke="rgb({rgb})" stroke-width="1.6" points="{pts}">'
                   f'<title>{html.escape(c["label"])}</title></polyline>')
    out.append("</svg>")
    return "".join(out)


def bars(values: list[tuple[str, float]], width: int = 220, row: int = 16) -> str:
    """Horizontal signed bars ``[(label, value)]`` scaled to the largest |value| (mode loadings)."""
    if not values:
        return ""
    vmax = max(abs(v) for _, v in values) or 1.0
    L, half = 70, (width - 70 - 40) / 2
    height = row * len(values) + 4
    out = [f'<svg class="dh-chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           'xmlns="http://www.w3.org/2000/svg" role="img">',
           f'<line x1="{L + half}" x2="{L + half}" y1="0" y2="{height}" stroke="#bbb"/>']
    for k, (label, v) in enumerate(values):
        y, bw = 2 + k * row, abs(v) / vmax * half
        x = L + half - (bw if v < 0 else 0)
        colour = "#c0504d" if v < 0 else "#4f81bd"
        out.append(f'<text x="{L - 6}" y="{y + row - 5}" text-anchor="end" class="dh-ax">{html.escape(label)}</text>'
                   f'<rect x="{x:.1f}" y="{y + 2}" width="{bw:.1f}" height="{row - 5}" fill="{colour}"/>'
                   f'<text x="{L + 2 * half + 4}" y="{y + row - 5}" class="dh-ax">{v:+.2f}</text>')
    out.append("</svg>")
    return "".join(out)
