"""Normal modes of the reference (``deephemnma nma``): elastic network model, RTB, pseudoatoms.

:func:`run_nma` turns an atomic model or an EM map into a mode file
(:class:`deephemnma.core.modes.ModeSet`); :mod:`.enm` builds and diagonalises the elastic
network (full Hessian or RTB); :mod:`.pseudoatoms` converts maps to Gaussian pseudoatoms.
"""
from .compute import (
    ModesResult,
    animate,
    build_reference,
    compute_modes,
    mode_table,
    reference_kind,
    run_nma,
    select_modes,
    write_summary,
)

__all__ = ["ModesResult", "animate", "build_reference", "compute_modes", "mode_table", "reference_kind",
           "run_nma", "select_modes", "write_summary"]
