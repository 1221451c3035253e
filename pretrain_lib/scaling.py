"""Scaling laws: FLOP counting, the Chinchilla law and its fits, compute-optimal allocation.

Notation of Hoffmann et al. (2022, "Training Compute-Optimal Large Language Models"):

    L(N, D) = E + A / N**alpha + B / D**beta

with N the parameters, D the training tokens and C ≈ 6 N D the training FLOPs.

- :func:`flops_per_token`, :func:`training_flops`: the course GPT's FLOP count (the model's
  own formula, ``GPT.flops_per_token``, not a second copy of it).
- :func:`fit_chinchilla`: the paper's Approach 3 (Huber loss on log-loss, log-sum-exp
  parameterisation, L-BFGS from a grid of starts, best start kept), with optional
  bootstrap intervals. All grid starts are optimised together by a vectorised L-BFGS
  (:func:`batched_lbfgs`), then the best few are polished with SciPy's L-BFGS-B.
- :func:`fit_isoflop`: Approach 2 (a parabola per compute budget, then power laws).
- :func:`compute_optimal`: the closed-form N_opt, D_opt under C = 6 N D;
  :func:`compute_overhead` and :func:`floor_size_factor`: the cost of missing it.
- :data:`PAPER_FIT` (published), :data:`EPOCH_FIT` (the replication's table, rounded),
  :data:`REPLICATION_FIT` (the course's own fit on the replication's 240 points).
- :func:`run_isoflop_sweep`: a real IsoFLOP sweep on the CPU with the course's training loop.
- :func:`load_chinchilla_data`: the paper's points as extracted by Epoch AI (Besiroglu et al., 2024).
"""
from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .model import GPT, ModelConfig

# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def _meta_gpt(config: ModelConfig | GPT) -> GPT:
    """A GPT with the given config whose weights live on the ``meta`` device: no memory, no
    initialisation cost, but ``num_params`` and ``flops_per_token`` work."""
    if isinstance(config, GPT):
        return config
    if not isinstance(config, ModelConfig):
        raise TypeError(f"expected a ModelConfig or a GPT, got {type(config).__name__}")
    with torch.device("meta"):
        return GPT(config)


