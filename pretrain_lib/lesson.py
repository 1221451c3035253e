"""What every lesson notebook shares: results stated from the run's variables, effects
measured against their noise, and claims checked at the notebook's defaults.

A lesson notebook uses three things from here (CONTRIBUTING.md gives the method):

- ``say(f"...")`` shows a sentence built from the run's variables as Markdown, so the prose
  that states a result can never disagree with the run that produced it.
- ``Estimate`` (from ``over_seeds``, ``paired_difference`` or ``bootstrap_mean``) carries an
  effect with its noise and prints as ``0.193 ± 0.021 (3 seeds)``; ``clearly_exceeds`` is the
  one rule for "this effect is larger than its noise".
- ``Claims`` checks each claim by name. A test run at small sizes may skip a claim that
  needs the default budget by naming it in the ``skip_claims`` parameter; it can never loosen
  one. The closing ``claims.finish()`` prints the run time and "all checks passed".
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


def say(text: str) -> None:
    """Show ``text`` as Markdown in a notebook (plain text elsewhere)."""
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # no IPython: a script or a test
        print(text)
        return
    if get_ipython() is None:
        print(text)
    else:
        display(Markdown(text))


@dataclass(frozen=True)
class Estimate:
    """A measured quantity with its noise: ``mean ± spread`` over ``n`` samples of ``what``.

    ``spread`` is one standard deviation of the samples for seeds, or the half-width of a
    confidence interval for a bootstrap (``kind`` says which)."""
    mean: float
    spread: float
    n: int
    what: str = "seeds"
    kind: str = "std"

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        spread_spec = spec.replace("+", "")   # a signed mean, an unsigned noise: "+0.193 ± 0.021"
        return f"{self.mean:{spec}} ± {self.spread:{spread_spec}} ({self.n} {self.what})"

    def __str__(self) -> str:
        return format(self)


def over_seeds(values: Iterable[float], what: str = "seeds") -> Estimate:
    """Mean and sample standard deviation of one quantity measured once per seed."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("over_seeds needs at least one value")
    if not np.isfinite(v).all():
        raise ValueError(f"over_seeds got a non-finite value: {v.tolist()}")
    spread = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    return Estimate(float(v.mean()), spread, int(v.size), what)


def paired_difference(a: Sequence[float], b: Sequence[float], what: str = "seeds") -> Estimate:
    """``a - b`` per pair (the same seed, window or batch on both sides), as mean ± std.

    Pairing removes what both runs share (the seed's initialisation, the batch order), so the
    spread left is the noise of the difference itself."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_difference needs two equal, non-empty lists, got {a.shape} and {b.shape}")
    return over_seeds(a - b, what)


def bootstrap_mean(values: Sequence[float], *, n_resamples: int = 2000, level: float = 0.95, seed: int = 0,
                   what: str = "windows", groups: Sequence[int] | None = None) -> Estimate:
    """Mean of ``values`` with the half-width of its bootstrap ``level`` interval as the spread.

    For a validation loss, pass the per-window losses; for a difference between two models
    evaluated on the same windows, pass the per-window differences (a paired bootstrap).

    ``groups`` (one label per value) makes it a cluster bootstrap: whole groups are resampled,
    for values that are not independent within a group (the masked positions of one window
    share its context). The mean is still over all values; ``n`` and ``what`` count groups."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        raise ValueError(f"bootstrap_mean needs at least 2 values, got {v.size}")
    if not 0.5 < level < 1.0:
        raise ValueError(f"level must be in (0.5, 1), got {level}")
    rng = np.random.default_rng(seed)
    if groups is None:
        means = v[rng.integers(0, v.size, size=(n_resamples, v.size))].mean(axis=1)
        n = v.size
    else:
        labels = np.asarray(groups)
        if labels.shape != v.shape:
            raise ValueError(f"groups needs one label per value, got {labels.shape} for {v.shape}")
        _, index = np.unique(labels, return_inverse=True)
        sums, counts = np.bincount(index, weights=v), np.bincount(index).astype(float)
        n = sums.size
        if n < 2:
            raise ValueError(f"a cluster bootstrap needs at least 2 groups, got {n}")
        picks = rng.integers(0, n, size=(n_resamples, n))
        means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(v.mean()), float((hi - lo) / 2), int(n), what, kind=f"{level:.0%} interval")


def clearly_exceeds(effect: float, noise: float, factor: float = 2.0) -> bool:
    """The course's one rule for a real effect: ``|effect| > factor × noise`` (noise must be measured)."""
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"the noise must be a measured, non-negative number, got {noise}")
    return abs(effect) > factor * noise


class ClaimFailed(AssertionError):
    """A lesson's claim did not hold at this run's settings."""


class Claims:
    """Named checks of what a notebook demonstrates.

    ``skip`` names claims that need the default budget; a test run at small sizes passes them
    (``skip_claims`` parameter) and they are reported as skipped, never as passed. A skipped
    name that no ``check`` uses is an error, so a renamed claim cannot stay skipped by accident.
    """

    def __init__(self, skip: Iterable[str] = (), *, start: float | None = None):
        self.skip = set(skip)
        self.start = time.perf_counter() if start is None else start
        self.passed: list[str] = []
        self.skipped: list[str] = []

    def check(self, name: str, ok: bool, message: str) -> None:
        if name in self.passed or name in self.skipped:
            raise ValueError(f"claim {name!r} is checked twice")
        if name in self.skip:
            self.skipped.append(name)
            return
        if not bool(ok):
            raise ClaimFailed(f"claim {name!r} failed: {message}")
        self.passed.append(name)

    def finish(self) -> None:
        """Print the run time and the verdict; fail on a skip that named no claim."""
        unknown = self.skip - set(self.skipped)
        if unknown:
            raise ValueError(f"skip_claims names claims this notebook does not check: {sorted(unknown)}")
        print(f"this notebook ran in {time.perf_counter() - self.start:.0f} s")
        if self.skipped:
            print(f"skipped at these test sizes (they need the default budget): {', '.join(self.skipped)}")
        n = len(self.passed)
        print("all checks passed" + (f" ({n} named claim{'' if n == 1 else 's'})" if n else ""))
