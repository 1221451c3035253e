"""Batches for training.

``random_windows`` is nanoGPT's ``get_batch``: random contiguous windows of a long token
stream, the simplest loader for causal language modelling.
"""
from __future__ import annotations

import torch


def random_windows(tokens: torch.Tensor, *, batch_size: int, seq_len: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``batch_size`` windows of ``seq_len`` consecutive tokens from a 1-D stream.

    Returns ``(batch_size, seq_len)`` int64. For CLM, the loss shifts inside the window,
    so a window of T tokens gives T-1 predictions.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    if tokens.numel() < seq_len:
        raise ValueError(f"the stream has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    starts = torch.randint(tokens.numel() - seq_len + 1, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len)
    return tokens[starts[:, None] + offsets[None, :]].long()
