"""Learning-rate schedules: pure functions of the 0-based optimiser step that return the LR.

The engine calls one through ``TrainConfig.lr_schedule`` (each param group gets
``schedule(step) * group.get("lr_scale", 1)``); ``as_lr_lambda`` lets torch's ``LambdaLR``
drive an optimiser with the very same function.
"""
from __future__ import annotations

import math


def _check_step(step: int) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")


def _check_lrs(max_lr: float, min_lr: float) -> None:
    if not max_lr > 0:
        raise ValueError(f"max_lr must be positive, got {max_lr}")
    if not 0 <= min_lr <= max_lr:
        raise ValueError(f"min_lr must lie in [0, max_lr={max_lr}], got {min_lr}")


def noam_lr(step: int, *, d_model: int, warmup_steps: int, scale: float = 1.0) -> float:
    """The Transformer paper's schedule: ``scale · d_model^-0.5 · min((s+1)^-0.5, (s+1) · w^-1.5)``.

    It rises linearly for ``warmup_steps`` steps, peaks at ``scale · (d_model · w)^-0.5``,
    then decays as 1/√step. The LR it returns *is* the learning rate: whatever ``lr`` the
    optimiser was built with is overwritten every step.
    """
    _check_step(step)
    if not isinstance(d_model, int) or d_model <= 0:
        raise ValueError(f"d_model must be a positive integer, got {d_model!r}")
    if not isinstance(warmup_steps, int) or warmup_steps <= 0:
        raise ValueError(f"warmup_steps must be a positive integer, got {warmup_steps!r}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    s = step + 1
    return scale * d_model ** -0.5 * min(s ** -0.5, s * warmup_steps ** -1.5)


def cosine_lr(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, cosine_steps: int) -> float:
    """Linear warmup to ``max_lr``, cosine decay to ``min_lr`` at step ``cosine_steps``, then flat.

    ``cosine_steps`` is the (0-based) step at which the decay ends, not a duration.
    """
    _check_step(step)
    _check_lrs(max_lr, min_lr)
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    if not isinstance(cosine_steps, int) or cosine_steps < warmup_steps:
        raise ValueError(f"cosine_steps={cosine_steps!r} must be an integer >= warmup_steps={warmup_steps} "
                         "(it is the step at which the decay ends, counted from 0)")
    if step < warmup_steps:
        return step / warmup_steps * max_lr
    if step > cosine_steps:
        return min_lr
    if cosine_steps == warmup_steps:
        return max_lr
    progress = (step - warmup_steps) / (cosine_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


WSD_DECAYS = ("linear", "cosine", "sqrt")


def wsd_lr(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, stable_steps: int,
           decay_steps: int, decay: str = "linear") -> float:
    """Warmup–stable–decay: linear warmup, ``stable_steps`` at ``max_lr``, then a decay of
    ``decay_steps`` steps to ``min_lr`` (``"linear"``, ``"cosine"`` or ``"sqrt"``: 1 − √progress).

    Because the stable phase is flat, a run can be continued from any checkpoint taken
    there and decayed later: the restart costs only the decay, not a whole new schedule.
    """
    _check_step(step)
    _check_lrs(max_lr, min_lr)
    for name, value in (("warmup_steps", warmup_steps), ("stable_steps", stable_steps),
                        ("decay_steps", decay_steps)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if decay not in WSD_DECAYS:
        raise ValueError(f"decay must be one of {WSD_DECAYS}, got {decay!r}")
    if step < warmup_steps:
        return step / warmup_steps * max_lr
    decay_start = warmup_steps + stable_steps
    if step < decay_start:
        return max_lr
    if decay_steps == 0 or step >= decay_start + decay_steps:
        return min_lr
    progress = (step - decay_start) / decay_steps
    if decay == "linear":
        fraction = 1.0 - progress
    elif decay == "cosine":
        fraction = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        fraction = 1.0 - math.sqrt(progress)
    return min_lr + fraction * (max_lr - min_lr)


def as_lr_lambda(schedule, base_lr: float):
    """Adapt ``schedule(step) -> lr`` to ``torch.optim.lr_scheduler.LambdaLR``, which multiplies
    the optimiser's base LR by ``lr_lambda(epoch)`` (its "epoch" counts ``scheduler.step()`` calls)."""
    if not base_lr > 0:
        raise ValueError(f"base_lr must be positive, got {base_lr}")
    return lambda step: schedule(step) / base_lr
