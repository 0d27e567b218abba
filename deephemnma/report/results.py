"""Reading a results tree for the page, tolerant of whatever is missing or unreadable.

:class:`Results` answers "what does file X say" with ``None`` when the file is absent and
records a problem (shown on the page) when it is present but unreadable, so the page is
built from any subset of stages. :func:`landscape_table` picks the particle table of the
explorer; :func:`job_failures` finds failed and retried jobs in the Snakemake logs
(``<workdir>/.snakemake/log/*.snakemake.log``). What each stage's summary says is read in
:mod:`.readers`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.star import GROUP, IMAGE_NAME, read_star


@dataclass
class Results:
    """A results directory; every reader returns None for an absent file."""

    root: Path
    problems: list[str] = field(default_factory=list)
    _json: dict = field(default_factory=dict)

    def path(self, rel: str) -> Path:
        """Absolute path of ``rel`` (relative to the results directory)."""
        return self.root / rel

    def has(self, rel: str) -> bool:
        """Whether file ``rel`` exists."""
        return self.path(rel).is_file()

    def json(self, rel: str):
        """Parsed JSON file ``rel`` (cached), None when absent or unreadable."""
        if rel not in self._json:
            p, obj = self.path(rel), None
            if p.is_file():
                try:
                    obj = json.loads(p.read_text())
                except (OSError, ValueError) as exc:
                    self.problems.append(f"{rel}: unreadable ({exc})")
            self._json[rel] = obj
        return self._json[rel]

    def csv(self, rel: str) -> pd.DataFrame | None:
        """CSV file ``rel`` as a DataFrame, None when absent or unreadable."""
        p = self.path(rel)
        if not p.is_file():
            return None
        try:
            return pd.read_csv(p)
        except (OSError, ValueError) as exc:
            self.problems.append(f"{rel}: unreadable ({exc})")
            return None

    def star(self, rel: str) -> pd.DataFrame | None:
        """Particle table of a STAR file (no optics), None when absent or unreadable."""
        p = self.path(rel)
        if not p.is_file():
            return None
        try:
            return read_star(p).particles
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not sink the page
            self.problems.append(f"{rel}: unreadable ({exc})")
            return None

    def group_dirs(self) -> list[tuple[int, Path]]:
        """``(group, maps/group_NN)`` for every map directory, in group order."""
        d = self.path("maps")
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            m = re.fullmatch(r"group_(\d+)", p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def axis_files(self) -> list[tuple[int, Path]]:
        """``(axis, animate/axis_NN.pdb)`` for every animation, in axis order."""
        d = self.path("animate")
        if not d.is_dir():
            return []
        found = ((re.fullmatch(r"axis_(\d+)\.pdb", p.name), p) for p in d.iterdir())
        return sorted((int(m.group(1)), p) for m, p in found if m)


def group_labels(res: Results, particles: pd.DataFrame) -> np.ndarray | None:
    """Each particle's group from groups/group_NN.star (matched by rlnImageName; 0 = none),
    for a landscape table without dhnmaGroup; None when there are no groups."""
    doc = res.json("groups/groups.json")
    if not doc or IMAGE_NAME not in particles.columns:
        return None
    owner: dict[str, int] = {}
    for g, info in doc.get("groups", {}).items():
        t = res.star(f"groups/{info.get('file', '')}")
        if t is not None and IMAGE_NAME in t.columns:
            owner.update(dict.fromkeys(t[IMAGE_NAME].astype(str).tolist(), int(g)))
    if not owner:
        return None
    return particles[IMAGE_NAME].astype(str).map(owner).fillna(0).astype(np.int64).to_numpy()


def landscape_table(res: Results) -> tuple[pd.DataFrame | None, str | None, bool]:
    """The particle table of the explorer and its path relative to the results directory:
    groups/particles.star (has dhnmaGroup) if present, else landscape/landscape.star with the
    groups of groups/group_NN.star joined. The flag says whether the file itself has dhnmaGroup."""
    t = res.star("groups/particles.star")
    if t is not None:
        return t, "groups/particles.star", GROUP in t.columns
    t = res.star("landscape/landscape.star")
    if t is None:
        return None, None, False
    native = GROUP in t.columns
    if not native and (labels := group_labels(res, t)) is not None:
        t = t.assign(**{GROUP: labels})
    return t, "landscape/landscape.star", native


_SNAKE_RULE = re.compile(r"^(?:local)?rule (\S+):")
_SNAKE_ERR = re.compile(r"^Error in rule (\S+):")
_SNAKE_JOBID = re.compile(r"^\s+jobid: (\d+)")
_SNAKE_WILD = re.compile(r"^\s+wildcards: (.*)")


def _snakemake_log_failures(text: str) -> list[dict]:
    """Failed jobs in one Snakemake log: rule, wildcards, whether Snakemake restarted the job
    (``--retries``) and whether it finished after that."""
    lines = text.splitlines()
    wildcards: dict[str, str] = {}
    fails = []
    for k, line in enumerate(lines):
        rule, err = _SNAKE_RULE.match(line), _SNAKE_ERR.match(line)
        if not (rule or err):
            continue
        jobid, wild = None, ""
        for nxt in lines[k + 1:k + 12]:
            if (j := _SNAKE_JOBID.match(nxt)):
                jobid = j.group(1)
            if (w := _SNAKE_WILD.match(nxt)):
                wild = w.group(1)
        if rule and jobid is not None:
            wildcards[jobid] = wild
        elif err:
            rest = "\n".join(lines[k + 1:])
            fails.append({"rule": err.group(1), "jobid": jobid, "wildcards": wildcards.get(jobid, wild),
                          "retried": f"Trying to restart job {jobid}." in rest,
                          "succeeded_later": f"Finished jobid: {jobid} " in rest or f"Finished job {jobid}." in rest})
    return fails


def job_failures(res: Results, max_logs: int = 20) -> dict | None:
    """Failed and retried jobs found in Snakemake's logs (the working directory's .snakemake/log,
    looked for beside and above the results directory). None when no log is found."""
    logs: list[Path] = []
    for base in (res.root, *list(res.root.resolve().parents)[:2]):
        d = base / ".snakemake" / "log"
        if d.is_dir():
            logs = sorted(d.glob("*.snakemake.log"), key=lambda p: p.stat().st_mtime)[-max_logs:]
            break
    if not logs:
        return None
    runs = []
    for p in logs:
        try:
            text = p.read_text(errors="replace")
        except OSError:
            continue
        if f"{res.root.name}/" not in text:  # another workflow's run in the same working directory
            continue
        runs.append({"log": p.name, "failures": _snakemake_log_failures(text), "finished": "(100%) done" in text})
    return {"runs": runs, "failures": [f | {"log": r["log"]} for r in runs for f in r["failures"]]}


def job_times(res: Results) -> pd.DataFrame | None:
    """One row per job from Snakemake's benchmark files (``benchmarks/**/*.tsv``): wall time,
    peak memory and CPU time; None when there are none."""
    d = res.path("benchmarks")
    if not d.is_dir():
        return None
    rows = []
    for p in sorted(d.rglob("*.tsv")):
        try:
            t = pd.read_csv(p, sep="\t")
        except (OSError, ValueError):
            continue
        if len(t) and "s" in t.columns:
            r = t.iloc[-1]
            num = {k: float(pd.to_numeric(r.get(k, np.nan), errors="coerce")) for k in ("s", "max_rss", "cpu_time")}
            rows.append({"job": str(p.relative_to(d).with_suffix("")), "wall (s)": num["s"],
                         "max RSS (MB)": num["max_rss"], "CPU (s)": num["cpu_time"]})
    return pd.DataFrame(rows) if rows else None
