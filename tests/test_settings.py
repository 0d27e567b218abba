"""Stage settings come from the schema alone: every default equals the schema's, every key of a
stage's section is a setting, and settings are built the same way from a whole configuration."""
from __future__ import annotations

import dataclasses
import importlib

import pytest

from deephemnma.core.config import defaults
from deephemnma.core.settings import REGISTRY, lookup

STAGE_MODULES = ["deephemnma.align", "deephemnma.preprocess", "deephemnma.simulate", "deephemnma.reconstruct",
                 "deephemnma.network.train", "deephemnma.landscape", "deephemnma.groups", "deephemnma.filter"]
for _m in STAGE_MODULES:
    importlib.import_module(_m)


def _leaves(doc: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            out |= _leaves(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


@pytest.mark.parametrize("section", sorted(REGISTRY))
def test_defaults_equal_the_schema(section):
    cls = REGISTRY[section]
    schema = lookup(defaults(), section)
    for f in dataclasses.fields(cls):
        if f.name not in cls.KEYS:
            continue
        expected = lookup(schema, cls.KEYS[f.name])
        if f.name == "seed" and expected is None:
            expected = defaults()["seed"]
        got = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert got == expected, f"{section}.{cls.KEYS[f.name]}: code default {got!r} != schema {expected!r}"


@pytest.mark.parametrize("section", sorted(REGISTRY))
def test_every_key_of_the_section_is_a_setting(section):
    cls = REGISTRY[section]
    schema = lookup(defaults(), section)
    claimed = set(cls.KEYS.values())
    ignored = tuple(getattr(cls, "NOT_SETTINGS", ()))  # sub-sections that other stages own
    missing = {k for k in _leaves(schema) if k not in claimed and not any(k.startswith(c + ".") for c in claimed)
               and not any(k == i or k.startswith(i + ".") for i in ignored)}
    assert not missing, f"{section}: schema keys without a setting: {sorted(missing)}"


def test_from_whole_config_and_top_level_seed():
    from deephemnma.align import AlignSettings
    from deephemnma.preprocess import PreprocessSettings

    assert PreprocessSettings.from_config({"seed": 9}).seed == 9
    assert PreprocessSettings.from_config({"seed": 9, "preprocess": {"seed": 2}}).seed == 2
    assert AlignSettings.from_config({"align": {"batch_size": 7}}).batch_size == 7
    from deephemnma.core.errors import ConfigError

    with pytest.raises(ConfigError):
        AlignSettings.from_config({"align": {"no_such_key": 1}})
