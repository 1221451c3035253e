"""Notebook 9.3's runs: a dense GPT and mixture-of-experts GPTs trained alike, with expert load recorded.

Every arm of one seed shares the initial seed, the batch order and the schedule (the data and
validation windows of chapter 8.2: Shakespeare's plays but *Hamlet*, BPE, packed; *Hamlet* held
out), so an arm minus the dense arm of the same seed is a paired measurement
(``lesson.paired_difference``). ``imbalance`` is the busiest expert's share of the assignments
over the uniform share ``1/E`` (1: balanced; ``E/k``: every token on the same ``k`` experts),
averaged over the MoE layers, recorded at every step from ``layer.load`` (no extra forward).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .extensions.common import window_losses
from .extensions.speedrun import SpeedrunData, batch_fn
from .model import GPT, ModelConfig
from .moe import moe_layers
from .optim import build_optimizer, cosine_lr
from .optim.accumulation import labelled_clm_objective
from .train import train
from .utils import seed_everything


@dataclass
class ArmRun:
    name: str
    seed: int
    total_params: int
    active_params: int                       # matmul_params: what a token multiplies by
    flops_per_token: float
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    imbalance: list[float] = field(default_factory=list)   # per step, mean over MoE layers
    dropped: list[int] = field(default_factory=list)       # assignments dropped by capacity, per step
    final_windows: torch.Tensor | None = None
    seconds: float = 0.0

    @property
    def final(self) -> float:
        return float(self.final_windows.mean())


def imbalance(model: torch.nn.Module) -> float:
    """The busiest expert's share over ``1/E``, averaged over the MoE layers (last forward)."""
    layers = moe_layers(model)
    return sum(float(m.load.max() / m.load.mean()) for m in layers) / len(layers)


def run_arm(data: SpeedrunData, name: str, changes: dict, *, seed: int, base_config: dict, steps: int,
            batch_size: int, lr: float, warmup_steps: int, eval_points: int, device) -> ArmRun:
    """Train ``GPT(ModelConfig(**base_config, **changes))`` from ``seed`` with warmup + cosine to ``lr/10``."""
    seed_everything(seed)
    model = GPT(ModelConfig(**base_config, **changes))
    run = ArmRun(name, seed, model.num_params(), model.matmul_params(), model.flops_per_token())
    every = max(1, steps // eval_points)
    has_moe = bool(moe_layers(model))

    class Record:
        def on_step(self, state):
            if has_moe:
                run.imbalance.append(imbalance(model))
                run.dropped.append(sum(int(m.dropped) for m in moe_layers(model)))
            if state.step % every == 0 or state.step == steps:
                losses = window_losses(model, data.valid)
                run.eval_steps.append(state.step)
                run.eval_losses.append(float(losses.mean()))
                if state.step == steps:
                    run.final_windows = losses

    schedule = lambda step: cosine_lr(step, max_lr=lr, min_lr=lr / 10, warmup_steps=warmup_steps,  # noqa: E731
                                      cosine_steps=steps - 1)
    start = time.perf_counter()
    train(model, batch_fn(data, "packed", batch_size, torch.Generator().manual_seed(seed)), labelled_clm_objective,
          steps=steps, lr=lr, lr_schedule=schedule, optimizer=build_optimizer(model, lr=lr), callbacks=[Record()],
          device=device, seed=seed, desc=f"{name} (seed {seed})")
    run.seconds = time.perf_counter() - start
    return run
