"""The whole workflow at scale: one snakemake command per size, measured from its benchmark files.

    python bench/bench_scale.py --n 10000            # run (or continue) N = 10⁴, then collect
    python bench/bench_scale.py --n 10000 100000     # both sizes, one after the other
    python bench/bench_scale.py --collect-only --n 10000 100000
    python bench/bench_scale.py --dry-run-million    # the 10⁶ plan: snakemake -n time and jobs
    python bench/bench_scale.py --n 100000 --until preprocess_index   # only the stages up to a rule

Synthetic adenylate-kinase data (``simulate``: originals 128² at 0.65 Å/px), processed at 64²,
image set 1 of 5,000 particles; every other setting at the schema's default (the effective
settings of each stage, ``results/config/<stage>.yaml``, are copied into the JSON). Each size
runs in its own work directory (``--root``, default /tmp/deephemnma_scale/n<N>) with

    snakemake -s Snakefile --directory <root>/n<N> --configfile <root>/n<N>/config.yaml
              --cores 2 --rerun-incomplete --keep-going

so rerunning this script continues an interrupted run (finished jobs are not redone; HEMNMA
chunks and training resume from their progress files). Every invocation's wall time is kept
in ``<root>/n<N>/invocations.json``.

Per rule, from ``results/benchmarks/**/*.tsv`` (one file per job): jobs, wall (sum and
longest job), CPU time, peak RSS of the largest job, MB read and written; the cost per
unit of the work the rule handles (``UNITS``: all N, image set 1, image set 2, training
images or a fixed cost per job); disk per particle of each results folder; and, when two sizes are present, the
exponent of time and memory from one to the other (t ∝ N^k). Writes
``bench/results/scale.json`` (runs of other sizes already there are kept). A job rerun after a
failure leaves only its last attempt's benchmark (its earlier attempt is not counted).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = RESULTS / "scale.json"

#: the run's configuration; everything else takes the schema's defaults
CONFIG = {
    "outdir": "results",
    "seed": 0,
    "data": {"source": "simulate"},
    "simulate": {"box": 128, "pixel_size": 0.65},
    "preprocess": {"box": 64, "set1_size": 5000},
}

sys.path.insert(0, str(REPO))
from deephemnma.plan import BUILTIN  # noqa: E402

#: what each rule's cost is proportional to (deephemnma/plan.py): N (all particles), set1,
#: set2, train_images (epochs × steps × batch × ranks), or job (a fixed cost)
UNITS = {**{rule: c.unit for rule, c in BUILTIN.items()}, "nma": "job"}
BENCH_COLUMNS = ("s", "max_rss", "io_in", "io_out", "cpu_time")


# ----------------------------------------------------------------------------- running
def workdir(root: Path, n: int) -> Path:
    return root / f"n{n}"


def config_for(n: int) -> dict:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["simulate"]["n_particles"] = int(n)
    return cfg


def snakemake_cmd(wd: Path, cores: int, extra=()) -> list[str]:
    exe = Path(sys.executable).parent / "snakemake"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "snakemake"]
    return [*base, "-s", str(REPO / "Snakefile"), "--directory", str(wd), "--configfile", str(wd / "config.yaml"),
            "--cores", str(cores), "--rerun-incomplete", "--keep-going", *extra]


def run_size(root: Path, n: int, cores: int, until: list[str] | None = None) -> dict:
    """Run (or continue) the workflow at size ``n`` (only up to the rules ``until``, Snakemake's
    ``--until``, when given); the invocation's record."""
    wd = workdir(root, n)
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "config.yaml").write_text(yaml.safe_dump(config_for(n), sort_keys=False))
    cmd = snakemake_cmd(wd, cores, ["--until", *until] if until else ())
    log = wd / "snakemake.log"
    print(f"[bench_scale] N={n}: {' '.join(cmd)}  (log: {log})", flush=True)
    t0, start = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(log, "a") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(wd))
    rec = {"start": start, "wall_s": round(time.perf_counter() - t0, 1), "returncode": rc,
           "loadavg_1min_at_start": os.getloadavg()[0], "until": list(until or [])}
    inv = wd / "invocations.json"
    hist = json.loads(inv.read_text()) if inv.exists() else []
    hist.append(rec)
    inv.write_text(json.dumps(hist, indent=1))
    print(f"[bench_scale] N={n}: snakemake returned {rc} after {rec['wall_s']} s", flush=True)
    return rec


