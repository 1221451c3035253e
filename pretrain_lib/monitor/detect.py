"""Anomaly detectors on host values, and the two sanity checks every run should pass.

A *spike* is a value far above the recent history ``H`` of accepted values. Two rules:

- **the band** (once ``|H| >= min_history``): ``x > mean(H) + k·σ(H)`` over the last ``window``
  accepted values (OLMo-core's rule, with k = 6 and a window of 128 by default);
- **the early rule** (before that, once ``|H| >= early_history``, when ``early_ratio`` is set):
  ``x > early_ratio · median(H)``. A band from a handful of points means nothing, yet warmup
  and learning-rate failures strike in the first steps; a ratio to the median of even three
  values catches a blow-up there, and the median is not moved by one odd value among them.

Flagged and non-finite values are kept out of the history, so one blow-up does not widen the
band that should catch the next one.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, fields
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..train import train   # this check trains, so it sits above the engine (which never imports the monitor)


class RollingZScore:
    """Flags values above ``mean + k·std`` of the previous ``window`` accepted values.

    The band needs ``min_history`` values (a band from three points means nothing). Before
    that the detector is blind unless ``early_ratio`` is given: then, from ``early_history``
    accepted values on, a value above ``early_ratio × median`` of the history is a spike.
    ``update(x)`` returns ``(is_spike, z)`` where ``z`` is how many standard deviations ``x``
    lies above the mean (``nan`` before ``min_history``); ``last_rule`` says which rule
    judged the last value (``"band"``, ``"early"`` or ``None`` when none could) and
    ``last_ratio`` is ``x / median(H)`` under the early rule.
    """

    def __init__(self, k: float = 6.0, window: int = 128, min_history: int = 16, *,
                 early_ratio: float | None = None, early_history: int = 3):
        if not k > 0:
            raise ValueError(f"k must be positive, got {k!r}")
        if not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an integer of at least 2, got {window!r}")
        if not isinstance(min_history, int) or not 2 <= min_history <= window:
            raise ValueError(f"min_history must be an integer in [2, window={window}], got {min_history!r}")
        if early_ratio is not None and not early_ratio > 1:
            raise ValueError(f"early_ratio must be above 1 (or None: no early rule), got {early_ratio!r}")
        if not isinstance(early_history, int) or not 1 <= early_history <= min_history:
            raise ValueError(f"early_history must be an integer in [1, min_history={min_history}], "
                             f"got {early_history!r}")
        self.k, self.window, self.min_history = float(k), window, min_history
        self.early_ratio, self.early_history = early_ratio, early_history
        self.values: deque[float] = deque(maxlen=window)
        self.last_rule: str | None = None
        self.last_ratio = float("nan")

    def zscore(self, x: float) -> float:
        if len(self.values) < self.min_history:
            return float("nan")
        n = len(self.values)
        mean = sum(self.values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / n)
        # a perfectly flat history (std 0) makes every rise infinitely many σ: use a floor
        return (x - mean) / max(std, 1e-12 * max(abs(mean), 1.0))

    def update(self, x: float) -> tuple[bool, float]:
        self.last_rule, self.last_ratio = None, float("nan")
        if not math.isfinite(x):
            return False, float("nan")  # non-finite values are their own anomaly, never "history"
        z = self.zscore(x)
        if len(self.values) >= self.min_history:
            self.last_rule = "band"
            spike = z > self.k
        elif self.early_ratio is not None and len(self.values) >= self.early_history:
            median = statistics.median(self.values)
            self.last_rule = "early"
            self.last_ratio = x / median if median > 0 else float("inf")
            spike = median > 0 and x > self.early_ratio * median
        else:
            spike = False
        if not spike:
            self.values.append(x)
        return spike, z

    def state_dict(self) -> dict:
        return {"k": self.k, "window": self.window, "min_history": self.min_history, "values": list(self.values),
                "early_ratio": self.early_ratio, "early_history": self.early_history}

    def load_state_dict(self, state: dict) -> None:
        if state["window"] != self.window:
            raise ValueError(f"saved window {state['window']} differs from this detector's {self.window}")
        self.k, self.min_history = float(state["k"]), int(state["min_history"])
        # a state saved before the early rule existed keeps this detector's own setting
        self.early_ratio = state.get("early_ratio", self.early_ratio)
        self.early_history = int(state.get("early_history", self.early_history))
        self.values = deque((float(v) for v in state["values"]), maxlen=self.window)


@dataclass(frozen=True)
class AnomalyRules:
    """The rules by which :class:`~pretrain_lib.monitor.Monitor` flags an anomaly, in one value:
    ``Monitor(path, rules=AnomalyRules(spike_k=4.0))``. Every field has the default shown.

    - ``spike_k`` (6.0): the band: a loss, a gradient norm or a layer's norm more than ``spike_k``
      standard deviations above the mean of its recent history is a spike.
    - ``spike_window`` (128): that history is the last ``spike_window`` accepted values (flagged and
      non-finite values are kept out of it).
    - ``spike_min_history`` (16): how many values the band needs before it judges; in
      ``[2, spike_window]``.
    - ``spike_early_ratio`` (4.0): the early rule, for the first steps where the band cannot judge yet:
      a value above ``spike_early_ratio`` × the median of the values so far is a spike (above 1;
      None turns the early rule off).
    - ``spike_early_history`` (3): how many values the early rule needs before it judges; in
      ``[1, spike_min_history]``.
    - ``explode_factor`` (3.0): a layer's gradient norm is "exploding" when it is a spike *and* more
      than ``explode_factor`` times the mean of its history (positive).
    - ``vanish_ratio`` (1e-4): a layer is "vanishing" when its gradient norm is at most this share of
      the global gradient norm (in ``[0, 1)``; flagged once until it recovers).
    - ``warmup_steps`` (1): a learning rate of 0 after this step is a "dead" learning rate (a
      non-negative integer; flagged once until the rate comes back).
    """

    spike_k: float = 6.0
    spike_window: int = 128
    spike_min_history: int = 16
    spike_early_ratio: float | None = 4.0
    spike_early_history: int = 3
    explode_factor: float = 3.0
    vanish_ratio: float = 1e-4
    warmup_steps: int = 1

    def __post_init__(self):
        if not self.spike_k > 0:
            raise ValueError(f"spike_k must be positive, got {self.spike_k!r}")
        if not isinstance(self.spike_window, int) or self.spike_window < 2:
            raise ValueError(f"spike_window must be an integer of at least 2, got {self.spike_window!r}")
        if not isinstance(self.spike_min_history, int) or not 2 <= self.spike_min_history <= self.spike_window:
            raise ValueError(f"spike_min_history must be an integer in [2, spike_window={self.spike_window}], "
                             f"got {self.spike_min_history!r}")
        if self.spike_early_ratio is not None and not self.spike_early_ratio > 1:
            raise ValueError(f"spike_early_ratio must be above 1 (or None: no early rule), "
                             f"got {self.spike_early_ratio!r}")
        if not isinstance(self.spike_early_history, int) or not 1 <= self.spike_early_history <= self.spike_min_history:
            raise ValueError(f"spike_early_history must be an integer in [1, spike_min_history="
                             f"{self.spike_min_history}], got {self.spike_early_history!r}")
        if not self.explode_factor > 0:
            raise ValueError(f"explode_factor must be positive, got {self.explode_factor!r}")
        if not 0 <= self.vanish_ratio < 1:
            raise ValueError(f"vanish_ratio must be in [0, 1), got {self.vanish_ratio!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The fields' names (the keyword arguments ``Monitor`` took before they were grouped here)."""
        return tuple(f.name for f in fields(cls))

    def detector(self) -> RollingZScore:
        """A fresh spike detector following these rules."""
        return RollingZScore(self.spike_k, self.spike_window, self.spike_min_history,
                             early_ratio=self.spike_early_ratio, early_history=self.spike_early_history)


