"""RELION ZYZ Euler angles, rotation matrices, quaternions and the paper's angle error."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from deephemnma.core import geometry as g


@pytest.fixture
def angles():
    rng = np.random.default_rng(3)
    n = 500
    return np.stack([rng.uniform(-180, 180, n), rng.uniform(0.5, 179.5, n), rng.uniform(-180, 180, n)], -1)


def test_matrix_matches_relion_definition(angles):
    # RELION's Euler_angles2matrix is the transpose of the active intrinsic ZYZ rotation
    A = g.euler_to_matrix(angles)
    R = Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix()
    np.testing.assert_allclose(A, np.swapaxes(R, -1, -2), atol=1e-12)
    # one value worked by hand: rot=90, tilt=0, psi=0 → A = [[0,1,0],[-1,0,0],[0,0,1]]
    np.testing.assert_allclose(g.euler_to_matrix([90, 0, 0]), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)
    # tilt=90 about y: z axis goes to x in RELION's passive convention: A·ez = (-1, 0, 0)? check column
    A = g.euler_to_matrix([0, 90, 0])
    np.testing.assert_allclose(A @ [0, 0, 1], [-1, 0, 0], atol=1e-12)


def test_euler_roundtrip(angles):
    back = g.matrix_to_euler(g.euler_to_matrix(angles))
    np.testing.assert_allclose(back, angles, atol=1e-9)
    assert (back[:, 1] >= 0).all() and (back[:, 1] <= 180).all()


def test_gimbal_poles_roundtrip():
    for ang in ([30, 0, 40], [30, 180, 40], [-170, 0, 170]):
        A = g.euler_to_matrix(ang)
        np.testing.assert_allclose(g.euler_to_matrix(g.matrix_to_euler(A)), A, atol=1e-12)


def test_quaternion_roundtrip_and_sign(angles):
    A = g.euler_to_matrix(angles)
    q = g.matrix_to_quaternion(A)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-12)
    assert (q[:, 0] >= 0).all()
    np.testing.assert_allclose(g.quaternion_to_matrix(q), A, atol=1e-12)
    np.testing.assert_allclose(g.quaternion_to_matrix(-q), A, atol=1e-12)  # q and -q: same rotation
    # agrees with scipy's quaternion of the same matrix up to sign (scipy orders x, y, z, w)
    qs = Rotation.from_matrix(A).as_quat()[:, [3, 0, 1, 2]]
    np.testing.assert_allclose(np.abs(np.sum(q * qs, axis=1)), 1, atol=1e-9)


def test_quaternion_near_180_degrees():
    # w ~ 0: rotations by ~180° are the branch-choice edge case
    A = g.euler_to_matrix([[0, 180, 0], [90, 180, 0], [12, 90, 168]])
    np.testing.assert_allclose(g.quaternion_to_matrix(g.matrix_to_quaternion(A)), A, atol=1e-12)


def test_torch_versions_agree(angles):
    A = g.euler_to_matrix(angles)
    At = g.euler_to_matrix_torch(torch.tensor(np.deg2rad(angles)))
    np.testing.assert_allclose(At.numpy(), A, atol=1e-12)
    q = torch.tensor(g.matrix_to_quaternion(A))
    np.testing.assert_allclose(g.quaternion_to_matrix_torch(q).numpy(), A, atol=1e-12)
    np.testing.assert_allclose(g.matrix_to_quaternion_torch(At).numpy(), q.numpy(), atol=1e-12)
    # sign-invariant distance
    assert torch.allclose(g.quaternion_distance_torch(q, -q), torch.zeros(len(q), dtype=q.dtype), atol=1e-12)
    # differentiable
    x = torch.tensor(np.deg2rad(angles[:4]), requires_grad=True)
    g.euler_to_matrix_torch(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_random_rotations_uniform():
    rng = np.random.default_rng(0)
    R = g.random_rotations(50000, rng)
    np.testing.assert_allclose(np.linalg.det(R), 1, atol=1e-12)
    # Haar measure: E[R] = 0, and the tilt angle has density sin(tilt)/2 → mean cos(tilt) = 0, mean cos² = 1/3
    assert np.abs(R.mean(0)).max() < 0.02
    tilt = np.deg2rad(g.matrix_to_euler(R)[:, 1])
    assert abs(np.cos(tilt).mean()) < 0.02 and abs((np.cos(tilt) ** 2).mean() - 1 / 3) < 0.01
    # same seed → same rotations
    np.testing.assert_array_equal(g.random_rotations(10, np.random.default_rng(5)), g.random_rotations(10, np.random.default_rng(5)))


def test_angular_error():
    rng = np.random.default_rng(1)
    A = g.random_rotations(100, rng)
    np.testing.assert_allclose(g.angular_error(A, A), 0, atol=1e-5)
    # a rotation by θ about z: rows x and y turn by θ, row z stays → mean = 2θ/3
    for theta in (1.0, 10.0, 90.0):
        Rz = g.euler_to_matrix([theta, 0, 0])
        np.testing.assert_allclose(g.angular_error(Rz @ A, A), 2 * theta / 3, atol=1e-6)
        np.testing.assert_allclose(g.geodesic_angle(Rz @ A, A), theta, atol=1e-6)
    At = torch.tensor(A)
    np.testing.assert_allclose(g.angular_error_torch(At, At.flip(0)).numpy(), g.angular_error(A, A[::-1]), atol=1e-9)
