"""An independent particle simulator for tests and measurements of the polarity detector.

Nothing here uses the package (no ``deephemnma`` import): the PDB is parsed by hand, atoms are
projected directly as separable 2-D Gaussians (no volume, no Fourier slice), and the CTF is
written afresh from RELION's formula (``CTF::getCTF``) in numpy on the full ``fft2`` grid:

    λ   = 12.2643247 / sqrt(V · (1 + 0.978466e-6 · V))          (Å, V in volts)
    Δf(θ) = DfU · cos²(θ − φ) + DfV · sin²(θ − φ)                (underfocus positive, θ = atan2(ky, kx))
    γ   = π λ Δf u² − (π/2) Cs λ³ u⁴ + phase_shift + asin(Q0)
    CTF = sin(γ) · exp(−B u² / 4)

(the same function as RELION's ``−sin(K1·deltaf·u² + K2·u⁴ − K5 − K3)`` with deltaf = −Δf,
K3 = atan(Q0/√(1−Q0²)) = asin(Q0); written in this form on purpose, so that the cross-check
with :mod:`deephemnma.core.ctf` compares two derivations, not one copied twice).

Conventions (DESIGN.md §3): RELION ZYZ Euler angles; an atom at r (Å, from the box centre)
lands at (A·r)[x, y]; image centre is pixel D//2; ``rlnOriginXAngst/YAngst`` is the shift
that re-centres the particle (the particle centre sits at image centre − origin).

A particle image (``polarity="white"``, protein positive, RELION's convention after
extraction)::

    clean = crop_D( IFFT( CTF · FFT( pad_2D( project(atoms, A, shift) ) ) ) )
    (the CTF acts in a box padded twice, so its delocalised fringes leave the D² box)
    image = clean + noise,   noise ~ N(0, σ²) white,  σ² = mean_i var(clean_i) / SNR

(SNR: variance of the signal over the whole D² box / noise variance), then optionally
phase flipped (FFT · sign(CTF) at the D² box, as RELION/preprocess do) and normalised like
RELION's extraction (background outside 0.9·D/2: mean 0, std 1). ``polarity="dark"``
negates the signal (raw micrograph convention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

def _shared_data() -> Path:
    import os

    for cand in (os.environ.get("DEEPHEMNMA_SHARED_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data",
                 "/work/shared/data"):
        if cand and (Path(cand) / "adenylate_kinase" / "4ake.pdb").is_file():
            return Path(cand)
    return Path("/work/shared/data")


AK_PDB = _shared_data() / "adenylate_kinase" / "4ake.pdb"
ATOMIC_NUMBER = {"H": 1, "C": 6, "N": 7, "O": 8, "P": 15, "S": 16}


# ------------------------------------------------------------------------------- atoms
def read_pdb_atoms(path=AK_PDB, chain: str = "A") -> tuple[np.ndarray, np.ndarray]:
    """(coords (N, 3) Å, weights (N,) = atomic number) of the heavy atoms of one chain,
    first model, first alternate location; parsed by hand from the fixed columns."""
    xyz, w = [], []
    for line in Path(path).read_text().splitlines():
        if line.startswith("ENDMDL"):
            break
        if not line.startswith(("ATOM  ", "HETATM")) or line[21] != chain:
            continue
        if line[16] not in (" ", "A"):
            continue
        if line.startswith("HETATM") and line[17:20] == "HOH":
            continue
        el = line[76:78].strip().upper() or line[12:14].strip().upper()
        if el == "H":
            continue
        xyz.append((float(line[30:38]), float(line[38:46]), float(line[46:54])))
        w.append(ATOMIC_NUMBER.get(el.capitalize() if len(el) > 1 else el, 6))
    return np.asarray(xyz, dtype=np.float64), np.asarray(w, dtype=np.float64)


def centred(coords: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return coords - (weights[:, None] * coords).sum(0) / weights.sum()


# ------------------------------------------------------------------------------- rotations
def euler_matrix(rot: float, tilt: float, psi: float) -> np.ndarray:
    """RELION's Euler_angles2matrix (degrees in), as a product of elementary rotations:
    A = Rz(psi) · Ry(tilt) · Rz(rot) with Rz(a) = [[c, s, 0], [−s, c, 0], [0, 0, 1]] and
    Ry(b) = [[c, 0, −s], [0, 1, 0], [s, 0, c]] (passive, as in Xmipp/RELION)."""
    def rz(a):
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])

    def ry(b):
        c, s = math.cos(b), math.sin(b)
        return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])

    return rz(math.radians(psi)) @ ry(math.radians(tilt)) @ rz(math.radians(rot))


def random_eulers(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform on SO(3): rot, psi uniform, cos(tilt) uniform (degrees, (n, 3))."""
    rot = rng.uniform(-180, 180, n)
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    psi = rng.uniform(-180, 180, n)
    return np.stack([rot, tilt, psi], 1)


