"""Continuous refinement of pose and amplitudes together: batched, bounded L-BFGS.

Each problem (a particle, or one of its search candidates) has the parameters

    u = (ω · r_g, origin, q / √N)        (all in Å of atomic displacement)

where ``ω`` (radians) is a rotation vector perturbing the starting rotation on the left,
``A = exp([ω]×) · A₀`` (ω_z turns the image in plane, ω_x and ω_y tilt it), ``r_g`` is the
reference's radius of gyration, ``origin`` the RELION origin (Å) and ``q`` the amplitudes
(``q/√N`` is the RMS displacement a unit-norm mode causes). Expressing every parameter as
the displacement it causes makes them commensurate, so one step-size scale suits all and
tolerances are in Å.

The objective is ``−score`` (:meth:`deephemnma.align.levels.LevelData.score`), its gradient
by automatic differentiation through the analytic Gaussian-atom projector. The optimiser is
L-BFGS run independently per problem but evaluated in batches (two-loop recursion on
per-problem histories, per-problem backtracking Armijo line search), with amplitudes kept
within bounds by projection (the components of the gradient that push a bound variable
outwards are zeroed and the step is clipped). Problems stop when a step moves no parameter
by more than ``xtol`` Å and the objective changes by less than ``ftol``; those still moving
after ``max_iter`` iterations are reported as not converged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .levels import LevelData
from .model import ElasticModel


def skew(w: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(w[..., 0])
    return torch.stack([
        torch.stack([z, -w[..., 2], w[..., 1]], -1),
        torch.stack([w[..., 2], z, -w[..., 0]], -1),
        torch.stack([-w[..., 1], w[..., 0], z], -1),
    ], -2)


def rotation_from_vector(w: torch.Tensor) -> torch.Tensor:
    """exp([w]×) (…, 3, 3), differentiable (matrix exponential of the skew matrix)."""
    return torch.linalg.matrix_exp(skew(w))


@dataclass
class RefineResult:
    rotations: np.ndarray   # (n, 3, 3)
    origins: np.ndarray     # (n, 2) Å
    amplitudes: np.ndarray  # (n, M)
    score: np.ndarray       # (n,)
    converged: np.ndarray   # (n,) bool
    iterations: np.ndarray  # (n,)
    evaluations: int


class Problem:
    """Objective of a batch of refinement problems at one level."""

    def __init__(self, model: ElasticModel, data: LevelData, particle: np.ndarray, R0: np.ndarray,
                 amp_bound: np.ndarray, shift_bound: float):
        self.model = model
        self.data = data
        self.level = data.level
        self.particle = torch.as_tensor(particle, dtype=torch.long)
        self.R0 = torch.as_tensor(R0, dtype=torch.float32)
        self.rg = max(model.radius_of_gyration, 1.0)
        self.sqrt_n = model.amplitude_scale()
        M = model.n_modes
        ub = np.concatenate([np.full(3, np.inf), np.full(2, shift_bound), np.asarray(amp_bound, float) / self.sqrt_n])
        self.upper = torch.as_tensor(ub, dtype=torch.float32)[None].expand(len(particle), 5 + M)
        self.lower = -self.upper
        self.evaluations = 0

    def pack(self, origins: np.ndarray, amplitudes: np.ndarray) -> torch.Tensor:
        u = np.concatenate([np.zeros((len(origins), 3)), origins, amplitudes / self.sqrt_n], 1)
        return torch.as_tensor(u, dtype=torch.float32)

    def unpack(self, u: torch.Tensor, idx: torch.Tensor | None = None):
        R0 = self.R0 if idx is None else self.R0[idx]
        R = rotation_from_vector(u[:, :3] / self.rg) @ R0
        return R, u[:, 3:5], u[:, 5:] * self.sqrt_n

    def value_and_grad(self, u: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = u.detach().requires_grad_(True)
        R, origin, q = self.unpack(u, idx)
        lv = self.level
        P = self.model.project(R, origin / lv.pixel_size, q, lv.box, lv.pixel_size, lv.blur)
        f = -self.data.score(P, self.particle[idx])
        (g,) = torch.autograd.grad(f.sum(), u)
        self.evaluations += len(idx)
        return f.detach(), g.detach()

    def value(self, u: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            if idx is None:
                idx = torch.arange(u.shape[0])
            R, origin, q = self.unpack(u, idx)
            lv = self.level
            P = self.model.project(R, origin / lv.pixel_size, q, lv.box, lv.pixel_size, lv.blur)
            return -self.data.score(P, self.particle[idx])


def _two_loop(g, S, Y, rho, count, head):
    """Batched L-BFGS direction −H·g. S, Y (n, m, D); rho (n, m); count (n,) valid pairs;
    head (n,) index of the newest pair."""
    n, m, D = S.shape
    q = g.clone()
    alpha = torch.zeros(n, m, dtype=g.dtype)
    ar = torch.arange(n)
    for i in range(m):
        j = (head - i) % m
        valid = (i < count).to(g.dtype)
        s, y, r = S[ar, j], Y[ar, j], rho[ar, j] * valid
        a = r * (s * q).sum(1)
        alpha[:, i] = a
        q = q - a[:, None] * y
    # initial Hessian scaling γ = sᵀy / yᵀy of the newest pair
    s, y = S[ar, head], Y[ar, head]
    yy = (y * y).sum(1)
    gamma = torch.where((count > 0) & (yy > 0), (s * y).sum(1) / yy.clamp_min(1e-30), torch.ones_like(yy))
    r = q * gamma[:, None]
    for i in reversed(range(m)):
        j = (head - i) % m
        valid = (i < count).to(g.dtype)
        s, y, rr = S[ar, j], Y[ar, j], rho[ar, j] * valid
        b = rr * (y * r).sum(1)
        r = r + s * (alpha[:, i] - b)[:, None]
    return -r


def minimize(problem: Problem, u0: torch.Tensor, max_iter: int = 30, history: int = 6, xtol: float = 0.01,
             ftol: float = 1e-7, first_step: float = 0.5, max_step: float = 3.0, max_backtracks: int = 6,
             c1: float = 1e-4):
    """Batched bounded L-BFGS (see the module docstring). Returns (u, f, converged, iterations)."""
    n, D = u0.shape
    lo, hi = problem.lower, problem.upper
    u = torch.minimum(torch.maximum(u0.clone(), lo), hi)
    all_idx = torch.arange(n)
    f, g = problem.value_and_grad(u, all_idx)
    S = torch.zeros(n, history, D)
    Y = torch.zeros(n, history, D)
    rho = torch.zeros(n, history)
    count = torch.zeros(n, dtype=torch.long)
    head = torch.zeros(n, dtype=torch.long)
    active = torch.ones(n, dtype=torch.bool)
    converged = torch.zeros(n, dtype=torch.bool)
    iters = torch.zeros(n, dtype=torch.long)
    for _ in range(max_iter):
        idx = torch.nonzero(active).reshape(-1)
        if idx.numel() == 0:
            break
        ui, gi = u[idx], g[idx]
        # projected gradient: variables at a bound with the gradient pushing outwards are fixed
        at_lo = (ui <= lo[idx] + 1e-6) & (gi > 0)
        at_hi = (ui >= hi[idx] - 1e-6) & (gi < 0)
        free = ~(at_lo | at_hi)
        gp = gi * free
        d = _two_loop(gp, S[idx], Y[idx], rho[idx], count[idx], head[idx]) * free
        slope = (gp * d).sum(1)
        bad = ~(slope < 0)
        if bad.any():  # not a descent direction: restart from steepest descent
            d[bad] = -gp[bad]
            count[idx[bad]] = 0
            slope = (gp * d).sum(1)
        fresh = count[idx] == 0
        dmax = d.abs().amax(1).clamp_min(1e-30)
        scale = torch.where(fresh, first_step / dmax, torch.ones_like(dmax))
        scale = torch.minimum(scale, max_step / dmax)
        d = d * scale[:, None]
        slope = slope * scale
        alpha = torch.ones(len(idx))
        done = torch.zeros(len(idx), dtype=torch.bool)
        new_u = ui.clone()
        new_f = f[idx].clone()
        new_g = gi.clone()
        for _ls in range(max_backtracks + 1):
            todo = torch.nonzero(~done).reshape(-1)
            if todo.numel() == 0:
                break
            trial = ui[todo] + alpha[todo, None] * d[todo]
            trial = torch.minimum(torch.maximum(trial, lo[idx[todo]]), hi[idx[todo]])
            ft, gt = problem.value_and_grad(trial, idx[todo])
            decrease = (gp[todo] * (trial - ui[todo])).sum(1)
            ok = ft <= f[idx[todo]] + c1 * torch.minimum(decrease, torch.zeros_like(decrease))
            ok = ok & torch.isfinite(ft)
            acc = todo[ok]
            new_u[acc], new_f[acc], new_g[acc] = trial[ok], ft[ok], gt[ok]
            done[acc] = True
            alpha[todo[~ok]] *= 0.5
        step = new_u - ui
        moved = step.abs().amax(1)
        df = (f[idx] - new_f).abs()
        # memory update
        s, y = step, new_g - gi
        sy = (s * y).sum(1)
        upd = done & (sy > 1e-10)
        if upd.any():
            k = idx[upd]
            h = (head[k] + (count[k] > 0).long()) % history
            S[k, h] = s[upd]
            Y[k, h] = y[upd]
            rho[k, h] = 1.0 / sy[upd]
            head[k] = h
            count[k] = torch.clamp(count[k] + 1, max=history)
        u[idx], f[idx], g[idx] = new_u, new_f, new_g
        iters[idx] += 1
        conv = done & (moved < xtol) & (df < ftol + 1e-6 * f[idx].abs())
        stuck = ~done  # line search failed: no decrease found along the direction
        if stuck.any():
            # at a (numerical) optimum if the direction was already tiny, else give up
            conv = conv | (stuck & (dmax * scale < 4 * xtol))
        finished = conv | stuck
        converged[idx[conv]] = True
        active[idx[finished]] = False
    return u, f, converged, iters


def refine(model: ElasticModel, data: LevelData, particle: np.ndarray, rotations: np.ndarray, origins: np.ndarray,
           amplitudes: np.ndarray, amp_bound: np.ndarray, shift_bound: float, *, max_iter: int = 30,
           batch: int = 64, **kw) -> RefineResult:
    """Refine problems (``particle`` index into ``data`` for each) from starting poses
    (rotations (n,3,3), origins (n,2) Å, amplitudes (n,M)), in batches of ``batch``."""
    n = len(particle)
    M = model.n_modes
    out = RefineResult(np.zeros((n, 3, 3)), np.zeros((n, 2)), np.zeros((n, M)), np.zeros(n),
                       np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64), 0)
    for a in range(0, n, batch):
        sl = slice(a, min(n, a + batch))
        prob = Problem(model, data, particle[sl], rotations[sl], amp_bound, shift_bound)
        u0 = prob.pack(origins[sl], amplitudes[sl])
        u, f, conv, iters = minimize(prob, u0, max_iter=max_iter, **kw)
        with torch.no_grad():
            R, o, q = prob.unpack(u, torch.arange(len(u)))
        out.rotations[sl] = R.double().numpy()
        out.origins[sl] = o.double().numpy()
        out.amplitudes[sl] = q.double().numpy()
        out.score[sl] = -f.double().numpy()
        out.converged[sl] = conv.numpy()
        out.iterations[sl] = iters.numpy()
        out.evaluations += prob.evaluations
    return out
