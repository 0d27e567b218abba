"""deephemnma plan (deephemnma/plan.py): the cost of a run from per-particle costs, scaling as
the formulas say; resources of the workflow's jobs; one-line errors for bad input."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from deephemnma import plan as P
from deephemnma.core.errors import ConfigError


def rows_by_rule(run, cluster=None, costs=None):
    return {r["rule"]: r for r in P.plan(run, cluster or P.Cluster(), costs or P.BUILTIN)}


def test_costs_scale_linearly_with_the_particles_they_follow():
    a = rows_by_rule(P.Run(n=100_000, box=64, box_in=128, set1=5000))
    b = rows_by_rule(P.Run(n=1_000_000, box=64, box_in=128, set1=5000))
    # set 2 and everything over N grow 10× (set 2: 95,000 → 995,000), set 1 and training do not
    assert b["predict"]["cpu_h"] / a["predict"]["cpu_h"] == pytest.approx(995_000 / 95_000)
    assert b["preprocess_chunk"]["cpu_h"] / a["preprocess_chunk"]["cpu_h"] == pytest.approx(10)
    assert b["landscape"]["cpu_h"] / a["landscape"]["cpu_h"] == pytest.approx(10)
    assert b["align"]["cpu_h"] == pytest.approx(a["align"]["cpu_h"])
    assert b["train"]["cpu_h"] == pytest.approx(a["train"]["cpu_h"])
    # the formula itself: cpu_s per particle × particles
    c = P.BUILTIN["predict"]
    assert b["predict"]["cpu_h"] == pytest.approx(c.cpu_s * 995_000 / 3600)
    # disk of the preprocessed stacks: bytes per particle × N
    assert b["preprocess_chunk"]["disk_gb"] == pytest.approx(P.BUILTIN["preprocess_chunk"].disk_bytes * 1e6 / 1e9)


def test_costs_scale_with_the_box_as_stated():
    a = rows_by_rule(P.Run(n=10_000, box=64, box_in=128, set1=5000))
    b = rows_by_rule(P.Run(n=10_000, box=128, box_in=256, set1=5000))
    for rule in ("align", "predict", "preprocess_chunk", "reconstruct"):
        c = P.BUILTIN[rule]
        assert b[rule]["cpu_h"] / a[rule]["cpu_h"] == pytest.approx(2 ** c.box_exp), rule
    # stored images: 4× the bytes at twice the box
    assert b["preprocess_chunk"]["disk_gb"] / a["preprocess_chunk"]["disk_gb"] == pytest.approx(4)


def test_jobs_follow_the_chunk_plan_and_stay_in_the_hundreds_at_a_million():
    run = P.Run(n=1_000_000, box=128, set1=20_000)
    rows = rows_by_rule(run)
    assert rows["align"]["jobs"] == 20 and rows["predict"]["jobs"] == 196
    assert rows["preprocess_chunk"]["jobs"] == 216 and rows["reconstruct"]["jobs"] == 10
    assert 100 <= P.totals(list(rows.values()))["jobs"] <= 999
    assert run.chunk_sizes() == (1000, 5000)
    # an explicit set-2 chunk size wins
    assert P.Run(n=1_000_000, box=128, set1=20_000, set2_chunk_size=10_000).chunk_sizes() == (1000, 10_000)


def test_wall_time_divides_by_the_cluster():
    run = P.Run(n=1_000_000, box=128, set1=20_000)
    one = rows_by_rule(run, P.Cluster(nodes=1, cores_per_node=1))
    many = rows_by_rule(run, P.Cluster(nodes=10, cores_per_node=20))  # 200 slots ≥ 196 shards
    assert many["predict"]["wall_h"] == pytest.approx(one["predict"]["wall_h"] / 196)
    assert many["predict"]["cpu_h"] == pytest.approx(one["predict"]["cpu_h"])  # same work
    # with GPUs, train and predict move to them: GPU-h = CPU-h / speedup, no CPU-h left
    gpu = rows_by_rule(run, P.Cluster(nodes=2, cores_per_node=32, gpus_per_node=4, gpu_speedup=40))
    assert gpu["predict"]["cpu_h"] == 0 and gpu["predict"]["gpu_h"] == pytest.approx(one["predict"]["cpu_h"] / 40)
    assert gpu["predict"]["wall_h"] == pytest.approx(math.ceil(196 / 8) * one["predict"]["wall_h"] / 196 / 40)
    assert gpu["align"]["gpu_h"] == 0


def test_memory_of_whole_table_rules_grows_with_n_and_of_chunk_rules_does_not():
    small, big = P.Run(n=10_000, box=64, set1=5000), P.Run(n=1_000_000, box=64, set1=5000)
    for rule in ("align",):
        assert P.memory_mb(rule, big) == pytest.approx(P.memory_mb(rule, small))
    c = P.BUILTIN["merge_predict"]
    grow = P.memory_mb("merge_predict", big) - P.memory_mb("merge_predict", small)
    assert grow == pytest.approx(c.table_kb * (big.n - small.n) / 1024)


def test_job_resources_margin_attempt_and_floors():
    run = P.Run(n=1_000_000, box=128, set1=20_000)
    r1 = P.job_resources("predict", run)
    r2 = P.job_resources("predict", run, attempt=2)
    assert r1["mem_mb"] % 100 == 0 and r1["mem_mb"] >= P.MARGIN * P.memory_mb("predict", run)
    assert r2["mem_mb"] >= 2 * r1["mem_mb"] - 100 and r2["runtime"] == 2 * r1["runtime"]
    _, job_s = P.cpu_seconds("predict", run)
    assert r1["runtime"] == max(P.MIN_RUNTIME_MIN, math.ceil(P.MARGIN * job_s / 60))
    tiny = P.job_resources("filter", P.Run(n=100, box=32, set1=50))
    assert tiny == {"mem_mb": P.MIN_MEM_MB, "runtime": P.MIN_RUNTIME_MIN}


def test_cost_table_from_a_scale_result(tmp_path):
    doc = {"date": "2026-12-04T20:00:00", "figures": {"runs": {"10000": {
        "complete": True, "sizes": {"N": 10000, "set1": 5000, "set2": 5000, "train_images": 64000, "job": 1},
        "rules": {"predict": {"jobs": 5, "cpu_s": 1000.0}, "train": {"jobs": 1, "cpu_s": 640.0},
                  "nma": {"jobs": 1, "cpu_s": 3.0}}}}}}
    f = tmp_path / "scale.json"
    f.write_text(json.dumps(doc))
    costs, source = P.load_costs(f)
    assert "N = 10,000" in source
    assert costs["predict"].cpu_s == pytest.approx(0.2) and "bench_scale" in costs["predict"].source
    assert costs["train"].cpu_s == pytest.approx(0.01)
    assert costs["nma"].cpu_s == pytest.approx(3.0)
    assert costs["align"] == P.BUILTIN["align"]  # not measured there: built-in
    costs, source = P.load_costs(tmp_path / "absent.json")
    assert costs == P.BUILTIN and "built-in" in source


def test_measured_peaks_move_the_memory_formula_and_keep_its_growth(tmp_path):
    sizes = {"N": 10000, "set1": 5000, "set2": 5000, "train_images": 64000, "job": 1,
             "chunk_size_set1": 1000, "chunk_size_set2": 1000}
    doc = {"date": "2026-12-04T20:00:00", "figures": {
        "config": {"simulate": {"box": 128}, "preprocess": {"box": 64}},
        "runs": {"10000": {"complete": True, "sizes": sizes, "rules": {
            "simulate": {"jobs": 1, "cpu_s": 100.0, "max_rss_mb": 2300.0},
            "landscape": {"jobs": 1, "cpu_s": 10.0, "max_rss_mb": 90.0}}}}}}
    f = tmp_path / "scale.json"
    f.write_text(json.dumps(doc))
    costs, _ = P.load_costs(f)
    at = P.Run(n=10000, box=64, box_in=128, set1=5000, set2_chunk_size=1000)
    assert P.memory_mb("simulate", at, costs) == pytest.approx(2300.0)
    assert P.memory_mb("landscape", at, costs) == pytest.approx(90.0)
    # the growth with the rows held is the formula's, not the measurement's
    big = P.Run(n=1_000_000, box=64, box_in=128, set1=5000)
    grow = P.memory_mb("landscape", big, P.BUILTIN) - P.memory_mb("landscape", at, P.BUILTIN)
    assert grow > 0
    assert P.memory_mb("landscape", big, costs) - P.memory_mb("landscape", at, costs) == pytest.approx(grow)


def test_workflow_jobs_ask_for_more_than_the_measured_peaks():
    """Every rule measured by bench/bench_scale.py (bench/results/scale.json, at every size
    there, partial runs included): the memory a workflow job asks for (the built-in table,
    what SLURM gets) is at least 1.2 × the peak RSS measured for that rule at that size."""
    from pathlib import Path

    from deephemnma.core.config import validate_config

    path = Path(__file__).resolve().parents[1] / "bench" / "results" / "scale.json"
    if not path.is_file():
        pytest.skip("bench/results/scale.json not in this checkout")
    doc = json.loads(path.read_text())
    checked = []
    superseded = P.superseded_memory(doc, path.parent)  # a newer dedicated bench measures these rules' memory
    for n, rec in doc["figures"]["runs"].items():
        cfg = json.loads(json.dumps(doc["figures"]["config"]))
        cfg.setdefault("simulate", {})["n_particles"] = int(n)
        run = P.run_from_config(validate_config(cfg), int(n))
        for rule, r in rec["rules"].items():
            if rule in P.BUILTIN and r.get("max_rss_mb") and rule not in superseded:
                asked = P.job_resources(rule, run)["mem_mb"]
                assert asked >= 1.2 * r["max_rss_mb"], (n, rule, asked, r["max_rss_mb"])
                checked.append(rule)
        for rule, d in superseded.items():  # a job of the dedicated bench's size, at its box
            asked = P.job_resources(rule, P.dedicated_run(d, run.groups))["mem_mb"]
            assert asked >= 1.2 * d["peak_rss_mb"], (n, rule, asked, d)
            checked.append(rule)
    assert {"simulate", "preprocess_chunk", "align", "train", "predict"} <= set(checked)


def test_a_newer_dedicated_memory_bench_supersedes_the_scale_run(tmp_path):
    """A rule's dedicated memory bench dated after the bench_scale run replaces that run's
    peak in the cost table (the formula's constant gives the dedicated peak at its size); an
    older one, or none, leaves the run's peak in force."""
    import shutil
    from pathlib import Path

    rule, name = next(iter(P.DEDICATED_MEMORY.items()))
    fig = {"box": 128, "sizes": {"2000": {"peak_rss_mb": 1000.0}, "20000": {"peak_rss_mb": 1234.0}}}
    (tmp_path / f"{name}.json").write_text(json.dumps({"date": "2026-12-06T05:00:00+00:00", "figures": fig}))
    assert P.dedicated_memory(rule, "2026-12-06T04:00:00+00:00", tmp_path)["peak_rss_mb"] == 1234.0
    assert P.dedicated_memory(rule, "2026-12-07T00:00:00+00:00", tmp_path) is None
    assert P.dedicated_memory("align", "", tmp_path) is None
    c = P.BUILTIN[rule]
    run = P.Run(n=20000 * 8, box=64, box_in=128, set1=5000, groups=8)
    assert P.jobs_of(rule, run)[1] == P.jobs_of(rule, P.dedicated_run({"particles": 20000, "box": 128}))[1] == 20000
    base = 1234.0 - P.memory_mb(rule, run, {rule: P.replace(c, base_mb=0.0)})
    assert P.memory_mb(rule, run, {rule: P.replace(c, base_mb=base)}) == pytest.approx(1234.0)
    scale = Path(__file__).resolve().parents[1] / "bench" / "results" / "scale.json"
    if not scale.is_file():
        return
    doc = json.loads(scale.read_text())
    n = max(int(k) for k, r in doc["figures"]["runs"].items() if r.get("complete"))
    measured = doc["figures"]["runs"][str(n)]["rules"][rule]["max_rss_mb"]
    # the cost table built from scale.json + a newer dedicated bench of 1,234 MB at 20,000 rows
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    shutil.copy(scale, results / "scale.json")
    (results / f"{name}.json").write_text(json.dumps({"date": "2099-01-01T00:00:00+00:00", "figures": fig}))
    costs, _ = P.load_costs(results / "scale.json")
    assert costs[rule].base_mb == pytest.approx(base)
    assert name in costs[rule].source
    assert costs[rule].base_mb < measured  # not the run's (older) peak
    (results / f"{name}.json").unlink()  # without it, the run's peak is in force again
    costs, _ = P.load_costs(results / "scale.json")
    assert P.memory_mb(rule, P._measured_run(doc, doc["figures"]["runs"][str(n)]), costs) == pytest.approx(measured)


@pytest.mark.parametrize("kw", [dict(n=0, box=64), dict(n=10, box=63), dict(n=10, box=4),
                                dict(n=10, box=64, box_in=32), dict(n=10, box=64, set1=-1)])
def test_bad_runs_are_config_errors(kw):
    with pytest.raises(ConfigError):
        P.Run(**kw)


@pytest.mark.parametrize("kw", [dict(nodes=0), dict(cores_per_node=0), dict(gpus_per_node=-1), dict(gpu_speedup=0)])
def test_bad_clusters_are_config_errors(kw):
    with pytest.raises(ConfigError):
        P.Cluster(**kw)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "deephemnma", "plan", *args], capture_output=True, text=True,
                          timeout=120)