# ------------------------------------------------------------------------------- projection
def project_atoms(coords: np.ndarray, weights: np.ndarray, A: np.ndarray, box: int, pixel_size: float,
                  sigma: float = 1.5, centre_shift_px=(0.0, 0.0)) -> np.ndarray:
    """Line integral along z of Gaussian atoms rotated by A, sampled at pixel centres.

    Separable: image[y, x] = Σ_j w_j g(y − y_j) g(x − x_j) (unit-integral 2-D Gaussian).
    ``centre_shift_px`` (dx, dy): the particle centre sits at pixel (D//2 + dx, D//2 + dy)."""
    r = coords @ A.T                                   # (N, 3): A·r for each atom
    c = box // 2
    xj = r[:, 0] / pixel_size + c + centre_shift_px[0]
    yj = r[:, 1] / pixel_size + c + centre_shift_px[1]
    s = sigma / pixel_size
    grid = np.arange(box, dtype=np.float64)
    gx = np.exp(-0.5 * ((grid[None, :] - xj[:, None]) / s) ** 2)    # (N, box)
    gy = np.exp(-0.5 * ((grid[None, :] - yj[:, None]) / s) ** 2)
    return (gy * weights[:, None]).T @ gx / (2 * math.pi * s * s)      # [y, x]


def rasterise_volume(coords: np.ndarray, weights: np.ndarray, box: int, voxel_size: float,
                     sigma: float = 1.5) -> np.ndarray:
    """Gaussian atoms on a box³ grid [z, y, x] centred at voxel box//2 (separable)."""
    c = box // 2
    g = np.arange(box, dtype=np.float64)
    s = sigma / voxel_size

    def prof(v):
        return np.exp(-0.5 * ((g[None, :] - (v[:, None] / voxel_size + c)) / s) ** 2)

    gx, gy, gz = prof(coords[:, 0]), prof(coords[:, 1]), prof(coords[:, 2])
    vol = np.einsum("nz,ny,nx->zyx", gz * weights[:, None], gy, gx, optimize=True)
    return vol / ((2 * math.pi) ** 1.5 * s ** 3)


# ------------------------------------------------------------------------------- CTF
def wavelength(voltage_kv: float) -> float:
    v = voltage_kv * 1000.0
    return 12.2643247 / math.sqrt(v * (1.0 + 0.978466e-6 * v))


def ctf_2d(box: int, pixel_size: float, defocus_u: float, defocus_v: float, defocus_angle: float,
           voltage: float = 300.0, cs: float = 2.7, amp_contrast: float = 0.1, phase_shift: float = 0.0,
           bfactor: float = 0.0) -> np.ndarray:
    """RELION's CTF on the full fft2 grid (box, box) of an image indexed [y, x] (see module doc)."""
    f = np.fft.fftfreq(box, d=pixel_size)
    kx, ky = np.meshgrid(f, f, indexing="xy")             # kx varies along axis 1 (x)
    u2 = kx * kx + ky * ky
    theta = np.arctan2(ky, kx) - math.radians(defocus_angle)
    df = defocus_u * np.cos(theta) ** 2 + defocus_v * np.sin(theta) ** 2
    lam = wavelength(voltage)
    gamma = (math.pi * lam * df * u2 - 0.5 * math.pi * (cs * 1e7) * lam ** 3 * u2 * u2
             + math.radians(phase_shift) + math.asin(amp_contrast))
    return np.sin(gamma) * np.exp(-bfactor * u2 / 4.0)


