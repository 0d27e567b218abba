"""3-D reconstruction of a particle group by direct Fourier inversion, with half maps and FSC.

For each particle of a STAR file (poses in ``rlnAngleRot/Tilt/Psi`` and
``rlnOriginX/YAngst``, CTF in the usual RELION columns) the image — read at its ORIGINAL size
from the stack named in ``rlnImageName``, whatever size the network saw — is inserted into
one of two :class:`~deephemnma.core.projection.FourierAccumulator` s (random half sets, seeded,
or RELION's ``rlnRandomSubset``). Shifts are in Å in the STAR file, so they are divided by
the pixel size of the images actually read (the optics table's ``rlnImagePixelSize``); a
STAR whose ``rlnImageSize`` disagrees with the stacks is refused.

CTF correction (``ctf``): ``wiener`` (default) inserts ``CTF·F`` and ``CTF²`` and divides by
``Σ CTF² + reg``; ``phase_flipped`` is for images already phase-flipped (inserts ``|CTF|·F``,
weights ``CTF²``); ``none`` ignores the CTF (data without one). Images flagged
``rlnCtfDataAreCtfPremultiplied`` are handled. Regularisation (``regularisation``):
``constant`` — ``reg = reg_fraction ×`` the mean weight over sampled voxels (a Wiener term
with a flat SNR); ``fsc`` — the final map is regularised per shell from the half-map FSC,
``reg(k) = <Σ CTF²>_shell / SNR(k)`` with ``SNR = 2·FSC/(1−FSC)`` (the SNR of the full set;
RELION's τ² regularisation with T = 1), which Wiener-filters the map to its resolution.
Half maps always use the constant term so their FSC is not biased.

Particles are streamed in batches of ``batch_size`` (only one batch of images in memory);
accumulation runs in torch on ``device`` (``auto``: CUDA when available).

Outputs (:meth:`Reconstruction.write`): ``map.mrc`` (full set), ``half1.mrc``, ``half2.mrc``,
``mask.mrc`` (when a mask is used), ``fsc.csv`` (per shell: frequency 1/Å, resolution Å and
the FSC curves) and ``summary.json`` (counts, resolutions at 0.143 and 0.5, settings). Maps are
float32 with the voxel size of the images and origin (0, 0, 0): the rotation centre is the
voxel (D/2, D/2, D/2), as in RELION.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .core import fsc as fscmod
from .core.star import merged, pixel_sizes
from .core.mrc import ParticleImages, write_volume
from .core.errors import InputError
from .core.fileio import atomic_path, atomic_write_json
from .core.geometry import euler_to_matrix
from .core.logs import get_logger, progress
from .core.device import pick_device
from .core.runtime import one_torch_thread
from .core.settings import schema_settings
from .core.projection import FourierAccumulator

log = get_logger(__name__)

ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGINS = ("rlnOriginXAngst", "rlnOriginYAngst")
CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
               "rlnAmplitudeContrast")


@schema_settings("reconstruct")
class ReconstructSettings:
    """Settings of a reconstruction (the ``reconstruct`` config section; defaults: the schema)."""

    oversample: int
    interpolation: str
    ctf: str
    regularisation: str
    reg_fraction: float
    batch_size: int
    half_sets: str
    mask: str
    mask_radius: float | None
    mask_edge: float
    mask_threshold: float
    precision: str
    device: str

    def torch_device(self) -> torch.device:
        return pick_device(self.device, setting="reconstruct.device")


@dataclass
class Reconstruction:
    """Result of :func:`reconstruct_star`: maps [z, y, x] float32, FSC and bookkeeping."""

    map: np.ndarray
    half1: np.ndarray
    half2: np.ndarray
    voxel_size: float
    curve: fscmod.FSCCurve
    mask: np.ndarray | None
    n_particles: int
    n_half: tuple[int, int]
    settings: ReconstructSettings
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def resolution_0143(self) -> float:
        return self.curve.resolution(fscmod.FSC_HALF_MAPS)

    @property
    def resolution_05(self) -> float:
        return self.curve.resolution(fscmod.FSC_REFERENCE)

    def summary(self) -> dict:
        out = {
            "n_particles": self.n_particles,
            "n_half1": self.n_half[0],
            "n_half2": self.n_half[1],
            "box": int(self.map.shape[0]),
            "voxel_size": self.voxel_size,
            "resolution_fsc0143": self.resolution_0143,
            "resolution_fsc05": self.resolution_05,
            "masked": self.mask is not None,
            "seconds": round(self.seconds, 3),
            "particles_per_second": round(self.n_particles / self.seconds, 2) if self.seconds > 0 else None,
            "settings": asdict(self.settings),
        }
        if self.mask is not None:
            unm = self.curve.extra["fsc_unmasked"]
            out["resolution_unmasked_fsc0143"] = fscmod.resolution_at(self.curve.frequency, unm, 0.143)
            out["resolution_unmasked_fsc05"] = fscmod.resolution_at(self.curve.frequency, unm, 0.5)
        out.update(self.info)
        return out

    def write(self, outdir: str | Path) -> dict[str, Path]:
        """Write map.mrc, half1.mrc, half2.mrc, [mask.mrc], fsc.csv, summary.json in ``outdir``."""
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        paths = {"map": outdir / "map.mrc", "half1": outdir / "half1.mrc", "half2": outdir / "half2.mrc",
                 "fsc": outdir / "fsc.csv", "summary": outdir / "summary.json"}
        write_volume(paths["half1"], self.half1, self.voxel_size, origin=(0.0, 0.0, 0.0))
        write_volume(paths["half2"], self.half2, self.voxel_size, origin=(0.0, 0.0, 0.0))
        if self.mask is not None:
            paths["mask"] = outdir / "mask.mrc"
            write_volume(paths["mask"], self.mask, self.voxel_size, origin=(0.0, 0.0, 0.0))
        with atomic_path(paths["fsc"]) as tmp:
            pd.DataFrame(self.curve.as_table()).to_csv(tmp, index=False, float_format="%.6g")
        atomic_write_json(paths["summary"], self.summary())
        write_volume(paths["map"], self.map, self.voxel_size, origin=(0.0, 0.0, 0.0))  # last: marks completion
        return paths


# ------------------------------------------------------------------------------ helpers
def poses_from_table(df: pd.DataFrame, pixel_size, source=None, ignore_shifts: bool = False):
    """Rotation matrices (n, 3, 3) and origins in pixels (n, 2) from RELION columns."""
    missing = [c for c in ANGLES if c not in df.columns]
    if missing:
        raise InputError(source, f"missing pose column(s) {', '.join('_' + c for c in missing)}")
    ang = df[list(ANGLES)].to_numpy(np.float64)
    bad = ~np.isfinite(ang).all(axis=1)
    if bad.any():
        raise InputError(source, "non-finite Euler angle", row=int(np.flatnonzero(bad)[0]) + 1)
    R = euler_to_matrix(ang)
    if ignore_shifts or not all(c in df.columns for c in ORIGINS):
        origins = np.zeros((len(df), 2))
    else:
        origins = df[list(ORIGINS)].to_numpy(np.float64) / np.asarray(pixel_size, np.float64).reshape(-1, 1)
    return R, origins


def half_set_labels(df: pd.DataFrame, mode: str, seed: int, source=None) -> np.ndarray:
    """0/1 half-set label per particle: ``random`` (balanced, seeded) or ``star``
    (RELION's ``rlnRandomSubset`` 1/2)."""
    n = len(df)
    if mode == "star":
        if "rlnRandomSubset" not in df.columns:
            raise InputError(source, "half_sets: star needs the column _rlnRandomSubset")
        lab = df["rlnRandomSubset"].to_numpy(np.int64) - 1
        if not np.isin(lab, (0, 1)).all():
            raise InputError(source, "_rlnRandomSubset must be 1 or 2", row=int(np.flatnonzero(~np.isin(lab, (0, 1)))[0]) + 1)
        return lab
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7EC0]))
    lab = np.zeros(n, np.int64)
    lab[rng.permutation(n)[n // 2:]] = 1
    return lab


def make_mask(settings: ReconstructSettings, average: np.ndarray, voxel_size: float,
              envelope: np.ndarray | None = None) -> tuple[np.ndarray | None, dict]:
    """The FSC mask and what was checked: ``auto`` masks are sanity-checked (volume fraction,
    the map's centre of mass and, with an ``envelope`` (the reference's density on the map's
    grid), the reference's density inside) and replaced by a soft sphere with a warning when
    they fail — a mask drawn around noise measures the FSC of noise."""
    box = average.shape[0]
    if settings.mask == "none":
        return None, {"kind": "none"}
    radius = settings.mask_radius if settings.mask_radius is not None else _sphere_radius(envelope, box, voxel_size)
    sphere = fscmod.spherical_mask(box, radius / voxel_size, settings.mask_edge / voxel_size)
    if settings.mask == "sphere":
        return sphere, {"kind": "sphere", "radius_A": radius}
    if settings.mask != "auto":
        raise ValueError(f"unknown mask mode {settings.mask!r}")
    m = fscmod.auto_mask(average, voxel_size, threshold=settings.mask_threshold, edge=settings.mask_edge)
    if settings.mask_radius is not None:  # never beyond the given sphere
        m = m * sphere
    check = mask_check(m, average, envelope)
    if check["problems"]:
        log.warning("automatic mask rejected (%s): a soft sphere of radius %.1f Å is used instead",
                    "; ".join(check["problems"]), radius)
        return sphere, {"kind": "sphere (automatic mask rejected)", "radius_A": radius, "auto_mask": check}
    return m, {"kind": "auto", **check}


def _sphere_radius(envelope: np.ndarray | None, box: int, voxel_size: float) -> float:
    """Radius (Å) of a sphere holding the reference (its density above 1 % of the maximum,
    plus 10 %), else 0.4 × the box."""
    if envelope is not None and envelope.max() > 0:
        g = np.indices(envelope.shape) - box // 2
        r = np.sqrt((g ** 2).sum(0))[envelope > 0.01 * envelope.max()]
        return float(min(1.1 * r.max() + 2, 0.5 * box - 1) * voxel_size)
    return 0.4 * box * voxel_size


def mask_check(mask: np.ndarray, average: np.ndarray, envelope: np.ndarray | None = None,
               max_fraction: float = 0.5, min_envelope: float = 0.9) -> dict:
    """Volume fraction of a mask, whether it holds the centre of mass of the map's positive
    density, and (with the reference's ``envelope``) the fraction of the reference's density
    inside it; ``problems`` lists what fails."""
    inside = mask > 0.5
    frac = float(inside.mean())
    pos = np.clip(average, 0, None)
    com = np.rint(np.array([(np.indices(pos.shape)[k] * pos).sum() for k in range(3)]) / max(pos.sum(), 1e-30))
    com = np.clip(com.astype(int), 0, np.array(mask.shape) - 1)
    out = {"volume_fraction": round(frac, 4), "holds_centre_of_mass": bool(inside[tuple(com)]), "problems": []}
    if frac > max_fraction:
        out["problems"].append(f"it covers {100 * frac:.0f} % of the box")
    if not out["holds_centre_of_mass"]:
        out["problems"].append("the map's centre of mass is outside it")
    if envelope is not None and envelope.sum() > 0:
        env = float((envelope * inside).sum() / envelope.sum())
        out["reference_density_inside"] = round(env, 4)
        if env < min_envelope:
            out["problems"].append(f"only {100 * env:.0f} % of the reference's density is inside it")
    return out


def map_sign(volume: np.ndarray, envelope: np.ndarray | None, source=None, voxel_size: float = 1.0,
             resolution: float = 10.0) -> dict:
    """Is the map positive where the molecule is? With the reference's ``envelope``: the
    correlation of the two, both low-passed to ``resolution`` Å (the sign is a low-resolution
    question; unfiltered, a map of a few hundred particles is mostly noise); else the mean of
    the map in the central sphere (radius a quarter of the box) against the rest. A negative
    map means an inverted contrast."""
    if envelope is not None and envelope.std() > 0:
        from scipy import ndimage

        sigma = max(resolution / voxel_size / (2 * np.pi) * np.sqrt(2 * np.log(2)) * 2, 0.5)
        a = ndimage.gaussian_filter(np.asarray(volume, np.float64), sigma)
        b = ndimage.gaussian_filter(np.asarray(envelope, np.float64), sigma)
        c = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
        out = {"correlation_with_reference": round(c, 4), "positive": c > 0}
    else:
        box = volume.shape[0]
        g = np.indices(volume.shape) - box // 2
        centre = (g ** 2).sum(0) <= (box / 4) ** 2
        diff = float(volume[centre].mean() - volume[~centre].mean())
        out = {"centre_minus_outside": diff, "positive": diff > 0}
    if not out["positive"]:
        log.warning("%s: the map is negative where the molecule is (%s): the contrast polarity is probably "
                    "inverted (data.invert_contrast)", source or "map", {k: v for k, v in out.items() if k != "positive"})
    return out


def fsc_regularisation(acc: FourierAccumulator, curve: fscmod.FSCCurve) -> np.ndarray:
    """Per-shell Wiener term ``<W>_shell / SNR(shell)`` (``SNR = 2 FSC / (1 − FSC)``, FSC of
    the half maps clipped to [0.001, 0.999]); beyond Nyquist the term is huge (those
    frequencies are zeroed). One value per shell for :meth:`FourierAccumulator.reconstruct`."""
    D = acc.box
    tot, cnt = acc.shell_weights(D // 2 + 2)
    mean_w = (tot / cnt.clamp(min=1)).cpu().numpy()
    f = np.clip(curve.fsc[: D // 2 + 1], 1e-3, 0.999)
    snr = np.append(2 * f / (1 - f), 1e-6)
    reg = mean_w / snr
    fallback = 0.01 * (tot.sum() / cnt.sum().clamp(min=1)).item()
    return np.where(reg > 0, reg, fallback if fallback > 0 else 1.0)


# ------------------------------------------------------------------------------ main
#: CTF state of an image: raw (CTF·F), phase flipped (|CTF|·F), CTF-premultiplied (CTF²·F)
CTF_RAW, CTF_FLIPPED, CTF_PREMULTIPLIED = 0, 1, 2


def ctf_states(df: pd.DataFrame, settings: ReconstructSettings) -> np.ndarray:
    """Per particle: the CTF state of its image, from RELION's per-particle (or optics-group)
    ``rlnCtfDataArePhaseFlipped`` and ``rlnCtfDataAreCtfPremultiplied``; ``reconstruct.ctf:
    phase_flipped`` declares every image flipped."""
    def flag(col):
        if col not in df.columns:
            return np.zeros(len(df), dtype=bool)
        return pd.to_numeric(df[col], errors="coerce").fillna(0).to_numpy() != 0

    state = np.where(flag("rlnCtfDataAreCtfPremultiplied"), CTF_PREMULTIPLIED,
                     np.where(flag("rlnCtfDataArePhaseFlipped"), CTF_FLIPPED, CTF_RAW))
    if settings.ctf == "phase_flipped":
        state[state == CTF_RAW] = CTF_FLIPPED
    return state.astype(np.int64)


def _particles(star, settings, indices, images, data_dir, pixel_size, ignore_shifts, seed):
    """The rows to reconstruct with their images, pixel size, poses and half-set labels."""
    source = star.path
    df = merged(star)
    if indices is not None:
        df = df.iloc[np.asarray(indices)]
    n = len(df)
    if n < 2:
        raise InputError(source, f"need at least 2 particles to reconstruct half maps, got {n}")
    if images is None:
        images = ParticleImages.from_star(star, data_dir=data_dir)
    rows = np.arange(len(star.particles)) if indices is None else np.asarray(indices)
    box = images.box
    if box % 2:
        raise InputError(source, f"odd image size {box}: box sizes must be even")
    if "rlnImageSize" in df.columns and pixel_size is None:
        sizes = df["rlnImageSize"].to_numpy(np.float64)
        if np.any(sizes != box):
            raise InputError(source, f"rlnImageSize {int(sizes[np.flatnonzero(sizes != box)[0]])} in the optics table "
                             f"differs from the image stacks' box {box}: the optics table does not describe the "
                             "images read (use the STAR file of the original-size particles, or give their "
                             "pixel size with --pixel-size)")
    if pixel_size is not None:
        px_all = np.full(n, float(pixel_size))
    else:
        px_all = pixel_sizes(star)
        px_all = px_all if indices is None else px_all[np.asarray(indices)]
    pix = float(np.median(px_all))
    if np.any(np.abs(px_all - pix) > 1e-3 * pix):
        raise InputError(source, "particles with different pixel sizes cannot be reconstructed together")
    R, origins = poses_from_table(df, px_all, source, ignore_shifts)
    labels = half_set_labels(df, settings.half_sets, seed, source)
    return df, images, rows, box, pix, R, origins, labels


def _accumulate(halves, images, rows, R, origins, labels, ctf_params, state, box, pix, settings, invert, device):
    """Insert every particle into its half set's accumulator, one batch of images at a time."""
    bs = max(1, int(settings.batch_size))
    n = len(rows)
    t_read = 0.0
    for s in progress(range(0, n, bs), total=(n + bs - 1) // bs, desc="reconstruct", unit="batch"):
        e = min(n, s + bs)
        tr = time.perf_counter()
        imgs = torch.from_numpy(images.read(rows[s:e])).to(device)
        if invert:
            imgs = -imgs
        t_read += time.perf_counter() - tr
        Rb = torch.as_tensor(R[s:e], dtype=torch.float32, device=device)
        ob = torch.as_tensor(origins[s:e], dtype=torch.float64, device=device)
        ctf = None
        if ctf_params is not None:
            from .core.ctf import compute_ctf

            ctf = compute_ctf(ctf_params[s:e], box, pix, device=device)
            flipped = torch.as_tensor(state[s:e] == CTF_FLIPPED, device=device)
            ctf = torch.where(flipped[:, None, None], ctf.abs(), ctf)
        premult = state[s:e] == CTF_PREMULTIPLIED
        lab = torch.as_tensor(labels[s:e], device=device)
        for h in (0, 1):
            sel = (lab == h).nonzero().squeeze(1)
            if sel.numel():
                halves[h].insert(imgs[sel], Rb[sel], ob[sel], None if ctf is None else ctf[sel],
                                 ctf_premultiplied=premult[sel.cpu().numpy()])
    return t_read


def reconstruct_star(star, settings: ReconstructSettings | None = None, seed: int = 0, data_dir=None,
                     ignore_shifts: bool = False, indices=None, pixel_size: float | None = None,
                     images: ParticleImages | None = None, invert: bool = False, ctf_state=None,
                     envelope: np.ndarray | None = None) -> Reconstruction:
    """Reconstruct the particles of ``star`` (a StarData) with half maps and FSC.

    ``indices``: optional subset of rows. ``ignore_shifts``: treat all origins as 0 (for data
    whose STAR lists shifts the images do not carry). ``pixel_size``: the pixel size (Å) of
    the images read, overriding the optics table (e.g. when the table describes downscaled
    copies of the stacks named in ``rlnImageName``); the optics' ``rlnImageSize`` is then not
    checked. ``images``: read the particles from these images (one per STAR row) instead of
    ``rlnImageName`` — e.g. :func:`deephemnma.preprocess.original_images` (give ``pixel_size``).
    ``invert``: negate the images (dark particles). ``ctf_state``: the CTF state of each row's
    image (0 raw, 1 phase flipped, 2 premultiplied; default: from the STAR's flags).
    ``envelope``: the reference's density on the map's grid, for the mask and sign checks.
    On the CPU the computation runs on one thread: the maps are the same bytes whatever the
    thread count."""
    settings = settings or ReconstructSettings()
    device = settings.torch_device()
    with one_torch_thread() if device.type == "cpu" else contextlib.nullcontext():
        return _reconstruct(star, settings, seed, data_dir, ignore_shifts, indices, pixel_size, images, invert,
                            ctf_state, envelope, device)


def _reconstruct(star, settings, seed, data_dir, ignore_shifts, indices, pixel_size, images, invert, ctf_state,
                 envelope, device) -> Reconstruction:
    t0 = time.perf_counter()
    source = star.path
    df, images, rows, box, pix, R, origins, labels = _particles(star, settings, indices, images, data_dir,
                                                                pixel_size, ignore_shifts, seed)
    n = len(df)
    ctf_params, state = None, np.zeros(n, dtype=np.int64)
    if settings.ctf != "none":
        from .core.ctf import CTFParams

        missing = [c for c in CTF_COLUMNS if c not in df.columns]
        if missing:
            raise InputError(source, f"missing CTF column(s) {', '.join('_' + c for c in missing)} "
                             "(set reconstruct.ctf: none for data without CTF)")
        ctf_params = CTFParams.from_table(df, source)
        state = ctf_states(df, settings) if ctf_state is None else np.asarray(ctf_state, dtype=np.int64).reshape(-1)
    dtype = torch.float64 if settings.precision == "float64" else torch.float32
    halves = [FourierAccumulator(box, settings.oversample, device=device, dtype=dtype,
                                 interpolation=settings.interpolation) for _ in range(2)]
    log.info("reconstructing %d particles (box %d, %.4g Å/px, CTF %s: %s; %s interpolation ×%d%s) on %s",
             n, box, pix, settings.ctf, _state_counts(state), settings.interpolation, settings.oversample,
             ", images negated" if invert else "", device)
    t_loop = time.perf_counter()
    t_read = _accumulate(halves, images, rows, R, origins, labels, ctf_params, state, box, pix, settings, invert, device)
    t_loop = time.perf_counter() - t_loop
    n_half = (halves[0].count, halves[1].count)
    half_maps = [acc.reconstruct(settings.reg_fraction * acc.mean_weight()).cpu().numpy() for acc in halves]
    unmasked = fscmod.fsc(half_maps[0], half_maps[1], pix)
    average = 0.5 * (half_maps[0] + half_maps[1])
    mask, mask_info = make_mask(settings, average, pix, envelope)
    curve = unmasked if mask is None else fscmod.masked_fsc(half_maps[0], half_maps[1], mask, pix, seed)
    full = halves[0]
    full.merge(halves[1])  # the half maps are done: sum in place
    del halves
    reg = fsc_regularisation(full, unmasked) if settings.regularisation == "fsc" else \
        settings.reg_fraction * full.mean_weight()
    volume = full.reconstruct(reg).cpu().numpy()
    seconds = time.perf_counter() - t0
    rec = Reconstruction(map=volume, half1=half_maps[0], half2=half_maps[1], voxel_size=pix, curve=curve,
                         mask=mask, n_particles=n, n_half=n_half, settings=settings, seconds=seconds,
                         info={"read_seconds": round(t_read, 3), "insert_seconds": round(t_loop, 3),
                               "finish_seconds": round(seconds - t_loop, 3), "device": str(device),
                               "ignore_shifts": ignore_shifts, "images_negated": bool(invert),
                               "ctf_states": _state_counts(state), "mask": mask_info,
                               "sign": map_sign(volume, envelope, source, pix)})
    log.info("reconstructed %d particles in %.1f s: FSC 0.143 at %.2f Å, 0.5 at %.2f Å%s", n, seconds,
             rec.resolution_0143, rec.resolution_05, " (masked, corrected)" if mask is not None else "")
    return rec


def _state_counts(state: np.ndarray) -> dict:
    names = {CTF_RAW: "raw", CTF_FLIPPED: "phase_flipped", CTF_PREMULTIPLIED: "premultiplied"}
    return {names[int(k)]: int(v) for k, v in zip(*np.unique(state, return_counts=True))}
