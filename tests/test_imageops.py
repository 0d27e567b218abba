"""Image operations: Fourier cropping/padding, low-pass, masks, normalisation, FRC."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deephemnma.core import imageops
from deephemnma.core.density import AtomProfiles, atoms_to_images
from deephemnma.core.geometry import random_rotations

from _sim_helpers import blob


def smooth_images(n=3, D=96, px=1.0, seed=0):
    x, el = blob(200, seed=seed, radius=20.0)
    R = random_rotations(n, np.random.default_rng(seed))
    return atoms_to_images(x, R, AtomProfiles.peng(el, b_factor=20.0), D, px).numpy()


def test_fourier_crop_is_exact_on_band_limited_signals():
    D, d = 64, 32
    n = np.arange(D)
    for kx, ky, phi in [(3, 5, 0.3), (-7, 2, 1.1), (15, -15, 2.0)]:  # |k| < d/2
        img = np.cos(2 * np.pi * (kx * n[None, :] + ky * n[:, None]) / D + phi)
        m = np.arange(d)
        want = np.cos(2 * np.pi * (kx * m[None, :] + ky * m[:, None]) / d + phi)
        np.testing.assert_allclose(imageops.fourier_crop(img, d), want, atol=1e-10)
    # a frequency beyond the new Nyquist is removed, not aliased
    img = np.cos(2 * np.pi * 20 * n[None, :] / D) * np.ones((D, 1))
    assert np.abs(imageops.fourier_crop(img, d)).max() < 1e-10


def test_fourier_crop_keeps_low_frequencies_and_mean():
    imgs = smooth_images()
    small = imageops.fourier_crop(imgs, 48)
    assert small.shape == (3, 48, 48) and small.dtype == np.float32
    np.testing.assert_allclose(small.mean(axis=(1, 2)), imgs.mean(axis=(1, 2)), rtol=1e-4)
    back = imageops.fourier_pad(small, 96)
    f = imageops.frc(back, imgs)
    assert np.all(f[:23] > 0.9999)  # every ring below the new Nyquist (24)
    # pad then crop is the identity
    np.testing.assert_allclose(imageops.fourier_crop(back, 48), small, atol=1e-5 * np.abs(small).max())
    # torch in, torch out
    t = imageops.fourier_crop(torch.as_tensor(imgs), 48)
    assert isinstance(t, torch.Tensor) and t.shape == (3, 48, 48)
    with pytest.raises(ValueError):
        imageops.fourier_crop(imgs, 47)


def test_lowpass_and_raised_cosine():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64))
    y = imageops.lowpass(x, pixel_size=2.0, resolution=8.0, width_px=2.0)  # cutoff at 16 Fourier pixels
    F, G = np.fft.rfft2(x), np.fft.rfft2(y)
    k = imageops.radial_frequency(64).numpy()
    assert np.allclose(G[k >= 16], 0, atol=1e-9)
    np.testing.assert_allclose(G[k <= 14], F[k <= 14], atol=1e-9)
    r = imageops.raised_cosine(torch.tensor([0.0, 13.0, 14.0, 15.0, 16.0, 20.0]), 16.0, 2.0)
    np.testing.assert_allclose(r.numpy(), [1, 1, 1, 0.5, 0, 0], atol=1e-12)


def test_masks_and_background_normalisation():
    m = imageops.circular_mask(128, 40.0)
    assert abs(int(m.sum()) - np.pi * 40 ** 2) < 2 * np.pi * 40
    assert bool(m[64, 64]) and not bool(m[0, 0]) and bool(m[64, 104]) and not bool(m[64, 105])
    rng = np.random.default_rng(1)
    imgs = 3.0 * rng.standard_normal((4, 64, 64)) + 5.0
    imgs[:, 20:44, 20:44] += 40.0  # a "particle" that must not bias the statistics
    out = imageops.normalise_background(imgs)
    bg = ~imageops.circular_mask(64, 0.9 * 32).numpy()
    np.testing.assert_allclose(out[:, bg].mean(axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(out[:, bg].std(axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(imageops.invert_contrast(out), -out)
    v = imageops.masked_variance(imgs, bg)
    np.testing.assert_allclose(v, imgs[:, bg].var(axis=1), rtol=1e-10)


def test_frc():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((8, 64, 64))
    b = rng.standard_normal((8, 64, 64))
    np.testing.assert_allclose(imageops.frc(a, a), 1.0, atol=1e-12)
    f = imageops.frc(a, b)
    assert f.shape == (33,) and np.abs(f[2:]).max() < 0.2
    np.testing.assert_allclose(imageops.frc(a, -a), -1.0, atol=1e-12)
    np.testing.assert_allclose(imageops.frc(a, 3 * a + 0.0), 1.0, atol=1e-12)  # scale-invariant
