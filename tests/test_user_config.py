"""A user's configuration alone (with the schema's defaults) defines a workflow run: the demo's
values apply only when no configuration is given, and `deephemnma config` prints what runs."""
from __future__ import annotations

import subprocess
import sys

import yaml

from conftest import REPO, cli_env
from deephemnma.core.config import defaults

USER = """outdir: r
simulate:
  n_particles: 300
  box: 64
  pixel_size: 1.3
preprocess:
  box: 32
  set1_size: 100
  chunk_size: 50
"""


def _stage_config(tmp_path, stage: str, *config_args, outdir: str = "r") -> dict:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--cores", "1", f"{outdir}/config/{stage}.yaml", *config_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load((tmp_path / outdir / "config" / f"{stage}.yaml").read_text())


def test_user_config_trains_for_the_schema_default(tmp_path, run_cli):
    (tmp_path / "user.yaml").write_text(USER)
    train = _stage_config(tmp_path, "train", "--configfile", str(tmp_path / "user.yaml"))
    schema = defaults()
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert demo["network"]["epochs"] != schema["network"]["epochs"]  # the demo sets its own
    assert train["network"]["epochs"] == schema["network"]["epochs"]  # the user's run: the schema's
    groups = _stage_config(tmp_path, "groups", "--configfile", str(tmp_path / "user.yaml"))
    assert groups["landscape"]["groups"] == schema["landscape"]["groups"]
    # `deephemnma config` prints the same values the workflow runs with
    printed = yaml.safe_load(run_cli("config", "--config", tmp_path / "user.yaml", check=True).stdout)
    assert printed["network"] == {**train["network"], "engine": printed["network"]["engine"]}
    assert printed["workflow"]["train_engine"] == train["network"]["engine"] == "single"


def test_the_demo_applies_only_without_any_configuration(tmp_path):
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    train = _stage_config(tmp_path / "demo", "train", outdir=demo["outdir"])  # nothing given: the demo
    assert train["network"]["epochs"] == demo["network"]["epochs"]
    train = _stage_config(tmp_path / "set", "train", "--config", "outdir=r")  # --config alone: not the demo
    assert train["network"]["epochs"] == defaults()["network"]["epochs"]
