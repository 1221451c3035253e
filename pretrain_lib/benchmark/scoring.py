"""Scoring the multiple-choice items: a causal model's log-likelihoods, a unigram baseline, accuracy.

The rule (the one ``lm-eval`` calls ``acc_bytes``): for each ending, sum the log-probabilities of
its tokens given the context, divide by the ending's length in UTF-8 bytes, pick the largest.
Per byte rather than per token, because the same ending is 40 tokens to a character model and
10 to a BPE model; per byte, both are scored on the same quantity, a log-likelihood per unit of
text. Ties go to the first ending (``numpy.argmax``), as in lm-eval.

The tokens are cut exactly as lm-eval cuts them, so the two evaluators score the same numbers:
the ending's tokens are those of ``encode(context + ending)`` after the first
``len(encode(context))``, and a pair longer than the model's window keeps its last
``window + 1`` tokens (the context is cut on the left).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..lesson import Estimate, bootstrap_mean
from .items import Item

CHANCE = 0.25


class WindowTooShort(ValueError):
    """An ending longer than the model's context window: the item cannot be scored."""


def encode_pair(tokenizer, context: str, ending: str) -> tuple[list[int], list[int]]:
    """``(context_ids, ending_ids)`` as lm-eval's ``_encode_pair`` forms them (trailing spaces of the
    context move to the ending; the ending's ids are the tail of the whole text's encoding)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, ending = context[:-n_spaces], context[-n_spaces:] + ending
    whole = tokenizer.encode(context + ending, add_special_tokens=False).ids
    context_ids = tokenizer.encode(context, add_special_tokens=False).ids
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def choice_loglikelihoods(model: torch.nn.Module, tokenizer, items: list[Item], *, window: int,
                          batch_size: int = 64) -> np.ndarray:
    """``(n_items, 4)`` summed log-probabilities (nats) of each ending given its context.

    ``window``: the model's context in tokens (``config.max_seq_len``); each sequence fed is at most
    that long. Right padding does not change a causal model's logits at the real positions."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pairs = []
    for item in items:
        for ending in item.endings:
            ctx, cont = encode_pair(tokenizer, item.context, ending)
            if not cont or len(cont) >= window:
                raise WindowTooShort(f"item {item.id}: the ending {ending!r} is {len(cont)} tokens, which does not fit "
                                     f"the model's {window}-token window with context before it (train with a "
                                     "longer model.seq_len)")
            seq = (ctx + cont)[-(window + 1):]
            pairs.append((seq[:-1], seq[1:], len(cont)))
    out = np.zeros(len(pairs))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        width = max(len(inp) for inp, _, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (inp, _, _) in enumerate(chunk):
            ids[row, :len(inp)] = torch.tensor(inp)
        logp = F.log_softmax(model(ids.to(device)).double(), dim=-1).cpu()
        for row, (inp, target, n) in enumerate(chunk):
            positions = torch.arange(len(inp) - n, len(inp))
            out[start + row] = float(logp[row, positions, torch.tensor(target[-n:])].sum())
    model.train(was_training)
    return out.reshape(len(items), 4)


def unigram_log_probs(train_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """log p(token) from the training split's counts, add-one smoothed: a model with no context."""
    counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def unigram_loglikelihoods(log_probs: np.ndarray, tokenizer, items: list[Item]) -> np.ndarray:
    """``(n_items, 4)``: each ending's tokens (cut as for the model) scored by the unigram model."""
    return np.array([[float(log_probs[encode_pair(tokenizer, it.context, e)[1]].sum()) for e in it.endings]
                     for it in items])


def byte_lengths(items: list[Item]) -> np.ndarray:
    return np.array([[len(e.encode("utf-8")) for e in it.endings] for it in items], dtype=np.float64)


def predictions(loglikelihoods: np.ndarray, items: list[Item]) -> np.ndarray:
    """The chosen ending of each item: the largest log-likelihood per byte."""
    return np.argmax(loglikelihoods / byte_lengths(items), axis=1)


def correct(loglikelihoods: np.ndarray, items: list[Item]) -> np.ndarray:
    """1.0 for each item whose true ending wins, else 0.0."""
    return (predictions(loglikelihoods, items) == np.array([it.label for it in items])).astype(float)


def accuracy(loglikelihoods: np.ndarray, items: list[Item], *, seed: int = 0) -> Estimate:
    """Share of items whose true ending wins, with the half-width of its 95 % bootstrap interval over items."""
    return bootstrap_mean(correct(loglikelihoods, items), seed=seed, what="items")


def accuracy_gain(loglikelihoods: np.ndarray, baseline: np.ndarray, items: list[Item], *, seed: int = 0) -> Estimate:
    """Accuracy minus a baseline's on the same items, with a paired bootstrap interval (per-item
    differences resampled together): the noise of a comparison, smaller than either interval's sum."""
    return bootstrap_mean(correct(loglikelihoods, items) - correct(baseline, items), seed=seed, what="items")
