"""Bits per byte: a loss that does not depend on the tokenizer (see :mod:`pretrain_lib.evaluate`).

Imports nothing from the capstone, so the trainer may use it during training without a cycle.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.tokenizer import SPECIAL_TOKENS, UNK


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Nats summed over tokens → bits per byte of the text they decode to."""
    if total_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive byte count, got {total_bytes}")
    return total_nats / (math.log(2) * total_bytes)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for in decoded text (0 for the special tokens).

    A byte-level BPE token's string spells one byte per character (GPT-2's byte-to-unicode map),
    so its length is its byte count even when it holds half of a multi-byte character; any other
    token's string is its text."""
    byte_level = json.loads(tokenizer.to_str()).get("decoder", {}) or {}
    byte_level = byte_level.get("type") == "ByteLevel"
    specials = {tokenizer.token_to_id(t) for t in (*SPECIAL_TOKENS, UNK)} - {None}
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, i in tokenizer.get_vocab().items():
        if i not in specials:
            lengths[i] = len(token) if byte_level else len(token.encode("utf-8"))
    return lengths


@torch.no_grad()
def window_nats(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
    """``(n_windows, seq_len)`` nats of each predicted token of each window ``(n_windows, seq_len + 1)``."""
    was_training = model.training
    model.eval()
    out = []
    for chunk in windows.split(batch_size):
        logits = model(chunk[:, :-1]).double()
        out.append(F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none"))
    model.train(was_training)
    return torch.cat(out)
