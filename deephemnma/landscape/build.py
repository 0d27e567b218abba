"""The landscape stage: features → coordinates (any registered method), tables and figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import ConfigError, InputError
from ..core.features import column_matrix, feature_matrix
from ..core.logs import get_logger
from ..core.settings import schema_settings
from ..core.star import SOURCE
from .methods import get_method

log = get_logger(__name__)

SPECTRAL_PREFIX = "dhnmaSpectral"
SOURCE_COLUMN = SOURCE  # 1 = HEMNMA (image set 1), 2 = network prediction (image set 2)
SOURCE_HEMNMA, SOURCE_NETWORK = 1, 2


def spectral_column(i: int) -> str:
    return f"{SPECTRAL_PREFIX}{int(i)}"


@schema_settings("landscape")
class LandscapeSettings:
    """The landscape's own keys of the ``landscape`` section (defaults: the schema); its
    sub-sections filter, groups, animation, evaluation and report belong to other stages."""

    NOT_SETTINGS = ("filter", "groups", "animation", "evaluation", "report")

    features: object
    modes: list | None
    method: str
    n_components: int
    standardise: bool
    fit_on: str
    spectral: dict
    plots: dict


# ------------------------------------------------------------------------------ tables
def concat_particle_sets(parts: list[tuple[pd.DataFrame, pd.DataFrame, int]], source=None):
    """Concatenate (particles, optics, source_code) sets into one table with ``dhnmaSource``.

    Identical optics tables are shared; otherwise the later set's optics groups are
    renumbered after the earlier ones. A particle (``rlnImageName``) present in several
    sets is kept once, from the first set that has it."""
    from ..core.star import IMAGE_NAME, OPTICS_GROUP

    out_p, out_o = [], None
    for particles, optics, code in parts:
        p = particles.copy()
        p[SOURCE_COLUMN] = code
        o = optics.copy() if optics is not None else None
        if out_o is None:
            out_o = o
        elif o is not None and not _same_table(o, out_o):
            offset = int(out_o[OPTICS_GROUP].max())
            mapping = {g: g + offset for g in o[OPTICS_GROUP]}
            o[OPTICS_GROUP] = o[OPTICS_GROUP].map(mapping)
            if "rlnOpticsGroupName" in o.columns:
                o["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in o[OPTICS_GROUP]]
            p[OPTICS_GROUP] = p[OPTICS_GROUP].map(mapping)
            out_o = pd.concat([out_o, o], ignore_index=True)
        out_p.append(p)
    allp = pd.concat(out_p, ignore_index=True)
    dup = allp[IMAGE_NAME].duplicated(keep="first")
    if dup.any():
        log.warning("%d particles appear in more than one input set: each kept once, from the first set", int(dup.sum()))
        allp = allp[~dup].reset_index(drop=True)
    return allp, out_o


def _same_table(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return False
    return all(np.array_equal(a[c].to_numpy(), b[c].to_numpy()) for c in a.columns)


def add_coordinates(df: pd.DataFrame, Y: np.ndarray, prefix: str = "pc") -> pd.DataFrame:
    """Write coordinates as columns ``dhnmaPC1..k`` (``prefix="pc"``) or ``dhnmaSpectral1..k``
    (replacing any previous ones of that kind)."""
    from ..core.star import pc_column, pc_columns

    out = df.copy()
    if prefix == "pc":
        out = out.drop(columns=pc_columns(out))
        names = [pc_column(i + 1) for i in range(Y.shape[1])]
    else:
        out = out.drop(columns=[c for c in out.columns if str(c).startswith(SPECTRAL_PREFIX)])
        names = [spectral_column(i + 1) for i in range(Y.shape[1])]
    for j, c in enumerate(names):
        out[c] = Y[:, j]
    return out


# ------------------------------------------------------------------------------ stage driver
def build_landscape(particles: pd.DataFrame, optics: pd.DataFrame | None, settings: LandscapeSettings,
                    seed: int = 0, hemnma: tuple[pd.DataFrame, pd.DataFrame] | None = None, source=None):
    """Fit the landscape: returns (table with coordinate columns, optics, model, spectral
    model or None). With ``fit_on: combined`` the HEMNMA particles (``hemnma`` = (particles,
    optics)) are concatenated first (column ``dhnmaSource``); with ``spectral.compare`` a
    spectral embedding is added beside another method's coordinates."""
    if settings.fit_on == "combined":
        if hemnma is None:
            raise InputError(source, "landscape.fit_on is combined: the HEMNMA particles are needed (--hemnma)")
        particles, optics = concat_particle_sets([(particles, optics, SOURCE_NETWORK),
                                                  (hemnma[0], hemnma[1], SOURCE_HEMNMA)], source)
    X, cols = feature_matrix(particles, settings.features, settings.modes, source)
    method = get_method(settings.method)
    compare = settings.spectral["compare"] and method.NAME != "spectral"
    _check_size(method.NAME, len(X), settings, source)
    if compare:  # checked before anything is fitted
        _check_size("spectral", len(X), settings, source)
    model, Y = method.fit_features(X, cols, settings, seed)
    out = add_coordinates(particles, Y, "pc")
    spectral = None
    if compare:
        spectral, Ys = get_method("spectral").fit_features(X, cols, settings, seed)
        out = add_coordinates(out, Ys, "spectral")
    return out, optics, model, spectral


def apply_model(particles: pd.DataFrame, model, source=None) -> pd.DataFrame:
    """Place particles with a saved model (its own feature columns)."""
    X, _ = column_matrix(particles, list(model.columns), source)
    return add_coordinates(particles, model.transform(X), "pc")


def _check_size(method: str, n: int, settings: LandscapeSettings, source) -> None:
    need = 2 if method != "spectral" else max(int(settings.spectral["n_neighbors"]), settings.n_components + 1) + 1
    if method == "spectral" and int(settings.spectral["max_fit"]) < need:
        raise ConfigError(f"landscape.spectral.max_fit = {settings.spectral['max_fit']} is below the {need} particles "
                          f"the embedding needs (n_neighbors + 1)")
    if n < need:
        raise InputError(source, f"the {method} landscape needs at least {need} particles, got {n}")


def landscape_plots(outdir, table: pd.DataFrame, model, settings: LandscapeSettings, seed: int = 0) -> list[Path]:
    """landscape.png, the method's own figures (PCA: explained_variance.png), features.png
    (histograms of the fitted features), spectral_vs_pca.png (when present)."""
    from ..core import plots
    from ..core.star import pc_columns

    outdir = Path(outdir)
    ps = settings.plots
    Y = table[pc_columns(table)].to_numpy(np.float64)
    paths = [plots.landscape(outdir / "landscape.png", Y, density=ps["density"], max_points=int(ps["max_points"]),
                             seed=seed, axis_label=model.AXIS_LABEL)]
    paths += model.plots(outdir, Y, settings, seed)
    paths.append(plots.amplitude_histograms(outdir / "amplitudes.png", table[model.columns].to_numpy(), model.columns))
    spec = [c for c in table.columns if str(c).startswith(SPECTRAL_PREFIX)]
    if spec and model.NAME != "spectral":
        paths.append(plots.embedding_comparison(outdir / "spectral_vs_pca.png", Y, table[spec].to_numpy(),
                                                colour=Y[:, 0], max_points=int(ps["max_points"]), seed=seed))
    return paths
