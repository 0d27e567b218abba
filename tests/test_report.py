"""The results page builder (no browser): self-contained, leads with the answer and its health,
reads what the stages write now (and older trees), tolerant of missing stages, embeds every
particle exactly. Browser tests: test_page_browser.py."""
from __future__ import annotations

import base64
import gzip
import json
import re

import numpy as np
import pytest

from deephemnma.commands.report import report_sections
from deephemnma.report import build_report
from deephemnma.report.health import maps_check, network_check, polarity_check, refinement_check
from deephemnma.report.readers import group_map
from deephemnma.report.results import Results

from _pagetree import make_results_tree, write_json


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("page") / "results"
    table = make_results_tree(root, n=3000)
    out = build_report(root, root / "report.html", report_sections(), title="test run")
    return root, table, out.read_text()


def embedded(text: str, elem_id: str) -> bytes:
    m = re.search(rf'<script type="application/octet-stream" id="{elem_id}" data-dtype="\w+" data-enc="(\w+)">([^<]*)',
                  text)
    data = base64.b64decode(m.group(2))
    return gzip.decompress(data) if m.group(1) == "gzip" else data


def health(text: str) -> str:
    return text[text.index('id="health"'):text.index('id="groups"')]


def test_self_contained(tree):
    _, _, text = tree
    assert text.startswith("<!DOCTYPE html>") and "<title>test run</title>" in text
    assert "default-src 'none'" in text  # the Content-Security-Policy forbids any fetch
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=\"(https?:)?//", text)
    assert "<link" not in text and 'src="http' not in text


def test_answer_and_health_first(tree):
    _, _, text = tree
    first = text.index('id="landscape"'), text.index('id="health"'), text.index('id="groups"'), text.index('id="details"')
    assert list(first) == sorted(first)  # landscape and health before groups, settings last
    assert "3,000 particles placed on a 2-D landscape; 4 groups, maps at" in text
    assert "But: network (image set 2) — not learned" in text
    h = health(text)
    assert 'class="bad"><span class="topic">Network (image set 2).' in h and "89.5°" in h
    assert "chance ≈ 90°" in h and "predicting the mean: 126°" in h and "validation set (best epoch 12" in h
    assert 'class="na"><span class="topic">Refinement of predictions.</span> Not available' in h
    assert 'class="ok"><span class="topic">Contrast polarity.</span> Detected from the data: the particles were dark' in h
    assert "z = -23.4" in h and "images inverted on reading" in h
    assert 'class="ok"><span class="topic">Group maps.' in h and "correlation with the reference +0.65" in h
    assert "Masks: automatic; 97 % of the reference&#x27;s density inside" in h


def test_details_follow_the_stage_declarations(tree):
    _, _, text = tree
    details = text[text.index('id="details"'):]
    titles = re.findall(r"<summary>(.*?)</summary>", details)
    stage_blocks = [t for t in titles if t.endswith("/)")]
    # in pipeline order, titled as each command module's STAGE declares (stages with nothing to show left out)
    assert stage_blocks == ["Pre-processing (preprocess/)", "Outlier filter (filter/)", "Network training (network/)",
                            "Conformational landscape (landscape/)", "Groups (groups/)",
                            "Reconstructions and FSC (maps/)"], stage_blocks
    assert "landscape/model.json" in titles and "maps/group_01/summary.json" in titles


def test_every_particle_embedded_exactly(tree):
    _, table, text = tree
    meta = json.loads(re.search(r'id="dh-landscape-meta">(.*?)</script>', text).group(1))
    assert meta["n"] == 3000 and meta["landscape"]["path"] == "results/groups/particles.star"
    ids = {a["name"]: a["id"] for a in meta["arrays"]}
    pc1 = np.frombuffer(embedded(text, ids["dhnmaPC1"]), np.float32)
    assert np.array_equal(pc1, table["dhnmaPC1"].to_numpy(np.float32))
    group = np.frombuffer(embedded(text, ids["dhnmaGroup"]), np.uint8)
    assert np.array_equal(group, table["dhnmaGroup"].to_numpy())
    kinds = {c["name"]: c["kind"] for c in meta["columns"]}
    assert kinds["dhnmaPC2"] == "coord" and kinds["dhnmaFlag"] == "category" and kinds["dhnmaScore"] == "numeric"
    number = np.frombuffer(embedded(text, ids["__image_number"]), np.uint32)
    stack = np.frombuffer(embedded(text, ids["__image_stack"]), np.uint16)
    names = [f"{k:0{meta['names']['width']}d}@{meta['names']['stacks'][s]}" for k, s in zip(number, stack)]
    assert names == table["rlnImageName"].tolist()
    assert "deephemnma select --particles results/groups/particles.star --selection selection.json" in text


