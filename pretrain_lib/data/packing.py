"""Packing documents into fixed-length blocks, against padding each one to a length.

Padding (the source chapter's preprocessing) gives every document its own row of
``max_length`` ids: short documents fill the row with ``[PAD]`` (compute spent on
nothing) and long ones are cut (text never trained on). Packing concatenates the
documents, each followed by an end-of-text id, and cuts the stream into blocks of
``block_size``: no padding at all, only the last partial block is left over.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch


def _as_id_arrays(docs: Iterable[Sequence[int]]) -> list[np.ndarray]:
    return [np.asarray(d, dtype=np.int64).reshape(-1) for d in docs]


def pack_documents(docs: Iterable[Sequence[int]], *, block_size: int, eot_id: int) -> torch.LongTensor:
    """Concatenate ``doc_0 + [eot] + doc_1 + [eot] + ...`` and cut it into full blocks.

    ``docs``: lists (or arrays) of token ids. Returns ``(n_blocks, block_size)`` int64 with
    ``n_blocks = total // block_size`` where ``total = sum(len(doc) + 1)``; the tokens after
    the last full block are dropped. A document may span two blocks: with causal attention
    the end-of-text id tells the model where one text stops.
    """
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    pieces = []
    eot = np.array([eot_id], dtype=np.int64)
    for ids in _as_id_arrays(docs):
        pieces.append(ids)
        pieces.append(eot)
    if not pieces:
        raise ValueError("pack_documents got no documents: the corpus is empty")
    stream = np.concatenate(pieces)
    n_blocks = stream.size // block_size
    if n_blocks == 0:
        raise ValueError(f"the documents hold {stream.size} tokens (with separators), fewer than one block of "
                         f"{block_size}; use a smaller block_size or more text")
    return torch.from_numpy(stream[:n_blocks * block_size].reshape(n_blocks, block_size).copy())


def pad_documents(docs: Iterable[Sequence[int]], *, max_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per document, truncated to ``max_length`` and right-padded with ``pad_id``.

    Returns ``(input_ids, attention_mask)``, both ``(n_docs, max_length)``; the mask is 1 on
    real tokens and 0 on padding (the source chapter returns no mask at all).
    """
    arrays = _as_id_arrays(docs)
    if not arrays:
        raise ValueError("pad_documents got no documents: the corpus is empty")
    ids = np.full((len(arrays), max_length), pad_id, dtype=np.int64)
    mask = np.zeros((len(arrays), max_length), dtype=np.int64)
    for row, a in enumerate(arrays):
        n = min(a.size, max_length)
        ids[row, :n] = a[:n]
        mask[row, :n] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


@dataclass(frozen=True)
class WasteReport:
    """Where the compute of a batch layout goes, over a corpus. Fractions of slots/tokens."""
    strategy: str
    slots: int              # ids the model processes: rows x length
    real_tokens: int        # slots holding document tokens (or separators, for packing)
    padding_fraction: float  # slots holding [PAD]: computed, learned nothing
    dropped_fraction: float  # corpus tokens never placed in any row (truncated or left over)


def padding_waste(lengths: Sequence[int], *, max_length: int) -> WasteReport:
    """Pad-to-length: padding = rows x max_length - kept tokens; dropped = truncated tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        raise ValueError("no documents")
    kept = np.minimum(lengths, max_length)
    slots = int(lengths.size * max_length)
    return WasteReport("pad", slots, int(kept.sum()), 1 - kept.sum() / slots,
                       float((lengths - kept).sum() / max(lengths.sum(), 1)))


def packing_waste(lengths: Sequence[int], *, block_size: int) -> WasteReport:
    """Packing: no padding; dropped = the tail after the last full block."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        raise ValueError("no documents")
    total = int((lengths + 1).sum())  # + one end-of-text id per document
    n_blocks = total // block_size
    return WasteReport("pack", n_blocks * block_size, n_blocks * block_size, 0.0,
                       (total - n_blocks * block_size) / total)
