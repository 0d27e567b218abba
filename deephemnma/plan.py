"""What a run costs before it runs: jobs, CPU- and GPU-hours, disk, memory and wall time per
rule, and the resources (``mem_mb``, ``runtime``) each workflow job asks for.

One cost table (:data:`BUILTIN`, or :func:`load_costs` from ``bench/results/scale.json``)
holds, per rule, the measured cost of one particle (or one job, for rules whose cost does
not depend on N), at the processing box and original box it was measured at, and how it
scales with the box. Everything else follows from formulas written once here:

==================  ====================================================================
quantity            formula (n_job: particles of one job; n: particles the rule handles)
==================  ====================================================================
jobs                the chunk plan (:func:`deephemnma.preprocess.plan_chunks`): one per
                    chunk of set 1 (align), of set 2 (predict), of both (preprocess); one
                    per group (reconstruct, ``groups``); else 1
CPU seconds         cpu_s · n · (B / B_ref)^e        (B: the box the rule's work scales
                    with — the processing box, or the original box for simulate,
                    preprocess and reconstruct; e: the rule's box exponent)
GPU hours           with GPUs, for rules that run on them (train, predict): CPU seconds /
                    ``gpu_speedup`` (a stated assumption until a GPU run measures it)
disk                bytes per particle · N · (B / B_ref)² (the rule's outputs)
peak memory (MB)    base + table_kb · rows / 1024 + image_mb · (B / B_ref)^mem_e, where
                    rows = the rows the job holds (its chunk, or the whole table for the
                    rules that read every particle: preprocess, merges, landscape …)
job runtime (min)   ceil(margin · CPU seconds of the job / threads / 60), at least 10
wall time           per rule, ceil(jobs / slots) · the longest job (slots: nodes × cores
                    per node for CPU rules, nodes × GPUs per node for GPU rules), summed
                    over the rules in pipeline order (an upper bound: set 2's
                    preprocessing in fact overlaps HEMNMA)
==================  ====================================================================

:func:`job_resources` gives the workflow's per-job ``mem_mb`` and ``runtime`` from the same
formulas (``margin`` × the estimate; a retried job asks for ``attempt`` × the memory).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from .core.errors import ConfigError

#: rules in pipeline order (the order of the printed plan)
ORDER = ("nma", "simulate", "preprocess_chunk", "preprocess_index", "align", "merge_align", "filter", "train", "predict",
         "merge_predict", "landscape", "groups", "reconstruct", "animate", "evaluate_hemnma", "evaluate_predicted",
         "report")
#: rules that run on a GPU when the cluster has them (workflow.gpus_per_node > 0)
GPU_RULES = ("train", "predict")
#: safety factor of job resources over the estimate
MARGIN = 1.5
MIN_RUNTIME_MIN = 10
MIN_MEM_MB = 1000


@dataclass(frozen=True)
class Cost:
    """The measured cost of one rule.

    ``unit``: what the cost is proportional to — "N" (all particles), "set1", "set2",
    "train_images" (images seen by training: epochs × steps × batch × ranks) or "job" (a
    fixed cost per job). ``cpu_s``: CPU seconds per particle of the unit (per job
    for "job"), measured at processing box ``box_ref`` and original box ``box_in_ref``;
    ``scales_with``: "box" (processing) or "box_in" (original), with exponent ``box_exp``.
    Memory: ``base_mb`` + ``table_kb`` per row held (``rows``: "job" or "all") +
    ``image_mb`` · (B/B_ref)^``mem_exp``. ``disk_bytes``: output bytes per particle of the
    unit (at the reference box, scaling with B²). ``source``: where the figures come from."""

    unit: str
    cpu_s: float
    base_mb: float
    table_kb: float = 0.0
    rows: str = "job"
    image_mb: float = 0.0
    mem_exp: float = 2.0
    scales_with: str = "box"
    box_exp: float = 2.0
    disk_bytes: float = 0.0
    threads: int = 1
    box_ref: int = 64
    box_in_ref: int = 128
    source: str = ""


_DEMO = "built-in: the demo (1,200 particles, 128² → 64²) on the shared 2-core VM, 2026-12-04"
#: memory constants set from the peak RSS bench/bench_scale.py measured (the workflow's jobs ask
#: for 1.5 × these; tests/test_plan.py checks that they cover every measured peak by ≥ 1.2 ×)
_MEM = "; memory: bench_scale peaks at N = 10⁴ and 10⁵ (2026-12-05)"
#: built-in figures (used when bench/results/scale.json is absent); per-rule sources
BUILTIN: dict[str, Cost] = {
    "nma": Cost("job", 4.6, 570, source=_DEMO + " (AK, heavy atoms)"),
    "simulate": Cost("N", 0.0166, 2200, 1.0, "all", 0, scales_with="box_in", box_exp=2.0, disk_bytes=2 * 65536 + 600,
                     threads=2, source=_DEMO + _MEM),
    "preprocess_chunk": Cost("N", 0.0126, 950, 1.0, "all", 60, scales_with="box_in", box_exp=2.2, disk_bytes=16384 + 800,
                             source=_DEMO + _MEM),
    "preprocess_index": Cost("N", 0.002, 600, 2.0, "all", source="estimate: reads and writes the whole table" + _MEM),
    "align": Cost("set1", 0.33, 1400, 2.0, "job", 300, box_exp=0.3, disk_bytes=900, source=_DEMO + _MEM),
    "merge_align": Cost("set1", 0.001, 400, 2.0, "all", source="estimate: concatenates the chunk tables"),
    "filter": Cost("set1", 0.001, 400, 2.0, "all", source="estimate: one table"),
    "train": Cost("train_images", 0.0061, 2200, 0.0, "job", 0, box_exp=2.0, disk_bytes=0, threads=2, source=_DEMO),
    "predict": Cost("set2", 0.148, 1450, 2.0, "job", 300, box_exp=1.0, disk_bytes=900, source=_DEMO + _MEM),
    "merge_predict": Cost("set2", 0.001, 400, 2.0, "all", source="estimate: concatenates the shard tables"),
    "landscape": Cost("N", 0.0017, 170, 1.0, "all", source=_DEMO + " (bench_landscape: 1.06 GB at 10⁶)"),
    "groups": Cost("N", 0.002, 400, 1.5, "all", disk_bytes=1500, source="estimate (bench_landscape)"),
    "reconstruct": Cost("N", 0.004, 800, 5.0, "job", 350, mem_exp=3.0, scales_with="box_in", box_exp=2.0,
                        source=_DEMO + " (bench_reconstruct: 158 particles/s at 128²); memory flat in the group "
                        "size (bench_reconstruct --group-sizes: 1.18 → 1.26 GB from 2,000 to 20,000 at 128², ~5 KB per row)"),
    "animate": Cost("job", 10.0, 600, source="estimate"),
    "evaluate_hemnma": Cost("set1", 0.002, 1050, 2.0, "all", source="estimate" + _MEM),
    "evaluate_predicted": Cost("N", 0.002, 900, 2.0, "all", source="estimate" + _MEM),
    "report": Cost("N", 0.005, 600, 2.0, "all", source="estimate (bench_page: 10⁶ particles in a 33 MB page)"),
}


@dataclass
class Cluster:
    nodes: int = 1
    cores_per_node: int = 2
    gpus_per_node: int = 0
    gpu_speedup: float = 50.0  # GPU seconds = CPU seconds / this (assumed; not measured)

    def __post_init__(self):
        for k in ("nodes", "cores_per_node"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"--{k.replace('_', '-')} must be ≥ 1, got {getattr(self, k)}")
        if int(self.gpus_per_node) < 0:
            raise ConfigError(f"--gpus-per-node must be ≥ 0, got {self.gpus_per_node}")
        if not self.gpu_speedup > 0:
            raise ConfigError(f"--gpu-speedup must be > 0, got {self.gpu_speedup}")


@dataclass
class Run:
    """The data of a run: N particles, processing box, original box, image set 1, chunks."""

    n: int
    box: int
    box_in: int | None = None
    set1: int = 20000
    chunk_size: int = 1000
    set2_chunk_size: int | None = None
    set2_max_chunks: int = 200
    groups: int = 10
    train_images: int | None = None  # images the training sees (None: the schema defaults' run)

    def __post_init__(self):
        if self.train_images is None:
            from .core.config import defaults

            self.train_images = train_images(defaults(), int(self.set1))
        if int(self.n) < 1:
            raise ConfigError(f"--particles must be ≥ 1, got {self.n}")
        if int(self.box) < 8 or int(self.box) % 2:
            raise ConfigError(f"--box must be even and ≥ 8, got {self.box}")
        if self.box_in is None:
            self.box_in = 2 * int(self.box)
        if int(self.box_in) < int(self.box) or int(self.box_in) % 2:
            raise ConfigError(f"--original-box must be even and ≥ --box ({self.box}), got {self.box_in}")
        if int(self.set1) < 0:
            raise ConfigError(f"--set1 must be ≥ 0, got {self.set1}")
        if int(self.chunk_size) < 1:
            raise ConfigError(f"--chunk-size must be ≥ 1, got {self.chunk_size}")
        if int(self.groups) < 1:
            raise ConfigError(f"--groups must be ≥ 1, got {self.groups}")
        self.set1 = min(int(self.set1), int(self.n))

    @property
    def set2(self) -> int:
        return int(self.n) - self.set1

    def chunk_sizes(self) -> tuple[int, int]:
        from .preprocess import PreprocessSettings, chunk_sizes

        s = PreprocessSettings(box=self.box, set1_size=self.set1, chunk_size=self.chunk_size,
                               set2_chunk_size=self.set2_chunk_size, set2_max_chunks=self.set2_max_chunks)
        return chunk_sizes(self.n, s)

    def units(self) -> dict[str, int]:
        return {"N": int(self.n), "set1": self.set1, "set2": self.set2, "train_images": int(self.train_images), "job": 1}


# ----------------------------------------------------------------------------- the cost table
#: rules whose peak memory a dedicated bench measures (bench/results/<name>.json, figures
#: ``{"box": original box, "sizes": {particles of one job: {"peak_rss_mb": …}}}``); when that
#: bench is newer than the bench_scale run, its figure supersedes the run's (a fix landed
#: after the run: reconstruct read its images through memory maps until 2026-12-06)
DEDICATED_MEMORY = {"reconstruct": "reconstruct_groups"}


def dedicated_memory(rule: str, after: str = "", results: str | Path | None = None) -> dict | None:
    """The largest job of ``rule``'s dedicated memory bench, if there is one dated after
    ``after`` (an ISO date-time): ``{"particles", "box", "peak_rss_mb", "date", "name"}``."""
    name = DEDICATED_MEMORY.get(rule)
    if name is None:
        return None
    path = Path(results or Path(__file__).resolve().parents[1] / "bench" / "results") / f"{name}.json"
    try:
        doc = json.loads(path.read_text())
        fig = doc["figures"]
        n = max(int(k) for k in fig["sizes"])
        rec = {"particles": n, "box": int(fig["box"]), "peak_rss_mb": float(fig["sizes"][str(n)]["peak_rss_mb"]),
               "date": str(doc["date"]), "name": name}
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError):
        return None
    return rec if rec["date"] > after else None


def superseded_memory(doc: dict, results: str | Path | None = None) -> dict[str, dict]:
    """``{rule: dedicated figure}`` for the rules whose peak in a bench_scale result ``doc``
    a newer dedicated bench (in the folder ``results``, default the repository's
    bench/results) supersedes."""
    out = {}
    for rule in DEDICATED_MEMORY:
        rec = dedicated_memory(rule, str(doc.get("date", "")), results)
        if rec is not None:
            out[rule] = rec
    return out


def dedicated_run(rec: dict, groups: int = 10) -> "Run":
    """A :class:`Run` one of whose jobs is the dedicated bench's: ``rec["particles"]`` particles
    at original box ``rec["box"]`` (:func:`dedicated_memory`)."""
    box = int(rec["box"])
    return Run(n=int(rec["particles"]) * groups, box=box // 2 + box // 2 % 2, box_in=box, set1=0, groups=groups)


def load_costs(path: str | Path | None = None) -> tuple[dict[str, Cost], str]:
    """The cost table: :data:`BUILTIN`, with each rule measured in ``path`` (a
    bench/results/scale.json; default: the repository's, when present) replaced by its
    CPU time per particle and peak memory at the largest complete size there (the memory
    formula's constant is moved so that it gives the measured peak there; its growth with
    rows and box is kept). Returns the table and a line saying where it came from."""
    if path is None:
        path = Path(__file__).resolve().parents[1] / "bench" / "results" / "scale.json"
    path = Path(path)
    if not path.is_file():
        return dict(BUILTIN), "built-in figures (bench/results/scale.json not found)"
    try:
        doc = json.loads(path.read_text())
        runs = doc["figures"]["runs"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a bench_scale result ({exc})") from None
    done = sorted((int(k) for k, r in runs.items() if r.get("complete")), reverse=True)
    if not done:
        return dict(BUILTIN), f"built-in figures ({path} has no complete run)"
    n = done[0]
    run = runs[str(n)]
    date = doc.get("date", "")[:10]
    measured_run = _measured_run(doc, run)
    out = dict(BUILTIN)
    superseded = superseded_memory(doc, path.parent)
    for rule, r in run["rules"].items():
        if rule not in out or r.get("cpu_s") is None:
            continue
        c = out[rule]
        k = run["sizes"].get(c.unit) if c.unit != "job" else r["jobs"]
        if not k:
            continue
        src = f"bench_scale N={n:,} ({date}, {r['jobs']} job{'s' if r['jobs'] != 1 else ''})"
        c = replace(c, cpu_s=r["cpu_s"] / k, source=src)
        # memory: keep the formula's growth with rows and box, move its constant so that it gives
        # the measured peak at the measured size (a newer dedicated bench's, else the run's)
        peak, at = (r.get("max_rss_mb"), measured_run)
        if rule in superseded:
            d = superseded[rule]
            peak, at = d["peak_rss_mb"], dedicated_run(d)
            c = replace(c, source=src + f"; memory: {d['name']} ({d['date'][:10]}, {d['particles']:,} particles)")
        if peak and at is not None:
            growth = memory_mb(rule, at, {rule: replace(c, base_mb=0.0)})
            c = replace(c, base_mb=max(0.0, float(peak) - growth))
        out[rule] = c
    return out, f"bench/results/scale.json, N = {n:,} ({date}); unmeasured rules: built-in"


def _measured_run(doc: dict, run: dict) -> "Run | None":
    """The :class:`Run` a bench_scale record was measured on (its sizes and boxes)."""
    try:
        sz = run["sizes"]
        cfg = doc.get("figures", {}).get("config", {})
        box = int(cfg.get("preprocess", {}).get("box") or 64)
        box_in = int(cfg.get("simulate", {}).get("box") or 2 * box)
        return Run(n=int(sz["N"]), box=box, box_in=box_in, set1=int(sz["set1"]),
                   chunk_size=int(sz.get("chunk_size_set1") or 1000),
                   set2_chunk_size=int(sz["chunk_size_set2"]) if sz.get("chunk_size_set2") else None,
                   train_images=int(sz.get("train_images") or 0) or None)
    except (KeyError, TypeError, ValueError, ConfigError):
        return None


# ----------------------------------------------------------------------------- formulas
def _box_factor(c: Cost, run: Run, exp: float) -> float:
    b, ref = (run.box, c.box_ref) if c.scales_with == "box" else (run.box_in, c.box_in_ref)
    return (b / ref) ** exp


def jobs_of(rule: str, run: Run) -> tuple[int, int]:
    """(number of jobs, particles of the largest job) of ``rule`` in ``run``."""
    c1, c2 = run.chunk_sizes()
    n1, n2 = run.set1, run.set2
    if rule == "preprocess_chunk":
        j1, j2 = -(-n1 // c1), -(-n2 // c2)
        return j1 + j2, max(min(c1, n1), min(c2, n2))
    if rule == "align":
        return -(-n1 // c1), min(c1, n1)
    if rule == "predict":
        return -(-n2 // c2), min(c2, n2)
    if rule == "reconstruct":
        return run.groups, -(-int(run.n) // run.groups)
    unit = BUILTIN[rule].unit if rule in BUILTIN else "N"
    return 1, run.units().get(unit, int(run.n)) if unit not in ("job", "train_images") else 0


def memory_mb(rule: str, run: Run, costs: dict[str, Cost] | None = None) -> float:
    """Estimated peak memory (MB) of one job of ``rule``."""
    c = (costs or BUILTIN)[rule]
    _, n_job = jobs_of(rule, run)
    rows = int(run.n) if c.rows == "all" else n_job
    return c.base_mb + c.table_kb * rows / 1024 + c.image_mb * _box_factor(c, run, c.mem_exp)


def cpu_seconds(rule: str, run: Run, costs: dict[str, Cost] | None = None) -> tuple[float, float]:
    """(CPU seconds of the whole rule, of its largest job)."""
    c = (costs or BUILTIN)[rule]
    jobs, n_job = jobs_of(rule, run)
    f = _box_factor(c, run, c.box_exp)
    if c.unit == "job":
        return c.cpu_s * f * jobs, c.cpu_s * f
    total = c.cpu_s * run.units()[c.unit] * f
    return total, (c.cpu_s * n_job * f if rule in ("preprocess_chunk", "align", "predict", "reconstruct") else total)


def plan(run: Run, cluster: Cluster, costs: dict[str, Cost] | None = None, simulate: bool = False) -> list[dict]:
    """One row per rule: jobs, CPU-hours, GPU-hours, disk (GB), peak memory of one job (MB),
    wall hours on ``cluster``, the source of its figures."""
    costs = costs or BUILTIN
    gpus = int(cluster.nodes) * int(cluster.gpus_per_node)
    cpu_slots = int(cluster.nodes) * int(cluster.cores_per_node)
    rows = []
    for rule in ORDER:
        if rule == "simulate" and not simulate:
            continue
        c = costs[rule]
        jobs, n_job = jobs_of(rule, run)
        total_s, job_s = cpu_seconds(rule, run, costs)
        on_gpu = gpus > 0 and rule in GPU_RULES
        threads = max(1, c.threads)
        if on_gpu:
            gpu_h, cpu_h = total_s / cluster.gpu_speedup / 3600, 0.0
            job_wall = job_s / cluster.gpu_speedup
            slots = gpus
        else:
            gpu_h, cpu_h = 0.0, total_s / 3600
            job_wall = job_s / threads
            slots = max(1, cpu_slots // threads)
        wall_h = math.ceil(jobs / slots) * job_wall / 3600
        unit = run.units()[c.unit] if c.unit not in ("job", "train_images") else 0
        disk = c.disk_bytes * unit * (run.box / c.box_ref) ** 2 / 1e9
        rows.append({"rule": rule, "jobs": jobs, "particles_per_job": n_job, "cpu_h": cpu_h, "gpu_h": gpu_h,
                     "disk_gb": disk, "peak_mem_mb": memory_mb(rule, run, costs), "wall_h": wall_h,
                     "on": "GPU" if on_gpu else "CPU", "source": c.source})
    return rows


def totals(rows: list[dict]) -> dict:
    return {"jobs": sum(r["jobs"] for r in rows), "cpu_h": sum(r["cpu_h"] for r in rows),
            "gpu_h": sum(r["gpu_h"] for r in rows), "disk_gb": sum(r["disk_gb"] for r in rows),
            "peak_mem_mb": max(r["peak_mem_mb"] for r in rows), "wall_h": sum(r["wall_h"] for r in rows)}


def format_plan(run: Run, cluster: Cluster, rows: list[dict], source: str) -> str:
    t = totals(rows)
    c1, c2 = run.chunk_sizes()
    head = (f"{run.n:,} particles, box {run.box}² (originals {run.box_in}²), image set 1 {run.set1:,} in chunks of "
            f"{c1:,}, set 2 {run.set2:,} in shards of {c2:,}; cluster {cluster.nodes} node(s) × "
            f"{cluster.cores_per_node} cores, {cluster.gpus_per_node} GPU(s)/node"
            + (f" (GPU time = CPU time / {cluster.gpu_speedup:g}, assumed)" if cluster.gpus_per_node else ""))
    sources = list(dict.fromkeys(r["source"] for r in rows))
    lines = [head, f"costs: {source}", "",
             f"{'rule':<19}{'jobs':>5}{'per job':>11}{'CPU-h':>9}{'GPU-h':>8}{'disk GB':>9}{'peak MB':>9}"
             f"{'wall h':>8}  on  src"]
    for r in rows:
        per = f"{r['particles_per_job']:,}" if r["particles_per_job"] else "-"
        lines.append(f"{r['rule']:<19}{r['jobs']:>5}{per:>11}{r['cpu_h']:>9.2f}{r['gpu_h']:>8.2f}"
                     f"{r['disk_gb']:>9.2f}{r['peak_mem_mb']:>9.0f}{r['wall_h']:>8.2f}  {r['on']:<3} "
                     f"[{sources.index(r['source']) + 1}]")
    lines.append(f"{'total':<19}{t['jobs']:>5}{'':>11}{t['cpu_h']:>9.2f}{t['gpu_h']:>8.2f}{t['disk_gb']:>9.2f}"
                 f"{t['peak_mem_mb']:>9.0f}{t['wall_h']:>8.2f}")
    lines.append("(per job: particles of the largest job; peak MB: its memory, total: the largest of all; "
                 "wall: the rules one after the other)")
    lines += [f"[{i + 1}] {s}" for i, s in enumerate(sources)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- workflow resources
def job_resources(rule: str, run: Run, *, threads: int = 1, attempt: int = 1,
                  costs: dict[str, Cost] | None = None) -> dict:
    """``mem_mb`` and ``runtime`` (minutes) of one job of ``rule`` for the workflow: the
    estimates above × :data:`MARGIN`, both × ``attempt`` on retries, rounded up (memory to
    100 MB, at least :data:`MIN_MEM_MB`; runtime at least :data:`MIN_RUNTIME_MIN`)."""
    costs = costs or BUILTIN
    mem = max(MIN_MEM_MB, MARGIN * memory_mb(rule, run, costs)) * max(1, int(attempt))
    _, job_s = cpu_seconds(rule, run, costs)
    runtime = max(MIN_RUNTIME_MIN, math.ceil(MARGIN * job_s / max(1, int(threads)) / 60)) * max(1, int(attempt))
    return {"mem_mb": int(math.ceil(mem / 100.0) * 100), "runtime": int(runtime)}


def run_from_config(config: dict, n_particles: int, box_in: int | None = None) -> Run:
    """The :class:`Run` of a validated workflow configuration with ``n_particles``."""
    from .preprocess import PreprocessSettings, split_sizes

    s = PreprocessSettings.from_config(config)
    n1, _ = split_sizes(n_particles, s)
    if box_in is None and config.get("data", {}).get("source") == "simulate":
        box_in = int(config["simulate"]["box"])
    box = int(s.box) if s.box is not None else int(box_in or 128)
    groups = config.get("landscape", {}).get("groups", {}).get("n_bins") or 10
    return Run(n=max(1, int(n_particles)), box=box, box_in=max(box, int(box_in or 2 * box)), set1=n1,
               chunk_size=s.chunk_size, set2_chunk_size=s.set2_chunk_size, set2_max_chunks=s.set2_max_chunks,
               groups=int(groups), train_images=train_images(config, n1))


def train_images(config: dict, n_set1: int) -> int:
    """Images the training job processes: epochs × steps per epoch × batch × ranks (the
    recipe's values where the configuration leaves them null; an epoch of the fast and
    paper recipes is one pass over image set 1)."""
    from .core.config import defaults
    from .network.train import RECIPES

    net = {**defaults()["network"], **{k: v for k, v in config.get("network", {}).items() if v is not None}}
    recipe = RECIPES.get(net.get("recipe") or "grid", RECIPES["grid"])
    epochs = int(net.get("epochs") or recipe["epochs"])
    batch = int(net.get("batch_size") or recipe["batch_size"])
    ranks = int(config.get("workflow", {}).get("train_ranks") or 1)
    if (net.get("recipe") or "grid") == "grid":
        per_epoch = int(net["steps_per_epoch"]) * batch * ranks * int(net.get("accumulate") or 1)
    else:
        per_epoch = max(1, int(n_set1))
    return epochs * per_epoch


def star_box(path: str | Path) -> int | None:
    """The image box of a STAR file's first optics group (``rlnImageSize``), read from the
    top of the file only; None when it is not there (RELION 3.0 files)."""
    cols, in_optics, in_loop = [], False, False
    try:
        with open(path, "r", errors="replace") as fh:
            for k, line in enumerate(fh):
                s = line.strip()
                if k > 2000 or s.startswith("data_particles"):
                    return None
                if s.startswith("data_optics"):
                    in_optics = True
                    continue
                if not in_optics or not s or s.startswith("#"):
                    continue
                if s == "loop_":
                    in_loop = True
                    continue
                if s.startswith("_"):
                    cols.append(s.split()[0][1:])
                    continue
                if in_loop and "rlnImageSize" in cols:
                    return int(float(s.split()[cols.index("rlnImageSize")]))
    except (OSError, ValueError, IndexError):
        return None
    return None
