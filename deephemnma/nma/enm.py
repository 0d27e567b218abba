"""Elastic network model (Tirion 1996): Hessian, lowest eigenpairs, RTB reduction.

Potential: every pair of atoms closer than ``cutoff`` (Å) in the reference is joined by a
spring of uniform constant k = 1, E = ½ Σ_pairs (|r_i − r_j| − d⁰_ij)². Its Hessian at the
reference is H = Gᵀ·G with one row of G per spring: ``e_ijᵀ`` on atom i's three columns and
``−e_ijᵀ`` on atom j's, ``e_ij`` the unit vector between them. H is built as a sparse 3N×3N
matrix from the neighbour pairs (scipy cKDTree), with no Python loop over atoms or pairs.
Unit masses: eigenvalues are squared frequencies in units of k/m, only their ratios mean
anything. A connected, rigid network has exactly six zero eigenvalues (rigid-body motions).

RTB (rotations–translations of blocks; Tama et al. 2000, Durand et al. 1994): atoms are
grouped into blocks that move rigidly. With P the 3N×6B matrix of per-block rigid motions
(orthonormal columns: 3 translations, 3 rotations about the block's principal axes, divided
by the square root of the principal moments), the reduced Hessian is Pᵀ·H·P = (G·P)ᵀ(G·P),
again built row by row from the springs between different blocks (springs inside a block do
not deform). Its eigenvectors u give full modes v = P·u, which are orthonormal over 3N
because P's columns are.

Eigenpairs: dense ``scipy.linalg.eigh`` for small problems, else ``scipy.sparse.linalg.eigsh``
in shift-invert mode around a slightly negative shift (H − σI is then positive definite and
factorises although H is singular), with a seeded start vector so reruns agree.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..core.logs import get_logger

log = get_logger(__name__)

DENSE_MAX_DOF = 1500        # dense eigh up to this size, sparse shift-invert above
PAIR_CHUNK = 1_000_000      # springs per chunk when assembling G·P (bounds peak memory)
ZERO_TOL = 1e-6             # |λ| < ZERO_TOL × mean diagonal of H counts as a zero mode


# ----------------------------------------------------------------------------- network


def contact_pairs(coords: np.ndarray, cutoff: float) -> np.ndarray:
    """(P, 2) int64 array of atom pairs (i < j) closer than ``cutoff`` Å (sorted, deterministic)."""
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    pairs = cKDTree(coords).query_pairs(float(cutoff), output_type="ndarray").astype(np.int64)
    if len(pairs):
        order = np.lexsort((pairs[:, 1], pairs[:, 0]))
        pairs = pairs[order]
    return pairs.reshape(-1, 2)


def network_components(n_atoms: int, pairs: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected components of the spring network: (count, per-atom label)."""
    from scipy.sparse.csgraph import connected_components

    adj = sp.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n_atoms, n_atoms))
    return connected_components(adj, directed=False)


