"""One module per CLI subcommand (see :mod:`deephemnma.cli` for the protocol).

A pipeline stage's command module declares ``STAGE`` (:class:`deephemnma.core.stage.Stage`:
its position, the configuration sections it reads, its results folder and report section);
utilities (check, config, merge, fetch-demo) declare ``ORDER`` instead. :func:`stages` is the
one list of stages that the workflow, the report and the CLI read.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def command_modules() -> list[ModuleType]:
    """Every command module: the stages in pipeline order, then the utilities."""
    mods = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            mods.append(mod)
    return sorted(mods, key=lambda m: (0, m.STAGE.order) if is_stage(m) else (1, getattr(m, "ORDER", 100)))


def is_stage(mod: ModuleType) -> bool:
    return getattr(mod, "STAGE", None) is not None


def stages() -> dict:
    """``{command name: Stage}`` of the pipeline stages, in pipeline order."""
    return {m.NAME: m.STAGE for m in command_modules() if is_stage(m)}
