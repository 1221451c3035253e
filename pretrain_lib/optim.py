"""The one optimiser builder every chapter, strategy and benchmark uses.

``build_optimizer`` is the only place an optimiser is constructed: weight decay goes on the
matrices (dim ≥ 2) only, never on biases or normalisation gains, and a tied weight (the GPT's
token embedding, reused as the output projection) is counted once. On CUDA the fused AdamW
kernel is used (one launch for all parameters instead of several per tensor).

Param groups may carry ``lr_scale``: the engine's learning-rate schedule sets each group's
LR to ``schedule(step) * lr_scale`` (1 when absent), so groups with different base LRs keep
their ratio under one schedule.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


def _unique_trainable(params: Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices with ``weight_decay``; biases and norm gains without.

    Decaying a LayerNorm gain pulls it towards 0, which shrinks that layer's output
    whatever the data says; decaying a bias has no regularising meaning. A tied weight
    appears once (``named_parameters`` already de-duplicates shared tensors; the check
    here also covers parameter lists assembled by hand).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    named = _unique_trainable(model.named_parameters())
    if not named:
        raise ValueError("the model has no trainable parameters")
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over ``param_groups(model, weight_decay)``.

    ``fused=None`` picks the fused kernel when the parameters live on CUDA and the
    for-each implementation otherwise (both compute the same update).
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {betas}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    groups = param_groups(model, weight_decay)
    if fused is None:
        fused = next(iter(groups[0]["params"])).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=None if fused else True)
