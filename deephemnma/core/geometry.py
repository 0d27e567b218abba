"""Orientation conventions: RELION/Xmipp ZYZ Euler angles, rotation matrices, unit quaternions.

The one definition of orientation used by every stage.

* Euler angles (rot, tilt, psi) in degrees in files (``_rlnAngleRot/Tilt/Psi``), radians in
  code. The rotation matrix ``A`` is RELION's ``Euler_angles2matrix(rot, tilt, psi)``::

      A = Rz(psi) · Ry(tilt) · Rz(rot)      with  Rz(a) = [[ c, s, 0], [-s, c, 0], [0, 0, 1]]
                                                  Ry(b) = [[ c, 0,-s], [ 0, 1, 0], [s, 0, c]]

* Projection: an atom at ``r`` (Å, (x, y, z) relative to the box centre) lands at
  ``(A·r)[x, y]`` in the image; the image is the integral along z of the volume rotated by
  ``A``. Fourier slice: ``F_img(k) = F_vol(Aᵀ·[kx, ky, 0])``.
* Quaternions ``q = (w, x, y, z)`` represent the same ``A`` (``A = quaternion_to_matrix(q)``);
  ``q`` and ``-q`` are the same rotation — :func:`matrix_to_quaternion` returns ``w ≥ 0``.
* The paper's angular error between two orientations is the mean, over the three axes, of
  the angle between corresponding rows of the two matrices (:func:`angular_error`, degrees).

Functions take batches (``(..., 3)`` angles, ``(..., 3, 3)`` matrices, ``(..., 4)``
quaternions). numpy versions are named plainly; torch versions end in ``_torch`` and are
differentiable.
"""
from __future__ import annotations

import numpy as np

try:  # torch is a hard dependency of the package, but keep numpy-only use cheap to import
    import torch
except ImportError:  # pragma: no cover
    torch = None


# ----------------------------------------------------------------------------- numpy
def euler_to_matrix(angles, degrees: bool = True) -> np.ndarray:
    """RELION ``Euler_angles2matrix``: ``angles[..., 0:3] = (rot, tilt, psi)`` → ``A (..., 3, 3)``."""
    a = np.asarray(angles, dtype=np.float64)
    if degrees:
        a = np.deg2rad(a)
    rot, tilt, psi = a[..., 0], a[..., 1], a[..., 2]
    ca, sa = np.cos(rot), np.sin(rot)
    cb, sb = np.cos(tilt), np.sin(tilt)
    cg, sg = np.cos(psi), np.sin(psi)
    cc, cs = cb * ca, cb * sa
    sc, ss = sb * ca, sb * sa
    A = np.empty(a.shape[:-1] + (3, 3))
    A[..., 0, 0] = cg * cc - sg * sa
    A[..., 0, 1] = cg * cs + sg * ca
    A[..., 0, 2] = -cg * sb
    A[..., 1, 0] = -sg * cc - cg * sa
    A[..., 1, 1] = -sg * cs + cg * ca
    A[..., 1, 2] = sg * sb
    A[..., 2, 0] = sc
    A[..., 2, 1] = ss
    A[..., 2, 2] = cb
    return A


def matrix_to_euler(A, degrees: bool = True) -> np.ndarray:
    """Inverse of :func:`euler_to_matrix` with tilt in [0, 180°] (RELION's ``Euler_matrix2angles``).

    At the gimbal poles (tilt = 0 or 180°) rot is set to 0 and the whole in-plane rotation
    goes into psi, as RELION does.
    """
    A = np.asarray(A, dtype=np.float64)
    abs_sb = np.hypot(A[..., 0, 2], A[..., 1, 2])
    regular = abs_sb > 16 * np.finfo(np.float32).eps
    rot = np.where(regular, np.arctan2(A[..., 2, 1], A[..., 2, 0]), 0.0)
    tilt = np.arctan2(abs_sb, A[..., 2, 2])
    psi_regular = np.arctan2(A[..., 1, 2], -A[..., 0, 2])
    psi_pole = np.where(A[..., 2, 2] > 0, np.arctan2(-A[..., 1, 0], A[..., 0, 0]),
                        np.arctan2(A[..., 1, 0], -A[..., 0, 0]))
    psi = np.where(regular, psi_regular, psi_pole)
    tilt = np.where(regular, tilt, np.where(A[..., 2, 2] > 0, 0.0, np.pi))
    out = np.stack([rot, tilt, psi], axis=-1)
    return np.rad2deg(out) if degrees else out


def matrix_to_quaternion(A) -> np.ndarray:
    """Rotation matrix → unit quaternion (w, x, y, z) with w ≥ 0 (numerically stable branch choice)."""
    A = np.asarray(A, dtype=np.float64)
    m00, m11, m22 = A[..., 0, 0], A[..., 1, 1], A[..., 2, 2]
    # |w|, |x|, |y|, |z| from the diagonal; then signs from the off-diagonal of the largest one.
    cand = np.stack([
        1 + m00 + m11 + m22,
        1 + m00 - m11 - m22,
        1 - m00 + m11 - m22,
        1 - m00 - m11 + m22,
    ], axis=-1)
    best = np.argmax(cand, axis=-1)
    s = np.sqrt(np.maximum(np.take_along_axis(cand, best[..., None], -1)[..., 0], 1e-300)) * 2  # 4·|largest|
    d21, d02, d10 = A[..., 2, 1] - A[..., 1, 2], A[..., 0, 2] - A[..., 2, 0], A[..., 1, 0] - A[..., 0, 1]
    s21, s02, s10 = A[..., 2, 1] + A[..., 1, 2], A[..., 0, 2] + A[..., 2, 0], A[..., 1, 0] + A[..., 0, 1]
    # One candidate per choice of the largest component; only the chosen one is used.
    cands = np.stack([
        np.stack([s / 4, d21 / s, d02 / s, d10 / s], -1),
        np.stack([d21 / s, s / 4, s10 / s, s02 / s], -1),
        np.stack([d02 / s, s10 / s, s / 4, s21 / s], -1),
        np.stack([d10 / s, s02 / s, s21 / s, s / 4], -1),
    ], -2)
    q = np.take_along_axis(cands, best[..., None, None].repeat(4, -1), -2)[..., 0, :]
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    return canonical_quaternion(q)


