"""Notebook 9.5's runs: the coordinate check and the learning-rate sweep per width, standard
parametrisation (SP) against μP (``ModelConfig.mup_base_width``, ``pretrain_lib.mup``).

Every run trains through the engine (``extensions.common.train_clm``: ``train`` and
``build_optimizer``, which reads the μP option from the model's config), so μP here is an option
of the one training loop, not a second one. A width's SP and μP runs of one seed share the
initial seed and the batch order; at the base width the two parametrisations are the same model.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .extensions.common import fixed_windows, train_clm, window_losses
from .model import GPT, ModelConfig
from .optim import build_optimizer
from .optim.experiments import TokenData
from .train import clm_objective, train_step
from .utils import seed_everything


def char_tokens(max_chars: int = 300_000, val_fraction: float = 0.1) -> TokenData:
    """Shakespeare's plays as characters (a vocabulary of about 65), the last ``val_fraction`` held out. A
    character model escapes the unigram plateau within a few dozen steps, so a short run's loss is a smooth
    function of the learning rate: what a sweep needs to locate its optimum."""
    from .data.corpus import shakespeare_text

    text = shakespeare_text(max_chars)
    if not text:
        raise ValueError("the Shakespeare corpus is empty")
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    n_val = max(1, int(len(ids) * val_fraction))
    return TokenData(train=ids[:-n_val], val=ids[-n_val:], vocab_size=len(alphabet))


def width_config(vocab_size: int, width: int, *, mup_base_width: int, n_layers: int = 2, n_heads: int = 4,
                 seq_len: int = 64, tie_embeddings: bool = True) -> ModelConfig:
    """The course GPT at ``width`` (d_ff = 4·width, a fixed number of heads, so the head dimension grows
    with the width, as μP's width ratio assumes); ``mup_base_width=0`` is SP; ``tie_embeddings=False``
    gives the output layer its own table."""
    return ModelConfig(vocab_size=vocab_size, d_model=width, n_heads=n_heads, n_layers=n_layers,
                       max_seq_len=seq_len, mup_base_width=mup_base_width, tie_embeddings=tie_embeddings)


@torch.no_grad()
def _outputs(model: GPT, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The last block's attention and MLP outputs (before the residual add) and the logits."""
    seen = {}
    last = model.backbone.blocks[-1]
    hooks = [last.attn.register_forward_hook(lambda m, i, o: seen.__setitem__("attention output", o)),
             last.mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("MLP output", o))]
    try:
        seen["logits"] = model(ids)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.detach().clone() for k, v in seen.items()}


def coordinate_check(tokens: torch.Tensor, config: ModelConfig, *, lr: float, steps: int, batch_size: int,
                     seed: int) -> dict[str, list[float]]:
    """How far each output moves from its initial value, per coordinate, over ``steps`` AdamW steps
    at a constant ``lr`` (no weight decay): ``{name: [rms(x_t - x_0) for t = 1..steps]}`` on one fixed
    probe batch. Yang et al.'s check: under a parametrisation that transfers, these stay the same
    size as the width grows; if they grow with the width, a wider model needs a smaller LR."""
    from .data.loader import random_windows

    seed_everything(seed)
    model = GPT(config)
    generator = torch.Generator().manual_seed(seed)
    draw = lambda: random_windows(tokens, batch_size=batch_size, seq_len=config.max_seq_len,  # noqa: E731
                                  generator=generator)
    probe = draw()
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.0)
    model.eval()   # no dropout in the course GPT; eval only fixes the mode of the probe forward
    start = _outputs(model, probe)
    change: dict[str, list[float]] = {name: [] for name in start}
    for _ in range(steps):
        model.train()
        train_step(model, [{"input_ids": draw()}], clm_objective, optimizer)
        model.eval()
        for name, value in _outputs(model, probe).items():
            change[name].append(F.mse_loss(value, start[name]).sqrt().item())
    return change


def sweep_loss(tokens: torch.Tensor, val_windows: torch.Tensor, config: ModelConfig, *, lr: float, steps: int,
               batch_size: int, seed: int, warmup_steps: int, grad_clip: float | None = None) -> float:
    """Validation loss (nats/token, mean over ``val_windows``) after ``steps`` steps of warmup + cosine to
    ``lr/10``, or ``inf`` when the run diverged (a non-finite loss). Not clipped by default: clipping by the
    global norm, which grows with the parameter count, would lower a wide model's effective rate on its own."""
    model, history = train_clm(tokens, config, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                               device="cpu", warmup_steps=warmup_steps, desc=f"w{config.d_model} lr {lr:.2g}",
                               grad_clip=grad_clip)
    if not all(math.isfinite(x) for x in history.losses):
        return math.inf
    loss = float(window_losses(model, val_windows).mean())
    return loss if math.isfinite(loss) else math.inf


def validation_windows(tokens: torch.Tensor, *, seq_len: int, n_windows: int) -> torch.Tensor:
    """Evenly spaced, non-overlapping validation windows (see ``extensions.common.fixed_windows``)."""
    return fixed_windows(tokens, seq_len=seq_len, n_windows=min(n_windows, tokens.numel() // seq_len))


def best_log2_lr(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The learning rate (as log2) that minimises the loss: the vertex of the parabola through the grid's
    best point and its two neighbours in log2(lr). At an edge of the grid, the edge itself (the optimum may
    lie beyond it; callers should widen the grid). The vertex is clipped to the three points' span."""
    x = np.log2(np.asarray(lrs, dtype=float))
    y = np.asarray(losses, dtype=float)
    if len(x) != len(y) or len(x) < 3 or np.any(np.diff(x) <= 0):
        raise ValueError("need at least 3 increasing learning rates, each with a loss")
    i = int(np.nanargmin(np.where(np.isfinite(y), y, np.inf)))
    if i == 0 or i == len(x) - 1 or not np.all(np.isfinite(y[i - 1:i + 2])):
        return float(x[i])
    a, b, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
    return float(np.clip(-b / (2 * a), x[i - 1], x[i + 1])) if a > 0 else float(x[i])