# ----------------------------------------------------------------------------- collecting
def read_benchmarks(results: Path) -> dict[str, list[dict]]:
    """Rule → one row per job (the last line of each benchmark file)."""
    out: dict[str, list[dict]] = {}
    d = results / "benchmarks"
    for f in sorted(d.rglob("*.tsv")) if d.is_dir() else []:
        rel = f.relative_to(d)
        rule = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if rule == "reconstruct" or rule.startswith("group_"):
            rule = "reconstruct"
        elif rule == "preprocess":
            rule = "preprocess_chunk"
        with open(f) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if not rows:
            continue
        row = rows[-1]

        def num(k):
            try:
                v = float(row.get(k, "nan"))
            except ValueError:
                return 0.0
            return v if math.isfinite(v) else 0.0

        out.setdefault(rule, []).append({"job": str(rel.with_suffix("")), **{k: num(k) for k in BENCH_COLUMNS}})
    return out


def du(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sizes_of(n: int) -> dict:
    from deephemnma import preprocess as pp
    from deephemnma.core.config import validate_config
    from deephemnma.plan import train_images

    cfg = validate_config(config_for(n))
    s = pp.PreprocessSettings.from_config(cfg)
    n1, n2 = pp.split_sizes(n, s)
    c1, c2 = pp.chunk_sizes(n, s)
    return {"N": n, "set1": n1, "set2": n2, "train_images": train_images(cfg, n1), "job": 1,
            "chunk_size_set1": c1, "chunk_size_set2": c2}


def collect_size(root: Path, n: int) -> dict | None:
    wd = workdir(root, n)
    res = wd / "results"
    if not res.exists():
        return None
    sizes = sizes_of(n)
    bench = read_benchmarks(res)
    rules = {}
    for rule, jobs in bench.items():
        unit = UNITS.get(rule, "N")
        k = sizes[unit]
        per_unit = unit not in ("job",)
        wall = sum(j["s"] for j in jobs)
        cpu = sum(j["cpu_time"] for j in jobs)
        rules[rule] = {
            "jobs": len(jobs), "unit": unit, "units": k if per_unit else None,
            "wall_s": round(wall, 2), "wall_s_longest_job": round(max(j["s"] for j in jobs), 2),
            "cpu_s": round(cpu, 2), "max_rss_mb": round(max(j["max_rss"] for j in jobs), 1),
            "io_in_mb": round(sum(j["io_in"] for j in jobs), 1), "io_out_mb": round(sum(j["io_out"] for j in jobs), 1),
            "wall_s_per_unit": wall / k if per_unit else None,
            "cpu_s_per_unit": cpu / k if per_unit else None,
        }
    stages = {}
    for name in sorted(p.name for p in res.iterdir() if p.is_dir() and p.name not in ("benchmarks", "logs", "config")):
        b = du(res / name)
        stages[name] = {"bytes": b, "bytes_per_particle": round(b / n, 1)}
    inv = wd / "invocations.json"
    invocations = json.loads(inv.read_text()) if inv.exists() else []
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in sorted((res / "config").glob("*.yaml"))}
    complete = (res / "report.html").exists()
    # a run stopped on purpose at some rules (--until): say which, so it is not read as a failure
    until = invocations[-1].get("until", []) if invocations else []
    manifest = res / "preprocess" / "preprocess.json"
    dtype = json.loads(manifest.read_text())["settings"].get("dtype", "float32") if manifest.exists() else None
    return {
        "N": n, "sizes": sizes, "complete": complete, "until": [] if complete else until,
        "workdir": str(wd), "preprocess_dtype": dtype,
        "invocations": invocations, "wall_s_invocations": round(sum(i["wall_s"] for i in invocations), 1),
        "jobs": sum(r["jobs"] for r in rules.values()), "rules": dict(sorted(rules.items())),
        "disk": stages, "stage_settings": configs,
    }


def exponents(a: dict, b: dict) -> dict:
    """Per rule: k in t ∝ N^k (total wall and CPU time) and in peak RSS ∝ N^k, from size a to
    size b; and the ratio of the per-particle cost (b / a) over the rule's own particles."""
    out = {}
    r = math.log(b["N"] / a["N"])
    for rule in sorted(set(a["rules"]) & set(b["rules"])):
        x, y = a["rules"][rule], b["rules"][rule]

        def k(u, v):
            return round(math.log(v / u) / r, 3) if u > 0 and v > 0 else None

        e = {"time": k(x["wall_s"], y["wall_s"]), "cpu": k(x["cpu_s"], y["cpu_s"]),
             "memory": k(x["max_rss_mb"], y["max_rss_mb"]),
             "memory_ratio": round(y["max_rss_mb"] / x["max_rss_mb"], 3) if x["max_rss_mb"] else None}
        if x["wall_s_per_unit"] and y["wall_s_per_unit"]:
            e["per_unit_time_ratio"] = round(y["wall_s_per_unit"] / x["wall_s_per_unit"], 3)
            e["per_unit_cpu_ratio"] = round(y["cpu_s_per_unit"] / x["cpu_s_per_unit"], 3) if x["cpu_s_per_unit"] else None
        out[rule] = e
    return out


