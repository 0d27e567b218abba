"""The report stage: ``report.html``, one self-contained results page that answers "did it
work, and what did I get" before anything else.

Layout, top to bottom: a one-sentence answer; the interactive landscape (every particle,
coloured by group, image set, score, flag or any column; hover, box and lasso selection;
"save selection" writes the JSON that ``deephemnma select`` turns into a RELION STAR file,
:mod:`deephemnma.core.selection`) beside what was obtained (groups with their map
resolution, the motion along each axis) and the health panel (:mod:`.health`: what can be
trusted, in words); the groups with their FSC curves; the motion along each axis (mode
composition, RMSD, a playable 3D animation); each group map as an isosurface with a level
slider; and, collapsed at the bottom, the settings, one block per stage (its summaries,
tables and figures), job times and the file list.

Modules: :mod:`.results` (reading a results tree, tolerant of absent files; Snakemake logs),
:mod:`.readers` (what each stage's files say: the one place to adjust when a stage's output
changes), :mod:`.health` (the verdicts), :mod:`.particles` (the explorer's packed table),
:mod:`.views3d` (maps and animations for the 3D views), :mod:`.render` and :mod:`.svg`
(HTML pieces), :mod:`.build` (assembly). Package data: ``templates/report.html``,
``static/`` (the page's CSS and JavaScript) and ``vendor/`` (NGL, with its licences;
``scripts/vendor_js.py`` refetches and verifies it).

Self-contained: CSS, JavaScript and data (base64, gzip where it helps) are inlined; a
Content-Security-Policy forbids any fetch, so the page works from file:// offline.

Entry point: :func:`build_report` (``deephemnma report``).
"""
from .build import build_report

__all__ = ["build_report"]
