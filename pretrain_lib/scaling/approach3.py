"""Approach 3 of Hoffmann et al. (2022): fit all five parameters of the law at once.

Minimise Σ_i Huber_δ(LSE(a − α log N_i, b − β log D_i, e) − log L_i) over (a, b, e, α, β),
with A = e^a, B = e^b, E = e^e (so a and b here are log A and log B, not the allocation
exponents), by L-BFGS from every start of the paper's grid; the best start wins.
"""
from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import numpy as np

from .law import PARAM_NAMES, ChinchillaFit
from .lbfgs import batched_lbfgs


#: The paper's grid of initial values (Hoffmann et al. 2022, §D.2): 6·6·5·5·5 = 4500 starts,
#: in the order (a, b, e, alpha, beta) with A = exp(a), B = exp(b), E = exp(e).
PAPER_GRID = {
    "a": np.arange(0.0, 25.0 + 1e-9, 5.0),
    "b": np.arange(0.0, 25.0 + 1e-9, 5.0),
    "e": np.arange(-1.0, 1.0 + 1e-9, 0.5),
    "alpha": np.arange(0.0, 2.0 + 1e-9, 0.5),
    "beta": np.arange(0.0, 2.0 + 1e-9, 0.5),
}


def grid_starts(grid: Mapping[str, Sequence[float]] | None = None) -> np.ndarray:
    """All combinations of the grid's values, shape ``(n_starts, 5)`` in (a, b, e, alpha, beta) order."""
    grid = PAPER_GRID if grid is None else grid
    missing = [k for k in ("a", "b", "e", "alpha", "beta") if k not in grid]
    if missing:
        raise ValueError(f"the grid needs values for {missing}; keys are a, b, e, alpha, beta")
    axes = [np.atleast_1d(np.asarray(grid[k], dtype=float)) for k in ("a", "b", "e", "alpha", "beta")]
    return np.array(list(itertools.product(*axes)))


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss: r²/2 for |r| ≤ δ, δ(|r| − δ/2) beyond."""
    abs_r = np.abs(r)
    return np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta))


def log_huber_objective(x: np.ndarray, log_N: np.ndarray, log_D: np.ndarray, log_loss: np.ndarray,
                        delta: float, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The paper's objective and its analytic gradient for many parameter vectors at once.

    x: ``(S, 5)`` rows (a, b, e, alpha, beta); log_N, log_D, log_loss: ``(n,)``;
    weights: ``(n,)`` or ``(S, n)`` (bootstrap counts), default all ones.
    Returns f ``(S,)`` = Σ_i w_i Huber_δ(LSE(a − α log N_i, b − β log D_i, e) − log L_i)
    and its gradient ``(S, 5)``.
    """
    a, b, e, alpha, beta = (x[:, k:k + 1] for k in range(5))
    t1 = a - alpha * log_N          # log(A / N^alpha), (S, n)
    t2 = b - beta * log_D           # log(B / D^beta)
    t3 = np.broadcast_to(e, t1.shape)  # log E
    m = np.maximum(np.maximum(t1, t2), t3)
    p1, p2, p3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(t3 - m)
    total = p1 + p2 + p3
    r = m + np.log(total) - log_loss
    w = 1.0 if weights is None else weights
    f = np.sum(w * huber(r, delta), axis=1)
    # d Huber / dr = clip(r, ±δ); d LSE / d t_k = softmax_k
    dr = w * np.clip(r, -delta, delta) / total
    g = np.empty_like(x)
    g1, g2 = dr * p1, dr * p2
    g[:, 0] = g1.sum(axis=1)
    g[:, 1] = g2.sum(axis=1)
    g[:, 2] = (dr * p3).sum(axis=1)
    g[:, 3] = -(g1 * log_N).sum(axis=1)
    g[:, 4] = -(g2 * log_D).sum(axis=1)
    return f, g



