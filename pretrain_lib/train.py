"""The one training loop every chapter reuses: batches → objective → AdamW step → history.

Seeded and deterministic on the CPU; on CUDA it uses bf16 autocast and fused AdamW.
An *objective* is a function ``(model, batch) -> (loss, n_target_tokens)``; ready-made
ones for CLM and MLM are below.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .objectives import IGNORE_INDEX, clm_loss, mask_tokens, mlm_loss
from .utils import autocast_context, is_headless, resolve_device, seed_everything

Batch = dict[str, torch.Tensor]
Objective = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]


@dataclass
class TrainHistory:
    losses: list[float] = field(default_factory=list)         # training loss per step
    target_tokens: list[int] = field(default_factory=list)    # tokens that gave a learning signal, per step
    input_tokens: list[int] = field(default_factory=list)     # tokens fed to the model, per step
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def final_loss(self, last: int = 10) -> float:
        """Mean of the last ``last`` training losses (less noisy than the very last one)."""
        if not self.losses:
            raise ValueError("no steps were trained")
        tail = self.losses[-last:]
        return sum(tail) / len(tail)

    @property
    def tokens_per_second(self) -> float:
        return sum(self.input_tokens) / self.seconds if self.seconds > 0 else float("nan")


def clm_objective(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Next-token prediction on ``batch["input_ids"]`` ``(batch, seq)``."""
    ids = batch["input_ids"]
    loss = clm_loss(model(ids, batch.get("attention_mask")), ids)
    return loss, int((ids[:, 1:] != IGNORE_INDEX).sum())


def mlm_objective(*, mask_token_id: int, vocab_size: int, special_token_ids: Sequence[int],
                  mlm_probability: float = 0.15, generator: torch.Generator | None = None) -> Objective:
    """An MLM objective that masks each batch afresh (dynamic masking, as RoBERTa does)."""

    def objective(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        inputs, labels = mask_tokens(batch["input_ids"], mask_token_id=mask_token_id, vocab_size=vocab_size,
                                     special_token_ids=special_token_ids, mlm_probability=mlm_probability,
                                     generator=generator)
        loss = mlm_loss(model(inputs, batch.get("attention_mask")), labels)
        return loss, int((labels != IGNORE_INDEX).sum())

    return objective


def adamw(model: nn.Module, *, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
          device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, LayerNorm gains or the tied
    embedding's duplicate), fused on CUDA."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def train(
    model: nn.Module,
    next_batch: Callable[[int], Batch],
    objective: Objective,
    *,
    steps: int,
    lr: float = 3e-4,
    weight_decay: float = 0.1,
    grad_clip: float | None = 1.0,
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    eval_every: int | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    progress: bool | None = None,
    desc: str = "train",
) -> TrainHistory:
    """Train ``model`` for ``steps`` optimiser steps and return the loss history.

    ``next_batch(step)`` returns a dict with ``input_ids`` ``(batch, seq)`` (and optionally
    ``attention_mask``); tensors are moved to the device here. ``eval_fn(model)`` is called
    every ``eval_every`` steps and at the end, in eval mode without gradients.
    ``progress=None`` shows a live bar (a widget in Jupyter, text in a terminal) unless the run
    is headless (papermill, CI), where a bar would only fill the log.
    """
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    seed_everything(seed)
    dev = resolve_device(device)
    model.to(dev).train()
    opt = optimizer if optimizer is not None else adamw(model, lr=lr, weight_decay=weight_decay, device=dev)
    history = TrainHistory()

    if progress is None:
        progress = not is_headless()
    from tqdm.auto import tqdm
    bar = tqdm(range(steps), desc=desc, disable=not progress)

    start = time.perf_counter()
    for step in bar:
        batch = {k: v.to(dev) for k, v in next_batch(step).items()}
        with autocast_context(dev):
            loss, n_targets = objective(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        history.losses.append(loss.item())
        history.target_tokens.append(n_targets)
        history.input_tokens.append(int(batch["input_ids"].numel()))
        if eval_fn is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            model.eval()
            with torch.no_grad():
                history.eval_steps.append(step + 1)
                history.eval_losses.append(float(eval_fn(model)))
            model.train()
        if step % 10 == 0 or step + 1 == steps:
            bar.set_postfix(loss=f"{history.final_loss(10):.3f}", refresh=False)
    history.seconds = time.perf_counter() - start
    bar.close()
    return history