def collect(root: Path, sizes: list[int]) -> dict:
    doc = json.loads(OUT.read_text()) if OUT.exists() else {}
    figures = doc.get("figures", {})
    runs = figures.get("runs", {})
    for n in sizes:
        got = collect_size(root, n)
        if got is not None:
            runs[str(n)] = got
    figures["runs"] = dict(sorted(runs.items(), key=lambda kv: int(kv[0])))
    figures["config"] = CONFIG
    figures["units"] = UNITS
    ns = sorted(int(k) for k in runs)
    if len(ns) >= 2:
        figures["exponents"] = {f"{a}->{b}": exponents(runs[str(a)], runs[str(b)]) for a, b in zip(ns, ns[1:])}
    return figures


# ----------------------------------------------------------------------------- the 10⁶ plan
def write_million_star(d: Path, n: int = 1_000_000, m: int = 100, box: int = 128, px: float = 0.65) -> Path:
    """A STAR of ``n`` rows over a stack of ``m`` noise images (repeated), with CTF columns
    and an optics table: enough for planning (snakemake -n), not for running."""
    import numpy as np
    import pandas as pd

    from deephemnma.core.mrc import write_stack
    from deephemnma.core.star import write_star

    d.mkdir(parents=True, exist_ok=True)
    star = d / "particles.star"
    if star.exists():
        return star
    rng = np.random.default_rng(0)
    write_stack(d / "stack.mrcs", rng.standard_normal((m, box, box)).astype(np.float32), px)
    idx = np.arange(n) % m + 1
    p = pd.DataFrame({"rlnImageName": [f"{i:06d}@stack.mrcs" for i in idx], "rlnOpticsGroup": 1,
                      "rlnDefocusU": rng.uniform(4000, 6000, n).round(2), "rlnDefocusV": rng.uniform(4000, 6000, n).round(2),
                      "rlnDefocusAngle": rng.uniform(0, 180, n).round(2), "rlnPhaseShift": 0.0})
    o = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnImagePixelSize": [px],
                      "rlnImageSize": [box], "rlnImageDimensionality": [2], "rlnVoltage": [200.0],
                      "rlnSphericalAberration": [2.0], "rlnAmplitudeContrast": [0.1]})
    write_star(star, p, o)
    return star


def dry_run_million(root: Path, n: int = 1_000_000) -> dict:
    d = root / "million"
    star = write_million_star(d, n)
    cfg = {"outdir": "results", "data": {"source": "star", "particles": str(star)}, "preprocess": {"box": 64}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = snakemake_cmd(d, 2, ["-n", "--quiet", "rules"])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(d))
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    counts = {}
    text = p.stdout + p.stderr
    on = False
    for line in text.splitlines():
        f = line.split()
        if f[:2] == ["job", "count"]:
            on = True
            continue
        if on and len(f) == 2 and f[1].isdigit():
            counts[f[0]] = int(f[1])
        elif on and counts and not f:
            break
    t0 = time.perf_counter()
    from deephemnma.core.star import count_particles

    assert count_particles(star) == n
    t_count = time.perf_counter() - t0
    return {"particles": n, "config": cfg, "snakemake_n_s": round(wall, 2), "count_particles_s": round(t_count, 2),
            "jobs": counts, "star_mb": round(star.stat().st_size / 1e6, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[10_000], help="particle counts (default 10000)")
    ap.add_argument("--root", type=Path, default=Path("/tmp/deephemnma_scale"), help="work directories' parent")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--collect-only", action="store_true", help="do not run snakemake; collect what is there")
    ap.add_argument("--until", nargs="+", metavar="RULE",
                    help="run only the rules these depend on (snakemake --until), e.g. preprocess_index: "
                         "the stages whose cost grows with N, without the set-2 prediction's hours")
    ap.add_argument("--dry-run-million", action="store_true", help="time snakemake -n on a 10⁶-row STAR")
    a = ap.parse_args(argv)
    if a.dry_run_million:
        doc = json.loads(OUT.read_text()) if OUT.exists() else {"figures": {}}
        figures = doc.get("figures", {})
        figures["dry_run_1e6"] = dry_run_million(a.root)
        from common import write_result

        write_result("scale", figures, doc.get("notes", ""))
        return 0
    if not a.collect_only:
        for n in a.n:
            run_size(a.root, n, a.cores, a.until)
    figures = collect(a.root, a.n)
    from common import write_result

    doc = json.loads(OUT.read_text()) if OUT.exists() else {}
    if "dry_run_1e6" in doc.get("figures", {}):
        figures.setdefault("dry_run_1e6", doc["figures"]["dry_run_1e6"])
    write_result("scale", figures, "Per-rule figures from Snakemake's benchmark files; see bench/README.md (scale).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
