"""The learning-rate range test (Smith, 2017; popularised by fastai).

Train a copy of the model for a few dozen steps while the LR grows exponentially from
``min_lr`` to ``max_lr``; record the loss at each LR; stop once the loss has clearly diverged.
The loss first barely moves (LR too small), then falls fastest, then blows up. A good peak LR
sits below the divergence: the rule used here is one tenth of the LR at the lowest smoothed
loss (the minimum itself is already at the edge of instability).
"""
from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch.nn as nn


class LRRangeResult(NamedTuple):
    lrs: list[float]          # the LR of each step that ran
    losses: list[float]       # its training loss
    suggested_lr: float       # lr_at_min / 10
    lr_at_min: float          # the LR at the lowest smoothed loss
    smoothed: list[float]     # exponentially smoothed, bias-corrected losses


def exponential_lr(step: int, *, min_lr: float, max_lr: float, steps: int) -> float:
    """``min_lr · (max_lr / min_lr)^(step / (steps − 1))``: ``min_lr`` at step 0, ``max_lr`` at the last."""
    return min_lr * (max_lr / min_lr) ** (step / max(1, steps - 1))


def _smooth(losses: list[float], beta: float) -> list[float]:
    out, avg = [], 0.0
    for i, loss in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** i))  # bias correction, as in Adam: early values are not pulled to 0
    return out


class _Recorder:
    """Engine callback: record each step's LR and loss (log_every=1), stop on divergence."""

    def __init__(self, beta: float, diverge_factor: float):
        self.beta, self.diverge_factor = beta, diverge_factor
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.best = math.inf

    def on_step(self, state) -> None:
        loss = state.history.losses[-1]
        self.lrs.append(state.lr)
        self.losses.append(loss)
        smooth = _smooth(self.losses, self.beta)[-1]
        self.best = min(self.best, smooth)
        if not math.isfinite(loss) or smooth > self.diverge_factor * self.best:
            state.stop = True


def lr_range_test(model: nn.Module, batches, objective, *, min_lr: float = 1e-6, max_lr: float = 1.0,
                  steps: int = 100, beta: float = 0.9, diverge_factor: float = 4.0, optimizer_name: str = "adamw",
                  **overrides) -> LRRangeResult:
    """Run the range test through the engine on a *copy* of ``model`` (the original is untouched).

    ``batches`` and ``objective`` are what ``train`` takes; ``overrides`` are further
    ``TrainConfig`` fields (``weight_decay``, ``grad_clip``, ``device``, ...). Returns an
    :class:`LRRangeResult` (unpacks as ``lrs, losses, suggested_lr, ...``).
    """
    from ..train import train  # here, not at the top: train imports this package
    from .builder import build_optimizer

    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if not isinstance(steps, int) or steps < 5:
        raise ValueError(f"steps must be an integer >= 5, got {steps!r}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    if not diverge_factor > 1:
        raise ValueError(f"diverge_factor must exceed 1, got {diverge_factor}")
    for name in ("steps", "lr", "lr_schedule", "log_every"):
        if name in overrides:
            raise TypeError(f"lr_range_test sets {name} itself; do not pass it")
    trial = copy.deepcopy(model)
    recorder = _Recorder(beta, diverge_factor)
    optimizer = None
    if optimizer_name != "adamw":
        optimizer = build_optimizer(trial, optimizer_name, lr=max_lr,
                                    weight_decay=overrides.get("weight_decay", 0.1))
    train(trial, batches, objective, callbacks=[recorder], optimizer=optimizer, steps=steps, lr=max_lr,
          lr_schedule=lambda s: exponential_lr(s, min_lr=min_lr, max_lr=max_lr, steps=steps),
          log_every=1, progress=False, desc="lr range test", **overrides)
    smoothed = _smooth(recorder.losses, beta)
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if not finite:
        raise FloatingPointError("every loss of the range test was non-finite; lower min_lr")
    best = min(finite, key=lambda i: smoothed[i])
    return LRRangeResult(recorder.lrs, recorder.losses, recorder.lrs[best] / 10, recorder.lrs[best], smoothed)
