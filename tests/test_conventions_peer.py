"""Geometry conventions proven on files cryoDRGN wrote (../shared/data/peer_cryodrgn).

toy_projections.mrcs holds 1000 noise-free 30² projections of toymodel_small_nocenter.mrc;
toy_projections_poses.star (written by cryoDRGN's own ``write_star``) holds their poses.
We read both with the project's readers and check that

1. projecting the peer's volume with the peer's poses reproduces the peer's images,
2. back-projecting the images with those poses gives a map whose re-projections match the
   images (the issue's test), and
3. a deliberately wrong convention (transposed rotation) scores clearly lower.

Finding: the images carry no shifts although the STAR lists _rlnOriginX/Y (cryoDRGN's test
pose pickle pairs the toy images with random translations). Projecting with the listed
shifts matches the images far worse than projecting without; test 4 asserts this so the
finding stays true, and the shifts are left out of 1–3. The shift sign is proven against
cryoDRGN itself in tests/test_peer_cryodrgn.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deephemnma.core import star as starmod
from deephemnma.core.geometry import euler_to_matrix
from deephemnma.core.mrc import ParticleImages, read_volume
from deephemnma.core.projection import FourierAccumulator, FourierSliceProjector

pytestmark = pytest.mark.peer


def ncc(a, b):
    a = a - a.mean(axis=(-2, -1), keepdims=True)
    b = b - b.mean(axis=(-2, -1), keepdims=True)
    return (a * b).sum((-2, -1)) / np.sqrt((a * a).sum((-2, -1)) * (b * b).sum((-2, -1)))


@pytest.fixture(scope="module")
def toy(peer_dir):
    star = starmod.read_star(peer_dir / "toy_projections_poses.star")
    images = ParticleImages.from_star(star).read(np.arange(len(star.particles)))
    A = euler_to_matrix(star.particles[list(starmod.ANGLE_COLUMNS)].to_numpy())
    pix = starmod.pixel_sizes(star)
    origins_px = star.particles[list(starmod.ORIGIN_COLUMNS)].to_numpy() / pix[:, None]
    volume = read_volume(peer_dir / "toymodel_small_nocenter.mrc")
    return dict(images=images, A=A, origins_px=origins_px, volume=volume.data)


def test_projection_of_peer_volume_matches_peer_images(toy):
    proj = FourierSliceProjector(toy["volume"], oversample=2)
    right = ncc(proj.project(torch.tensor(toy["A"])).numpy(), toy["images"]).mean()
    wrong = ncc(proj.project(torch.tensor(np.swapaxes(toy["A"], 1, 2))).numpy(), toy["images"]).mean()
    print(f"\nprojection vs images: right convention {right:.4f}, transposed rotation {wrong:.4f}")
    assert right > 0.98
    assert wrong < right - 0.3


def reprojection_score(images, A, origins=None):
    acc = FourierAccumulator(images.shape[-1], oversample=2)
    acc.insert(torch.tensor(images), torch.tensor(A), origins_px=None if origins is None else torch.tensor(origins))
    rec = acc.reconstruct()
    reproj = FourierSliceProjector(rec, oversample=2).project(
        torch.tensor(A), origins_px=None if origins is None else torch.tensor(origins)).numpy()
    return ncc(reproj, images).mean(), rec.numpy()


def test_backprojection_reprojects_to_images(toy):
    right, rec = reprojection_score(toy["images"], toy["A"])
    wrong, _ = reprojection_score(toy["images"], np.swapaxes(toy["A"], 1, 2))
    vol_cc = np.corrcoef(rec.ravel(), toy["volume"].ravel())[0, 1]
    print(f"\nre-projection vs images: right {right:.4f}, transposed rotation {wrong:.4f}; map vs peer volume {vol_cc:.4f}")
    assert right > 0.97 and vol_cc > 0.9
    assert wrong < right - 0.2


def test_listed_shifts_do_not_belong_to_the_images(toy):
    proj = FourierSliceProjector(toy["volume"], oversample=2)
    A = torch.tensor(toy["A"])
    without = ncc(proj.project(A).numpy(), toy["images"]).mean()
    with_shifts = ncc(proj.project(A, torch.tensor(toy["origins_px"])).numpy(), toy["images"]).mean()
    negated = ncc(proj.project(A, -torch.tensor(toy["origins_px"])).numpy(), toy["images"]).mean()
    print(f"\nwithout shifts {without:.4f}, listed shifts {with_shifts:.4f}, negated {negated:.4f}")
    assert without > 0.98 and with_shifts < 0.6 and negated < 0.6
