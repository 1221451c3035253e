"""The learning-rate range test (Smith, 2017; popularised by fastai).

Train a copy of the model for a few dozen steps while the LR grows exponentially from
``min_lr`` to ``max_lr``; record the loss at each LR; stop once the loss has clearly diverged.
The loss first barely moves (LR too small), then falls fastest, then blows up. A good peak LR
sits below the divergence: the rule used here is a third of the lowest LR at which the
smoothed loss reaches its floor (a safe side of the window where learning is fast; the classic
"a tenth of the minimum" rule was made for an exponentially smoothed minimum, which lags to
the edge of instability, and is too timid for this lag-free one: on the course GPT it gives a
rate that learns markedly slower in 300 steps).

Two details make the result robust to the single wild losses a range test produces (one bad
batch at a high LR can cost several nats for one step, then the run recovers):

- **Smoothing is a running median**, not an exponential average. An exponential average lags
  (its minimum lands several steps late, at an LR where the raw loss is already rising) and
  one outlier drags it for a dozen steps; a median over ``window`` steps ignores a lone outlier.
  The minimum is taken on the *centred* median (no lag); the stop rule uses the median of the
  last ``window`` steps (it can only look back).
- **Divergence is a give-back, not a ratio.** The test stops once the recent median has given
  back ``give_back`` (default half) of everything the loss gained from its first value to its
  best: a scale-free rule that works whether the loss is 6 nats or 0.06.
- **The minimum stops at the first spike and at the start of the floor.** After a short run
  the loss often sits on a plateau for a decade or more of LR while single steps begin to blow
  up and recover. The first such spike (one loss above its centred median by more than
  ``give_back`` of the whole gain) marks the edge of stability; the floor is the lowest centred
  median before it, and the result is the *lowest* LR that reaches it (within ``floor_share``
  of the gain): on a flat plateau the exact minimum is decided by noise, not by the LR.
"""
from __future__ import annotations

import copy
import math
import statistics
from typing import NamedTuple, Sequence

import torch.nn as nn

from ..train import train
from .builder import build_optimizer


SUGGESTION_DIVISOR = 3.0  # suggested_lr = lr_at_min / SUGGESTION_DIVISOR


class LRRangeResult(NamedTuple):
    lrs: list[float]          # the LR of each step that ran
    losses: list[float]       # its training loss
    suggested_lr: float       # lr_at_min / 3
    lr_at_min: float          # the lowest LR at which the centred median reaches its floor
    smoothed: list[float]     # centred running median of the losses
    stopped_early: bool = False   # True when the divergence rule stopped the test before its last step
    stop_lr: float = math.nan     # the LR of the last step that ran


def exponential_lr(step: int, *, min_lr: float, max_lr: float, steps: int) -> float:
    """``min_lr · (max_lr / min_lr)^(step / (steps − 1))``: ``min_lr`` at step 0, ``max_lr`` at the last."""
    return min_lr * (max_lr / min_lr) ** (step / max(1, steps - 1))


