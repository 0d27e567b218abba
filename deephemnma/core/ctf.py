"""The contrast transfer function, RELION's model and column names — one definition.

Parameters (RELION columns, units):

===========================  ===========================  =====================
``_rlnDefocusU``/``V``        defocus, positive = underfocus  Å
``_rlnDefocusAngle``          astigmatism angle               degrees
``_rlnVoltage``               acceleration voltage            kV
``_rlnSphericalAberration``   Cs                              mm
``_rlnAmplitudeContrast``     Q0                              fraction
``_rlnPhaseShift``            phase-plate shift (optional)    degrees
``_rlnCtfBfactor``            envelope B-factor (optional)    Å²
``_rlnCtfScalefactor``        scale (optional)                —
===========================  ===========================  =====================

As in RELION's ``CTF::getCTF``, with spatial frequency (kx, ky) in 1/Å, u² = kx² + ky²::

    λ  = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))            (V in volts, λ in Å)
    Δf = −[(DfU + DfV)/2 + (DfU − DfV)/2 · cos(2 (atan2(ky, kx) − angle))]
    χ  = π λ Δf u² + (π/2) Cs λ³ u⁴ − phase_shift − atan(Q0 / sqrt(1 − Q0²))
    CTF = −sin(χ) · exp(−B u² / 4) · scale

so CTF(0) = +sin(atan(Q0/√(1−Q0²))) ≈ Q0 > 0 (RELION's sign: positive at low frequency).
Images are modulated by multiplying their Fourier transform by the CTF. Frequencies follow
numpy's FFT layout of images indexed [y, x]: axis −2 is ky, axis −1 is kx (``rfft2`` half
plane by default).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from . import star as _star

#: CTFParams field → RELION column (names defined once, in :mod:`deephemnma.core.star`)
COLUMNS = {
    "defocus_u": _star.DEFOCUS_U,
    "defocus_v": _star.DEFOCUS_V,
    "defocus_angle": _star.DEFOCUS_ANGLE,
    "voltage": _star.VOLTAGE,
    "cs": _star.SPHERICAL_ABERRATION,
    "amp_contrast": _star.AMPLITUDE_CONTRAST,
    "phase_shift": _star.PHASE_SHIFT,
    "bfactor": _star.CTF_BFACTOR,
    "scale": _star.CTF_SCALEFACTOR,
}
REQUIRED = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amp_contrast")
assert tuple(COLUMNS[k] for k in REQUIRED) == _star.CTF_COLUMNS
OPTIONAL_DEFAULTS = {"phase_shift": 0.0, "bfactor": 0.0, "scale": 1.0}


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


@dataclass
class CTFParams:
    """Per-particle CTF parameters (1-D arrays of equal length, RELION units)."""

    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    voltage: np.ndarray
    cs: np.ndarray
    amp_contrast: np.ndarray
    phase_shift: np.ndarray
    bfactor: np.ndarray
    scale: np.ndarray

    def __post_init__(self):
        arrays = [np.atleast_1d(np.asarray(getattr(self, f.name), dtype=np.float64)) for f in fields(self)]
        n = max(a.shape[0] for a in arrays)
        for f, a in zip(fields(self), arrays):
            setattr(self, f.name, np.broadcast_to(a, (n,)).copy())

    def __len__(self) -> int:
        return self.defocus_u.shape[0]

    def __getitem__(self, idx) -> "CTFParams":
        return CTFParams(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @classmethod
    def from_table(cls, table, source=None) -> "CTFParams":
        """From a per-particle table (optics merged in) with RELION column names.

        Missing required columns raise :class:`~deephemnma.core.errors.InputError` naming ``source``.
        """
        from .errors import InputError

        missing = ["_" + COLUMNS[k] for k in REQUIRED if COLUMNS[k] not in table.columns]
        if missing:
            raise InputError(source, f"missing CTF column(s) {', '.join(missing)}")
        values = {}
        for key, col in COLUMNS.items():
            if col in table.columns:
                values[key] = table[col].to_numpy(dtype=np.float64)
            else:
                values[key] = np.full(len(table), OPTIONAL_DEFAULTS[key])
        bad = ~np.isfinite(np.stack(list(values.values()))).all(axis=0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(source, "non-finite CTF parameter", row=row + 1)
        return cls(**values)

    def to_columns(self) -> dict:
        """RELION column name → values (for writing STAR files)."""
        return {COLUMNS[f.name]: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def constant(cls, n: int, defocus: float, voltage: float = 300.0, cs: float = 2.7, amp_contrast: float = 0.1,
                 astigmatism: float = 0.0, angle: float = 0.0, phase_shift: float = 0.0, bfactor: float = 0.0) -> "CTFParams":
        return cls(defocus + astigmatism / 2, defocus - astigmatism / 2, angle, voltage, cs, amp_contrast,
                   phase_shift, bfactor, 1.0)


def frequency_grid(box: int, pixel_size: float, rfft: bool = True, device=None, dtype=torch.float32):
    """(ky, kx) in 1/Å for an image of ``box``² pixels, in numpy FFT order ([y, x] images)."""
    ky = torch.fft.fftfreq(box, d=pixel_size, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(box, d=pixel_size, device=device, dtype=dtype) if rfft else ky
    return torch.meshgrid(ky, kx, indexing="ij")


def compute_ctf(params: CTFParams, box: int, pixel_size: float, rfft: bool = True, device=None,
                dtype=torch.float32) -> torch.Tensor:
    """CTF images ``(n, box, box//2+1)`` (or ``(n, box, box)`` with ``rfft=False``) for each particle."""
    ky, kx = frequency_grid(box, pixel_size, rfft, device, torch.float64)

    def col(a):
        return torch.as_tensor(np.asarray(a, dtype=np.float64), device=device)[:, None, None]

    lam = col(electron_wavelength(params.voltage))
    cs_a = col(params.cs * 1e7)
    q0 = col(params.amp_contrast)
    u2 = kx * kx + ky * ky
    angle = torch.atan2(ky, kx) - torch.deg2rad(col(params.defocus_angle))
    dfu, dfv = col(params.defocus_u), col(params.defocus_v)
    deltaf = -((dfu + dfv) / 2 + (dfu - dfv) / 2 * torch.cos(2 * angle))
    chi = (torch.pi * lam * deltaf * u2 + torch.pi / 2 * cs_a * lam ** 3 * u2 * u2
           - torch.deg2rad(col(params.phase_shift)) - torch.atan(q0 / torch.sqrt(1 - q0 * q0)))
    ctf = -torch.sin(chi)
    bf = col(params.bfactor)
    if torch.any(bf != 0):
        ctf = ctf * torch.exp(-bf / 4 * u2)
    ctf = ctf * col(params.scale)
    return ctf.to(dtype)


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Modulate real images (n, box, box) by rfft-layout CTFs (n, box, box//2+1)."""
    box = images.shape[-1]
    return torch.fft.irfft2(torch.fft.rfft2(images) * ctf, s=(images.shape[-2], box))


def phase_flip(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Multiply each image's Fourier transform by sign(CTF) (rfft layout)."""
    return apply_ctf(images, torch.sign(ctf))


def wiener_filter(images: torch.Tensor, ctf: torch.Tensor, snr: float = 1.0) -> torch.Tensor:
    """Wiener-corrected images: F · CTF / (CTF² + 1/snr) (rfft layout)."""
    return apply_ctf(images, ctf / (ctf * ctf + 1.0 / snr))
