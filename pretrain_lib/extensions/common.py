"""Validation on many fixed windows, one loss per window, so that the noise of a validation
loss (or of a difference between two models on the same windows) can be measured with a
bootstrap over windows (``pretrain_lib.lesson.bootstrap_mean``)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def fixed_windows(tokens: torch.Tensor, *, seq_len: int, n_windows: int) -> torch.Tensor:
    """``(n_windows, seq_len)``: evenly spaced windows of a 1-D token stream (the same every call).

    With ``n_windows * seq_len <= len(tokens)`` the windows do not overlap."""
    if tokens.dim() != 1 or tokens.numel() < seq_len:
        raise ValueError(f"need a 1-D stream of at least seq_len={seq_len} tokens, got shape {tuple(tokens.shape)}")
    if n_windows < 1:
        raise ValueError(f"n_windows must be positive, got {n_windows}")
    starts = torch.linspace(0, tokens.numel() - seq_len, n_windows).long()
    return tokens[starts[:, None] + torch.arange(seq_len)]


@torch.no_grad()
def window_losses(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
    """The mean next-token loss (nats/token) of each window: a ``(n_windows,)`` float tensor on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        logits = model(chunk)[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")
        out.append(nll.mean(dim=1).cpu())
    model.train(was_training)
    return torch.cat(out)


def unigram_window_losses(train_tokens: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-window loss of the unigram model: every target predicted with its frequency in
    ``train_tokens`` (add-one smoothed), ignoring all context. A language model that does not
    beat this has learnt only which tokens are common (the unigram plateau, glossary 0.2)."""
    counts = torch.bincount(train_tokens.flatten(), minlength=vocab_size).double() + 1.0
    log_p = (counts / counts.sum()).log()
    return (-log_p[windows[:, 1:]]).mean(dim=1).float()


def train_clm(tokens: torch.Tensor, config, *, steps: int, batch_size: int, lr: float, seed: int, device,
              warmup_steps: int = 0, min_lr: float | None = None, desc: str = "train", grad_clip: float | None = 1.0):
    """A course GPT initialised from ``seed`` and trained on random windows of ``tokens`` (their
    order fixed by ``seed``), warmup then cosine decay to ``min_lr`` (``lr / 10`` by default), gradients
    clipped to ``grad_clip`` (None: not clipped). Returns ``(model, history)``."""
    from ..data.loader import random_windows
    from ..model import GPT
    from ..optim import cosine_lr
    from ..train import clm_objective, train
    from ..utils import seed_everything

    seed_everything(seed)
    model = GPT(config)
    generator = torch.Generator().manual_seed(seed)
    floor = lr / 10 if min_lr is None else min_lr
    schedule = lambda step: cosine_lr(step, max_lr=lr, min_lr=floor, warmup_steps=warmup_steps,
                                      cosine_steps=steps - 1)
    history = train(model, lambda i: {"input_ids": random_windows(tokens, batch_size=batch_size,
                                                                  seq_len=config.max_seq_len, generator=generator)},
                    clm_objective, steps=steps, lr=lr, lr_schedule=schedule, device=device, seed=seed, desc=desc,
                    grad_clip=grad_clip)
    return model, history
