"""A vectorised L-BFGS: many independent small problems minimised at once.

The Approach-3 fit starts L-BFGS from 4500 points of a grid, and the bootstrap refits
hundreds of resamples; one Python loop per problem would spend its time in the interpreter.
Here every NumPy call serves all problems still running, so the whole grid costs about
as many objective evaluations as one start. Generic: nothing here knows about scaling laws.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class BatchedLBFGSResult:
    x: np.ndarray          # (S, d) final points
    f: np.ndarray          # (S,) final objective values
    iterations: np.ndarray  # (S,) iterations used
    converged: np.ndarray  # (S,) bool: gradient or progress criterion met (not the iteration cap)


def batched_lbfgs(fun: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]], x0: np.ndarray, *,
                  memory: int = 10, max_iter: int = 500, gtol: float = 1e-9, ftol: float = 1e-12,
                  free: np.ndarray | None = None) -> BatchedLBFGSResult:
    """Minimise many independent problems at once with L-BFGS (two-loop recursion, Armijo
    backtracking), one NumPy call per objective evaluation for all problems still running.

    ``fun(x, rows)`` returns ``(f, g)`` for ``x`` ``(k, d)``, the problems ``rows`` ``(k,)``
    (indices into ``x0``, so per-problem data such as bootstrap weights can be selected).
    ``free``: bool ``(d,)``; coordinates that are False stay at their initial value.
    """
    x = np.array(x0, dtype=float)
    S, d = x.shape
    mask = np.ones(d) if free is None else np.asarray(free, dtype=float)
    f, g = fun(x, np.arange(S))
    g = g * mask
    s_hist = np.zeros((memory, S, d))
    y_hist = np.zeros((memory, S, d))
    rho = np.zeros((memory, S))
    n_hist = np.zeros(S, dtype=int)
    iters = np.zeros(S, dtype=int)
    active = np.isfinite(f) & (np.abs(g).max(axis=1) > gtol)
    converged = ~active & np.isfinite(f)
    for it in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        gi = g[idx]
        # two-loop recursion, newest pair first; pairs are stored in a ring at it % memory
        q = gi.copy()
        alphas = np.zeros((memory, idx.size))
        order = [(it - 1 - j) % memory for j in range(memory)]
        for j in order:
            alphas[j] = rho[j, idx] * np.einsum("sd,sd->s", s_hist[j, idx], q)
            q -= alphas[j][:, None] * y_hist[j, idx]
        newest = order[0]
        yy = np.einsum("sd,sd->s", y_hist[newest, idx], y_hist[newest, idx])
        sy = np.einsum("sd,sd->s", s_hist[newest, idx], y_hist[newest, idx])
        gamma = np.where((n_hist[idx] > 0) & (yy > 0) & (sy > 0), sy / np.where(yy > 0, yy, 1.0), 0.0)
        # first step (no curvature yet): a unit-length step along -g
        gamma = np.where(gamma > 0, gamma, 1.0 / np.maximum(np.linalg.norm(gi, axis=1), 1e-300))
        r = gamma[:, None] * q
        for j in reversed(order):
            b_j = rho[j, idx] * np.einsum("sd,sd->s", y_hist[j, idx], r)
            r += (alphas[j] - b_j)[:, None] * s_hist[j, idx]
        direction = -r * mask
        slope = np.einsum("sd,sd->s", gi, direction)
        bad = ~(slope < 0)  # not a descent direction: restart from steepest descent
        if bad.any():
            direction[bad] = -gi[bad] / np.maximum(np.linalg.norm(gi[bad], axis=1, keepdims=True), 1e-300)
            slope[bad] = np.einsum("sd,sd->s", gi[bad], direction[bad])
            rho[:, idx[bad]] = 0.0
            n_hist[idx[bad]] = 0
        # Armijo backtracking, vectorised: problems that accept leave the loop
        step = np.ones(idx.size)
        new_x = np.empty_like(x[idx])
        new_f = np.full(idx.size, np.inf)
        new_g = np.zeros_like(gi)
        pending = np.arange(idx.size)
        for _ in range(40):
            trial = x[idx[pending]] + step[pending, None] * direction[pending]
            ft, gt = fun(trial, idx[pending])
            ok = np.isfinite(ft) & (ft <= f[idx[pending]] + 1e-4 * step[pending] * slope[pending])
            acc = pending[ok]
            new_x[acc], new_f[acc], new_g[acc] = trial[ok], ft[ok], gt[ok] * mask
            pending = pending[~ok]
            if pending.size == 0:
                break
            step[pending] *= 0.5
        failed = np.zeros(idx.size, dtype=bool)
        failed[pending] = True
        moved = ~failed
        mi = idx[moved]
        s_new = new_x[moved] - x[mi]
        y_new = new_g[moved] - g[mi]
        sy_new = np.einsum("sd,sd->s", s_new, y_new)
        slot = it % memory
        s_hist[slot, mi] = s_new
        y_hist[slot, mi] = y_new
        rho[slot, mi] = np.where(sy_new > 1e-16, 1.0 / np.where(sy_new > 1e-16, sy_new, 1.0), 0.0)
        # problems that did not move keep a zero pair in this slot (skipped by rho = 0)
        rho[slot, idx[failed]] = 0.0
        n_hist[mi] += 1
        f_old = f[mi].copy()
        x[mi], f[mi], g[mi] = new_x[moved], new_f[moved], new_g[moved]
        iters[idx] += 1
        small_grad = np.abs(g[mi]).max(axis=1) <= gtol
        small_step = (f_old - f[mi]) <= ftol * np.maximum(np.abs(f_old), 1e-300)
        done = small_grad | small_step
        converged[mi[done]] = True
        active[mi[done]] = False
        active[idx[failed]] = False  # no decrease along a descent direction: at a (numerical) minimum
        converged[idx[failed]] = True
    return BatchedLBFGSResult(x=x, f=f, iterations=iters, converged=converged)