def test_3d_data_present(tree):
    _, _, text = tree
    views = json.loads(re.search(r'id="dh-3d-meta">(.*?)</script>', text).group(1))
    assert [m["name"] for m in views["maps"]] == [f"group_{g:02d}" for g in range(1, 5)]
    assert [a["frames"] for a in views["animations"]] == [11, 11]  # the back-and-forth loop halved
    mrc = embedded(text, views["maps"][0]["id"])
    assert int.from_bytes(mrc[12:16], "little") == 2 and int.from_bytes(mrc[:4], "little") == 32  # mode 2, 32³
    assert ".NGL={}" in text  # the vendored library is inlined


def test_groups_joined_when_there_is_no_particles_star(tmp_path):
    root = tmp_path / "results"
    table = make_results_tree(root, n=800, maps=False, all_file=False)
    text = build_report(root, tmp_path / "p.html").read_text()
    meta = json.loads(re.search(r'id="dh-landscape-meta">(.*?)</script>', text).group(1))
    assert meta["landscape"]["path"] == "results/landscape/landscape.star" and not meta["landscape"]["file_has_groups"]
    ids = {a["name"]: a["id"] for a in meta["arrays"]}
    group = np.frombuffer(embedded(text, ids["dhnmaGroup"]), np.uint8)
    assert np.array_equal(group, table["dhnmaGroup"].to_numpy())
    assert "each group is already a STAR file" in text and "--groups 1 3" not in text


def test_partial_and_empty_trees(tmp_path, run_cli):
    root = tmp_path / "partial"
    make_results_tree(root, n=500, maps=False)
    for p in ("network/summary.json", "preprocess/preprocess.json", "animate/axis_01.pdb", "animate/axis_02.pdb"):
        (root / p).unlink()
    out = build_report(root, tmp_path / "p.html").read_text()
    assert "Network (image set 2).</span> Not available" in out and "Contrast polarity.</span> Not available" in out
    assert "Not available: no maps" in out and "dh-landscape-meta" in out
    assert ".NGL={}" not in out  # nothing to show in 3D: the library is left out
    (tmp_path / "empty").mkdir()
    text = build_report(tmp_path / "empty", tmp_path / "e.html").read_text()
    assert "No landscape or groups in these results yet." in text and "Not available" in text
    (tmp_path / "broken" / "network").mkdir(parents=True)
    (tmp_path / "broken" / "network" / "summary.json").write_text("{not json")
    res = run_cli("report", "--results", tmp_path / "broken", "--out", tmp_path / "b.html")
    assert res.returncode == 0, res.stderr
    assert "network/summary.json: unreadable" in (tmp_path / "b.html").read_text()
    res = run_cli("report", "--results", tmp_path / "nowhere", "--out", tmp_path / "x.html")
    assert res.returncode == 2 and "nowhere" in res.stderr and not (tmp_path / "x.html").exists()


# ------------------------------------------------------------------------------ what the stages write
def test_polarity_records(tmp_path):
    res = Results(tmp_path)
    pre = tmp_path / "preprocess" / "preprocess.json"
    write_json(pre, {"box_in": 128})  # an older run: no polarity record
    c = polarity_check(res)
    assert c.status == "na" and "no polarity record" in c.text
    for decision, status, words in [
        ("set in the configuration", "info", "Not detected: set in the configuration (data.invert_contrast: true); "
                                             "images inverted on reading"),
        ("already preprocessed (white)", "info", "already preprocessed (white)"),
        ({"polarity": "white", "zscore": 31.2, "threshold": 5, "n_particles": 400, "method": "ctf-blob-ttest",
          "invert": False}, "bad", "contradicts"),  # recorded as inverted though detected white
    ]:
        write_json(pre, {"polarity": {"invert": True, "setting": "auto" if isinstance(decision, dict) else True,
                                      "decision": decision}})
        c = polarity_check(Results(tmp_path))
        assert c.status == status and words in c.text, c.text


def test_map_sign_mask_and_negation(tmp_path):
    d = tmp_path / "maps" / "group_01"
    write_json(d / "summary.json", {
        "resolution_fsc0143": 8.0, "resolution_unmasked_fsc0143": 11.0, "images_negated": False,
        "sign": {"positive": False, "centre_minus_outside": -0.21},
        "mask": {"kind": "sphere (automatic mask rejected)", "radius_A": 30.0,
                 "auto_mask": {"volume_fraction": 0.7, "holds_centre_of_mass": True,
                               "problems": ["it covers 70 % of the box"]}}})
    write_json(tmp_path / "preprocess" / "preprocess.json",
               {"polarity": {"invert": True, "setting": True, "decision": "set in the configuration"}})
    res = Results(tmp_path)
    m = group_map(res, 1, "group_01")
    assert m["sign"] == {"positive": False, "how": "centre minus outside -0.21"} and m["mask"]["rejected"]
    c = maps_check(res, [m])
    assert c.status == "bad" and "Group 1 negative where the molecule is" in c.text
    assert "reconstructed from non-negated original images although preprocessing inverted" in c.text
    assert "automatic mask was rejected (it covers 70 % of the box)" in c.text and "unmasked 11 Å" in c.text
    write_json(d / "summary.json", {"resolution_fsc0143": 8.0, "images_negated": True,
                                    "sign": {"positive": True, "correlation_with_reference": 0.7},
                                    "mask": {"kind": "sphere (automatic mask rejected)", "problems": []}})
    res = Results(tmp_path)
    assert maps_check(res, [group_map(res, 1, "group_01")]).status == "warn"


