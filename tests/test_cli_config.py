"""CLI framework and configuration: defaults from the schema, unknown keys and wrong types rejected."""
from __future__ import annotations

import yaml
import pytest

from deephemnma.core.config import load_config, validate_config, defaults
from deephemnma.core.errors import ConfigError


def test_defaults_filled_from_schema():
    cfg = defaults()
    assert cfg["outdir"] == "results"
    assert cfg["data"]["source"] == "simulate"
    assert cfg["reference"]["atoms"] == "heavy"


def test_unknown_key_is_error():
    with pytest.raises(ConfigError, match="unknown key"):
        validate_config({"data": {"sorce": "star"}}, "x.yaml")


def test_wrong_type_is_error():
    with pytest.raises(ConfigError, match="seed"):
        validate_config({"seed": "zero"}, "x.yaml")


def test_given_values_kept_and_defaults_added(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"seed": 7, "data": {"source": "star", "particles": "p.star"}}))
    cfg = load_config(p, ["reference.atoms=ca"])
    assert cfg["seed"] == 7 and cfg["data"]["particles"] == "p.star"
    assert cfg["data"]["data_dir"] is None
    assert cfg["reference"]["atoms"] == "ca"


@pytest.mark.parametrize("name", ["config.yaml", "test.yaml", "vae.yaml"])
def test_shipped_configs_are_valid(name):
    from conftest import REPO

    cfg = load_config(REPO / "config" / name)
    if name == "vae.yaml":  # the demo with the VAE, into its own results folder
        assert cfg["network"]["model"] == "vae" and cfg["outdir"] != "results"


def test_snakemake_validate_agrees(tmp_path):
    snakemake_utils = pytest.importorskip("snakemake.utils")
    from deephemnma.core.config import SCHEMA_PATH

    cfg = {"seed": 1}
    snakemake_utils.validate(cfg, str(SCHEMA_PATH), set_default=True)
    assert cfg["data"]["source"] == "simulate"
    with pytest.raises(Exception):
        snakemake_utils.validate({"bogus": 1}, str(SCHEMA_PATH))


def test_cli_bad_config_one_line_error(run_cli, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("seed: [1\n")
    proc = run_cli("config", "--config", p)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(p) in lines[0], proc.stderr


def test_cli_help_lists_commands_with_examples(run_cli):
    proc = run_cli("--help", check=True)
    assert "config" in proc.stdout
    proc = run_cli("config", "--help", check=True)
    assert "example" in proc.stdout


def test_atomic_outputs_get_umask_permissions(tmp_path):
    import os
    import stat

    from deephemnma.core.fileio import atomic_path, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask
    # an error inside the block leaves nothing behind
    try:
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_fail_once_hook(run_cli, tmp_path, monkeypatch):
    marker = tmp_path / "failed-once"
    monkeypatch.setenv("DEEPHEMNMA_FAIL_ONCE", f"--schema::{marker}")
    first = run_cli("config", "--schema")
    assert first.returncode == 3 and "injected failure" in first.stderr and marker.exists()
    assert run_cli("config", "--schema").returncode == 0  # only once
    assert run_cli("config").returncode == 0  # other commands never
