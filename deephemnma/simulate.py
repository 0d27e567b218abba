"""Synthetic particle data sets with ground truth: the paper's adenylate-kinase benchmark.

Recipe (seed 000 §3.1.2; every value is a key of the config's ``simulate`` section)
-------------------------------------------------------------------------------
For each particle ``i``:

1. **Conformation.** Amplitudes ``q`` of the selected normal modes are drawn from
   ``amplitudes.distribution``:

   * ``helix`` (default, the paper's): ``r ~ U(0, 1)``; on the first three modes of
     ``amplitudes.modes`` (default: the first three modes of the mode file, i.e. 7, 8, 9)
     ``q = (−s·r, s·sin πr, s·cos πr)`` with ``s = amplitudes.helix_scale`` (200).
     The ground truth keeps ``r`` in ``dhnmaConformation``.
   * ``uniform``: each mode ``U(low, high)`` (``amplitudes.uniform_range``);
   * ``gaussian``: each mode ``N(mean, std²)``;
   * ``discrete``: one of ``amplitudes.states`` (amplitude vectors) with probabilities
     ``state_weights``, plus optional Gaussian jitter ``state_spread``; the 1-based state
     number goes to ``dhnmaConformation``.

   The deformed structure is ``x = x0 + Σ_k q_k v_k`` (mode vectors of unit norm over 3N,
   so amplitudes are on the paper's scale). ``x0`` is the mode file's reference centred on
   the mean of its atom coordinates (the box centre is that point).
2. **Density and projection** (``projector``): the deformed atoms with their elements'
   Peng (1996) electron scattering factors (optional B-factor) are rasterised as voxel
   integrals (:mod:`deephemnma.core.density`) and projected along the particle's orientation:

   * ``rotated_grid`` (default): rasterised on the voxel grid aligned with the particle's
     image (the exact real-space rotation of the continuous density, no interpolation) and
     integrated along z — ~45 ms per 256² particle of 1,656 atoms on one core;
   * ``fourier_slice``: rasterised into a D³ volume in the reference frame and projected with
     :class:`deephemnma.core.projection.FourierSliceProjector` (``oversample`` × zero padding,
     trilinear slice) — 4 s per 256² particle at oversample 1 and 8 s per 128² particle at
     oversample 2 (a full 3-D FFT per particle; oversample 2 at 256² needs a 512³ transform,
     ~5 GB), for validation and small sets. The two agree to a correlation > 0.95 at full
     resolution and > 0.99 below 3 Å (tests/test_density.py): the Fourier slice adds
     interpolation error, and its gridding correction is only right on average.
   Orientations are uniform on SO(3) (``rotations: uniform``), or the paper's literal
   statement (``euler_uniform``: rot, psi ~ U(0, 360°), tilt ~ U(0, 180°), which is not
   uniform on the sphere). Shifts: the particle is drawn at (image centre − origin) with
   ``origin ~ U(−shift_range, shift_range)`` pixels per axis (RELION ``rlnOriginX/YAngst``
   = origin × pixel size).
3. **CTF and noise.** With ``x`` the noise-free projection, ``n₁, n₂`` white Gaussian noise,
   and ``c`` the particle's CTF (RELION model, :mod:`deephemnma.core.ctf`)::

       image = CTF ⊛ (x + σ₁ n₁) + σ₂ n₂          clean = CTF ⊛ x

   Defaults: 200 kV, Cs 2 mm, amplitude contrast 0.1, defocus 5,000 Å **underfocus** (the
   paper's "−0.5 µm" is underfocus; RELION's ``rlnDefocusU/V`` are positive for underfocus),
   optional per-particle defocus spread and astigmatism.

SNR (the definition used here)
------------------------------
``SNR = mean_i var_M(clean_i) / mean_i var_M(image_i − clean_i)``: the variance of the
noise-free CTF-modulated signal over the variance of the total noise (both noise terms,
the first after CTF modulation), each measured inside the particle mask ``M`` — a disc of
radius ``snr_radius`` Å (default: the reference's radius, the largest distance of an atom
from its centre) — and averaged over the data set. The noise level is set once per data
set, not per image: ``σ_tot² = S / SNR`` where ``S`` is the mean in-mask signal variance of
``snr_calibration`` particles drawn from the same distributions (their own random stream);
a fraction ``noise_before_ctf`` of ``σ_tot²`` comes from the pre-CTF noise (after its
modulation by the CTF: σ₁² = f·σ_tot² / mean(CTF²), the mean over the full frequency grid
averaged over the calibration particles) and the rest from σ₂² = (1 − f)·σ_tot². The SNR
actually obtained is measured on every image written and reported in ``simulate.json``.

Output (``simulate_dataset(reference, settings, out_dir)``)
----------------------------------------------------------
::

    DIR/particles.star         RELION 3.1 (optics + particles): rlnImageName, CTF columns,
                               rlnOpticsGroup — what a microscope would give (no answers);
                               with ``snr: null`` it points at the noise-free stacks
    DIR/ground_truth.star      the answers, keyed by rlnImageName, in the pipeline's columns:
                               rlnAngleRot/Tilt/Psi (°), rlnOriginXAngst/YAngst (Å),
                               dhnmaAmplitudeNNN (every mode of the mode file; 0 if not driven),
                               dhnmaConformation (helix r, or 1-based discrete state),
                               rlnDefocusU/V/Angle, rlnOpticsGroup; same optics table
    DIR/stacks/particles_NNNN.mrcs   noisy images, chunk NNNN (``chunk_size`` particles)
    DIR/stacks/clean_NNNN.mrcs       noise-free CTF-modulated images (``write_clean``)
    DIR/stacks/projections_NNNN.mrcs noise-free projections without CTF (``write_projections``)
    DIR/stacks/chunk_NNNN.json       completion record of the chunk (fingerprint, SNR sums)
    DIR/clean.star, DIR/projections.star   the same particles (same rows, same order) pointing at
                               the clean / projection stacks, when written (projections.star
                               has no CTF columns) — noise-free controls
    DIR/simulate.json                manifest: settings, noise model, measured SNR, chunks

Chunks are written whole and atomically, in parallel processes; a chunk whose record
exists with the same fingerprint (settings + reference) is not redone. Randomness is drawn
per chunk from ``SeedSequence([seed, stream, chunk])`` and each chunk is rendered on one
thread, so the same seed gives the same bytes whatever the number of worker processes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .core import geometry
from .core.ctf import CTFParams, compute_ctf
from .core.density import AtomProfiles, atoms_to_images, atoms_to_volume_torch
from .core.settings import schema_settings
from .core.errors import ConfigError, InputError
from .core.fileio import atomic_write_json
from .core.imageops import circular_mask
from .core.logs import get_logger, progress
from .core.runtime import one_torch_thread
from .core.resume import chunk_done, fingerprint, write_record

log = get_logger(__name__)

STREAM_PARAMS = 1
STREAM_NOISE = 2
STREAM_CALIBRATION = 3
CALIBRATION_CHUNK = 1 << 30  # chunk index used for the calibration draw's parameter stream
CONFORMATION = "dhnmaConformation"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------- inputs
@dataclass
class SimReference:
    """What the simulation needs of a normal-mode analysis (:class:`deephemnma.core.modes.ModeSet`).

    ``coords`` (N, 3) Å in any frame and ``centre`` (3,) Å, the point that goes to the box
    centre (the mode file's ``centre``: the weighted centroid of the atoms, or a map's box
    centre; default the mean of ``coords``) — stored centred, so ``coords`` are relative
    to the box centre; ``elements`` (N,) symbols; ``mode_numbers`` (M,) (numbered from 1;
    1–6 rigid); ``vectors`` (M, N, 3) unit norm over 3N; ``weights`` (N,) and ``sigma``
    (N,) Å for the one-Gaussian-per-atom density (pseudo-atoms); ``kind`` "atomic" or
    "pseudoatoms".
    """

    coords: np.ndarray
    elements: np.ndarray
    mode_numbers: np.ndarray
    vectors: np.ndarray
    weights: np.ndarray | None = None
    sigma: np.ndarray | None = None
    centre: np.ndarray | None = None
    kind: str = "atomic"
    source: str | None = None

    def __post_init__(self):
        c = np.asarray(self.coords, dtype=np.float64).reshape(-1, 3)
        if self.centre is None:
            self.centre = c.mean(axis=0) if len(c) else np.zeros(3)
        self.centre = np.asarray(self.centre, dtype=np.float64).reshape(3)
        self.coords = c - self.centre
        n = len(self.coords)
        self.elements = np.asarray(self.elements, dtype=str).reshape(n)
        self.mode_numbers = np.asarray(self.mode_numbers, dtype=np.int64).reshape(-1)
        self.vectors = np.asarray(self.vectors, dtype=np.float64).reshape(len(self.mode_numbers), n, 3)
        if self.weights is not None:
            self.weights = np.asarray(self.weights, dtype=np.float64).reshape(n)
        if self.sigma is not None:
            self.sigma = np.broadcast_to(np.asarray(self.sigma, dtype=np.float64), (n,)).copy()

    @property
    def n_atoms(self) -> int:
        return len(self.coords)

    @property
    def radius(self) -> float:
        """Largest distance of an atom from the centre (Å)."""
        return float(np.sqrt((self.coords ** 2).sum(1)).max()) if self.n_atoms else 0.0

    def deform(self, amplitudes) -> np.ndarray:
        """(B, N, 3) coordinates for amplitudes (B, M) over all of :attr:`mode_numbers`."""
        q = np.asarray(amplitudes, dtype=np.float64).reshape(-1, len(self.mode_numbers))
        return self.coords[None] + np.einsum("bm,mnj->bnj", q, self.vectors)

    def fingerprint(self) -> str:
        return fingerprint(self.kind, self.elements.tolist(), length=64,
                           arrays=[self.coords, self.centre, self.vectors, self.mode_numbers, self.weights, self.sigma])

    @classmethod
    def from_modes(cls, modes, source=None) -> "SimReference":
        """From a :class:`deephemnma.core.modes.ModeSet` (attributes ``coords``, ``element``,
        ``mode_numbers``, ``modes`` (the vectors), ``weights``, ``sigma``, ``centre``, ``kind``)."""
        def pick(*names, required=True):
            for n in names:
                v = getattr(modes, n, None)
                if v is not None:
                    return v
            if required:
                raise InputError(source, f"mode set lacks {' / '.join(names)}")
            return None

        return cls(pick("coords"), pick("element", "elements"), pick("mode_numbers"), pick("modes", "vectors"),
                   pick("weights", required=False), pick("sigma", required=False), pick("centre", required=False),
                   str(pick("kind", required=False) or "atomic"), source=None if source is None else str(source))


def load_reference(path) -> SimReference:
    """Read a mode file written by ``deephemnma nma`` (via :func:`deephemnma.core.modes.load_modes`)."""
    from .core.fileio import require_file

    path = require_file(path, "mode file")
    try:
        from .core.modes import load_modes
    except ImportError as exc:  # pragma: no cover - nma arrives on another branch
        raise InputError(path, f"cannot read mode files: deephemnma.nma is unavailable ({exc})") from None
    return SimReference.from_modes(load_modes(path), source=path)


#: fields whose schema key is nested (amplitudes.*, ctf.*) or named otherwise
_KEYS = {k: f"amplitudes.{k}" for k in ("distribution", "modes", "helix_scale", "uniform_range", "gaussian_mean",
                                         "gaussian_std", "states", "state_weights", "state_spread")}
_KEYS.update({"ctf": "ctf.enabled", "ctf_bfactor": "ctf.bfactor", "ctf_padding": "ctf.padding",
              **{k: f"ctf.{k}" for k in ("voltage", "cs", "amplitude_contrast", "defocus", "defocus_spread",
                                         "astigmatism", "phase_shift")}})


@schema_settings("simulate", keys=_KEYS)
class Settings:
    """The ``simulate`` config section as typed values (defaults and meanings: the schema)."""

    n_particles: int
    box: int
    pixel_size: float
    seed: int | None
    distribution: str
    modes: list | None
    helix_scale: float
    uniform_range: list
    gaussian_mean: float
    gaussian_std: float
    states: list
    state_weights: list | None
    state_spread: float
    rotations: str
    shift_range: float
    ctf: bool
    voltage: float
    cs: float
    amplitude_contrast: float
    defocus: float
    defocus_spread: float
    astigmatism: float
    ctf_bfactor: float
    phase_shift: float
    ctf_padding: int
    snr: float | None
    noise_before_ctf: float
    snr_radius: float | None
    snr_calibration: int
    scattering: str
    b_factor: float
    projector: str
    oversample: int
    truncate: float
    invert_contrast: bool
    write_clean: bool
    write_projections: bool
    chunk_size: int
    batch_size: int
    workers: int | None

    def validate(self) -> None:
        if self.box % 2 or self.box < 8:
            raise ConfigError(f"simulate.box must be even and ≥ 8, got {self.box}")
        lo, hi = self.uniform_range
        if hi < lo:
            raise ConfigError(f"simulate.amplitudes.uniform_range: low {lo} > high {hi}")
        if self.distribution == "discrete":
            if not self.states:
                raise ConfigError("simulate.amplitudes.states: at least one state is needed")
            if len({len(s) for s in self.states}) != 1:
                raise ConfigError("simulate.amplitudes.states: every state needs the same number of amplitudes")
            if self.state_weights is not None and len(self.state_weights) != len(self.states):
                raise ConfigError("simulate.amplitudes.state_weights: one weight per state")
        if not 0.0 <= self.noise_before_ctf <= 1.0:
            raise ConfigError("simulate.noise_before_ctf must be in [0, 1]")
        if self.snr is not None and self.snr <= 0:
            raise ConfigError("simulate.snr must be positive (or null for no noise)")

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["uniform_range"] = list(self.uniform_range)
        return d

    def fingerprint(self, reference: SimReference) -> str:
        d = self.as_dict()
        for k in ("workers", "n_particles", "write_clean", "write_projections"):
            d.pop(k)  # these do not change any chunk's bytes (n only adds chunks; extra stacks are checked)
        return fingerprint(d, reference.fingerprint(), FORMAT_VERSION)


# ---------------------------------------------------------------------------- chunks
def chunk_ranges(n_particles: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, stop), …] of the simulation's chunks (all ``chunk_size`` but the last)."""
    n, c = int(n_particles), int(chunk_size)
    if n < 1 or c < 1:
        raise ConfigError(f"need n_particles ≥ 1 and chunk_size ≥ 1, got {n}, {c}")
    return [(a, min(n, a + c)) for a in range(0, n, c)]