def flops_per_token(config: ModelConfig | GPT, seq_len: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token of the course GPT: ≈ 6 N plus attention.

    Delegates to :meth:`pretrain_lib.model.GPT.flops_per_token` so the course has one formula.
    ``seq_len`` defaults to ``config.max_seq_len``.
    """
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len <= 0):
        raise ValueError(f"seq_len must be a positive integer or None, got {seq_len!r}")
    return _meta_gpt(config).flops_per_token(seq_len)


def training_flops(config: ModelConfig | GPT, tokens: float, seq_len: int | None = None) -> float:
    """FLOPs to train on ``tokens`` tokens: ``flops_per_token(config, seq_len) * tokens``."""
    if not tokens > 0:
        raise ValueError(f"tokens must be positive, got {tokens!r}")
    return flops_per_token(config, seq_len) * float(tokens)


def scaling_params(config: ModelConfig | GPT) -> int:
    """The N of C ≈ 6 N D for the course GPT: every weight that takes part in a matrix multiply
    (non-embedding parameters plus the tied output projection). Position embeddings are
    a lookup, not a multiply, so they are left out (as Kaplan et al. and Hoffmann et al. do for
    the FLOP count)."""
    model = _meta_gpt(config)
    c = model.config
    return model.num_params(non_embedding=True) + c.vocab_size * c.d_model


# ---------------------------------------------------------------------------------------------
# The law and published estimates
# ---------------------------------------------------------------------------------------------


def chinchilla_loss(N, D, E: float, A: float, B: float, alpha: float, beta: float):
    """L(N, D) = E + A / N**alpha + B / D**beta (NumPy broadcasting over N and D)."""
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    if np.any(N <= 0) or np.any(D <= 0):
        raise ValueError("N (parameters) and D (tokens) must be positive")
    return E + A / N**alpha + B / D**beta


PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


@dataclass
class ChinchillaFit:
    """Fitted (or published) parameters of L(N, D) = E + A/N^alpha + B/D^beta.

    ``objective``: the paper's objective at the optimum (sum of Huber losses of the log
    residuals); ``ci``: bootstrap intervals ``{name: (low, high)}`` when requested;
    ``bootstrap``: the bootstrap estimates, shape ``(n_boot, 5)`` in :data:`PARAM_NAMES` order.
    """
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = float("nan")
    n_points: int = 0
    n_starts: int = 0
    label: str = ""
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap: np.ndarray | None = field(default=None, repr=False)

    def __call__(self, N, D):
        """Predicted loss at N parameters and D tokens."""
        return chinchilla_loss(N, D, self.E, self.A, self.B, self.alpha, self.beta)

    predict = __call__

    @property
    def params(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in PARAM_NAMES}

    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a: beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt ∝ C^b: alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    def summary(self) -> str:
        text = (f"E={self.E:.3f}  A={self.A:.1f}  B={self.B:.1f}  alpha={self.alpha:.3f}  beta={self.beta:.3f}"
                f"  (N_opt ∝ C^{self.a:.3f}, D_opt ∝ C^{self.b:.3f})")
        return f"{self.label}: {text}" if self.label else text


#: Hoffmann et al. (2022), Approach 3 as published.
PAPER_FIT = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, label="Hoffmann et al. 2022")
#: Besiroglu et al. (2024), the same method on the SVG-extracted points, five outliers dropped,
#: as rounded in their paper's table. The rounding matters: with these two-decimal exponents
#: the law fits the points worse than the paper's own parameters do (see notebook 4.2).
EPOCH_FIT = ChinchillaFit(E=1.82, A=482.0, B=2085.0, alpha=0.35, beta=0.37,
                          label="Besiroglu et al. 2024 (as rounded in their table)")
#: The course's own replication-style fit: :func:`fit_chinchilla` with the paper's 4500-start
#: grid on ``load_chinchilla_data()`` (the 240 points the replication kept), stored to six
#: significant digits. ``tests/test_scaling.py`` refits and checks these values; they agree
#: with the replication's table to its rounding (E 1.82, A 482, B 2085, alpha 0.35, beta 0.37
#: up to 3 % on A and B).
REPLICATION_FIT = ChinchillaFit(E=1.81722, A=477.826, B=2143.42, alpha=0.347310, beta=0.367172,
                                label="replication-style fit (this course, 240 points)")


# ---------------------------------------------------------------------------------------------
# The Chinchilla paper's data (as extracted by Epoch AI)
# ---------------------------------------------------------------------------------------------

DATA_FILE = "chinchilla_svg_extracted_data.csv"


@dataclass
class ChinchillaData:
    """The paper's points: N parameters, C training FLOPs, D = C / (6 N) tokens, final loss."""
    N: np.ndarray
    C: np.ndarray
    D: np.ndarray
    loss: np.ndarray
    dropped: np.ndarray  # row indices (in the CSV) left out as outliers

    def __len__(self) -> int:
        return len(self.loss)