def test_command_prints_the_plan_and_one_line_errors(tmp_path):
    p = cli("--particles", "1000000", "--box", "128", "--costs", str(tmp_path / "none.json"))
    assert p.returncode == 0, p.stderr
    assert "1,000,000 particles" in p.stdout and "predict" in p.stdout and "total" in p.stdout
    p = cli("--particles", "100000", "--box", "64", "--nodes", "2", "--gpus-per-node", "4", "--json",
            "--costs", str(tmp_path / "none.json"))
    doc = json.loads(p.stdout)
    assert doc["total"]["gpu_h"] > 0 and doc["run"]["set1"] == 20000
    for bad in (["--particles", "-5", "--box", "64"], ["--particles", "10", "--box", "65"],
                ["--particles", "10", "--box", "64", "--nodes", "0"]):
        p = cli(*bad)
        assert p.returncode == 2, (bad, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr


def test_star_box_reads_the_optics_table(tmp_path):
    f = tmp_path / "p.star"
    f.write_text("\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnImageSize #2\n_rlnImagePixelSize #3\n1 256 1.0\n\n"
                 "data_particles\n\nloop_\n_rlnImageName #1\n1@a.mrcs\n")
    assert P.star_box(f) == 256
    g = tmp_path / "old.star"
    g.write_text("data_\nloop_\n_rlnImageName #1\n1@a.mrcs\n")
    assert P.star_box(g) is None


def test_command_costs_the_configured_training():
    """The training row follows the run's own network settings (epochs × steps × batch), not a
    fixed default: a tenth of the epochs, a tenth of the training CPU-hours."""
    def train_h(*extra):
        p = cli("--particles", "1000", "--box", "64", "--json", *extra)
        assert p.returncode == 0, p.stderr
        return next(r["cpu_h"] for r in json.loads(p.stdout)["rules"] if r["rule"] == "train")

    full, short = train_h(), train_h("--set", "network.epochs=10")
    assert full > 0 and short == pytest.approx(full / 10)
