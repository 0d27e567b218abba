"""The conformational landscape: low-dimensional coordinates of per-particle features.

The features are the normal-mode amplitudes by default, or any per-particle columns (a VAE's
latent, ...) chosen by ``landscape.features`` (:mod:`deephemnma.core.features`). The method
is chosen from a registry (:mod:`.methods`): :mod:`.pca` (the paper's) and :mod:`.spectral`
(Laplacian eigenmaps, seed 003). Per-particle coordinates are written as columns
``dhnmaPC1``, ``dhnmaPC2`` … whatever the method (``dhnmaSpectral1`` … when a spectral
embedding is added for comparison). Adding a method is one module whose class is
registered with :func:`.methods.register`.
"""
from . import pca, spectral  # noqa: F401  (register the methods)
from .build import (
    SOURCE_COLUMN,
    SOURCE_HEMNMA,
    SOURCE_NETWORK,
    SPECTRAL_PREFIX,
    LandscapeSettings,
    add_coordinates,
    apply_model,
    build_landscape,
    concat_particle_sets,
    landscape_plots,
    spectral_column,
)
from .methods import METHODS, get_method, load_model, register
from .pca import PCAModel
from .spectral import SpectralModel

__all__ = ["SOURCE_COLUMN", "SOURCE_HEMNMA", "SOURCE_NETWORK", "SPECTRAL_PREFIX", "LandscapeSettings",
           "add_coordinates", "apply_model", "build_landscape", "concat_particle_sets", "landscape_plots",
           "spectral_column", "METHODS", "get_method", "load_model", "register", "PCAModel", "SpectralModel"]