def load_chinchilla_data(*, drop_highest_loss: int = 5) -> ChinchillaData:
    """Read ``pretrain_lib/assets/chinchilla_svg_extracted_data.csv``.

    The points of Figure 4 of Hoffmann et al. (2022), recovered from the figure's SVG by
    Besiroglu, Erdil, Barnett and You (2024, "Chinchilla Scaling: A replication attempt",
    github.com/epoch-research/analyzing-chinchilla). As the replication did, tokens are
    D = C / (6 N) and the ``drop_highest_loss`` points with the highest loss are left out
    (5 by default; 0 keeps all 245).
    """
    if not isinstance(drop_highest_loss, int) or drop_highest_loss < 0:
        raise ValueError(f"drop_highest_loss must be a non-negative integer, got {drop_highest_loss!r}")
    text = resources.files("pretrain_lib").joinpath("assets").joinpath(DATA_FILE).read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    N = np.array([float(r["Model Size"]) for r in rows])
    C = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    if drop_highest_loss >= len(loss):
        raise ValueError(f"cannot drop {drop_highest_loss} of {len(loss)} points")
    # stable sort: ties are broken by file order, the same on every machine
    dropped = np.sort(np.argsort(-loss, kind="stable")[:drop_highest_loss])
    keep = np.setdiff1d(np.arange(len(loss)), dropped)
    return ChinchillaData(N=N[keep], C=C[keep], D=C[keep] / (6.0 * N[keep]), loss=loss[keep], dropped=dropped)


# ---------------------------------------------------------------------------------------------
# Approach 3: Huber on log-loss, log-sum-exp parameterisation, L-BFGS from a grid
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Compute-optimal allocation
# ---------------------------------------------------------------------------------------------


def compute_optimal(C, fit: ChinchillaFit) -> tuple[np.ndarray | float, np.ndarray | float]:
    """N_opt and D_opt that minimise the fitted L(N, D) subject to C = 6 N D.

    With D = C / (6N), dL/dN = 0 gives α A N^{-α} = β B (C/6)^{-β} N^{β}, so
    N_opt = G (C/6)^{β/(α+β)} and D_opt = G^{-1} (C/6)^{α/(α+β)}, G = (αA / (βB))^{1/(α+β)}.
    """
    C_arr = np.asarray(C, dtype=float)
    if np.any(~np.isfinite(C_arr)) or np.any(C_arr <= 0):
        raise ValueError("the compute budget C (FLOPs) must be positive and finite")
    if not (fit.alpha > 0 and fit.beta > 0 and fit.A > 0 and fit.B > 0):
        raise ValueError(f"compute_optimal needs alpha, beta, A, B > 0; got {fit.params}: "
                         "without both power-law terms there is no finite optimum")
    s = fit.alpha + fit.beta
    G = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1.0 / s)
    n_opt = G * (C_arr / 6.0) ** (fit.beta / s)
    d_opt = (C_arr / 6.0) / n_opt
    if C_arr.ndim == 0:
        return float(n_opt), float(d_opt)
    return n_opt, d_opt


def loss_along_budget(C: float, N, fit: ChinchillaFit):
    """The fitted loss of a model of N parameters trained on D = C / (6N) tokens."""
    N = np.asarray(N, dtype=float)
    return fit(N, C / (6.0 * N))


# ---------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP profiles
# ---------------------------------------------------------------------------------------------


@dataclass
class IsoFlopRun:
    """One training run of an IsoFLOP sweep."""
    compute: float   # the budget this run belongs to (FLOPs)
    params: float    # N
    tokens: float    # D
    loss: float      # final (validation) loss
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class IsoFlopFit:
    """Result of :func:`fit_isoflop`. Per budget (arrays of shape ``(n_budgets,)``): the
    parabola ``loss ≈ p[0] (log N)^2 + p[1] log N + p[2]``, N_opt at its vertex, D_opt from the
    same fit in log D, the loss there, and whether the vertex lies inside the sizes tried.
    Then the power laws N_opt = k_N C^a and D_opt = k_D C^b over the convex budgets."""
    budgets: np.ndarray
    parabolas_N: np.ndarray   # (n_budgets, 3)
    parabolas_D: np.ndarray   # (n_budgets, 3)
    N_opt: np.ndarray
    D_opt: np.ndarray
    loss_opt: np.ndarray
    convex: np.ndarray        # bool: the parabola opens upwards (has a minimum)
    bracketed: np.ndarray     # bool: the minimum lies between the smallest and largest N tried
    a: float
    b: float
    log_kN: float
    log_kD: float

    def n_opt(self, C):
        return np.exp(self.log_kN) * np.asarray(C, dtype=float) ** self.a

    def d_opt(self, C):
        return np.exp(self.log_kD) * np.asarray(C, dtype=float) ** self.b