def _spring_units(coords: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    d = coords[pairs[:, 1]] - coords[pairs[:, 0]]
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def hessian(coords: np.ndarray, cutoff: float | None = None, pairs: np.ndarray | None = None,
            spring: float = 1.0) -> sp.csr_matrix:
    """Sparse 3N×3N Tirion/ANM Hessian (coordinate order x0, y0, z0, x1, ...)."""
    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    if pairs is None:
        if cutoff is None:
            raise ValueError("give cutoff or pairs")
        pairs = contact_pairs(coords, cutoff)
    H = sp.csr_matrix((3 * n, 3 * n))
    for s in range(0, max(len(pairs), 1), PAIR_CHUNK):
        p = pairs[s:s + PAIR_CHUNK]
        if len(p) == 0:
            break
        e = _spring_units(coords, p)
        m = len(p)
        rows = np.repeat(np.arange(m, dtype=np.int64), 6)
        cols = np.concatenate([3 * p[:, :1] + np.arange(3), 3 * p[:, 1:] + np.arange(3)], axis=1).ravel()
        vals = np.concatenate([e, -e], axis=1).ravel()
        G = sp.csr_matrix((vals, (rows, cols)), shape=(m, 3 * n))
        H = H + (G.T @ G).tocsr()
    return (spring * H).tocsr()


# ----------------------------------------------------------------------------- rigid bodies


def rigid_body_basis(coords: np.ndarray) -> np.ndarray:
    """Orthonormal 3N×6 basis of the rigid-body motions: translations along x, y, z, then
    rotations about the principal axes of inertia (unit masses, smallest moment first).

    Each column's largest-magnitude component is made positive, so the basis is unique.
    """
    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    x = coords - coords.mean(axis=0)
    basis = np.zeros((n, 3, 6))
    for a in range(3):
        basis[:, a, a] = 1.0 / np.sqrt(n)
    inertia = (x * x).sum() * np.eye(3) - x.T @ x
    mu, axes = np.linalg.eigh(inertia)
    for k in range(3):
        if mu[k] <= 1e-12 * max(mu.max(), 1e-300):
            continue
        basis[:, :, 3 + k] = np.cross(axes[:, k], x) / np.sqrt(mu[k])
    B = basis.reshape(3 * n, 6)
    return fix_signs(B)


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so that its largest-magnitude component (first one on ties) is positive."""
    V = np.array(vectors, dtype=np.float64, copy=True)
    if V.ndim == 1:
        V = V[:, None]
    idx = np.argmax(np.abs(V), axis=0)
    signs = np.sign(V[idx, np.arange(V.shape[1])])
    signs[signs == 0] = 1.0
    return V * signs


# ----------------------------------------------------------------------------- RTB


def residue_blocks(residue_index: np.ndarray, chain_id: np.ndarray, block_size: int) -> np.ndarray:
    """Per-atom block id: ``block_size`` consecutive residues of one chain per block.

    A chain's last block is merged into the previous one when it holds fewer than half
    ``block_size`` residues (a one-residue block of one Cα has no rotations of its own).
    """
    residue_index = np.asarray(residue_index)
    chain_id = np.asarray(chain_id).astype(str)
    n = len(residue_index)
    block = np.empty(n, dtype=np.int64)
    next_id = 0
    # chain runs in file order
    starts = np.flatnonzero(np.r_[True, chain_id[1:] != chain_id[:-1]])
    ends = np.r_[starts[1:], n]
    for s, e in zip(starts, ends):
        r = residue_index[s:e]
        local = np.unique(r, return_inverse=True)[1]
        nres = local.max() + 1
        b = local // block_size
        nb = int(b.max()) + 1
        if nb > 1 and nres - (nb - 1) * block_size < max(1, block_size // 2):
            b = np.minimum(b, nb - 2)
            nb -= 1
        block[s:e] = b + next_id
        next_id += nb
    return block


def spatial_blocks(coords: np.ndarray, atoms_per_block: int, seed: int = 0) -> np.ndarray:
    """Per-atom block id from k-means clusters of the coordinates (references without residues)."""
    from sklearn.cluster import KMeans

    n = len(coords)
    k = max(1, int(round(n / max(1, atoms_per_block))))
    if k >= n:
        return np.arange(n, dtype=np.int64)
    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(np.asarray(coords, dtype=np.float64))
    # relabel clusters in order of first appearance so ids do not depend on k-means internals
    _, first, inverse = np.unique(km.labels_, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[inverse].astype(np.int64)


def rtb_projector(coords: np.ndarray, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-atom rigid-motion basis of its block.

    Returns ``Pat`` (N, 3, 6): atom i moves by ``Pat[i] @ s_b`` when its block b has the
    6 block coordinates s_b; ``keep`` (6B,) bool: block coordinates that exist (rotations of
    one-atom or collinear blocks do not); and B, the number of blocks. Columns of the
    assembled 3N×6B matrix are orthonormal.
    """
    coords = np.asarray(coords, dtype=np.float64)
    blocks = np.asarray(blocks, dtype=np.int64)
    nb = int(blocks.max()) + 1
    counts = np.bincount(blocks, minlength=nb).astype(np.float64)
    if np.any(counts == 0):
        raise ValueError("block ids must be 0..B-1 without gaps")
    centres = np.stack([np.bincount(blocks, coords[:, a], minlength=nb) for a in range(3)], axis=1) / counts[:, None]
    x = coords - centres[blocks]
    # inertia tensors per block: Σ (|x|² I − x xᵀ)
    outer = x[:, :, None] * x[:, None, :]
    sumxx = np.zeros((nb, 3, 3))
    np.add.at(sumxx, blocks, outer)
    trace = np.trace(sumxx, axis1=1, axis2=2)
    inertia = trace[:, None, None] * np.eye(3) - sumxx
    mu, axes = np.linalg.eigh(inertia)                 # (B, 3), (B, 3, 3) columns = axes
    tol = 1e-6 * np.maximum(trace, 1e-12)
    ok_rot = mu > tol[:, None]                         # (B, 3)
    inv_sqrt = np.where(ok_rot, 1.0 / np.sqrt(np.where(ok_rot, mu, 1.0)), 0.0)
    Pat = np.zeros((len(coords), 3, 6))
    Pat[:, [0, 1, 2], [0, 1, 2]] = (1.0 / np.sqrt(counts[blocks]))[:, None]
    ax = axes[blocks]                                  # (N, 3, 3)
    for k in range(3):
        Pat[:, :, 3 + k] = np.cross(ax[:, :, k], x) * inv_sqrt[blocks, k][:, None]
    keep = np.concatenate([np.ones((nb, 3), dtype=bool), ok_rot], axis=1).ravel()
    return Pat, keep, nb


def rtb_hessian(coords: np.ndarray, pairs: np.ndarray, blocks: np.ndarray, Pat: np.ndarray,
                nb: int, spring: float = 1.0) -> sp.csr_matrix:
    """Reduced 6B×6B Hessian Pᵀ·H·P from the springs between different blocks."""
    inter = pairs[blocks[pairs[:, 0]] != blocks[pairs[:, 1]]]
    Hr = sp.csr_matrix((6 * nb, 6 * nb))
    for s in range(0, max(len(inter), 1), PAIR_CHUNK):
        p = inter[s:s + PAIR_CHUNK]
        if len(p) == 0:
            break
        e = _spring_units(coords, p)
        gi = np.einsum("pa,pak->pk", e, Pat[p[:, 0]])
        gj = np.einsum("pa,pak->pk", e, Pat[p[:, 1]])
        m = len(p)
        rows = np.repeat(np.arange(m, dtype=np.int64), 12)
        bi = blocks[p[:, 0]]
        bj = blocks[p[:, 1]]
        cols = np.concatenate([6 * bi[:, None] + np.arange(6), 6 * bj[:, None] + np.arange(6)], axis=1).ravel()
        vals = np.concatenate([gi, -gj], axis=1).ravel()
        G = sp.csr_matrix((vals, (rows, cols)), shape=(m, 6 * nb))
        Hr = Hr + (G.T @ G).tocsr()
    return (spring * Hr).tocsr()


def rtb_expand(u: np.ndarray, blocks: np.ndarray, Pat: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Block-coordinate vectors u (6B_kept, K) → atomic vectors (3N, K)."""
    nb6 = keep.size
    full = np.zeros((nb6, u.shape[1]))
    full[keep] = u
    s = full.reshape(-1, 6, u.shape[1])[blocks]        # (N, 6, K)
    v = np.einsum("nak,nkm->nam", Pat, s)              # (N, 3, K)
    return v.reshape(-1, u.shape[1])


# ----------------------------------------------------------------------------- eigenpairs


def lowest_eigenpairs(H: sp.spmatrix, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The k lowest eigenpairs of a symmetric positive semi-definite matrix, ascending.

    Dense ``eigh`` up to :data:`DENSE_MAX_DOF`, else shift-invert Lanczos (``eigsh``) around
    σ = −10⁻⁶ × the mean diagonal, with a seeded start vector.
    """
    n = H.shape[0]
    k = min(k, n)
    if n <= DENSE_MAX_DOF or k >= n - 1:
        from scipy.linalg import eigh

        w, v = eigh(H.toarray(), subset_by_index=[0, k - 1])
    else:
        from scipy.sparse.linalg import eigsh

        scale = float(H.diagonal().mean()) or 1.0
        sigma = -1e-6 * scale
        v0 = np.random.default_rng(seed).standard_normal(n)
        w, v = eigsh(H.tocsc(), k=k, sigma=sigma, which="LM", v0=v0, tol=0.0,
                     ncv=min(n, max(2 * k + 1, 40)))
    order = np.argsort(w, kind="stable")
    return w[order], v[:, order]


def zero_tolerance(H: sp.spmatrix) -> float:
    """Eigenvalues below this count as zero: :data:`ZERO_TOL` × the mean diagonal of H."""
    return ZERO_TOL * float(H.diagonal().mean())


def collectivity(vectors: np.ndarray) -> np.ndarray:
    """Brüschweiler (1995) collectivity of modes given as (K, N, 3) or (3N, K) columns.

    κ = exp(−Σ_i p_i ln p_i) / N with p_i = |v_i|² / Σ_j |v_j|² (unit masses): 1 when all
    atoms move equally, 1/N when one atom moves.
    """
    V = np.asarray(vectors, dtype=np.float64)
    if V.ndim == 2:                                    # (3N, K) columns
        V = V.T.reshape(V.shape[1], -1, 3)
    p = (V ** 2).sum(axis=2)
    p = p / p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return np.exp(ent) / V.shape[1]
