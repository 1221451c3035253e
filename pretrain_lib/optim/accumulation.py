"""Gradient accumulation, seen from chapter 5: objectives whose targets come with the batch, and
the source chapter's per-micro-step division as an engine hook (to measure its error).

The engine (``train.train_step``) already accumulates correctly: every micro-batch contributes
its *summed* token loss and the window's gradient is divided by the total number of target
tokens. To compare that with one large batch, both must see the *same* targets, so the
objectives below read them from ``batch["labels"]`` (masks drawn once, before splitting)
instead of drawing them inside the objective.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..objectives import IGNORE_INDEX, clm_loss, mlm_loss


def labelled_mlm_objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM on pre-drawn masks: ``input_ids`` already masked, ``labels`` ``(batch, seq)`` with -100 elsewhere."""
    labels = batch["labels"]
    return mlm_loss(model(batch["input_ids"], batch.get("attention_mask")), labels), (labels != IGNORE_INDEX).sum()


def labelled_clm_objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLM whose targets are ``labels`` (the ids, with -100 at padding): the logit at t predicts label t+1."""
    labels = batch["labels"]
    logits = model(batch["input_ids"], batch.get("attention_mask"))
    return clm_loss(logits, labels), (labels[:, 1:] != IGNORE_INDEX).sum()


def per_micro_step_forward_backward(model: nn.Module, micro_batches: Sequence[dict], objective: Callable, *,
                                    autocast: Any = None, no_sync: Any = None, scaler: Any = None
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The source chapter's accumulation, as a ``forward_backward`` for ``train_step``.

    Each micro-batch's *mean* loss is divided by the number of micro-steps K and backpropagated,
    so the gradient is (1/K) Σ_k ∇ mean_k. It returns a target count of 1, so the engine's
    division by the count leaves that gradient as it is. It equals the large batch only when
    every micro-batch holds the same number of targets. (fp32 only; no DDP: a measurement tool.)
    """
    if autocast is not None or scaler is not None:
        raise ValueError("per_micro_step_forward_backward is a fp32 measurement tool: no autocast or scaler")
    device = next(model.parameters()).device
    k = len(micro_batches)
    mean_of_means = torch.zeros((), device=device)
    for batch in micro_batches:
        mean_loss, _ = objective(model, batch)
        (mean_loss.float() / k).backward()
        mean_of_means = mean_of_means + mean_loss.detach().float() / k
    return mean_of_means, torch.ones((), device=device)
