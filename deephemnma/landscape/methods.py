"""The registry of landscape methods: adding a method is one module with one registered class.

A method is a class registered with :func:`register` that provides

* ``NAME`` (the value of ``landscape.method``), ``AXIS_LABEL`` (for plots) and
  ``INVERTIBLE`` (whether landscape points map back to features: animations need it);
* ``fit_features(X, columns, settings, seed) -> (model, Y)``: fit on the feature matrix X
  (n, F) and return the coordinates Y (n, k) of the same particles;
* ``transform(X) -> Y`` for new particles; ``save(path)`` and
  ``from_saved(doc, path)`` (the JSON document written by ``save``, which holds
  ``"method": NAME``) for the model file;
* ``plots(outdir, Y, settings, seed) -> [paths]`` for figures of its own (optional).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import ConfigError, InputError

METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    METHODS[cls.NAME] = cls
    return cls


def get_method(name: str) -> type:
    if name not in METHODS:
        raise ConfigError(f"landscape.method {name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]


class LandscapeMethod:
    """Defaults for the optional parts of a method."""

    NAME = ""
    AXIS_LABEL = "axis "
    INVERTIBLE = False

    def plots(self, outdir, Y, settings, seed: int = 0) -> list[Path]:
        return []


def load_model(path):
    """A saved landscape model (any registered method) from its JSON file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "landscape model not found")
    try:
        d = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise InputError(path, "not a JSON landscape model (binary content)") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not a JSON landscape model ({exc.msg})") from None
    if not isinstance(d, dict) or d.get("method") not in METHODS:
        raise InputError(path, f"unknown landscape model method {d.get('method') if isinstance(d, dict) else None!r}")
    try:
        return METHODS[d["method"]].from_saved(d, path)
    except InputError:
        raise
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else f"{exc.__class__.__name__}: {exc}"
        raise InputError(path, f"not a valid {d['method']} landscape model ({what})") from None
