"""Activation memory: what autograd keeps for the backward pass, the formula for it, and
activation checkpointing as a function applied to a model (chapter 9.4).

A forward pass saves, for each operation, the tensors its backward needs (a linear layer's
input, a GELU's input, attention's queries, keys, values and output, ...). Those saved
*activations* grow with batch × sequence × width × layers, while the weights do not, so at
scale they, not the weights, fill a GPU. *Activation checkpointing* keeps only each block's
input and runs the block's forward again during the backward pass: memory for time.

``saved_activation_bytes`` measures the saved tensors exactly, on any device, with autograd's
saved-tensor hooks (so a CPU shows the same count a GPU would hold), leaving out the
parameters, which are saved too but are not activations.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "block", "mlp")


def saved_activation_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for the backward pass while ``forward()`` runs.

    Each storage counts once (a view of a saved tensor adds nothing), and the model's
    parameters are left out. ``forward`` returns the loss; it is not backpropagated here.
    """
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


def layer_activation_values(config, *, batch: int, seq: int) -> int:
    """The formula for one pre-norm block's saved activations, in values (multiply by the
    bytes per value: 4 in fp32, 2 in bf16), for a model without dropout whose attention does
    not store the ``seq × seq`` score matrix (a fused kernel: flash attention on GPUs, SDPA's
    CPU kernel here).

    Per token and per unit of width ``h``: the first norm's input and output (2; the output
    is the query/key/value projection's input), the queries, keys and values (3), attention's
    output, which is the output projection's input (1), the second norm's input and output
    (2), and the MLP's expansion (``d_ff / h`` = 4) before and after GELU (8): 16 in all.
    Korthikanti et al. (2022) count the same 16 values for 16-bit training with dropout as
    ``s·b·h·(34 + 5·a·s/h)`` bytes: 32 bytes for the values, 2 for two dropout masks (a byte
    per value each), and the ``a·s/h`` term for the score matrix a fused kernel never stores.
    """
    h = config.d_model
    per_token = 2 * h + 3 * h + h + 2 * h + 2 * config.d_ff
    return batch * seq * per_token


def _checkpointed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        # non-reentrant: works with keyword arguments and inputs that need no gradient
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def apply_activation_checkpointing(model: nn.Module, mode: str = "block") -> nn.Module:
    """Checkpoint the course GPT's blocks in place and return ``model``.

    ``"block"``: every block keeps only its input and reruns its whole forward in the
    backward pass. ``"mlp"`` (selective): only the MLPs are rerun, which drops their
    expansion (half of a block's activations) for the cheapest recompute. The weights,
    their names and the results are unchanged: only what is kept between forward and
    backward differs.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    blocks = getattr(getattr(model, "backbone", None), "blocks", None)
    if blocks is None:
        raise TypeError(f"apply_activation_checkpointing expects the course's models (model.backbone.blocks), "
                        f"got {type(model).__name__}")
    if mode == "none":
        return model
    for block in blocks:
        target = block if mode == "block" else block.mlp
        if "forward" in vars(target):
            raise ValueError("this model's blocks are already checkpointed")
        target.forward = _checkpointed(target.forward)   # an instance attribute: the state dict is untouched
    return model
