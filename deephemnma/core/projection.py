"""Forward models shared by simulation, alignment and reconstruction (torch, batched).

Conventions (see :mod:`deephemnma.core.geometry`): images are ``[y, x]``, volumes ``[z, y, x]``;
the centre of an image or volume of even size ``D`` is the pixel ``D // 2`` on each axis; an
atom at ``r`` (Å, relative to the centre) lands at ``(A·r)[x, y]``; the image is the
integral along z of the rotated volume; ``F_img(k) = F_vol(Aᵀ·[kx, ky, 0])``.

Shifts follow RELION's ``_rlnOriginX/YAngst``: the particle's centre sits at
``image centre − origin``, so a projector given ``origins`` (in PIXELS: origin in Å divided
by the pixel size) draws the particle translated by ``−origin``, and shifting an image by
``+origin`` re-centres it (:func:`recenter`).

* :class:`FourierSliceProjector` — a voxel volume projected by the Fourier-slice theorem
  (oversampled volume transform, trilinear interpolation, gridding pre-correction).
* :class:`FourierAccumulator` — its adjoint (back-projection into Fourier space with
  trilinear weights) and a Wiener-style direct Fourier inversion.
* :func:`project_gaussians` — atoms as 3-D Gaussians projected analytically: a rotated 3-D
  Gaussian projects to a 2-D Gaussian, and the image is separable
  ``I = Gyᵀ · diag(w) · Gx``, one batched matrix product.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _as_tensor(x, dtype=torch.float32, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype=dtype, device=device if device is not None else x.device)
    return torch.as_tensor(x, dtype=dtype, device=device)


# ---------------------------------------------------------------------------- shifts
def fourier_shift(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate image content by ``shifts`` (…, 2) = (dx, dy) pixels: ``out(p) = in(p − s)``.

    Sub-pixel shifts by a Fourier phase ramp (periodic boundary).
    """
    ny, nx = images.shape[-2:]
    shifts = _as_tensor(shifts, torch.float64, images.device)
    ky = torch.fft.fftfreq(ny, device=images.device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(nx, device=images.device, dtype=torch.float64)
    phase = -2 * math.pi * (kx * shifts[..., 0, None, None] + ky[:, None] * shifts[..., 1, None, None])
    ramp = torch.polar(torch.ones_like(phase), phase).to(torch.complex64 if images.dtype != torch.float64 else torch.complex128)
    return torch.fft.irfft2(torch.fft.rfft2(images) * ramp, s=(ny, nx))


def recenter(images: torch.Tensor, origins_px: torch.Tensor) -> torch.Tensor:
    """Re-centre particles given their RELION origins in pixels (shift by +origin)."""
    return fourier_shift(images, origins_px)


def _shift_ramp_rfft(box_y: int, box_x: int, translation: torch.Tensor, device, sampling: int = 1) -> torch.Tensor:
    """exp(−2πi k·t) on the rfft grid of a (box_y, box_x) image; t in pixels of that grid."""
    ky = torch.fft.fftfreq(box_y, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(box_x, device=device, dtype=torch.float64)
    t = translation.to(torch.float64)
    phase = -2 * math.pi * (kx * t[:, 0, None, None] + ky[:, None] * t[:, 1, None, None])
    return torch.polar(torch.ones_like(phase), phase)


# --------------------------------------------------------------------- helpers (grid)
def _sinc2_correction(size: int, padded: int, device, dtype=torch.float64) -> torch.Tensor:
    """Per-axis real-space attenuation of trilinear interpolation on a grid of ``padded``
    samples: sinc²((i − c)/padded) for the ``size`` central samples (c = size // 2)."""
    r = (torch.arange(size, device=device, dtype=dtype) - size // 2) / padded
    return torch.special.sinc(r) ** 2


def _centered_fftn(vol: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(vol)))


def _pad_center(vol: torch.Tensor, size: int) -> torch.Tensor:
    d = vol.shape[-1]
    if size == d:
        return vol
    out = vol.new_zeros((size,) * vol.dim())
    o = size // 2 - d // 2
    sl = tuple(slice(o, o + d) for _ in range(vol.dim()))
    out[sl] = vol
    return out


def _crop_center(vol: torch.Tensor, size: int) -> torch.Tensor:
    p = vol.shape[-1]
    if size == p:
        return vol
    o = p // 2 - size // 2
    sl = (Ellipsis,) + tuple(slice(o, o + size) for _ in range(3))
    return vol[sl]


def _slice_coords(box: int, rotations: torch.Tensor, full_y: bool = True) -> torch.Tensor:
    """3-D frequency coordinates (B, box, box//2+1, 3) = kx·A[0] + ky·A[1] in units of 1/box,
    on the rfft grid of a box² image (ky in fftfreq order)."""
    dev = rotations.device
    ky = torch.fft.fftfreq(box, d=1.0 / box, device=dev, dtype=rotations.dtype)  # integers −box/2 … box/2−1
    kx = torch.arange(box // 2 + 1, device=dev, dtype=rotations.dtype)
    return kx[None, None, :, None] * rotations[:, None, None, 0, :] + ky[None, :, None, None] * rotations[:, None, None, 1, :]


# ------------------------------------------------------------------ Fourier slice
class FourierSliceProjector:
    """Project a voxel volume (D³, [z, y, x]) into D² images by the Fourier-slice theorem.

    The volume is zero-padded ``oversample`` times, pre-divided by the sinc² of trilinear
    interpolation (gridding correction) and Fourier transformed once; each projection
    samples a central slice by trilinear interpolation (``grid_sample``) on the rfft half
    plane and returns to real space. ``project(rotations, origins_px=None, ctf=None)``.
    """

    def __init__(self, volume, oversample: int = 2, device=None):
        vol = _as_tensor(volume, torch.float64, device)
        if vol.dim() != 3 or len(set(vol.shape)) != 1:
            raise ValueError(f"volume must be a cube, got shape {tuple(vol.shape)}")
        self.box = vol.shape[0]
        self.oversample = int(oversample)
        self.padded = self.box * self.oversample
        c = _sinc2_correction(self.box, self.padded, vol.device)
        vol = vol / (c[:, None, None] * c[None, :, None] * c[None, None, :])
        ft = _centered_fftn(_pad_center(vol, self.padded))
        # (1, 2, P, P, P) real/imag channels for grid_sample
        self._ft = torch.stack([ft.real, ft.imag]).to(torch.float32)[None].contiguous()
        self.device = vol.device

    def slices(self, rotations) -> torch.Tensor:
        """Central slices (B, D, D//2+1) complex, rfft layout, phase referenced to the image centre."""
        R = _as_tensor(rotations, torch.float32, self.device)
        if R.dim() == 2:
            R = R[None]
        k3 = _slice_coords(self.box, R) * self.oversample  # padded-grid offsets from centre
        P = self.padded
        grid = (k3 + P // 2) / (P - 1) * 2 - 1  # align_corners=True normalisation, (x, y, z) order
        out = F.grid_sample(self._ft, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)
        return torch.complex(out[0, 0], out[0, 1])

    def project(self, rotations, origins_px=None, ctf=None) -> torch.Tensor:
        """Images (B, D, D) float32. ``origins_px``: RELION origins in pixels (B, 2);
        ``ctf``: (B, D, D//2+1) rfft-layout CTF (see :func:`deephemnma.core.ctf.compute_ctf`)."""
        S = self.slices(rotations)
        return slices_to_images(S, self.box, origins_px, ctf)


def slices_to_images(slices: torch.Tensor, box: int, origins_px=None, ctf=None) -> torch.Tensor:
    """rfft-layout, centre-referenced Fourier slices → real images centred at box//2."""
    S = slices
    if ctf is not None:
        S = S * _as_tensor(ctf, torch.float32, S.device)
    # centre-referenced → index-0-referenced: translate by +box//2 pixels
    t = torch.full((S.shape[0], 2), float(box // 2), device=S.device, dtype=torch.float64)
    if origins_px is not None:
        t = t - _as_tensor(origins_px, torch.float64, S.device).reshape(-1, 2)
    S = S * _shift_ramp_rfft(box, box, t, S.device).to(S.dtype)
    return torch.fft.irfft2(S, s=(box, box))


def images_to_slices(images: torch.Tensor, origins_px=None, pad: int | None = None) -> torch.Tensor:
    """Real images (B, D, D) → centre-referenced rfft-layout transforms, re-centred by +origin.

    With ``pad`` (> D) the images are zero-padded to pad² first (finer frequency sampling).
    """
    box = images.shape[-1]
    if pad is not None and pad != box:
        o = pad // 2 - box // 2
        padded = images.new_zeros(images.shape[:-2] + (pad, pad))
        padded[..., o:o + box, o:o + box] = images
        images, box = padded, pad
    S = torch.fft.rfft2(images)
    t = torch.full((images.shape[0], 2), -float(box // 2), device=images.device, dtype=torch.float64)
    if origins_px is not None:
        t = t + _as_tensor(origins_px, torch.float64, images.device).reshape(-1, 2)
    return S * _shift_ramp_rfft(box, box, t, images.device).to(S.dtype)


# ------------------------------------------------------------------ back-projection
class FourierAccumulator:
    """Back-projection into an oversampled Fourier volume, for direct Fourier inversion.

    ``insert(images, rotations, origins_px=None, ctf=None, weights=None)`` adds
    ``CTF·F_img`` and ``CTF²`` (times per-image weights) at the central slice of each image;
    :meth:`reconstruct` returns ``Σ CTF F / (Σ CTF² + reg)`` in real space,
    gridding-corrected and cropped to D³. Two accumulators over random halves give half maps
    for an FSC.

    Implementation (as RELION's back-projector): the image transforms are taken at their own
    size D and their frequencies scaled by ``oversample`` onto the padded grid
    (P = oversample·D), so an image costs D·(D/2+1) insertions rather than P·(P/2+1).
    Friedel symmetry halves the volume: only the half space kx ≥ 0 is stored (a point that
    lands at kx < 0 is stored as its conjugate at −k), as ``(P, P, P//2+1)`` voxels [z, y, x]
    with z, y in FFT order (index k mod P); the plane kx = 0 is symmetrised at the end. Sums
    are kept as ``data`` (complex Σ CTF·F) and ``weight`` (Σ CTF²), flat. :meth:`reconstruct`
    inverts chunk by chunk along kx (inverse along z and y, crop to D, then the real inverse
    along x), so it never holds a second P³ array. ``interpolation``: ``"trilinear"`` (8
    voxels per sample, gridding correction sinc²) or ``"nearest"`` (1 voxel, correction sinc;
    ~3× faster). ``dtype`` is that of the sums (float32: 12 bytes per half-volume voxel,
    0.8 GB per accumulator at D = 256 with oversample 2). Partial accumulators (chunks,
    workers) combine exactly with :meth:`merge`.
    """

    def __init__(self, box: int, oversample: int = 2, device=None, dtype=torch.float64,
                 interpolation: str = "trilinear"):
        if interpolation not in ("trilinear", "nearest"):
            raise ValueError(f"interpolation must be 'trilinear' or 'nearest', got {interpolation!r}")
        self.box = int(box)
        self.oversample = int(oversample)
        self.padded = self.box * self.oversample
        self.interpolation = interpolation
        P = self.padded
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        # Σ CTF·F (complex) and Σ CTF² over the half volume, flattened [z][y][x]
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        self.data = torch.zeros(P * P * (P // 2 + 1), dtype=cdtype, device=self.device)
        self.weight = torch.zeros(P * P * (P // 2 + 1), dtype=dtype, device=self.device)
        self.count = 0
        self._grid_cache: tuple | None = None

    # -- insertion
    def _image_grid(self):
        """Per-image constants on the D² rfft grid, for the points kept (inside the sphere the
        padded grid holds): flat indices, in-plane frequencies (padded-grid units, (K, 2)),
        multiplicity weights, and the row/column of each point."""
        if self._grid_cache is None:
            D, s = self.box, self.oversample
            ky = torch.fft.fftfreq(D, d=1.0 / D, device=self.device, dtype=torch.float32)
            kx = torch.arange(D // 2 + 1, device=self.device, dtype=torch.float32)
            r2 = (kx[None, :] ** 2 + ky[:, None] ** 2) * (s * s)
            keep = (r2 <= (self.padded // 2 - 1) ** 2).reshape(-1)
            kyy, kxx = torch.meshgrid(ky, kx, indexing="ij")
            # the kx = 0 and kx = D/2 columns hold each frequency and its mate: weight ½
            mult = torch.ones(D, D // 2 + 1, device=self.device, dtype=torch.float32)
            mult[:, 0] = 0.5
            if D % 2 == 0:
                mult[:, -1] = 0.5
            sel = keep.nonzero().squeeze(1)
            kxy = torch.stack([kxx.reshape(-1)[sel], kyy.reshape(-1)[sel]], -1) * s
            self._grid_cache = (sel, kxy, mult.reshape(-1)[sel], sel // (D // 2 + 1), sel % (D // 2 + 1))
        return self._grid_cache

    def _centred_slices(self, images, origins_px, sel, rows, cols):
        """rfft of the images at the kept points, phases referenced to the image centre and
        re-centred by +origin: F(k)·exp(−2πi k·t/D) with t = origin − D/2 (separable ramp)."""
        D = self.box
        B = images.shape[0]
        Fi = torch.fft.rfft2(images).reshape(B, -1)[:, sel]
        t = torch.full((B, 2), -float(D // 2), device=images.device, dtype=torch.float64)
        if origins_px is not None:
            t = t + origins_px
        fy = torch.fft.fftfreq(D, device=images.device, dtype=torch.float64)
        fx = torch.fft.rfftfreq(D, device=images.device, dtype=torch.float64)
        ex = torch.polar(torch.ones(B, fx.numel(), dtype=torch.float64, device=images.device),
                         -2 * math.pi * fx[None] * t[:, 0:1]).to(torch.complex64)
        ey = torch.polar(torch.ones(B, D, dtype=torch.float64, device=images.device),
                         -2 * math.pi * fy[None] * t[:, 1:2]).to(torch.complex64)
        return Fi * ex[:, cols] * ey[:, rows]

    def insert(self, images, rotations, origins_px=None, ctf=None, weights=None,
               ctf_premultiplied: bool = False) -> None:
        """Add images (B, D, D) seen in orientations ``rotations`` (B, 3, 3).

        ``origins_px``: RELION origins in pixels (B, 2); ``ctf``: (B, D, D//2+1) rfft-layout
        CTF the images are modulated by (any other square grid is resampled); ``weights``:
        per-image weights (B,). ``ctf_premultiplied``: the images were already multiplied by
        their CTF (RELION's ``rlnCtfDataAreCtfPremultiplied``): only the weights get CTF²;
        a bool, or one per image (B,)."""
        images = _as_tensor(images, torch.float32, self.device)
        R = _as_tensor(rotations, torch.float32, self.device)
        if images.dim() == 2:
            images, R = images[None], R.reshape(1, 3, 3)
        B, box = images.shape[0], images.shape[-1]
        if box != self.box:
            raise ValueError(f"image box {box} != accumulator box {self.box}")
        if ctf is not None:
            ctf = _as_tensor(ctf, torch.float32, self.device)
            if ctf.dim() == 2:
                ctf = ctf[None]
        w_img = None if weights is None else _as_tensor(weights, torch.float32, self.device).reshape(-1)
        # bound the temporaries (~170 bytes per inserted point) to ~100 MB per chunk
        chunk = max(1, int(2 ** 19 // max(1, self.box * (self.box // 2 + 1))))
        premult = torch.as_tensor(np.broadcast_to(np.asarray(ctf_premultiplied, dtype=bool), (B,)).copy(),
                                  device=self.device)
        for s in range(0, B, chunk):
            sl = slice(s, s + chunk)
            self._insert(images[sl], R[sl],
                         None if origins_px is None else _as_tensor(origins_px, torch.float64, self.device).reshape(-1, 2)[sl],
                         None if ctf is None else ctf[sl], None if w_img is None else w_img[sl],
                         premult[sl])
        self.count += B

    def _insert(self, images, R, origins_px, ctf, w_img, premultiplied: torch.Tensor) -> None:
        D, P = self.box, self.padded
        H = P // 2 + 1
        B = images.shape[0]
        sel, kxy, mult, rows, cols = self._image_grid()
        S = self._centred_slices(images, origins_px, sel, rows, cols)  # (B, K) complex64
        wt = mult.expand(B, -1)
        if ctf is not None:
            if ctf.shape[-2:] != (D, D // 2 + 1):  # CTF on another grid: resample onto the D² grid
                ctf = _resample_rfft(ctf, D)
            c = ctf.reshape(B, -1)[:, sel]
            if bool(premultiplied.all()):
                pass
            elif not bool(premultiplied.any()):
                S = S * c
            else:  # a mix: premultiplied images are not multiplied again
                S = torch.where(premultiplied[:, None], S, S * c)
            wt = wt * c * c
        scale = mult[None] if w_img is None else mult[None] * w_img[:, None]
        if w_img is not None:
            wt = wt * w_img[:, None]
        # 3-D positions (padded-grid units, (x, y, z)) of the samples: kx·A[0] + ky·A[1]
        pos = torch.matmul(kxy, R[:, :2, :])  # (B, K, 3)
        # store the mate (−k, conjugate value) of samples in kx < 0 in the half space kx ≥ 0
        sign = torch.where(pos[..., 0] < 0, -1.0, 1.0)
        pos = (pos * sign[..., None]).reshape(-1, 3)
        cdtype = self.data.dtype
        vals = torch.complex(S.real * scale, S.imag * (scale * sign)).reshape(-1).to(cdtype)
        wt = wt.reshape(-1).to(self.dtype)
        if self.interpolation == "nearest":
            i = torch.round(pos).long()
            idx = ((i[:, 2] % P) * P + (i[:, 1] % P)) * H + i[:, 0]
            self._add(idx, vals, wt)
            return
        i0 = torch.floor(pos)
        f = (pos - i0).to(self.dtype)
        i0 = i0.long()
        x0 = i0[:, 0]
        y0, y1 = i0[:, 1] % P, (i0[:, 1] + 1) % P
        z0, z1 = i0[:, 2] % P, (i0[:, 2] + 1) % P
        g = 1 - f
        for zi, wz in ((z0, g[:, 2]), (z1, f[:, 2])):
            for yi, wy in ((y0, g[:, 1]), (y1, f[:, 1])):
                row = (zi * P + yi) * H + x0
                wzy = wz * wy
                for idx, w in ((row, wzy * g[:, 0]), (row + 1, wzy * f[:, 0])):
                    self._add(idx, vals * w, wt * w)

    _complex_index_add = True

    def _add(self, idx, vals, wt) -> None:
        """data[idx] += vals (complex), weight[idx] += wt; complex index_add_ where the
        backend has it, else on the (N, 2) real view (same sums)."""
        if FourierAccumulator._complex_index_add:
            try:
                self.data.index_add_(0, idx, vals)
            except RuntimeError:  # pragma: no cover - backends without complex index_add_
                FourierAccumulator._complex_index_add = False
                torch.view_as_real(self.data).index_add_(0, idx, torch.view_as_real(vals))
        else:  # pragma: no cover
            torch.view_as_real(self.data).index_add_(0, idx, torch.view_as_real(vals))
        self.weight.index_add_(0, idx, wt)

    # -- bookkeeping
    def merge(self, other: "FourierAccumulator") -> None:
        if (other.box, other.oversample, other.interpolation) != (self.box, self.oversample, self.interpolation):
            raise ValueError("cannot merge accumulators of different box, oversampling or interpolation")
        self.data += other.data.to(self.data.dtype)
        self.weight += other.weight.to(self.weight.dtype)
        self.count += other.count

    def state_dict(self) -> dict:
        return {"box": self.box, "oversample": self.oversample, "count": self.count, "data": self.data,
                "weight": self.weight, "interpolation": self.interpolation, "layout": "half"}

    @classmethod
    def from_state_dict(cls, state: dict) -> "FourierAccumulator":
        if state.get("layout") != "half":
            raise ValueError("accumulator state of an older layout (full volume): re-run the insertion")
        acc = cls(state["box"], state["oversample"], device=state["weight"].device, dtype=state["weight"].dtype,
                  interpolation=state.get("interpolation", "trilinear"))
        if state["weight"].shape != acc.weight.shape:
            raise ValueError(f"accumulator state of shape {tuple(state['weight'].shape)} does not fit box "
                             f"{acc.box} × oversample {acc.oversample} (expected {tuple(acc.weight.shape)})")
        acc.data, acc.weight, acc.count = state["data"], state["weight"], state["count"]
        return acc

    # -- inversion
    def _symmetrised(self):
        """(Σ CTF·F, Σ CTF²) half volumes (P, P, P//2+1) with the kx = 0 plane made Hermitian."""
        P = self.padded
        d = self.data.reshape(P, P, P // 2 + 1).clone()
        w = self.weights()
        d0 = d[..., 0]
        d[..., 0] = d0 + _kx0_mate(d0).conj()
        return d, w

    def fourier(self, reg=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, weight) on the padded grid, half-volume rfft layout ``(P, P, P//2+1)`` [z, y, x],
        z and y in FFT order, phases referenced to the volume centre: the Wiener estimate
        ``Σ CTF·F / (Σ CTF² + reg)`` and its weights ``Σ CTF²``. ``reg``: a number or a
        tensor broadcastable to the half volume (e.g. per shell); default
        :func:`default_regularisation`."""
        d, w = self._symmetrised()
        if reg is None:
            reg = default_regularisation(w)
        return d / (w + reg), w

    def weights(self) -> torch.Tensor:
        """Σ CTF² (times image weights) on the half volume ``(P, P, P//2+1)``, kx = 0 plane symmetrised."""
        P = self.padded
        w = self.weight.reshape(P, P, P // 2 + 1).clone()
        w0 = w[..., 0]
        w[..., 0] = w0 + _kx0_mate(w0)
        return w

    def frequency_radius(self) -> torch.Tensor:
        """|k| of every half-volume voxel in units of 1/(D voxels) (so D/2 is Nyquist)."""
        P = self.padded
        k = torch.fft.fftfreq(P, d=1.0 / P, device=self.device, dtype=torch.float32)
        kx = torch.arange(P // 2 + 1, device=self.device, dtype=torch.float32)
        r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2
        return torch.sqrt(r2) / self.oversample

    # -- chunked inversion (memory: the accumulator plus ~one chunk, never a second P³ array)
    def _x_chunks(self):
        P = self.padded
        H = P // 2 + 1
        step = max(1, int(2 ** 23 // (P * P)))  # ≈ 8 M voxels per chunk
        return [(j, min(H, j + step)) for j in range(0, H, step)]

    def _chunk(self, j0: int, j1: int):
        """(Σ CTF·F, Σ CTF²) for x in [j0, j1): views, except that a chunk holding the kx = 0
        plane is a copy with that plane symmetrised."""
        P = self.padded
        d = self.data.reshape(P, P, P // 2 + 1)[..., j0:j1]
        w = self.weight.reshape(P, P, P // 2 + 1)[..., j0:j1]
        if j0 == 0:
            d, w = d.clone(), w.clone()
            d0, w0 = d[..., 0].clone(), w[..., 0].clone()
            d[..., 0] = d0 + _kx0_mate(d0).conj()
            w[..., 0] = w0 + _kx0_mate(w0)
        return d, w

    def _shell_chunk(self, j0: int, j1: int, n_shells: int) -> torch.Tensor:
        """round(|k|) in units of 1/D voxels, clipped to n_shells − 1, for x in [j0, j1)."""
        P = self.padded
        k = torch.fft.fftfreq(P, d=1.0 / P, device=self.device, dtype=torch.float32)
        kx = torch.arange(j0, j1, device=self.device, dtype=torch.float32)
        r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2) / self.oversample
        return torch.round(r).long().clamp(max=n_shells - 1)

    def shell_weights(self, n_shells: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per shell (round |k| in 1/D units; the last shell collects everything beyond): the
        sum of the weights and the number of sampled voxels (float64)."""
        n_shells = n_shells or self.box // 2 + 2
        tot = torch.zeros(n_shells, dtype=torch.float64, device=self.device)
        cnt = torch.zeros(n_shells, dtype=torch.float64, device=self.device)
        for j0, j1 in self._x_chunks():
            _, w = self._chunk(j0, j1)
            sh = self._shell_chunk(j0, j1, n_shells).reshape(-1)
            w = w.reshape(-1).double()
            tot += torch.bincount(sh, weights=w, minlength=n_shells)
            cnt += torch.bincount(sh, weights=(w > 0).double(), minlength=n_shells)
        return tot, cnt

    def mean_weight(self) -> float:
        """Mean weight over the sampled voxels of the (symmetrised) half volume."""
        tot, cnt = 0.0, 0
        for j0, j1 in self._x_chunks():
            _, w = self._chunk(j0, j1)
            tot += float(w.sum(dtype=torch.float64))
            cnt += int(torch.count_nonzero(w))
        return tot / cnt if cnt else 1.0

    def reconstruct(self, reg=None) -> torch.Tensor:
        """Real-space volume (D³, [z, y, x], float32): ``Σ CTF·F / (Σ CTF² + reg)``, inverted,
        cropped and gridding-corrected, chunk by chunk along kx (memory ~ one extra chunk).

        ``reg``: a number; or a 1-D array of one value per shell (``round(|k|)`` in 1/D units,
        index ``D//2 + 1`` and beyond for frequencies past Nyquist; shorter arrays are extended
        with their last value); or a tensor broadcastable to the half volume. Default: 1 % of
        the mean weight over sampled voxels (:func:`default_regularisation`)."""
        P, D = self.padded, self.box
        H = P // 2 + 1
        if reg is None:
            reg = 0.01 * self.mean_weight()
        per_shell = None
        if isinstance(reg, (list, tuple)) or (hasattr(reg, "ndim") and getattr(reg, "ndim") == 1):
            per_shell = _as_tensor(reg, self.weight.dtype, self.device)
        elif isinstance(reg, torch.Tensor) and reg.dim() > 0:
            reg = reg.to(self.device).expand(P, P, H)
        # (−1)^k before an inverse transform = a shift by P/2 after it: the volume centre lands
        # at P/2 and the wanted D samples are the contiguous slice lo:hi
        lo, hi = P // 2 - D // 2, P // 2 - D // 2 + D
        G = torch.empty(D, D, H, dtype=self.data.dtype, device=self.device)
        for j0, j1 in self._x_chunks():
            d, w = self._chunk(j0, j1)
            if per_shell is not None:
                r = per_shell[self._shell_chunk(j0, j1, per_shell.numel())]
            elif isinstance(reg, torch.Tensor) and reg.dim() > 0:
                r = reg[..., j0:j1]
            else:
                r = float(reg)
            inv = torch.reciprocal(w + r)  # real arithmetic: cheaper than a complex division
            inv[1::2].neg_()
            inv[:, 1::2].neg_()
            inv[..., (j0 % 2 == 0)::2].neg_()  # odd kx
            f = torch.view_as_complex(torch.view_as_real(d) * inv[..., None])
            del inv
            f = torch.fft.ifft(f, dim=0)[lo:hi]
            G[..., j0:j1] = torch.fft.ifft(f, dim=1)[:, lo:hi]
            del f
        vol = torch.fft.irfft(G, n=P, dim=2)[..., lo:hi]
        return self._grid_correct(vol)

    def _grid_correct(self, vol: torch.Tensor) -> torch.Tensor:
        P = self.padded
        c = _sinc2_correction(self.box, P, vol.device, torch.float64)
        if self.interpolation == "nearest":
            c = torch.sqrt(c)
        c = c.to(vol.dtype)
        vol = vol / (c[:, None, None] * c[None, :, None] * c[None, None, :])
        return vol.to(torch.float32)

    def to_real(self, Fv: torch.Tensor) -> torch.Tensor:
        """Half-volume transform (as from :meth:`fourier`) → gridding-corrected D³ volume."""
        P = self.padded
        vol = torch.fft.fftshift(torch.fft.irfftn(Fv, s=(P, P, P)))
        return self._grid_correct(_crop_center(vol, self.box))


def _kx0_mate(t: torch.Tensor) -> torch.Tensor:
    """Value at (−kz, −ky) of a (P, P) plane in FFT order: index i → (P − i) mod P."""
    return torch.roll(torch.flip(t, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))


def default_regularisation(weight: torch.Tensor, fraction: float = 0.01) -> float:
    """``fraction`` × the mean weight over sampled voxels: small enough not to bias
    well-sampled frequencies, large enough to keep barely sampled ones from blowing up."""
    sampled = weight[weight > 0]
    return float(fraction * sampled.mean()) if sampled.numel() else 1.0


def _resample_rfft(ctf: torch.Tensor, P: int) -> torch.Tensor:
    """Resample an rfft-layout array (B, D, D//2+1) onto the (B, P, P//2+1) grid of the same
    frequency range (bilinear, in centred order)."""
    D = ctf.shape[-2]
    centred = torch.fft.fftshift(ctf, dim=-2)[:, None]  # (B,1,D,D//2+1), ky centred
    ky = torch.fft.fftshift(torch.fft.fftfreq(P, d=1.0 / P, device=ctf.device)) / (P / D)  # in D-grid units
    kx = torch.arange(P // 2 + 1, device=ctf.device, dtype=torch.float32) / (P / D)
    gy = (ky + D // 2) / (D - 1) * 2 - 1
    gx = kx / (D // 2) * 2 - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None].expand(ctf.shape[0], -1, -1, -1)
    out = F.grid_sample(centred, grid.to(ctf.dtype), mode="bilinear", padding_mode="border", align_corners=True)[:, 0]
    return torch.fft.ifftshift(out, dim=-2)


# ------------------------------------------------------------------ Gaussian atoms
def project_gaussians(coords, weights, sigma, rotations, box: int, pixel_size: float,
                      origins_px=None) -> torch.Tensor:
    """Analytic projections of Gaussian atoms: (B, box, box), differentiable.

    ``coords``: (N, 3) or (B, N, 3) Å relative to the box centre (e.g. a deformed
    reference); ``weights`` (N,) integrated density of each atom; ``sigma`` Å (scalar or
    (N,)); ``rotations`` (B, 3, 3); ``origins_px`` (B, 2) RELION origins in pixels. Each
    image pixel holds Σ_n w_n N(p; (A r_n)[x, y] − origin, σ²) · pixel_size², so an image sums
    to ≈ Σ w when the particle is inside the box.
    """
    R = rotations if isinstance(rotations, torch.Tensor) else torch.as_tensor(rotations)
    dtype = R.dtype if R.dtype in (torch.float32, torch.float64) else torch.float32
    R = R.to(dtype)
    X = _as_tensor(coords, dtype, R.device)
    if X.dim() == 2:
        X = X[None].expand(R.shape[0], -1, -1)
    w = _as_tensor(weights, dtype, R.device)
    s = _as_tensor(sigma, dtype, R.device) / pixel_size
    xy = torch.einsum("bnj,bij->bni", X, R[:, :2, :]) / pixel_size + box // 2  # (B, N, 2) pixels
    if origins_px is not None:
        xy = xy - _as_tensor(origins_px, dtype, R.device).reshape(-1, 1, 2)
    grid = torch.arange(box, device=R.device, dtype=dtype)
    s_ = s if s.dim() == 0 else s[None, :, None]
    # exponents below −80 (values < 2e-35) are clamped: exp is slow on its denormal path
    gx = torch.exp((-0.5 * ((grid - xy[..., 0:1]) / s_) ** 2).clamp_min(-80.0))  # (B, N, box)
    gy = torch.exp((-0.5 * ((grid - xy[..., 1:2]) / s_) ** 2).clamp_min(-80.0))
    amp = w / (2 * math.pi * s * s)  # (N,) or scalar-broadcast
    if amp.dim() == 0:
        amp = amp.expand(X.shape[1])
    return torch.bmm((gy * amp[None, :, None]).transpose(1, 2), gx)  # (B, box_y, box_x)