def canonical_quaternion(q) -> np.ndarray:
    """Choose the sign of ``q`` so that w ≥ 0 (q and −q are the same rotation)."""
    q = np.asarray(q, dtype=np.float64)
    return np.where(q[..., :1] < 0, -q, q)


def quaternion_to_matrix(q) -> np.ndarray:
    """Unit quaternion (w, x, y, z) → rotation matrix (normalises the input)."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    A = np.empty(q.shape[:-1] + (3, 3))
    A[..., 0, 0] = 1 - 2 * (y * y + z * z)
    A[..., 0, 1] = 2 * (x * y - z * w)
    A[..., 0, 2] = 2 * (x * z + y * w)
    A[..., 1, 0] = 2 * (x * y + z * w)
    A[..., 1, 1] = 1 - 2 * (x * x + z * z)
    A[..., 1, 2] = 2 * (y * z - x * w)
    A[..., 2, 0] = 2 * (x * z - y * w)
    A[..., 2, 1] = 2 * (y * z + x * w)
    A[..., 2, 2] = 1 - 2 * (x * x + y * y)
    return A


def euler_to_quaternion(angles, degrees: bool = True) -> np.ndarray:
    return matrix_to_quaternion(euler_to_matrix(angles, degrees))


def quaternion_to_euler(q, degrees: bool = True) -> np.ndarray:
    return matrix_to_euler(quaternion_to_matrix(q), degrees)


def random_quaternions(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotations uniform on SO(3) (Haar measure): normalised 4-D Gaussian vectors, w ≥ 0."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return canonical_quaternion(q)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniformly distributed rotation matrices (n, 3, 3)."""
    return quaternion_to_matrix(random_quaternions(n, rng))


def random_euler(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniformly distributed orientations as RELION Euler angles (degrees), rot/psi in (−180, 180]."""
    return matrix_to_euler(random_rotations(n, rng))


def angular_error(A, B) -> np.ndarray:
    """The paper's angle error (degrees): mean over the three axes of the angle between
    corresponding rows of ``A`` and ``B`` (each ``(..., 3, 3)``)."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    cos = np.clip(np.sum(A * B, axis=-1), -1.0, 1.0)  # (..., 3): row i of A · row i of B
    return np.rad2deg(np.arccos(cos)).mean(axis=-1)


def geodesic_angle(A, B) -> np.ndarray:
    """Angle (degrees) of the rotation taking ``A`` to ``B`` (the SO(3) geodesic distance)."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    tr = np.einsum("...ij,...ij->...", A, B)  # trace(Aᵀ B)
    return np.rad2deg(np.arccos(np.clip((tr - 1) / 2, -1.0, 1.0)))


def inplane_rotation(psi_deg) -> np.ndarray:
    """Matrix of an in-plane rotation by psi (degrees) in RELION's sense: Rz(psi) of the docstring."""
    return euler_to_matrix(np.stack([np.zeros_like(np.asarray(psi_deg, float)), np.zeros_like(np.asarray(psi_deg, float)),
                                     np.asarray(psi_deg, float)], axis=-1))


# ----------------------------------------------------------------------------- torch
def euler_to_matrix_torch(angles: "torch.Tensor") -> "torch.Tensor":
    """Torch, differentiable: ``angles[..., 0:3]`` = (rot, tilt, psi) in RADIANS → ``A (..., 3, 3)``."""
    rot, tilt, psi = angles[..., 0], angles[..., 1], angles[..., 2]
    ca, sa = torch.cos(rot), torch.sin(rot)
    cb, sb = torch.cos(tilt), torch.sin(tilt)
    cg, sg = torch.cos(psi), torch.sin(psi)
    cc, cs = cb * ca, cb * sa
    sc, ss = sb * ca, sb * sa
    rows = [
        torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
        torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
        torch.stack([sc, ss, cb], -1),
    ]
    return torch.stack(rows, -2)


def quaternion_to_matrix_torch(q: "torch.Tensor") -> "torch.Tensor":
    """Torch, differentiable: quaternion (w, x, y, z) → rotation matrix (normalises the input)."""
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    rows = [
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ]
    return torch.stack(rows, -2)


def matrix_to_quaternion_torch(A: "torch.Tensor") -> "torch.Tensor":
    """Torch: rotation matrix → unit quaternion with w ≥ 0 (via the numpy routine; not differentiable)."""
    q = matrix_to_quaternion(A.detach().cpu().double().numpy())
    return torch.as_tensor(q, dtype=A.dtype, device=A.device)


def quaternion_distance_torch(q1: "torch.Tensor", q2: "torch.Tensor") -> "torch.Tensor":
    """Sign-invariant quaternion distance in [0, 1]: ``1 − |⟨q̂1, q̂2⟩|`` (q and −q are equal)."""
    q1 = q1 / q1.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    q2 = q2 / q2.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1 - (q1 * q2).sum(-1).abs()


def angular_error_torch(A: "torch.Tensor", B: "torch.Tensor") -> "torch.Tensor":
    """Torch version of :func:`angular_error` (degrees)."""
    cos = (A * B).sum(-1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos)).mean(-1)
