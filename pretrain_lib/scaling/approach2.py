"""Approach 2 of Hoffmann et al. (2022): IsoFLOP profiles.

For each compute budget, several model sizes are trained to exactly that budget; a parabola
of final loss against log N finds the best size, and the best sizes of all budgets give the
power laws N_opt = k_N C^x and D_opt = k_D C^y (x, y: the allocation exponents).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np


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
    Then the power laws N_opt = k_N C^exponent_n_opt and D_opt = k_D C^exponent_d_opt over
    the budgets in ``used``: the convex ones, or only those whose vertex lies inside the sizes
    tried (``bracketed_only``)."""
    budgets: np.ndarray
    parabolas_N: np.ndarray   # (n_budgets, 3)
    parabolas_D: np.ndarray   # (n_budgets, 3)
    N_opt: np.ndarray
    D_opt: np.ndarray
    loss_opt: np.ndarray
    convex: np.ndarray        # bool: the parabola opens upwards (has a minimum)
    bracketed: np.ndarray     # bool: the minimum lies between the smallest and largest N tried
    used: np.ndarray          # bool: the budget entered the power-law fits
    exponent_n_opt: float     # N_opt ∝ C^exponent_n_opt
    exponent_d_opt: float     # D_opt ∝ C^exponent_d_opt
    log_kN: float
    log_kD: float

    def n_opt(self, C):
        """The fitted power law N_opt(C)."""
        return np.exp(self.log_kN) * np.asarray(C, dtype=float) ** self.exponent_n_opt

    def d_opt(self, C):
        """The fitted power law D_opt(C)."""
        return np.exp(self.log_kD) * np.asarray(C, dtype=float) ** self.exponent_d_opt


def _as_run(run: IsoFlopRun | Mapping[str, float]) -> IsoFlopRun:
    if isinstance(run, IsoFlopRun):
        return run
    try:
        return IsoFlopRun(compute=float(run["compute"]), params=float(run["params"]),
                          tokens=float(run["tokens"]), loss=float(run["loss"]))
    except (KeyError, TypeError) as exc:
        raise ValueError("each run must be an IsoFlopRun or a mapping with keys compute, params, tokens, loss; "
                         f"got {run!r}") from exc


def fit_isoflop(runs: Iterable[IsoFlopRun | Mapping[str, float]], *, bracketed_only: bool = False) -> IsoFlopFit:
    """Approach 2 of Hoffmann et al.: for each compute budget fit a parabola of loss against
    log N (and against log D), take its minimum, then fit N_opt ∝ C^x and D_opt ∝ C^y by
    least squares in log-log space over the budgets whose parabola is convex.

    A vertex outside the sizes tried is an extrapolation of the parabola (``bracketed`` is
    False); ``bracketed_only=True`` leaves such budgets out of the power laws as well
    (``fit.used`` says which budgets entered them). Runs belong to the same budget when their
    ``compute`` values are equal (to 1e-9 relative).
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
    budgets_arr, convex_arr, bracketed_arr = np.array(budgets), np.array(convex), np.array(bracketed)
    use = convex_arr & bracketed_arr if bracketed_only else convex_arr
    if use.sum() < 2:
        which = "convex with a minimum inside the sizes tried" if bracketed_only else "convex"
        raise ValueError(f"only {int(use.sum())} of {len(budgets)} budgets have an IsoFLOP curve that is {which}; "
                         "a power law needs 2: widen the range of model sizes or lengthen the runs")
    x_n, log_kN = np.polyfit(np.log(budgets_arr[use]), np.log(np.array(n_opt)[use]), 1)
    x_d, log_kD = np.polyfit(np.log(budgets_arr[use]), np.log(np.array(d_opt)[use]), 1)
    return IsoFlopFit(budgets=budgets_arr, parabolas_N=np.array(pN), parabolas_D=np.array(pD),
                      N_opt=np.array(n_opt), D_opt=np.array(d_opt), loss_opt=np.array(l_opt),
                      convex=convex_arr, bracketed=bracketed_arr, used=use,
                      exponent_n_opt=float(x_n), exponent_d_opt=float(x_d),
                      log_kN=float(log_kN), log_kD=float(log_kD))


def equal_distance_rise(params: Iterable[float], losses: Iterable[float]) -> tuple[float, float, float]:
    """How lopsided one IsoFLOP curve is: ``(distance, rise left, rise right)``.

    From the best run, the loss rise towards smaller and towards larger models, both read at
    the same distance in e-folds of N (as far as both sides of the grid reach; losses in
    between interpolated linearly in log N). ``(0, nan, nan)`` when the best run is at an end.
    """
    pts = sorted(zip(params, losses))
    if len(pts) < 2:
        raise ValueError("an IsoFLOP curve needs at least two runs")
    n = np.array([p for p, _ in pts], dtype=float)
    y = np.array([loss for _, loss in pts], dtype=float)
    best = int(np.argmin(y))
    x, y = np.log(n / n[best]), y - y[best]
    dist = min(-x[0], x[-1])
    if dist <= 0:
        return 0.0, math.nan, math.nan
    return float(dist), float(np.interp(-dist, x, y)), float(np.interp(dist, x, y))