def centred_median(losses: Sequence[float], window: int) -> list[float]:
    """Median of the ``window`` losses centred on each step (fewer at the two ends); non-finite losses
    count as +inf, so a NaN step cannot look like a minimum."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window}")
    vals = [v if math.isfinite(v) else math.inf for v in losses]
    h = window // 2
    return [statistics.median(vals[max(0, i - h):i + h + 1]) for i in range(len(vals))]


def floor_index(losses: Sequence[float], window: int, give_back: float = 0.5, floor_share: float = 0.05) -> int:
    """Index of the lowest LR at which the centred median reaches the floor, before the first spike.

    A spike is a single loss that stands above its centred median by more than ``give_back`` of
    the loss's whole gain (first loss minus the lowest median): the first sign that this LR is
    past the edge of stability, even when the run recovers. The floor is the lowest centred
    median before it; the result is the first step whose median comes within ``floor_share`` of
    the gain of that floor (on a flat plateau the exact minimum is decided by noise)."""
    smooth = centred_median(losses, window)
    finite = [s for s in smooth if math.isfinite(s)]
    if not finite:
        raise FloatingPointError("every loss of the range test was non-finite; lower min_lr")
    gained = max(0.0, losses[0] - min(finite)) if math.isfinite(losses[0]) else 0.0
    edge = next((i for i, (v, s) in enumerate(zip(losses, smooth))
                 if i > 0 and (not math.isfinite(v) or (gained > 0 and v - s > give_back * gained))), len(losses))
    candidates = [i for i in range(max(1, edge)) if math.isfinite(smooth[i])] or [0]
    best = min(candidates, key=lambda i: smooth[i])
    return next(i for i in candidates if smooth[i] <= smooth[best] + floor_share * gained)


def first_spike(losses: Sequence[float], window: int, give_back: float = 0.5) -> int | None:
    """Index of the first spike (see :func:`floor_index`), or None."""
    smooth = centred_median(losses, window)
    finite = [s for s in smooth if math.isfinite(s)]
    gained = max(0.0, losses[0] - min(finite)) if finite and math.isfinite(losses[0]) else 0.0
    return next((i for i, (v, s) in enumerate(zip(losses, smooth))
                 if i > 0 and (not math.isfinite(v) or (gained > 0 and v - s > give_back * gained))), None)


def diverged(losses: Sequence[float], window: int, give_back: float) -> bool:
    """The stop rule: a non-finite loss, or the median of the last ``window`` losses has risen above
    the best such median by more than ``give_back`` of the drop from the first loss to that best."""
    if not losses or not math.isfinite(losses[-1]):
        return bool(losses)
    if len(losses) < 2 * window:
        return False
    recent = [statistics.median(losses[i - window + 1:i + 1]) for i in range(window - 1, len(losses))]
    best = min(recent)
    gained = losses[0] - best
    return gained > 0 and recent[-1] - best > give_back * gained


class _Recorder:
    """Engine callback: record each step's LR and loss (log_every=1), stop on divergence."""

    def __init__(self, window: int, give_back: float):
        self.window, self.give_back = window, give_back
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.stopped = False

    def on_step(self, state) -> None:
        self.lrs.append(state.lr)
        self.losses.append(state.history.losses[-1])
        if diverged(self.losses, self.window, self.give_back):
            self.stopped = state.stop = True


def lr_range_test(model: nn.Module, batches, objective, *, min_lr: float = 1e-6, max_lr: float = 1.0,
                  steps: int = 100, window: int = 5, give_back: float = 0.5, optimizer_name: str = "adamw",
                  **overrides) -> LRRangeResult:
    """Run the range test through the engine on a *copy* of ``model`` (the original is untouched).

    ``batches`` and ``objective`` are what ``train`` takes; ``overrides`` are further
    ``TrainConfig`` fields (``weight_decay``, ``grad_clip``, ``device``, ...). ``window`` is the
    running median's width (odd), ``give_back`` the share of the loss's gain that, given back,
    counts as divergence. Returns an :class:`LRRangeResult` (unpacks as ``lrs, losses, ...``).
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if not isinstance(steps, int) or steps < 5:
        raise ValueError(f"steps must be an integer >= 5, got {steps!r}")
    if not isinstance(window, int) or window < 1 or window % 2 == 0 or 2 * window > steps:
        raise ValueError(f"window must be an odd integer in [1, steps/2], got {window!r}")
    if not 0 < give_back < 1:
        raise ValueError(f"give_back must lie in (0, 1), got {give_back}")
    for name in ("steps", "lr", "lr_schedule", "log_every"):
        if name in overrides:
            raise TypeError(f"lr_range_test sets {name} itself; do not pass it")
    trial = copy.deepcopy(model)
    recorder = _Recorder(window, give_back)
    optimizer = None
    if optimizer_name != "adamw":
        optimizer = build_optimizer(trial, optimizer_name, lr=max_lr,
                                    weight_decay=overrides.get("weight_decay", 0.1))
    train(trial, batches, objective, callbacks=[recorder], optimizer=optimizer, steps=steps, lr=max_lr,
          lr_schedule=lambda s: exponential_lr(s, min_lr=min_lr, max_lr=max_lr, steps=steps),
          log_every=1, progress=False, desc="lr range test", **overrides)
    best = floor_index(recorder.losses, window, give_back)
    return LRRangeResult(recorder.lrs, recorder.losses, recorder.lrs[best] / SUGGESTION_DIVISOR, recorder.lrs[best],
                         centred_median(recorder.losses, window), recorder.stopped, recorder.lrs[-1])