def fourier_filter(images: np.ndarray, filt: np.ndarray) -> np.ndarray:
    return np.real(np.fft.ifft2(np.fft.fft2(images) * filt))


def normalise_background(images: np.ndarray, radius_frac: float = 0.9) -> np.ndarray:
    box = images.shape[-1]
    g = np.arange(box) - box // 2
    outside = (g[None, :] ** 2 + g[:, None] ** 2) > (radius_frac * box / 2) ** 2
    bg = images[..., outside]
    return (images - bg.mean(-1)[..., None, None]) / bg.std(-1)[..., None, None]


# ------------------------------------------------------------------------------- data sets
@dataclass
class SimSet:
    """A simulated particle set: images (n, D, D) float32 and per-particle parameters."""

    images: np.ndarray
    pixel_size: float
    ctf: dict                      # RELION CTF parameters, arrays (n,) (voltage, cs, amp_contrast scalars)
    eulers: np.ndarray             # (n, 3) degrees
    origins_angst: np.ndarray      # (n, 2) Å
    polarity: str
    phase_flipped: bool
    snr: float
    noise_sigma: float
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class CleanSet:
    """Noise-free CTF-modulated particles (white) and their parameters (see :func:`simulate_clean`)."""

    clean: np.ndarray              # (n, D, D) float64, CTF-modulated, protein positive
    pixel_size: float
    ctf: dict
    eulers: np.ndarray
    origins_angst: np.ndarray
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.clean)

    def ctf_images(self, box: int | None = None) -> np.ndarray:
        """The particles' CTFs (n, box, box) on the full fft2 grid (default: the image box)."""
        box = box or self.clean.shape[-1]
        c = self.ctf
        return np.stack([ctf_2d(box, self.pixel_size, c["defocus_u"][i], c["defocus_v"][i], c["defocus_angle"][i],
                                c["voltage"], c["cs"], c["amp_contrast"], c["phase_shift"], c["bfactor"])
                         for i in range(len(self))])


def simulate_clean(n: int = 300, box: int = 64, pixel_size: float = 1.3, defocus_range=(5000.0, 25000.0),
                   astigmatism_max: float = 500.0, max_shift_px: float = 3.0, voltage: float = 300.0,
                   cs: float = 2.7, amp_contrast: float = 0.1, phase_shift: float = 0.0, bfactor: float = 0.0,
                   atom_sigma: float = 1.5, pad: int = 2, seed: int = 0, atoms=None) -> CleanSet:
    """Noise-free particles: random uniform orientations, centre offsets uniform in
    ±``max_shift_px``, mean defocus uniform in ``defocus_range`` (Å), |U − V| uniform up to
    ``astigmatism_max``, random astigmatism angle; the CTF acts in a ``pad``× larger box."""
    rng = np.random.default_rng(seed)
    coords, weights = atoms if atoms is not None else read_pdb_atoms()
    coords = centred(coords, weights)
    eul = random_eulers(rng, n)
    shifts = rng.uniform(-max_shift_px, max_shift_px, (n, 2))        # particle centre offset (px)
    dmean = rng.uniform(*defocus_range, n)
    astig = rng.uniform(0, astigmatism_max, n)
    du, dv = dmean + astig / 2, dmean - astig / 2
    dang = rng.uniform(-180, 180, n)
    P = pad * box
    lo = (P - box) // 2
    clean = np.empty((n, box, box))
    for i in range(n):
        A = euler_matrix(*eul[i])
        proj = np.zeros((P, P))
        proj[lo:lo + box, lo:lo + box] = project_atoms(coords, weights, A, box, pixel_size, atom_sigma, shifts[i])
        c = ctf_2d(P, pixel_size, du[i], dv[i], dang[i], voltage, cs, amp_contrast, phase_shift, bfactor)
        clean[i] = fourier_filter(proj, c)[lo:lo + box, lo:lo + box]
    ctf = {"defocus_u": du, "defocus_v": dv, "defocus_angle": dang, "voltage": voltage, "cs": cs,
           "amp_contrast": amp_contrast, "phase_shift": phase_shift, "bfactor": bfactor}
    origins = -shifts * pixel_size          # the shift that re-centres the particle (Å)
    return CleanSet(clean, pixel_size, ctf, eul, origins,
                    {"box": box, "pad": pad, "atom_sigma": atom_sigma, "seed": seed,
                     "signal_variance": float(clean.var(axis=(1, 2)).mean())})