def test_network_test_block_and_refinement(tmp_path):
    write_json(tmp_path / "network" / "summary.json", {
        "best": {"val_angle_error_deg": 80.0}, "mean_prediction_baseline": {"angle": 90.0},
        "test": {"n": 2000, "errors": {"angle_deg": 2.5, "shift_A": 0.2, "rmsd_A": 0.4},
                 "baseline": {"angle_deg": 91.0, "shift_A": 1.5, "rmsd_A": 2.0}, "chance": {"angle_deg": 90}}})
    c = network_check(Results(tmp_path))
    assert c.status == "ok" and "held-out test set (2,000 particles)" in c.text
    assert "angle 2.5° (predicting the mean: 91°; chance ≈ 90°)" in c.text
    assert "atomic RMSD from the amplitudes 0.4 Å (predicting the mean: 2 Å)" in c.text
    write_json(tmp_path / "network" / "summary.json", {"test": {"n": 50, "errors": {"angle_deg": 60.0},
                                                                 "baseline": {"angle_deg": 91.0}}})
    assert network_check(Results(tmp_path)).status == "warn"  # chance is 90° when not given
    assert refinement_check(Results(tmp_path)).status == "na"
    write_json(tmp_path / "predict" / "summary.json", {"refinement": {"mode": "local", "n": 1000, "fallback": 300}})
    c = refinement_check(Results(tmp_path))
    assert c.status == "warn" and "30.0 % of 1,000 predicted particles" in c.text
    write_json(tmp_path / "predict" / "summary.json", {"refinement": {"mode": "none", "n": 1000}})
    assert refinement_check(Results(tmp_path)).status == "info"
    (tmp_path / "predict" / "summary.json").unlink()  # only the per-shard records
    for k, (n, fb) in enumerate([(600, 30), (400, 70)]):
        write_json(tmp_path / "predict" / f"chunk_{k:04d}.json", {"particles": n, "fallback": fb, "settings": {"refine": "fallback"}})
    c = refinement_check(Results(tmp_path))
    assert c.status == "ok" and "10.0 % of 1,000 predicted particles" in c.text and "(fallback)" in c.text


def test_older_map_summaries_are_checked_by_the_report(tmp_path):
    root = tmp_path / "results"
    make_results_tree(root, n=400)
    for g in range(1, 5):  # as reconstruct wrote them before its sign and mask records
        write_json(root / "maps" / f"group_{g:02d}" / "summary.json",
                   {"n_particles": 100, "resolution_fsc0143": 7.0, "resolution_fsc05": 8.0, "masked": False})
    text = build_report(root, tmp_path / "old.html").read_text()
    h = health(text)
    assert 'class="ok"><span class="topic">Group maps.' in h and "checked by the report on the binned maps" in h
    assert "Masks: none (unmasked FSC)" in h and "checked by the report" in text[text.index('id="groups"'):]


SNAKEMAKE_LOG = """Building DAG of jobs...
[Fri Dec  4 17:57:13 2026]
rule align:
    output: results/align/chunk_0001.star
    jobid: 7
    reason: Missing output files: results/align/chunk_0001.star
    wildcards: chunk=chunk_0001
    resources: tmpdir=/tmp
RuleException:
CalledProcessError in file "/repo/workflow/rules/align.smk", line 5:
[Fri Dec  4 17:57:13 2026]
Error in rule align:
    message: None
    jobid: 7
    output: results/align/chunk_0001.star
Trying to restart job 7.
[Fri Dec  4 17:57:14 2026]
rule align:
    output: results/align/chunk_0001.star
    jobid: 7
    wildcards: chunk=chunk_0001
[Fri Dec  4 17:58:13 2026]
Finished jobid: 7 (Rule: align)
34 of 34 steps (100%) done
"""


def test_failed_and_retried_jobs_from_snakemake_logs(tmp_path):
    from deephemnma.report.health import jobs_check
    from deephemnma.report.results import job_failures

    (tmp_path / "results").mkdir()
    logs = tmp_path / ".snakemake" / "log"
    logs.mkdir(parents=True)
    (logs / "2026-01-01T000000.000000.snakemake.log").write_text(SNAKEMAKE_LOG)
    check = jobs_check(job_failures(Results(tmp_path / "results")))
    assert check.status == "warn" and "align (chunk=chunk_0001)" in check.text and "1 by an automatic retry" in check.text
    unrecovered = SNAKEMAKE_LOG.split("Trying to restart")[0] + "Exiting because a job execution failed.\n"
    (logs / "2026-01-02T000000.000000.snakemake.log").write_text(unrecovered)
    check = jobs_check(job_failures(Results(tmp_path / "results")))
    assert check.status == "bad" and "failed and were not redone: align (chunk=chunk_0001)" in check.text
    assert jobs_check(job_failures(Results(tmp_path / "other" / "out"))).status == "na"  # logs of other results
