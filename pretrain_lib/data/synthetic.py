"""Synthetic token batches for exact distributed comparisons (Chapter 3).

Chapter 3 checks every parallel strategy against one process to 1e-5. That needs a batch
every rank can rebuild from ``(seed, step)`` alone, with no file, tokenizer or loader state
in between, and that a tiny model can still learn in a few steps. An arithmetic sequence
does both: each row follows ``x[t+1] = (x[t] + stride) mod vocab`` from a random start.
It is not language; the course text enters in Chapters 1, 2 and 7.
"""
from __future__ import annotations

import torch


def arithmetic_batch(step: int, *, batch: int, seq_len: int, vocab: int, seed: int = 0,
                     stride: int = 7) -> torch.Tensor:
    """The global batch of ``step``: token ids ``(batch, seq_len)``, identical on every rank.

    Row ``i`` starts at a random token (drawn from a generator seeded by ``seed`` and
    ``step``) and adds ``stride`` modulo ``vocab`` at each position.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len), ("vocab", vocab)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + step)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    return (start + stride * torch.arange(seq_len)) % vocab


def local_shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of the global batch: ``(batch / world, seq)``.

    Each rank reads different sequences; together they cover the global batch once.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got rank={rank}, world_size={world_size}")
    if batch.size(0) % world_size:
        raise ValueError(f"batch of {batch.size(0)} cannot be split evenly over {world_size} ranks")
    per = batch.size(0) // world_size
    return batch[rank * per:(rank + 1) * per]