def plan_chunks(n_particles: int | None, config) -> list[dict]:
    """The chunks ``simulate`` writes, computable before running (for Snakemake):
    ``{"index", "start", "n", "particles", "clean", "projections", "record"}`` (paths
    relative to the output directory; ``clean``/``projections`` only when written).
    ``n_particles`` None: the config's ``simulate.n_particles``. ``config``: the whole
    config or a :class:`Settings`."""
    s = config if isinstance(config, Settings) else Settings.from_config(config)
    n = s.n_particles if n_particles is None else int(n_particles)
    out = []
    for c, (a, b) in enumerate(chunk_ranges(n, s.chunk_size)):
        f = chunk_files(c)
        d = {"index": c, "start": a, "n": b - a, "particles": f["particles"], "record": f["record"]}
        if s.write_clean or s.snr is None:
            d["clean"] = f["clean"]
        if s.write_projections:
            d["projections"] = f["projections"]
        if s.snr is None:
            d.pop("particles")
        out.append(d)
    return out


def chunk_files(chunk: int) -> dict[str, str]:
    """Relative paths (from the output directory) of chunk ``chunk``'s files."""
    return {
        "particles": f"stacks/particles_{chunk:04d}.mrcs",
        "clean": f"stacks/clean_{chunk:04d}.mrcs",
        "projections": f"stacks/projections_{chunk:04d}.mrcs",
        "record": f"stacks/chunk_{chunk:04d}.json",
    }


