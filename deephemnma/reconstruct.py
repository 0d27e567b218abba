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


def make_mask(settings: ReconstructSettings, average: np.ndarray, voxel_size: float) -> np.ndarray | None:
    box = average.shape[0]
    if settings.mask == "none":
        return None
    if settings.mask == "sphere":
        radius = settings.mask_radius if settings.mask_radius is not None else 0.4 * box * voxel_size
        return fscmod.spherical_mask(box, radius / voxel_size, settings.mask_edge / voxel_size)
    if settings.mask == "auto":
        m = fscmod.auto_mask(average, voxel_size, threshold=settings.mask_threshold, edge=settings.mask_edge)
        if settings.mask_radius is not None:  # never beyond the given sphere
            m = m * fscmod.spherical_mask(box, settings.mask_radius / voxel_size, settings.mask_edge / voxel_size)
        return m
    raise ValueError(f"unknown mask mode {settings.mask!r}")


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
def reconstruct_star(star, settings: ReconstructSettings | None = None, seed: int = 0, data_dir=None,
                     ignore_shifts: bool = False, indices=None, pixel_size: float | None = None,
                     images: ParticleImages | None = None) -> Reconstruction:
    """Reconstruct the particles of ``star`` (a StarData) with half maps and FSC.

    ``indices``: optional subset of rows. ``ignore_shifts``: treat all origins as 0 (for data
    whose STAR lists shifts the images do not carry). ``pixel_size``: the pixel size (Å) of
    the images read, overriding the optics table (e.g. when the table describes downscaled
    copies of the stacks named in ``rlnImageName``); the optics' ``rlnImageSize`` is then not
    checked. ``images``: read the particles from these images (one per STAR row) instead of
    ``rlnImageName`` — e.g. :func:`deephemnma.preprocess.original_images` (give ``pixel_size``)."""
    settings = settings or ReconstructSettings()
    t0 = time.perf_counter()
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

    use_ctf = settings.ctf != "none"
    premult = False
    ctf_params = None
    if use_ctf:
        from .core.ctf import CTFParams

        missing = [c for c in CTF_COLUMNS if c not in df.columns]
        if missing:
            raise InputError(source, f"missing CTF column(s) {', '.join('_' + c for c in missing)} "
                             "(set reconstruct.ctf: none for data without CTF)")
        ctf_params = CTFParams.from_table(df, source)
        if "rlnCtfDataAreCtfPremultiplied" in df.columns:
            premult = bool(np.any(df["rlnCtfDataAreCtfPremultiplied"].to_numpy() == 1))

    device = settings.torch_device()
    dtype = torch.float64 if settings.precision == "float64" else torch.float32
    halves = [FourierAccumulator(box, settings.oversample, device=device, dtype=dtype,
                                 interpolation=settings.interpolation) for _ in range(2)]
    bs = max(1, int(settings.batch_size))
    log.info("reconstructing %d particles (box %d, %.4g Å/px, CTF %s, %s interpolation ×%d) on %s",
             n, box, pix, settings.ctf, settings.interpolation, settings.oversample, device)
    t_read = 0.0
    t_loop = time.perf_counter()
    for s in progress(range(0, n, bs), total=(n + bs - 1) // bs, desc="reconstruct", unit="batch"):
        e = min(n, s + bs)
        tr = time.perf_counter()
        imgs = torch.from_numpy(images.read(rows[s:e])).to(device)
        t_read += time.perf_counter() - tr
        Rb = torch.as_tensor(R[s:e], dtype=torch.float32, device=device)
        ob = torch.as_tensor(origins[s:e], dtype=torch.float64, device=device)
        ctf = None
        if use_ctf:
            from .core.ctf import compute_ctf

            ctf = compute_ctf(ctf_params[s:e], box, pix, device=device)
            if settings.ctf == "phase_flipped":
                ctf = ctf.abs()
        lab = torch.as_tensor(labels[s:e], device=device)
        for h in (0, 1):
            sel = (lab == h).nonzero().squeeze(1)
            if sel.numel():
                halves[h].insert(imgs[sel], Rb[sel], ob[sel], None if ctf is None else ctf[sel],
                                 ctf_premultiplied=premult)
    t_loop = time.perf_counter() - t_loop
    n_half = (halves[0].count, halves[1].count)

    half_maps = [acc.reconstruct(settings.reg_fraction * acc.mean_weight()).cpu().numpy() for acc in halves]
    unmasked = fscmod.fsc(half_maps[0], half_maps[1], pix)
    average = 0.5 * (half_maps[0] + half_maps[1])
    mask = make_mask(settings, average, pix)
    curve = unmasked if mask is None else fscmod.masked_fsc(half_maps[0], half_maps[1], mask, pix, seed)

    full = halves[0]
    full.merge(halves[1])  # the half maps are done: sum in place
    del halves
    if settings.regularisation == "fsc":
        reg = fsc_regularisation(full, unmasked)
    else:
        reg = settings.reg_fraction * full.mean_weight()
    volume = full.reconstruct(reg).cpu().numpy()
    seconds = time.perf_counter() - t0
    rec = Reconstruction(map=volume, half1=half_maps[0], half2=half_maps[1], voxel_size=pix, curve=curve,
                         mask=mask, n_particles=n, n_half=n_half, settings=settings, seconds=seconds,
                         info={"read_seconds": round(t_read, 3), "insert_seconds": round(t_loop, 3),
                               "finish_seconds": round(seconds - t_loop, 3), "device": str(device), "ignore_shifts": ignore_shifts})
    log.info("reconstructed %d particles in %.1f s: FSC 0.143 at %.2f Å, 0.5 at %.2f Å%s", n, seconds,
             rec.resolution_0143, rec.resolution_05, " (masked, corrected)" if mask is not None else "")
    return rec