def _params_from_x(x: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(v) for v in x)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def _check_points(N, D, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    N, D, loss = (np.asarray(v, dtype=float).ravel() for v in (N, D, loss))
    if not (N.shape == D.shape == loss.shape):
        raise ValueError(f"N, D and loss must have the same length, got {N.size}, {D.size}, {loss.size}")
    if N.size < 5:
        raise ValueError(f"fitting 5 parameters needs at least 5 points, got {N.size}")
    for name, v in (("N", N), ("D", D), ("loss", loss)):
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise ValueError(f"{name} must be finite and positive everywhere (the fit works in log space)")
    return N, D, loss


_FIXABLE = {"E": 2, "A": 0, "B": 1, "alpha": 3, "beta": 4}


def fit_chinchilla(N, D, loss, *, delta: float = 1e-3, grid: Mapping[str, Sequence[float]] | None = None,
                   fixed: Mapping[str, float] | None = None, bootstrap: int = 0, seed: int = 0,
                   confidence: float = 0.95, polish: int = 5, label: str = "") -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta by the paper's Approach 3.

    Minimises Σ_i Huber_δ(LSE(a − α log N_i, b − β log D_i, e) − log L_i) over
    (a, b, e, α, β) with A = e^a, B = e^b, E = e^e, by L-BFGS from every start of ``grid``
    (default :data:`PAPER_GRID`, 4500 starts); the best start wins, after its ``polish``
    best candidates are refined with SciPy's L-BFGS-B.

    ``fixed``: e.g. ``{"alpha": 0.34, "beta": 0.28}`` holds those parameters (the source
    chapter's choice, shown to be a pitfall). ``bootstrap``: number of resamples (points drawn
    with replacement, ``seed``-ed); each is refitted from the full-data optimum and
    ``confidence`` percentile intervals go to ``fit.ci``.
    """
    from scipy.optimize import minimize

    N, D, loss = _check_points(N, D, loss)
    if not delta > 0:
        raise ValueError(f"delta (the Huber threshold) must be positive, got {delta}")
    log_N, log_D, log_L = np.log(N), np.log(D), np.log(loss)
    starts = grid_starts(grid)
    free = np.ones(5, dtype=bool)
    for name, value in (fixed or {}).items():
        if name not in _FIXABLE:
            raise ValueError(f"cannot fix {name!r}; choose among {sorted(_FIXABLE)}")
        k = _FIXABLE[name]
        free[k] = False
        starts[:, k] = value if name in ("alpha", "beta") else math.log(value)
    starts = np.unique(starts, axis=0)
    # Optimise a rescaled objective (÷ nδ) so tolerances do not depend on n or δ; same minimiser.
    scale = 1.0 / (len(loss) * delta)

    def fun(x, rows):
        f, g = log_huber_objective(x, log_N, log_D, log_L, delta)
        return f * scale, g * scale

    # the grid phase only has to find the right basin; the polish below sets the precision
    res = batched_lbfgs(fun, starts, free=free, gtol=1e-7, ftol=1e-9)
    finite = np.flatnonzero(np.isfinite(res.f))
    best = finite[np.argsort(res.f[finite], kind="stable")[:max(1, polish)]]

    def fun1(x):
        f, g = fun(x[None, :], None)
        return float(f[0]), g[0] * free

    candidates = []
    for i in best:
        # L-BFGS-B on the free coordinates only, as bounds equal to the fixed value
        bounds = [(None, None) if free[k] else (res.x[i, k], res.x[i, k]) for k in range(5)]
        out = minimize(fun1, res.x[i], jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12})
        candidates.append((out.fun, tuple(out.x)))
    best_f, best_x = min(candidates)
    best_x = np.array(best_x)
    fit = ChinchillaFit(**_params_from_x(best_x), objective=best_f / scale, n_points=len(loss),
                        n_starts=len(starts), label=label)
    if bootstrap:
        fit.bootstrap = _bootstrap(best_x, log_N, log_D, log_L, delta, free, bootstrap, seed)
        tail = (1.0 - confidence) / 2.0 * 100.0
        lo, hi = np.percentile(fit.bootstrap, [tail, 100.0 - tail], axis=0)
        fit.ci = {name: (float(lo[k]), float(hi[k])) for k, name in enumerate(PARAM_NAMES)}
    return fit


def _bootstrap(x_best: np.ndarray, log_N, log_D, log_L, delta: float, free: np.ndarray,
               n_boot: int, seed: int) -> np.ndarray:
    """Refit ``n_boot`` resamples (all at once, each from the full-data optimum); returns
    ``(n_boot, 5)`` in (E, A, B, alpha, beta) order."""
    if not isinstance(n_boot, int) or n_boot < 2:
        raise ValueError(f"bootstrap must be an integer ≥ 2 (number of resamples), got {n_boot!r}")
    rng = np.random.default_rng(seed)
    n = len(log_L)
    # resampling with replacement = integer weights that sum to n
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]).astype(float)
    scale = 1.0 / (n * delta)

    def fun(x, rows):
        f, g = log_huber_objective(x, log_N, log_D, log_L, delta, weights=counts[rows])
        return f * scale, g * scale

    res = batched_lbfgs(fun, np.repeat(x_best[None, :], n_boot, axis=0), free=free, max_iter=1000)
    a, b, e, alpha, beta = res.x.T
    return np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=1)