def _rng(seed: int, stream: int, chunk: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), int(chunk)]))


# ---------------------------------------------------------------------------- parameters
def driven_modes(settings: Settings, reference: SimReference) -> list[int]:
    """Mode numbers that receive amplitudes."""
    available = [int(m) for m in reference.mode_numbers]
    if settings.modes is not None:
        modes = [int(m) for m in settings.modes]
        missing = [m for m in modes if m not in available]
        if missing:
            raise ConfigError(f"simulate.amplitudes.modes {missing} are not in the mode file (modes {available})")
    elif settings.distribution == "helix":
        modes = available[:3]
    elif settings.distribution == "discrete":
        modes = available[:len(settings.states[0])]
    else:
        modes = available
    if settings.distribution == "helix" and len(modes) != 3:
        raise ConfigError(f"the helix distribution needs three modes, got {modes}")
    if settings.distribution == "discrete" and len(settings.states[0]) != len(modes):
        raise ConfigError(f"simulate.amplitudes.states have {len(settings.states[0])} amplitudes for modes {modes}")
    return modes


def amplitude_column(mode: int) -> str:
    """``dhnmaAmplitude007``: :func:`deephemnma.core.star.amplitude_column`."""
    from .core.star import amplitude_column as col

    return col(int(mode))


def sample_parameters(settings: Settings, reference: SimReference, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Ground-truth parameters of ``n`` particles (no image names) drawn from ``rng``."""
    modes = driven_modes(settings, reference)
    q = np.zeros((n, len(modes)))
    conf = None
    dist = settings.distribution
    if dist == "helix":
        r = rng.uniform(0.0, 1.0, n)
        s = settings.helix_scale
        q = np.stack([-s * r, s * np.sin(np.pi * r), s * np.cos(np.pi * r)], axis=1)
        conf = r
    elif dist == "uniform":
        q = rng.uniform(settings.uniform_range[0], settings.uniform_range[1], (n, len(modes)))
    elif dist == "gaussian":
        q = settings.gaussian_mean + settings.gaussian_std * rng.standard_normal((n, len(modes)))
    elif dist == "discrete":
        states = np.asarray(settings.states, dtype=np.float64)
        w = np.ones(len(states)) if settings.state_weights is None else np.asarray(settings.state_weights, np.float64)
        if np.any(w < 0) or w.sum() <= 0:
            raise ConfigError("simulate.amplitudes.state_weights must be non-negative with a positive sum")
        k = rng.choice(len(states), size=n, p=w / w.sum())
        q = states[k] + (settings.state_spread * rng.standard_normal((n, len(modes))) if settings.state_spread > 0 else 0.0)
        conf = (k + 1).astype(np.int64)
    else:
        raise ConfigError(f"simulate.amplitudes.distribution: unknown {dist!r}")

    if settings.rotations == "uniform":
        angles = geometry.matrix_to_euler(geometry.random_rotations(n, rng))
    elif settings.rotations == "euler_uniform":
        angles = np.stack([rng.uniform(0, 360, n), rng.uniform(0, 180, n), rng.uniform(0, 360, n)], axis=1)
    else:
        raise ConfigError(f"simulate.rotations: unknown {settings.rotations!r}")
    origin_px = rng.uniform(-settings.shift_range, settings.shift_range, (n, 2))

    df = pd.DataFrame({
        "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
        "rlnOriginXAngst": origin_px[:, 0] * settings.pixel_size,
        "rlnOriginYAngst": origin_px[:, 1] * settings.pixel_size,
    })
    for j, m in enumerate(reference.mode_numbers):
        m = int(m)
        df[amplitude_column(m)] = q[:, modes.index(m)] if m in modes else 0.0
    if conf is not None:
        df[CONFORMATION] = conf
    if settings.ctf:
        mean = settings.defocus + (rng.uniform(-settings.defocus_spread, settings.defocus_spread, n)
                                   if settings.defocus_spread > 0 else np.zeros(n))
        astig = rng.uniform(0.0, settings.astigmatism, n) if settings.astigmatism > 0 else np.zeros(n)
        angle = rng.uniform(0.0, 180.0, n) if settings.astigmatism > 0 else np.zeros(n)
        df["rlnDefocusU"] = mean + astig / 2
        df["rlnDefocusV"] = mean - astig / 2
        df["rlnDefocusAngle"] = angle
    return df


def chunk_parameters(settings: Settings, reference: SimReference, chunk: int, start: int, stop: int) -> pd.DataFrame:
    """Parameters of the particles of chunk ``chunk`` (rows ``start … stop − 1``)."""
    df = sample_parameters(settings, reference, stop - start, _rng(settings.seed, STREAM_PARAMS, chunk))
    df.index = pd.RangeIndex(start, stop)
    return df


def all_parameters(settings: Settings, reference: SimReference) -> pd.DataFrame:
    chunks = chunk_ranges(settings.n_particles, settings.chunk_size)
    return pd.concat([chunk_parameters(settings, reference, c, a, b) for c, (a, b) in enumerate(chunks)])


# ---------------------------------------------------------------------------- rendering
@dataclass
class NoiseModel:
    """Noise levels (in the units of the projections) and how they were obtained."""

    sigma_before: float
    sigma_after: float
    sigma_total: float
    signal_variance: float
    mean_ctf2: float
    mask_radius_px: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def profiles_for(reference: SimReference, settings: Settings) -> AtomProfiles:
    """Each atom's density: Peng scattering for atomic models, the mode file's Gaussians for
    pseudo-atoms (``scattering: auto``), or as chosen."""
    mode = settings.scattering
    if mode == "auto":
        mode = "gaussian" if reference.kind == "pseudoatoms" else "peng"
    if mode == "peng":
        return AtomProfiles.peng(reference.elements, settings.b_factor)
    if mode == "gaussian":
        if reference.weights is None or reference.sigma is None:
            raise ConfigError("simulate.scattering=gaussian needs per-atom weights and sigma in the mode file")
        s = np.sqrt(reference.sigma ** 2 + settings.b_factor / (8 * math.pi ** 2))
        return AtomProfiles.gaussian(reference.weights, s)
    raise ConfigError(f"simulate.scattering: unknown {settings.scattering!r}")


def conformation_map(reference: SimReference, amplitudes, settings: Settings, box: int | None = None,
                     pixel_size: float | None = None) -> np.ndarray:
    """The true map of one conformation: the reference deformed by ``amplitudes`` (one per
    mode of the mode file, in :attr:`SimReference.mode_numbers` order), rasterised exactly as
    the simulation does (same scattering, B-factor and centre), float32 ``[z, y, x]`` at
    ``box`` / ``pixel_size`` (default: the simulation's). For evaluating reconstructions."""
    X = reference.deform(np.asarray(amplitudes, dtype=np.float64).reshape(1, -1))[0]
    vol = atoms_to_volume_torch(X, profiles_for(reference, settings), settings.box if box is None else int(box),
                                settings.pixel_size if pixel_size is None else float(pixel_size),
                                truncate=settings.truncate)
    return vol[0].numpy()


def ctf_params(settings: Settings, params: pd.DataFrame) -> CTFParams | None:
    if not settings.ctf:
        return None
    return CTFParams(params["rlnDefocusU"].to_numpy(), params["rlnDefocusV"].to_numpy(),
                     params["rlnDefocusAngle"].to_numpy(), settings.voltage, settings.cs,
                     settings.amplitude_contrast, settings.phase_shift, settings.ctf_bfactor, 1.0)


def project(reference: SimReference, profiles: AtomProfiles, params: pd.DataFrame, settings: Settings,
            box: int | None = None) -> torch.Tensor:
    """Noise-free, CTF-free projections (B, box, box) float32 of the particles in ``params``
    (``box`` defaults to ``settings.box``; a larger box draws the same particle, centred)."""
    amp_cols = [amplitude_column(int(m)) for m in reference.mode_numbers]
    X = reference.deform(params[amp_cols].to_numpy()) if amp_cols else np.repeat(reference.coords[None], len(params), 0)
    R = geometry.euler_to_matrix(params[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())
    origins = params[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / settings.pixel_size
    D, px = settings.box if box is None else int(box), settings.pixel_size
    if settings.projector == "rotated_grid":
        return atoms_to_images(X, R, profiles, D, px, origins, truncate=settings.truncate)
    if settings.projector == "fourier_slice":
        from .core.projection import FourierSliceProjector

        out = []
        for b in range(len(X)):
            vol = atoms_to_volume_torch(X[b], profiles, D, px, truncate=settings.truncate)[0]
            proj = FourierSliceProjector(vol, oversample=settings.oversample)
            out.append(proj.project(torch.as_tensor(R[b:b + 1], dtype=torch.float32),
                                    torch.as_tensor(origins[b:b + 1])))
        return torch.cat(out).to(torch.float32)
    raise ConfigError(f"simulate.projector: unknown {settings.projector!r}")


def _full_grid_mean(ctf2: torch.Tensor, box: int) -> torch.Tensor:
    """Mean over the full D×D frequency grid of an rfft-layout array (B, D, D//2+1)."""
    w = torch.full((ctf2.shape[-1],), 2.0, dtype=torch.float64)
    w[0] = 1.0
    if box % 2 == 0:
        w[-1] = 1.0
    return (ctf2.to(torch.float64) * w).sum((-2, -1)) / (box * box)


def snr_mask(settings: Settings, reference: SimReference) -> torch.Tensor:
    r_A = reference.radius if settings.snr_radius is None else settings.snr_radius
    return circular_mask(settings.box, min(r_A / settings.pixel_size, settings.box / 2))


def calibrate_noise(reference: SimReference, settings: Settings, profiles: AtomProfiles | None = None) -> NoiseModel | None:
    """Noise levels for the target SNR from ``snr_calibration`` particles (own random stream)."""
    if settings.snr is None:
        return None
    profiles = profiles if profiles is not None else profiles_for(reference, settings)
    mask = snr_mask(settings, reference)
    k = max(1, int(settings.snr_calibration))
    params = sample_parameters(settings, reference, k, _rng(settings.seed, STREAM_CALIBRATION, 0))
    sig, c2 = [], []
    with one_torch_thread():
        for a in range(0, k, settings.batch_size):
            p = params.iloc[a:a + settings.batch_size]
            imgs = render(reference, profiles, p, settings)
            sig.append(imgs["clean"][:, mask].to(torch.float64).var(-1, unbiased=False))
            c2.append(imgs["mean_ctf2"])
    S = float(torch.cat(sig).mean())
    mean_c2 = float(torch.cat(c2).mean())
    if S <= 0:
        raise InputError(reference.source, "the reference projects to empty images (is it inside the box?)")
    total = S / settings.snr
    f = settings.noise_before_ctf
    return NoiseModel(sigma_before=math.sqrt(f * total / mean_c2), sigma_after=math.sqrt((1 - f) * total),
                      sigma_total=math.sqrt(total), signal_variance=S, mean_ctf2=mean_c2,
                      mask_radius_px=float(min((reference.radius if settings.snr_radius is None else settings.snr_radius)
                                               / settings.pixel_size, settings.box / 2)))


def _crop(images: torch.Tensor, box: int) -> torch.Tensor:
    P = images.shape[-1]
    if P == box:
        return images
    o = P // 2 - box // 2
    return images[..., o:o + box, o:o + box].contiguous()


def render(reference: SimReference, profiles: AtomProfiles, params: pd.DataFrame, settings: Settings,
           noise: NoiseModel | None = None, rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    """Images of the particles in ``params``: ``projections`` (no CTF), ``clean`` (CTF, no
    noise) and, with ``noise`` and ``rng``, ``particles`` (noisy); ``mean_ctf2`` (B,) is
    the mean of CTF² over the frequency grid. With ``ctf_padding`` p > 1 the projection,
    the pre-CTF noise and the CTF live in a (p·D)² box and are cropped to D² after the CTF,
    so signal delocalised by the CTF beyond the box is lost as in a real micrograph
    (p = 1: the CTF acts circularly on the box). Noise is drawn particle by particle
    (pre-CTF field, then post-CTF field), so it does not depend on batching."""
    D = settings.box
    P = D * max(1, int(settings.ctf_padding))
    proj = project(reference, profiles, params, settings, box=P)
    cp = ctf_params(settings, params)
    ctf = compute_ctf(cp, P, settings.pixel_size) if cp is not None else None
    s = proj.shape[-2:]
    clean = torch.fft.irfft2(torch.fft.rfft2(proj) * ctf, s=s) if ctf is not None else proj
    out = {"projections": _crop(proj, D), "clean": _crop(clean, D),
           "mean_ctf2": _full_grid_mean(ctf * ctf, P) if ctf is not None else torch.ones(len(params), dtype=torch.float64)}
    if noise is not None and rng is not None:
        n1 = np.empty((len(params), P, P), dtype=np.float32)
        n2 = np.empty((len(params), D, D), dtype=np.float32)
        for i in range(len(params)):
            n1[i] = rng.standard_normal((P, P), dtype=np.float32)
            n2[i] = rng.standard_normal((D, D), dtype=np.float32)
        n1t, n2t = torch.from_numpy(n1), torch.from_numpy(n2)
        if ctf is not None:
            n1t = torch.fft.irfft2(torch.fft.rfft2(n1t) * ctf, s=s)
        out["particles"] = out["clean"] + noise.sigma_before * _crop(n1t, D) + noise.sigma_after * n2t
    if settings.invert_contrast:
        out = {k: (v if k == "mean_ctf2" else -v) for k, v in out.items()}
    return out


# ---------------------------------------------------------------------------- chunks in workers
_WORKER: dict = {}


def _worker_init(reference: SimReference, settings: Settings, noise: NoiseModel | None) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _WORKER.update(reference=reference, settings=settings, noise=noise, profiles=profiles_for(reference, settings))


def _render_chunk(task: dict) -> dict:
    """Render and write one chunk; return its record (also written as the chunk's JSON)."""
    from .core.mrc import StackWriter

    reference: SimReference = _WORKER["reference"]
    settings: Settings = _WORKER["settings"]
    noise: NoiseModel | None = _WORKER["noise"]
    profiles: AtomProfiles = _WORKER["profiles"]
    out_dir = Path(task["out_dir"])
    c, start, stop = task["chunk"], task["start"], task["stop"]
    params = chunk_parameters(settings, reference, c, start, stop)
    files = chunk_files(c)
    kinds = ["particles"] if noise is not None else []
    if settings.write_clean or noise is None:
        kinds.append("clean")
    if settings.write_projections:
        kinds.append("projections")
    rng = _rng(settings.seed, STREAM_NOISE, c)
    mask = snr_mask(settings, reference)
    sums = {"signal_variance": 0.0, "noise_variance": 0.0}
    t0 = time.perf_counter()
    with one_torch_thread(), contextlib.ExitStack() as stack:
        writers = {k: stack.enter_context(StackWriter(out_dir / files[k], stop - start, settings.box,
                                                      settings.pixel_size)) for k in kinds}
        for a in range(0, stop - start, settings.batch_size):
            p = params.iloc[a:a + settings.batch_size]
            imgs = render(reference, profiles, p, settings, noise, rng if noise is not None else None)
            sums["signal_variance"] += float(imgs["clean"][:, mask].to(torch.float64).var(-1, unbiased=False).sum())
            if "particles" in imgs:
                d = (imgs["particles"] - imgs["clean"])[:, mask].to(torch.float64)
                sums["noise_variance"] += float(d.var(-1, unbiased=False).sum())
            for k, w in writers.items():
                w.append(imgs[k].numpy())
    return write_record(out_dir / files["record"], task["fingerprint"], chunk=c, start=start, stop=stop,
                        n=stop - start, stacks={k: files[k] for k in kinds}, **sums, seconds=time.perf_counter() - t0)


def _chunk_done(out_dir: Path, chunk: int, start: int, stop: int, fp: str, kinds: Sequence[str]) -> dict | None:
    files = chunk_files(chunk)
    rec = chunk_done(out_dir / files["record"], fp, [out_dir / files[k] for k in kinds], start=start, stop=stop)
    if rec is not None and any(k not in rec.get("stacks", {}) for k in kinds):
        return None
    return rec


# ---------------------------------------------------------------------------- tables
def optics_table(settings: Settings) -> pd.DataFrame:
    return pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnAmplitudeContrast": [float(settings.amplitude_contrast)],
        "rlnSphericalAberration": [float(settings.cs)], "rlnVoltage": [float(settings.voltage)],
        "rlnImagePixelSize": [float(settings.pixel_size)], "rlnImageSize": [int(settings.box)],
        "rlnImageDimensionality": [2],
    })


def image_names(settings: Settings, kind: str = "particles") -> list[str]:
    """``NNNNNN@stacks/<kind>_CCCC.mrcs`` of every particle, relative to the output directory."""
    names = []
    for c, (a, b) in enumerate(chunk_ranges(settings.n_particles, settings.chunk_size)):
        stack = chunk_files(c)[kind]
        names.extend(f"{i + 1:06d}@{stack}" for i in range(b - a))
    return names


def tables(settings: Settings, reference: SimReference, params: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """The STAR tables: ``particles`` (the noisy images; the noise-free ones when ``snr`` is
    null), ``ground_truth`` (keyed by the same ``rlnImageName``), and, when those stacks are
    written, ``clean`` and ``projections`` (same rows in the same order; ``projections``
    without CTF columns)."""
    params = all_parameters(settings, reference) if params is None else params
    main_kind = "particles" if settings.snr is not None else "clean"
    names = image_names(settings, main_kind)
    particles = pd.DataFrame({"rlnImageName": names})
    truth = pd.DataFrame({"rlnImageName": names})
    if settings.ctf:
        for col in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
            particles[col] = params[col].to_numpy()
        particles["rlnPhaseShift"] = float(settings.phase_shift)
        particles["rlnCtfBfactor"] = float(settings.ctf_bfactor)
    particles["rlnOpticsGroup"] = 1
    for col in params.columns:
        truth[col] = params[col].to_numpy()
    truth["rlnOpticsGroup"] = 1
    out = {"particles": particles, "ground_truth": truth}
    if settings.snr is not None and settings.write_clean:
        out["clean"] = particles.assign(rlnImageName=image_names(settings, "clean"))
    if settings.write_projections:
        out["projections"] = pd.DataFrame({"rlnImageName": image_names(settings, "projections"), "rlnOpticsGroup": 1})
    return out


# ---------------------------------------------------------------------------- driver
def simulate_dataset(reference: SimReference, settings: Settings, out_dir, workers: int = 1) -> dict:
    """Simulate ``settings.n_particles`` particles into ``out_dir`` (see the module docstring);
    returns the manifest (also written as ``simulate.json``)."""
    from .core.star import write_star

    out_dir = Path(out_dir)
    (out_dir / "stacks").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    modes = driven_modes(settings, reference)
    profiles = profiles_for(reference, settings)
    chunks = chunk_ranges(settings.n_particles, settings.chunk_size)
    fp = settings.fingerprint(reference)
    noise = calibrate_noise(reference, settings, profiles)
    kinds = (["particles"] if noise is not None else []) + (["clean"] if settings.write_clean or noise is None else []) \
        + (["projections"] if settings.write_projections else [])
    records: dict[int, dict] = {}
    todo = []
    for c, (a, b) in enumerate(chunks):
        rec = _chunk_done(out_dir, c, a, b, fp, kinds)
        if rec is not None:
            records[c] = rec
        else:
            todo.append({"chunk": c, "start": a, "stop": b, "out_dir": str(out_dir), "fingerprint": fp})
    if records:
        log.info("%d of %d chunks already complete: not redone", len(records), len(chunks))
    workers = max(1, min(int(workers), len(todo))) if todo else 1
    log.info("simulating %d particles (%d chunks to do) at %d² × %.4g Å, %s projector, %d worker process%s",
             sum(t["stop"] - t["start"] for t in todo), len(todo), settings.box, settings.pixel_size,
             settings.projector, workers, "" if workers == 1 else "es")
    bar = progress(total=sum(t["stop"] - t["start"] for t in todo), desc="simulate", unit="particle")
    if workers == 1:
        saved = dict(_WORKER)
        _worker_init(reference, settings, noise)
        try:
            for t in todo:
                rec = _render_chunk(t)
                records[rec["chunk"]] = rec
                bar.update(rec["n"])
        finally:
            _WORKER.clear()
            _WORKER.update(saved)
    else:
        from .core.parallel import run_in_processes

        for rec in run_in_processes(_render_chunk, todo, workers, _worker_init, (reference, settings, noise)):
            records[rec["chunk"]] = rec
            bar.update(rec["n"])
    bar.close()

    params = all_parameters(settings, reference)
    optics = optics_table(settings)
    stars = {}
    for name, table in tables(settings, reference, params).items():
        stars[name] = f"{name}.star"
        write_star(out_dir / stars[name], table, optics)
    sig = sum(r["signal_variance"] for r in records.values())
    nv = sum(r["noise_variance"] for r in records.values())
    manifest = {
        "format_version": FORMAT_VERSION,
        "n_particles": settings.n_particles,
        "box": settings.box,
        "pixel_size": settings.pixel_size,
        "particles_star": "particles.star",
        "ground_truth_star": "ground_truth.star",
        "stars": stars,
        "settings": settings.as_dict(),
        "fingerprint": fp,
        "reference": {"source": reference.source, "n_atoms": reference.n_atoms, "radius": reference.radius,
                      "centre": reference.centre.tolist(), "modes": [int(m) for m in reference.mode_numbers],
                      "driven_modes": modes,
                      "elements": {str(e): int(n) for e, n in zip(*np.unique(reference.elements, return_counts=True))}},
        "noise": None if noise is None else noise.as_dict(),
        "snr_target": settings.snr,
        "snr_measured": (sig / nv) if nv > 0 else None,
        "chunks": [records[c] for c in range(len(chunks))],
        "seconds": time.perf_counter() - t0,
    }
    atomic_write_json(out_dir / "simulate.json", manifest)
    if manifest["snr_measured"] is not None:
        log.info("SNR measured %.4g (target %.4g) over %d particles", manifest["snr_measured"], settings.snr,
                 settings.n_particles)
    return manifest
