"""The model, the data, the optimiser and the single-process run every strategy must reproduce.

Each strategy module builds the same GPT from ``args.seed``, applies its strategy, and
trains it with the engine's ``train_step`` and ``build_optimizer``; ``reference_run`` trains
the unwrapped model on the whole global batch with the same step. The batches are the
synthetic arithmetic sequences of :mod:`pretrain_lib.data.synthetic` (exact comparisons need
data every rank rebuilds from the step number alone).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from ..data.synthetic import arithmetic_batch
from ..model import GPT, ModelConfig, seeded_model
from ..optim import build_optimizer
from ..train import clm_objective, train_step
from .arguments import dtype_name
from .metrics import TOLERANCE, read_losses, tensor_bytes
from .process_group import DistContext

# weight decay of the chapter's runs (on matrices only, as build_optimizer does everywhere)
WEIGHT_DECAY = 0.01
# eps=1e-6 rather than 1e-8: Adam divides each gradient by its own running scale, so for a
# gradient near 1e-9 a rounding difference between two summation orders (one process vs an
# all-reduce) would become a whole step of size lr. A larger eps bounds that amplification;
# the strategies themselves are exact either way.
ADAM_EPS = 1e-6


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                       max_seq_len=args.seq_len)


def strategy_model(args: argparse.Namespace, device: torch.device | str = "cpu") -> GPT:
    """The chapter's GPT from its command-line ``args``, initialised from ``args.seed`` so every rank starts identical."""
    return seeded_model(model_config(args), args.seed).to(device)


def global_batch(step: int, args: argparse.Namespace) -> torch.Tensor:
    """Step ``step``'s whole batch ``(args.batch, args.seq_len)``, the same on every rank."""
    return arithmetic_batch(step, batch=args.batch, seq_len=args.seq_len, vocab=args.vocab, seed=args.seed)


def strategy_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The engine's AdamW with the chapter's settings (see ``WEIGHT_DECAY`` and ``ADAM_EPS``)."""
    return build_optimizer(model, lr=args.lr, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS)


def reference_run(args: argparse.Namespace, device: torch.device | str = "cpu", n_rows: int | None = None,
                  autocast: torch.dtype | None = None, grad_norms: list[float] | None = None) -> tuple[GPT, list[float]]:
    """One process training on the full global batch with the engine: what every strategy must reproduce.

    ``n_rows`` keeps only the first rows of each step's batch ``(n_rows, seq_len)``: what one
    rank alone would train on (used to show what the "same data on every rank" mistake equals).
    ``grad_norms``, when given, receives each step's gradient norm (the norm the engine clips by).
    """
    model = strategy_model(args, device)
    opt = strategy_optimizer(model, args)
    losses, norms = [], []
    for step in range(args.steps):
        ids = global_batch(step, args)[:n_rows].to(device)
        result = train_step(model, [{"input_ids": ids}], clm_objective, opt, autocast=autocast)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    if grad_norms is not None:
        grad_norms.extend(read_losses(norms))   # one host read for all steps
    return model, read_losses(losses)


def run_header(strategy: str, args: argparse.Namespace, ctx: DistContext, ref_model: nn.Module,
               ref_losses: list[float], autocast: torch.dtype | None) -> dict:
    """The fields every strategy's metrics start with."""
    dtype = dtype_name(autocast)
    return {"strategy": strategy, "world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
            "dtype": dtype, "tolerance": TOLERANCE[dtype], "data": "synthetic arithmetic sequences",
            "n_params": sum(p.numel() for p in ref_model.parameters()),
            "param_bytes": sum(tensor_bytes(p) for p in ref_model.parameters()),
            "reference_losses": ref_losses, "variants": {}}
