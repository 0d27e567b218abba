"""One batch of particles through the whole alignment: global search, then coarse-to-fine
refinement of pose and amplitudes together (see :mod:`deephemnma.align` for the overview).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict

import numpy as np
import torch

from ..core import geometry
from ..core.ctf import CTFParams
from ..core.errors import ConfigError
from ..core.settings import schema_settings
from .levels import Level, LevelData, ctf_for_level
from .model import ElasticModel
from .refine import refine
from .search import TemplateBank, amplitude_grid, orientation_grid

#: largest template bank (GB) the search may build
MAX_BANK_GB = 4.0


@schema_settings("align")
class AlignSettings:
    """The ``align`` config section as typed values (defaults and meanings: the schema)."""

    modes: list | None
    atom_sigma: float | None
    levels: list
    iterations: list
    candidates: list
    search_box: int
    angular_step: float
    max_shift: float | None
    search_amplitude_points: int
    search_amplitude_rmsd: float
    search_amplitude_modes: int
    max_amplitude_rmsd: float
    blur_factor: float
    resolution: float | None
    coarse_cell: float
    xtol: float
    ctf: str
    batch_size: int
    min_significance: float | None
    max_flagged_fraction: float


@dataclass
class BatchResult:
    euler: np.ndarray        # (B, 3) degrees
    origins: np.ndarray      # (B, 2) Å
    amplitudes: np.ndarray   # (B, M)
    score: np.ndarray        # (B,) final-level similarity
    converged: np.ndarray    # (B,) bool
    at_bound: np.ndarray     # (B,) bool
    significance: np.ndarray  # (B,) final score in standard deviations of chance (pure noise)
    zscore: np.ndarray       # (B,) search z-score of the best template
    search_score: np.ndarray  # (B,)
    iterations: np.ndarray   # (B,) total L-BFGS iterations of the kept candidate at the last level
    evaluations: int = 0


class Aligner:
    """Aligns batches of images of one box and pixel size against one model."""

    def __init__(self, model: ElasticModel, image_box: int, pixel_size: float, settings: AlignSettings):
        self.model = model
        self.settings = s = settings
        self.D = int(image_box)
        self.px = float(pixel_size)
        boxes = sorted({min(int(b), self.D) for b in s.levels})
        self.levels = [Level.make(b, self.D, self.px, s.blur_factor, s.resolution) for b in boxes]
        n = len(self.levels)
        self.iterations = _per_level(s.iterations, n)
        self.candidates = _per_level(s.candidates, n)
        self.search_level = Level.make(min(int(s.search_box), self.D), self.D, self.px, s.blur_factor, s.resolution)
        self.amp_bound = np.full(model.n_modes, s.max_amplitude_rmsd * model.amplitude_scale())
        extent = self.D * self.px
        self.max_shift = float(s.max_shift) if s.max_shift is not None else 0.1 * extent
        # the finest level always uses the full model; coarser ones may lump atoms (coarse_cell)
        self.models = {lv.box: self._model_for(lv) for lv in self.levels[:-1] + [self.search_level]}
        self.models[self.levels[-1].box] = model
        half = min(s.search_amplitude_rmsd, s.max_amplitude_rmsd) * model.amplitude_scale()
        # the grid spans the first search_amplitude_modes modes (the lowest: the largest motions);
        # the others start at zero (a full grid over 6 modes would be 3⁶ = 729 conformations)
        k = max(0, min(model.n_modes, int(s.search_amplitude_modes)))
        conf = np.zeros((1, model.n_modes))
        if k:
            sub = amplitude_grid(k, int(s.search_amplitude_points), half)
            conf = np.concatenate([sub, np.zeros((len(sub), model.n_modes - k))], 1)
        self._bank = None
        self._conf = conf
        # the bank holds 3 floats per in-band coefficient per template (≈ 0.39·d² coefficients)
        n_templates = len(conf) * len(orientation_grid(s.angular_step))
        gb = n_templates * 3 * 0.4 * self.search_level.box ** 2 * 4 / 1e9
        if gb > MAX_BANK_GB:
            raise ConfigError(f"align: the search's template bank would hold {n_templates:,} templates "
                              f"(~{gb:.1f} GB): use fewer align.search_amplitude_points / search_amplitude_modes, "
                              f"a larger align.angular_step or a smaller align.search_box")

    def _model_for(self, level: Level) -> ElasticModel:
        cell = self.settings.coarse_cell * level.pixel_size
        return self.model.coarse(cell) if cell > 0 else self.model

    @property
    def bank(self) -> TemplateBank:
        if self._bank is None:
            self._bank = TemplateBank(self.models[self.search_level.box], self.search_level,
                                      self.settings.angular_step, self._conf)
        return self._bank

    def align(self, images: np.ndarray, ctf: CTFParams | None, ctf_mode) -> BatchResult:
        """Align images (B, D, D) (float32) with their CTF parameters and CTF mode(s)."""
        B = len(images)
        F = torch.fft.rfft2(torch.as_tensor(np.asarray(images, dtype=np.float32)))
        # ---- global search
        lv = self.search_level
        data = LevelData.build(F, ctf_for_level(ctf, ctf_mode, lv, B), lv)
        cand = self.bank.search(data, self.max_shift, self.candidates[0])
        part = np.concatenate([np.full(int(cand.n[b]), b) for b in range(B)]).astype(np.int64)
        slot = np.concatenate([np.arange(int(cand.n[b])) for b in range(B)]).astype(np.int64)
        R = geometry.euler_to_matrix(cand.euler[part, slot])
        res = self.refine_hypotheses(F, ctf, ctf_mode, part, R, cand.origins[part, slot], cand.amplitudes[part, slot])
        res.zscore, res.search_score = cand.zscore, cand.score[:, 0]
        return res

    def refine_hypotheses(self, F: torch.Tensor, ctf, ctf_mode, part: np.ndarray, R: np.ndarray, origins: np.ndarray,
                          amps: np.ndarray, keep: list | None = None) -> BatchResult:
        """Refine hypotheses (rotations (H,3,3), origins (H,2) Å, amplitudes (H,M); ``part``
        (H,) the image of each) of the images whose transforms are ``F`` (B, D, D//2+1), coarse
        to fine over the levels, keeping the ``keep[i]`` best per particle after level i
        (default: the next level's candidates; 1 after the last); the best per particle.
        ``zscore`` and ``search_score`` of the result are NaN (no search)."""
        B = F.shape[0]
        evaluations, res, data, sel = 0, None, None, None
        shift_bound = self.max_shift + 2 * self.search_level.pixel_size
        for li, lv in enumerate(self.levels):
            data = LevelData.build(F, ctf_for_level(ctf, ctf_mode, lv, B), lv)
            res = refine(self.models[lv.box], data, part, R, origins, amps, self.amp_bound, shift_bound,
                         max_iter=self.iterations[li], xtol=self.settings.xtol)
            evaluations += res.evaluations
            k = keep[li] if keep is not None and li < len(keep) else \
                (self.candidates[li + 1] if li + 1 < len(self.levels) else 1)
            sel = best_per_particle(part, res.score, int(k))
            part, R, origins, amps = part[sel], res.rotations[sel], res.origins[sel], res.amplitudes[sel]
        # one problem per particle now, in particle order
        order = np.argsort(part, kind="stable")
        part, R, origins, amps, final = part[order], R[order], origins[order], amps[order], sel[order]
        bound = np.abs(amps) >= 0.999 * self.amp_bound[None, :]
        lv = self.levels[-1]
        with torch.no_grad():
            P = self.models[lv.box].project(torch.as_tensor(R, dtype=torch.float32),
                                            torch.as_tensor(origins / lv.pixel_size, dtype=torch.float32),
                                            torch.as_tensor(amps, dtype=torch.float32), lv.box, lv.pixel_size, lv.blur)
            sig = data.significance(P, torch.as_tensor(part)).double().numpy()
        nan = np.full(B, np.nan)
        return BatchResult(
            euler=geometry.matrix_to_euler(R), origins=origins, amplitudes=amps, score=res.score[final],
            converged=res.converged[final], at_bound=bound.any(1), significance=sig, zscore=nan,
            search_score=nan, iterations=res.iterations[final], evaluations=evaluations)


def _per_level(values, n: int) -> list[int]:
    v = list(values) if isinstance(values, (list, tuple)) else [values]
    if not v:
        raise ValueError("empty per-level list")
    return [int(v[min(i, len(v) - 1)]) for i in range(n)]


def best_per_particle(part: np.ndarray, score: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the ``keep`` best-scoring problems of each particle."""
    order = np.lexsort((-score, part))
    ps = part[order]
    first = np.r_[0, np.flatnonzero(np.diff(ps)) + 1]
    rank = np.arange(len(ps)) - np.repeat(first, np.diff(np.r_[first, len(ps)]))
    return np.sort(order[rank < keep])
