"""Configuration: YAML validated against one JSON schema, defaults taken from the schema.

The schema is ``workflow/schemas/config.schema.yaml``; the workflow validates with
``snakemake.utils.validate`` and the CLI with :func:`load_config` — the same file, so
the two can never disagree. Unknown keys and wrong types are errors.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "data" / "config.schema.yaml"


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def _validator_with_defaults():
    import jsonschema

    base = jsonschema.Draft202012Validator

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def _format_error(err, source: str) -> str:
    where = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    msg = err.message
    if err.validator == "additionalProperties":
        msg = msg.replace("Additional properties are not allowed", "unknown key(s)")
    return f"{source}: {where}: {msg}"


def validate_config(config: dict | None, source: str = "config") -> dict:
    """Return a validated deep copy of ``config`` with every default filled in."""
    cfg = copy.deepcopy(config) if config else {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: the configuration must be a mapping, got {type(cfg).__name__}")
    validator = _validator_with_defaults()(load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_format_error(errors[0], source))
    return cfg


def defaults() -> dict:
    return validate_config({}, "defaults")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"nma.cutoff=10"`` → (["nma", "cutoff"], 10); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. nma.cutoff=10")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    cfg = copy.deepcopy(config)
    for text in overrides:
        keys, value = parse_override(text)
        node = cfg
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """Read a YAML config (or none: all defaults), apply ``--set`` overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            with open(path, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a YAML text file (binary content)") from None
    overrides = list(overrides)
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " (with --set)"
    return validate_config(raw, source)


def resolve_for_workflow(config: dict) -> dict:
    """The configuration as the workflow runs it: validated config with the values that depend
    on this machine resolved (``workflow.train_engine: auto``). The workflow and
    ``deephemnma config`` both show and use this."""
    from .runtime import training_engine

    cfg = copy.deepcopy(config)
    wf = cfg["workflow"]
    wf["train_engine"] = training_engine(wf["train_engine"], wf["train_ranks"])
    return cfg