def _as_run(run: IsoFlopRun | Mapping[str, float]) -> IsoFlopRun:
    if isinstance(run, IsoFlopRun):
        return run
    try:
        return IsoFlopRun(compute=float(run["compute"]), params=float(run["params"]),
                          tokens=float(run["tokens"]), loss=float(run["loss"]))
    except (KeyError, TypeError) as exc:
        raise ValueError("each run must be an IsoFlopRun or a mapping with keys compute, params, tokens, loss; "
                         f"got {run!r}") from exc


def fit_isoflop(runs: Iterable[IsoFlopRun | Mapping[str, float]]) -> IsoFlopFit:
    """Approach 2 of Hoffmann et al.: for each compute budget fit a parabola of loss against
    log N (and against log D), take its minimum, then fit N_opt ∝ C^a and D_opt ∝ C^b by
    least squares in log-log space over the budgets whose parabola is convex.

    Runs belong to the same budget when their ``compute`` values are equal (to 1e-9 relative).
    """
    runs = [_as_run(r) for r in runs]
    if not runs:
        raise ValueError("fit_isoflop got no runs")
    for r in runs:
        if not (r.compute > 0 and r.params > 0 and r.tokens > 0 and np.isfinite(r.loss)):
            raise ValueError(f"every run needs positive compute, params, tokens and a finite loss; got {r}")
    budgets: list[float] = []
    for r in sorted(runs, key=lambda r: r.compute):
        if not budgets or not math.isclose(r.compute, budgets[-1], rel_tol=1e-9):
            budgets.append(r.compute)
    pN, pD, n_opt, d_opt, l_opt, convex, bracketed = [], [], [], [], [], [], []
    for c in budgets:
        group = [r for r in runs if math.isclose(r.compute, c, rel_tol=1e-9)]
        sizes = np.array([r.params for r in group])
        if len(np.unique(sizes)) < 3:
            raise ValueError(f"budget C={c:.3g} has {len(np.unique(sizes))} distinct model sizes; a parabola "
                             "needs at least 3: add sizes to the sweep")
        log_n, log_d = np.log(sizes), np.log([r.tokens for r in group])
        losses = np.array([r.loss for r in group])
        coef_n = np.polyfit(log_n, losses, 2)
        coef_d = np.polyfit(log_d, losses, 2)
        is_convex = coef_n[0] > 0 and coef_d[0] > 0
        if is_convex:
            v_n, v_d = -coef_n[1] / (2 * coef_n[0]), -coef_d[1] / (2 * coef_d[0])
        else:  # no minimum: fall back to the best run tried (flagged, left out of the power law)
            best = int(np.argmin(losses))
            v_n, v_d = log_n[best], log_d[best]
        pN.append(coef_n)
        pD.append(coef_d)
        n_opt.append(math.exp(v_n))
        d_opt.append(math.exp(v_d))
        l_opt.append(float(np.polyval(coef_n, v_n)))
        convex.append(is_convex)
        bracketed.append(bool(log_n.min() <= v_n <= log_n.max()))
    budgets_arr, convex_arr = np.array(budgets), np.array(convex)
    if convex_arr.sum() < 2:
        raise ValueError(f"only {int(convex_arr.sum())} of {len(budgets)} budgets have a convex IsoFLOP curve; "
                         "a power law needs 2: widen the range of model sizes or lengthen the runs")
    use = convex_arr
    a, log_kN = np.polyfit(np.log(budgets_arr[use]), np.log(np.array(n_opt)[use]), 1)
    b, log_kD = np.polyfit(np.log(budgets_arr[use]), np.log(np.array(d_opt)[use]), 1)
    return IsoFlopFit(budgets=budgets_arr, parabolas_N=np.array(pN), parabolas_D=np.array(pD),
                      N_opt=np.array(n_opt), D_opt=np.array(d_opt), loss_opt=np.array(l_opt),
                      convex=convex_arr, bracketed=np.array(bracketed), a=float(a), b=float(b),
                      log_kN=float(log_kN), log_kD=float(log_kD))