def add_noise(cs: CleanSet, snr: float, polarity: str = "white", phase_flipped: bool = False,
              premultiplied: bool = False, normalise: bool = True, signal_scale: float = 1.0,
              noise_filter=None, seed: int = 0) -> SimSet:
    """Noisy images from clean ones: signal · (±1 by ``polarity``) · ``signal_scale`` + white
    Gaussian noise of variance mean_i var(clean_i) / ``snr`` (optionally coloured by the
    Fourier filter ``noise_filter`` (D, D), rescaled to keep its variance); then phase
    flipped or CTF-premultiplied (at the D² box) and background-normalised if asked."""
    if polarity not in ("white", "dark"):
        raise ValueError("polarity must be 'white' or 'dark'")
    rng = np.random.default_rng(seed)
    sig_var = cs.info["signal_variance"]
    sigma = math.sqrt(sig_var / snr) if np.isfinite(snr) and snr > 0 else 0.0
    noise = rng.standard_normal(cs.clean.shape)
    if noise_filter is not None:
        noise = fourier_filter(noise, noise_filter)
        noise /= noise.std()
    sign = 1.0 if polarity == "white" else -1.0
    images = sign * signal_scale * cs.clean + sigma * noise
    if phase_flipped or premultiplied:
        c = cs.ctf_images()
        images = fourier_filter(images, c if premultiplied else np.sign(c))
    if normalise:
        images = normalise_background(images)
    return SimSet(images.astype(np.float32), cs.pixel_size, cs.ctf, cs.eulers, cs.origins_angst, polarity,
                  bool(phase_flipped), snr, sigma, {**cs.info, "premultiplied": bool(premultiplied)})


def simulate(n: int = 300, box: int = 64, pixel_size: float = 1.3, snr: float = 0.1, polarity: str = "white",
             phase_flipped: bool = False, premultiplied: bool = False, normalise: bool = True,
             signal_scale: float = 1.0, seed: int = 0, **clean_kw) -> SimSet:
    """:func:`simulate_clean` then :func:`add_noise` (``snr=inf``: clean images;
    ``signal_scale=0``: pure noise, σ from the would-be signal)."""
    cs = simulate_clean(n, box, pixel_size, seed=seed, **clean_kw)
    return add_noise(cs, snr, polarity, phase_flipped, premultiplied, normalise, signal_scale,
                     seed=seed + 7919)


def write_relion(sim: SimSet, star_path, stack_name: str = "particles.mrcs"):
    """Write a RELION 3.1 STAR (data_optics + data_particles) and an MRC stack beside it."""
    import mrcfile
    import pandas as pd
    import starfile

    star_path = Path(star_path)
    star_path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(star_path.parent / stack_name, overwrite=True) as m:
        m.set_data(sim.images.astype(np.float32))
        m.voxel_size = sim.pixel_size
        m.set_image_stack()
    n = len(sim)
    c = sim.ctf
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnAmplitudeContrast": [float(c["amp_contrast"])], "rlnSphericalAberration": [float(c["cs"])],
        "rlnVoltage": [float(c["voltage"])], "rlnImagePixelSize": [float(sim.pixel_size)],
        "rlnImageSize": [int(sim.images.shape[-1])], "rlnImageDimensionality": [2],
        "rlnCtfDataArePhaseFlipped": [int(sim.phase_flipped)],
    })
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(n)],
        "rlnDefocusU": c["defocus_u"], "rlnDefocusV": c["defocus_v"], "rlnDefocusAngle": c["defocus_angle"],
        "rlnPhaseShift": np.full(n, float(c["phase_shift"])),
        "rlnAngleRot": sim.eulers[:, 0], "rlnAngleTilt": sim.eulers[:, 1], "rlnAnglePsi": sim.eulers[:, 2],
        "rlnOriginXAngst": sim.origins_angst[:, 0], "rlnOriginYAngst": sim.origins_angst[:, 1],
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
    })
    starfile.write({"optics": optics, "particles": parts}, star_path, overwrite=True)
    return star_path
