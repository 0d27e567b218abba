"""RELION's CTF model: values at known frequencies, astigmatism direction, phase flip, Wiener."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from deephemnma.core.ctf import (
    CTFParams,
    compute_ctf,
    electron_wavelength,
    frequency_grid,
    phase_flip,
    wiener_filter,
    apply_ctf,
)
from deephemnma.core.errors import InputError


def test_wavelength_300kv():
    # 300 kV electrons: λ = 0.019687 Å (textbook value)
    assert electron_wavelength(300.0) == pytest.approx(0.019687, abs=2e-6)
    assert electron_wavelength(200.0) == pytest.approx(0.025079, abs=2e-6)


def test_dc_value_and_first_zero():
    q0, df, box, pix = 0.1, 20000.0, 256, 1.0
    p = CTFParams.constant(1, defocus=df, voltage=300, cs=0.0, amp_contrast=q0)
    ctf = compute_ctf(p, box, pix, dtype=torch.float64)[0]
    # RELION's sign: positive at low frequency, CTF(0) = sin(atan(Q0/sqrt(1-Q0²))) = Q0
    assert ctf[0, 0].item() == pytest.approx(q0, abs=1e-9)
    # with Cs = 0 the first zero is where π λ Δf u² + atan(...) = π
    lam = electron_wavelength(300.0)
    u0 = np.sqrt((np.pi - np.arctan(q0 / np.sqrt(1 - q0 ** 2))) / (np.pi * lam * df))
    kx = torch.fft.rfftfreq(box, d=pix)
    row = ctf[0].numpy()
    i = np.flatnonzero(np.diff(np.sign(row)) != 0)[0]
    assert kx[i].item() <= u0 <= kx[i + 1].item()
    assert (row[: i + 1] > 0).all()


def test_astigmatism_direction():
    # DefocusU acts along the direction given by DefocusAngle
    box, pix = 128, 2.0  # sampled finely enough that the oscillations are not aliased
    p = CTFParams(defocus_u=8000.0, defocus_v=2000.0, defocus_angle=0.0, voltage=300.0, cs=0.0,
                  amp_contrast=0.0, phase_shift=0.0, bfactor=0.0, scale=1.0)
    c = compute_ctf(p, box, pix, rfft=False, dtype=torch.float64)[0].numpy()
    along_x, along_y = c[0, : box // 2], c[: box // 2, 0]
    zeros_x = np.sum(np.diff(np.sign(along_x)) != 0)
    zeros_y = np.sum(np.diff(np.sign(along_y)) != 0)
    assert zeros_x > zeros_y  # larger defocus along x → more oscillations
    p.defocus_angle[:] = 90.0
    c90 = compute_ctf(p, box, pix, rfft=False, dtype=torch.float64)[0].numpy()
    np.testing.assert_allclose(c90, c.T, atol=1e-9)


def test_bfactor_and_scale():
    p = CTFParams.constant(1, defocus=15000.0)
    c0 = compute_ctf(p, 64, 1.0)[0]
    p.bfactor[:] = 100.0
    p.scale[:] = 0.5
    c1 = compute_ctf(p, 64, 1.0)[0]
    ky, kx = frequency_grid(64, 1.0)
    np.testing.assert_allclose(c1.numpy(), (c0 * 0.5 * torch.exp(-100 / 4 * (kx ** 2 + ky ** 2))).numpy(), atol=1e-6)


def test_phase_flip_equals_sign_multiplication():
    rng = np.random.default_rng(0)
    img = torch.tensor(rng.standard_normal((3, 64, 64)), dtype=torch.float64)
    # band-limit: at the Nyquist column an astigmatic CTF is not Hermitian-symmetric on the grid
    ft = torch.fft.rfft2(img)
    ft[..., 32, :] = 0
    ft[..., :, 32] = 0
    img = torch.fft.irfft2(ft, s=(64, 64))
    p = CTFParams.constant(3, defocus=12000.0, astigmatism=500.0, angle=20.0)
    ctf = compute_ctf(p, 64, 1.3, dtype=torch.float64)
    flipped = phase_flip(img, ctf)
    expected = np.fft.irfft2(np.fft.rfft2(img.numpy()) * np.sign(ctf.numpy()), s=(64, 64))
    np.testing.assert_allclose(flipped.numpy(), expected, atol=1e-10)
    # flipping twice restores the image (sign² = 1 where CTF ≠ 0)
    np.testing.assert_allclose(phase_flip(flipped, ctf).numpy(), img.numpy(), atol=1e-10)


def test_wiener_inverts_ctf_at_high_snr():
    rng = np.random.default_rng(1)
    img = torch.tensor(rng.standard_normal((2, 32, 32)), dtype=torch.float64)
    ctf = torch.full((2, 32, 17), 0.5, dtype=torch.float64)
    out = wiener_filter(apply_ctf(img, ctf), ctf, snr=1e8)
    np.testing.assert_allclose(out.numpy(), img.numpy(), atol=1e-6)


def test_from_table_defaults_and_errors():
    df = pd.DataFrame({"rlnDefocusU": [1e4, 2e4], "rlnDefocusV": [1e4, 2e4], "rlnDefocusAngle": [0.0, 0.0],
                       "rlnVoltage": [300.0, 300.0], "rlnSphericalAberration": [2.7, 2.7],
                       "rlnAmplitudeContrast": [0.1, 0.1]})
    p = CTFParams.from_table(df, "x.star")
    assert len(p) == 2 and p.phase_shift.tolist() == [0, 0] and p.scale.tolist() == [1, 1]
    with pytest.raises(InputError, match=r"x.star: missing CTF column\(s\) _rlnDefocusV"):
        CTFParams.from_table(df.drop(columns="rlnDefocusV"), "x.star")
    bad = df.copy()
    bad.loc[1, "rlnDefocusU"] = np.nan
    with pytest.raises(InputError, match=r"row 2"):
        CTFParams.from_table(bad, "x.star")
