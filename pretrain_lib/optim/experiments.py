"""A small, seeded setup for comparing optimisation settings (chapter 5).

Comparing two schedules or two optimisers is only fair when both runs see the same model
initialisation, the same batches in the same order and the same validation windows. This
module gives exactly that: Shakespeare tokens split into train and validation, batches that
are a pure function of ``(seed, index)``, a fixed validation set, and the course GPT built
from a seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..model import GPT, ModelConfig, seeded_model
from ..objectives import clm_loss
from ..train import clm_objective, train
from .builder import build_optimizer


@dataclass
class TokenData:
    train: torch.Tensor       # 1-D int64 token stream
    val: torch.Tensor         # 1-D int64, the held-out end of the text
    vocab_size: int


def shakespeare_tokens(max_chars: int = 300_000, vocab_size: int = 512, val_fraction: float = 0.1) -> TokenData:
    """Byte-level BPE on the first ``max_chars`` characters of the plays; the last ``val_fraction`` held out."""
    from ..data.corpus import shakespeare_text
    from ..data.tokenizer import train_tokenizer

    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    text = shakespeare_text(max_chars)
    tokenizer = train_tokenizer([text], vocab_size=vocab_size)
    ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.int64)
    n_val = max(1, int(len(ids) * val_fraction))
    return TokenData(train=ids[:-n_val], val=ids[-n_val:], vocab_size=tokenizer.get_vocab_size())


def window_batches(tokens: torch.Tensor, *, batch_size: int, seq_len: int, seed: int = 0
                   ) -> Callable[[int], dict[str, torch.Tensor]]:
    """``next_batch(i)``: ``batch_size`` random windows of ``seq_len`` tokens, a pure function of
    ``(seed, i)``, so two runs (or a rerun) see identical batches whatever else they do."""
    if tokens.dim() != 1 or tokens.numel() <= seq_len:
        raise ValueError(f"need a 1-D stream longer than seq_len={seq_len}, got shape {tuple(tokens.shape)}")
    span = tokens.numel() - seq_len + 1
    offsets = torch.arange(seq_len)

    def next_batch(i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        starts = torch.randint(span, (batch_size,), generator=g)
        return {"input_ids": tokens[starts[:, None] + offsets]}

    return next_batch


def validation_loss_fn(tokens: torch.Tensor, *, seq_len: int, n_windows: int = 32, batch_size: int = 16
                       ) -> Callable[[torch.nn.Module], float]:
    """``eval_fn(model)``: the mean CLM loss (nats/token) on ``n_windows`` evenly spaced, fixed windows."""
    if tokens.numel() < seq_len:
        raise ValueError(f"the validation stream ({tokens.numel()} tokens) is shorter than seq_len={seq_len}")
    starts = torch.linspace(0, tokens.numel() - seq_len, n_windows).long()
    windows = tokens[starts[:, None] + torch.arange(seq_len)]

    @torch.no_grad()
    def eval_fn(model: torch.nn.Module) -> float:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total = 0.0
        for chunk in windows.split(batch_size):
            chunk = chunk.to(device)
            total += float(clm_loss(model(chunk), chunk)) * chunk.size(0)
        model.train(was_training)
        return total / windows.size(0)

    return eval_fn


def course_gpt(vocab_size: int, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, seq_len: int = 64,
               seed: int = 0) -> GPT:
    """The course GPT, initialised from ``seed`` (two calls with one seed give identical weights)."""
    return seeded_model(ModelConfig(vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                                    max_seq_len=seq_len), seed)


def loss_spike(losses, window: int = 100) -> float:
    """The largest rise of the training loss above its best value so far, within the first ``window`` steps."""
    best, worst_rise = float("inf"), 0.0
    for loss in list(losses)[:window]:
        worst_rise = max(worst_rise, loss - best)
        best = min(best, loss)
    return worst_rise


def unigram_cross_entropy(data: TokenData) -> float:
    """Validation cross-entropy (nats/token) of the unigram model: each token predicted with its training
    frequency (add-one smoothed), ignoring all context. A language model that has learned only which
    tokens are common sits here."""
    counts = torch.bincount(data.train, minlength=data.vocab_size).double() + 1.0
    return float(-(counts / counts.sum()).log()[data.val].mean())


def scheduled_run(data: TokenData, schedule: Callable[[int], float], steps: int, *, seed: int, d_model: int,
                  n_layers: int, seq_len: int, batch_size: int, device: str = "auto", start_step: int = 0,
                  model: torch.nn.Module | None = None, optimizer=None) -> dict:
    """Train the seeded course GPT (or ``model``) with ``schedule`` for ``steps`` steps on seeded batches;
    ``start_step`` offsets both the schedule and the batches (to continue a run from a checkpoint).
    Returns the model, its optimiser, the validation loss, the training losses and gradient norms."""
    batches = window_batches(data.train, batch_size=batch_size, seq_len=seq_len, seed=seed)
    if model is None:
        model = course_gpt(data.vocab_size, d_model=d_model, n_layers=n_layers, seq_len=seq_len, seed=seed)
    if optimizer is None:
        optimizer = build_optimizer(model, lr=schedule(start_step) or 1e-3)
    hist = train(model, lambda i: batches(i + start_step), clm_objective, optimizer=optimizer, steps=steps,
                 lr=max(schedule(start_step), 1e-12), lr_schedule=lambda s: schedule(s + start_step),
                 device=device, progress=False, log_every=25)
    val = validation_loss_fn(data.val, seq_len=seq_len)(model)
    return {"model": model, "optimizer": optimizer, "val": val, "losses": hist.losses,
            "grad_norms": hist.grad_norms}


def newton_schulz(matrix: torch.Tensor, passes: int = 5) -> torch.Tensor:
    """Muon's orthogonalisation of ``matrix``: ``passes`` Newton–Schulz iterations
    $X \\leftarrow aX + b(XX^\\top)X + c(XX^\\top)^2X$ with torch's Muon coefficients, on the matrix
    scaled to spectral norm at most 1. Its singular values land near 1 (roughly 0.7-1.2: the
    coefficients trade exactness for speed) and its singular vectors are the input's. A wrapper so
    lessons do not import torch's private ``torch.optim._muon`` (the one place to change if it moves)."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _zeropower_via_newtonschulz
    return _zeropower_via_newtonschulz(matrix, (DEFAULT_A, DEFAULT_B, DEFAULT_C), passes, 1e-7).float()