# ---------------------------------------------------------------------------------------------
# A real IsoFLOP sweep on the course corpus
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The width and depth of one model in a sweep (the vocabulary and context are shared)."""
    d_model: int
    n_layers: int
    n_heads: int = 2


@dataclass
class SweepData:
    """Token streams for a sweep: ``train`` and ``val`` are 1-D int64 tensors."""
    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int


def prepare_sweep_data(max_chars: int = 1_000_000, vocab_size: int = 512, val_fraction: float = 0.1) -> SweepData:
    """Train a byte-level BPE tokenizer on the first ``max_chars`` characters of the Shakespeare
    corpus, encode them, and keep the last ``val_fraction`` of the tokens for validation."""
    from .data.corpus import shakespeare_text
    from .data.tokenizer import train_tokenizer

    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    text = shakespeare_text(max_chars)
    tokenizer = train_tokenizer([text], vocab_size=vocab_size)
    ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.int64)
    n_val = max(1, int(len(ids) * val_fraction))
    return SweepData(train=ids[:-n_val], val=ids[-n_val:], vocab_size=tokenizer.get_vocab_size())


def cosine_lr(step: int, steps: int, peak: float, *, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to ``floor * peak``
    at the last step (the schedule length matches the run, as Chinchilla insists)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def run_isoflop_sweep(budgets: Sequence[float], shapes: Sequence[ModelShape], data: SweepData, *,
                      seq_len: int = 64, batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
                      min_steps: int = 20, max_steps: int | None = None, eval_windows: int = 32,
                      device: str = "auto",
                      log: Callable[[str], None] | None = print) -> list[IsoFlopRun]:
    """Train every shape at every compute budget with the course's loop and return the runs.

    For budget C and a model of ``flops_per_token`` F, the run takes
    ``steps = round(C / (F · batch_size · seq_len))`` steps of random windows
    (:func:`pretrain_lib.data.loader.random_windows`), with warmup + cosine decay to the end of
    the run; its loss is the mean CLM loss on ``eval_windows`` fixed validation windows.
    Runs with fewer than ``min_steps`` steps are skipped (too short to mean anything), and so
    are runs with more than ``max_steps`` (tiny models at large budgets: slow, far from optimal).
    ``run.extra`` holds the config, the steps, the FLOPs actually spent and the seconds.
    """
    from .data.loader import random_windows
    from .objectives import clm_loss
    from .optim import build_optimizer
    from .train import clm_objective, train
    from .utils import resolve_device

    if not budgets or not shapes:
        raise ValueError("run_isoflop_sweep needs at least one budget and one model shape")
    n_val = data.val.numel() // seq_len
    if n_val < 1:
        raise ValueError(f"the validation stream has {data.val.numel()} tokens, fewer than seq_len={seq_len}")
    val_batch = data.val[: min(n_val, eval_windows) * seq_len].view(-1, seq_len)
    dev = resolve_device(device)
    runs: list[IsoFlopRun] = []
    for budget in budgets:
        for shape in shapes:
            config = ModelConfig(vocab_size=data.vocab_size, d_model=shape.d_model, n_heads=shape.n_heads,
                                 n_layers=shape.n_layers, max_seq_len=seq_len)
            tokens_per_step = batch_size * seq_len
            per_token = flops_per_token(config)
            steps = round(budget / (per_token * tokens_per_step))
            if steps < min_steps or (max_steps is not None and steps > max_steps):
                if log:
                    log(f"C={budget:.2e}  d={shape.d_model:4d} L={shape.n_layers}: {steps} steps is outside "
                        f"[{min_steps}, {max_steps}], skipped")
                continue
            torch.manual_seed(seed)  # train() seeds too, but only after the weights exist
            model = GPT(config).to(dev)  # on the device before the optimiser sees its parameters
            optimizer = build_optimizer(model, lr=lr)
            generator = torch.Generator().manual_seed(seed)
            warmup = max(1, steps // 10)

            def next_batch(step: int, optimizer=optimizer, steps=steps, warmup=warmup) -> dict[str, torch.Tensor]:
                # train() has no schedule argument (chapter 5 is about schedules), so the
                # batch callback, which sees the step number, sets this step's learning rate
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(step, steps, lr, warmup=warmup)
                return {"input_ids": random_windows(data.train, batch_size=batch_size, seq_len=seq_len,
                                                    generator=generator)}

            def eval_fn(m: torch.nn.Module) -> float:
                ids = val_batch.to(dev)
                return float(clm_loss(m(ids), ids))

            history = train(model, next_batch, clm_objective, steps=steps, lr=lr, optimizer=optimizer,
                            device=dev, seed=seed, eval_every=steps, eval_fn=eval_fn, progress=False)
            n_params = scaling_params(model)
            tokens = steps * tokens_per_step
            run = IsoFlopRun(compute=float(budget), params=float(n_params), tokens=float(tokens),
                             loss=history.eval_losses[-1],
                             extra={"d_model": shape.d_model, "n_layers": shape.n_layers, "steps": steps,
                                    "flops": training_flops(config, tokens), "seconds": history.seconds,
                                    "train_loss": history.final_loss(10)})
            runs.append(run)
            if log:
                log(f"C={budget:.2e}  d={shape.d_model:4d} L={shape.n_layers}  N={n_params:>8,d}  "
                    f"D={tokens:>9,d}  steps={steps:5d}  val loss={run.loss:.3f}  ({history.seconds:.1f} s)")
    return runs


def compute_overhead(N, C: float, fit: ChinchillaFit):
    """The cost of an off-optimal model size: the extra compute (as a fraction of C) that a
    model of N parameters needs to reach the loss the compute-optimal model reaches with C.

    The optimal loss is L* = L(N_opt, D_opt). A model of size N reaches L* with
    D' = (B / (L* − E − A/N^α))^{1/β} tokens, i.e. C' = 6 N D'; the overhead is C'/C − 1.
    It is 0 at N_opt and ``inf`` when N is so small that E + A/N^α ≥ L* (no amount of data
    makes up for it).
    """
    N = np.asarray(N, dtype=float)
    if np.any(N <= 0):
        raise ValueError("N (parameters) must be positive")
    n_opt, d_opt = compute_optimal(C, fit)
    target = fit(n_opt, d_opt)
    gap = target - fit.E - fit.A / N**fit.alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        d_needed = np.where(gap > 0, (fit.B / np.where(gap > 0, gap, 1.0)) ** (1.0 / fit.beta), np.inf)
    overhead = 6.0 * N * d_needed / C - 1.0
    return float(overhead) if overhead.ndim == 0 else overhead


def floor_size_factor(fit: ChinchillaFit) -> float:
    """The smallest N / N_opt that can still reach the compute-optimal loss L* (at any budget).

    At the optimum the two power-law terms are tied: α A/N_opt^α = β B/D_opt^β (the
    stationarity condition of :func:`compute_optimal`), so L* − E = (1 + α/β) A/N_opt^α.
    A model f·N_opt has floor E + A/(f N_opt)^α, which stays below L* only while
    f^(−α) < 1 + α/β: the threshold is f = (1 + α/β)^(−1/α), the same for every C, where
    :func:`compute_overhead` goes to infinity.
    """
    if not (fit.alpha > 0 and fit.beta > 0):
        raise ValueError(f"floor_size_factor needs alpha, beta > 0; got alpha={fit.alpha}, beta={fit.beta}")
    return (1.0 + fit.alpha / fit.beta) ** (-1.0 / fit.alpha)
