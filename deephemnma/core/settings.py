"""Stage settings built from the configuration, with the schema as the only source of defaults.

A stage's settings are a dataclass decorated with :func:`schema_settings`: each field takes its
default from the schema (``workflow/schemas/config.schema.yaml``) at the key of the same name
in the stage's section (or the path given in ``keys``), so no default is written twice.
Fields that are not configuration keys (derived or internal values) must carry their own
default in the class body. Every settings class is built the same way, from the whole
validated configuration::

    settings = AlignSettings.from_config(config)

A section key ``seed`` that is null takes the top-level seed; a field ``seed`` with no key in
the section is the top-level seed.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

from .config import defaults, validate_config
from .errors import ConfigError

_MISSING = object()
#: every settings class, by its section (tests compare their defaults with the schema's)
REGISTRY: dict[str, type] = {}


def lookup(doc: dict, path: str, default=_MISSING):
    """``doc["a"]["b"]`` for ``path`` "a.b"; ``default`` (or KeyError) when absent."""
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise KeyError(path)
            return default
        node = node[part]
    return node


def schema_settings(section: str, keys: dict[str, str] | None = None):
    """Class decorator: a dataclass of the settings of ``section`` ("align", "landscape.groups")
    whose defaults are the schema's. ``keys`` maps a field to its path inside the section when
    the names differ (e.g. ``{"ctf_bfactor": "ctf.bfactor"}``)."""
    keys = dict(keys or {})

    def wrap(cls):
        section_defaults = lookup(defaults(), section)
        own = cls.__dict__.get("__annotations__", {})
        paths = {}
        for name in own:
            if name.startswith("_") or name.isupper():
                continue
            path = keys.get(name, name)
            value = lookup(section_defaults, path, _MISSING)
            if value is _MISSING:
                if name not in cls.__dict__:
                    raise TypeError(f"{cls.__name__}.{name}: not a key of {section} in the schema; give it a default")
                continue
            paths[name] = path
            if name == "seed" and value is None:  # null: the top-level seed, whose default this is
                value = defaults()["seed"]
            if isinstance(value, (list, dict)):
                setattr(cls, name, dataclasses.field(default_factory=lambda v=value: copy.deepcopy(v)))
            else:
                setattr(cls, name, value)
        cls = dataclasses.dataclass(cls)
        cls.SECTION = section
        cls.KEYS = paths
        cls.from_config = classmethod(_from_config)
        if not hasattr(cls, "as_dict"):
            cls.as_dict = _as_dict
        REGISTRY[section] = cls
        return cls

    return wrap


def _from_config(cls, config: dict | None = None, **overrides):
    """Settings from a whole configuration (validated here, so a partial one takes the
    schema's defaults); ``overrides`` replace fields afterwards."""
    config = validate_config(config or {}, "config")  # fills what a partial configuration leaves out
    section = lookup(config, cls.SECTION)
    values = {name: copy.deepcopy(lookup(section, path)) for name, path in cls.KEYS.items()}
    if "seed" in {f.name for f in dataclasses.fields(cls)} and values.get("seed", None) is None:
        values["seed"] = int(config.get("seed", 0))
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{cls.SECTION}: unknown setting(s) {sorted(unknown)}")
    values.update(overrides)
    out = cls(**values)
    if hasattr(out, "validate"):
        out.validate()
    return out


def _as_dict(self) -> dict:
    return dataclasses.asdict(self)