def rolling_spikes(values: Iterable[float], k: float = 6.0, window: int = 128, min_history: int = 16, *,
                   early_ratio: float | None = None, early_history: int = 3) -> list[int]:
    """Indices of the values :class:`RollingZScore` flags, for a whole series at once."""
    detector = RollingZScore(k, window, min_history, early_ratio=early_ratio, early_history=early_history)
    return [i for i, v in enumerate(values) if detector.update(float(v))[0]]


# ----------------------------------------------------------------------------- sanity checks

def expected_initial_loss(vocab_size: int) -> float:
    """Cross-entropy of a uniform guess over the vocabulary, ``ln |V|``: what a freshly
    initialised language model should score (small logits, so nearly uniform outputs)."""
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer of at least 2, got {vocab_size!r}")
    return math.log(vocab_size)


def check_initial_loss(model: nn.Module, batch: dict, objective: Callable, vocab_size: int,
                       *, tolerance: float = 0.05) -> dict:
    """Loss of ``model`` on ``batch`` before training against ``ln |V|``.

    Returns ``{"loss", "expected", "ratio", "ok"}``; ``ok`` when the loss is within
    ``tolerance`` (relative) of ``ln |V|``. A loss far above it means an initialisation
    that is too large (confident wrong predictions); far below it, leaked labels.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss, _ = objective(model, batch)
    model.train(was_training)
    value = float(loss)
    expected = expected_initial_loss(vocab_size)
    ratio = value / expected
    return {"loss": value, "expected": expected, "ratio": ratio, "ok": abs(ratio - 1.0) <= tolerance}


def check_overfits_one_batch(model: nn.Module, batch: dict, objective: Callable, *, steps: int = 100,
                             lr: float = 3e-3, target_loss: float = 0.5, device: str = "auto") -> dict:
    """Train on one batch only, through the engine: a correct model and objective drive the
    loss towards 0. Returns ``{"initial", "final", "ok"}`` with ``ok`` when ``final < target_loss``."""
    history = train(model, lambda i: batch, objective, steps=steps, lr=lr, weight_decay=0.0, grad_clip=1.0,
                    log_every=steps, device=device, progress=False, desc="overfit one batch")
    return {"initial": history.losses[0], "final": history.losses[-1], "ok": history.losses[-1] < target_loss}
