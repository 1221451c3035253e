"""Pretraining objectives: dynamic MLM masking (80/10/10), the MLM loss and the CLM loss.

Shapes: ``input_ids`` and ``labels`` are ``(batch, seq)`` integer tensors, ``logits`` are
``(batch, seq, vocab)``. Positions whose label is ``-100`` give no learning signal.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _check_integer_ids(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {tensor.dtype}")


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Iterable[int] = (),
    mlm_probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style dynamic masking.

    Each position whose id is not in ``special_token_ids`` is selected with probability
    ``mlm_probability``. A selected position becomes ``mask_token_id`` with probability 0.8,
    a random *ordinary* token (never a special one) with probability 0.1, and keeps its id
    with probability 0.1. ``labels`` holds the original id at selected positions and
    ``-100`` elsewhere. ``input_ids`` is not modified.

    Returns ``(inputs, labels)``, both shaped like ``input_ids``.
    """
    _check_integer_ids("input_ids", input_ids)
    if not 0.0 <= float(mlm_probability) <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id={mask_token_id} is outside the vocabulary [0, {vocab_size})")

    device = input_ids.device
    special = torch.tensor(sorted(set(int(i) for i in special_token_ids) | {mask_token_id}), dtype=torch.long)
    # Random replacements are drawn from ordinary tokens only: a random [PAD] or [CLS]
    # in the middle of a text would teach the model something false.
    ordinary = torch.ones(vocab_size, dtype=torch.bool)
    ordinary[special[(special >= 0) & (special < vocab_size)]] = False
    ordinary_ids = ordinary.nonzero().squeeze(1)
    if ordinary_ids.numel() == 0:
        raise ValueError("every id in the vocabulary is special: there is nothing to draw random replacements from")

    # Draw on the generator's device (CPU by default) so a seed gives the same masks on any device.
    draw_device = generator.device if generator is not None else device
    shape = input_ids.shape
    select_draw = torch.rand(shape, generator=generator, device=draw_device).to(device)
    action_draw = torch.rand(shape, generator=generator, device=draw_device).to(device)
    random_ids = ordinary_ids.to(draw_device)[
        torch.randint(ordinary_ids.numel(), shape, generator=generator, device=draw_device)
    ].to(device)

    is_special = torch.isin(input_ids, special.to(device))
    selected = (select_draw < mlm_probability) & ~is_special
    to_mask = selected & (action_draw < 0.8)
    to_random = selected & (action_draw >= 0.8) & (action_draw < 0.9)

    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    inputs = torch.where(to_random, random_ids.to(input_ids.dtype), inputs)
    return inputs, labels


def _cross_entropy_over_labels(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    if logits.dim() != 3:
        raise ValueError(f"logits must be (batch, seq, vocab), got shape {tuple(logits.shape)}")
    flat_targets = targets.reshape(-1)
    # Sum, then divide by the count clamped at 1: the same as the mean when any position
    # carries a label, and 0 (still attached to the logits) when none does. Branching on
    # "any label?" instead would read a tensor on the host at every step.
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat_targets,
                            ignore_index=ignore_index, reduction="sum")
    count = (flat_targets != ignore_index).sum().clamp(min=1)
    return total / count


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not -100.

    logits: ``(batch, seq, vocab)``; labels: ``(batch, seq)`` from :func:`mask_tokens`.
    """
    _check_integer_ids("labels", labels)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, seq)")
    return _cross_entropy_over_labels(logits, labels, IGNORE_INDEX)


def clm_loss(logits: torch.Tensor, input_ids: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token loss: the logits at position t predict ``input_ids`` at t+1.

    Targets equal to ``ignore_index`` (padding, for instance) are excluded from the mean.
    logits: ``(batch, seq, vocab)``; input_ids: ``(batch, seq)``.
    """
    _check_integer_ids("input_ids", input_ids)
    if logits.shape[:-1] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} disagree on (batch, seq)")
    if input_ids.size(1) < 2:
        raise ValueError("clm_loss needs sequences of at least 2 tokens (one input, one target)")
    return _cross_entropy_over_labels(logits[:, :-1, :], input_ids[:, 1:], ignore_index)
