"""Gradient and weight norms per layer in one fused pass, with no host read.

The source chapter's monitor built the gradient norm with one ``.item()`` per parameter:
each is a host-device synchronisation, hundreds per step on a real model. Here every
parameter's norm comes from one ``torch._foreach_norm`` call (a handful of kernels for all
tensors), the per-layer norms are sums of squares added with ``index_add_``, and the result
stays a tensor until the monitor reads everything of a logged step in one transfer.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

_WRAPPERS = ("module.", "_orig_mod.")  # DDP and torch.compile prefixes

try:  # FSDP2 parameters and their gradients are DTensors: each rank holds a shard
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise); no communication."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective: call it on every rank); the tensor itself otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def layer_of(name: str) -> str:
    """Group a parameter name into its layer: up to the first numeric part (a block index),
    else its module path. ``backbone.blocks.3.attn.qkv.weight`` -> ``backbone.blocks.3``;
    ``backbone.tok_emb.weight`` -> ``backbone.tok_emb``."""
    for prefix in _WRAPPERS:
        while name.startswith(prefix):
            name = name[len(prefix):]
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1]) or parts[0]


class LayerIndex:
    """The trainable parameters of a model, in order, and the layer each belongs to."""

    def __init__(self, model: nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters to monitor")
        groups = [layer_of(n) for n, _ in named]
        first = {g.split(".")[0] for g in groups}
        if len(first) == 1 and all("." in g for g in groups):  # drop a prefix every layer shares
            groups = [g.split(".", 1)[1] for g in groups]
        self.names = list(dict.fromkeys(groups))
        self.params = [p for _, p in named]
        self.sharded = any(isinstance(p, DTensor) for p in self.params)  # FSDP2: norms are per shard
        position = {g: i for i, g in enumerate(self.names)}
        self.layer_ids = torch.tensor([position[g] for g in groups])

    def __len__(self) -> int:
        return len(self.names)


def _per_layer(norms: torch.Tensor, layer_ids: torch.Tensor, n_layers: int) -> torch.Tensor:
    squares = torch.zeros(n_layers, device=norms.device, dtype=torch.float32)
    squares.index_add_(0, layer_ids.to(norms.device), norms.float().square())
    return squares.sqrt()


def fused_norms(tensors: Sequence[torch.Tensor], layer_ids: torch.Tensor, n_layers: int) -> torch.Tensor:
    """``(n_layers,)`` L2 norm of each layer's tensors, from one ``_foreach_norm`` (no host read)."""
    norms = torch.stack([n.float() for n in torch._foreach_norm(list(tensors))])
    return _per_layer(norms, layer_ids, n_layers)


def param_grad_norms(index: LayerIndex) -> torch.Tensor | None:
    """``(n_params,)`` L2 norm of each parameter's gradient (0 where there is none), one fused
    call; the cheapest thing to record every step. None when no parameter has a gradient."""
    grads = [None if p.grad is None else local(p.grad) for p in index.params]
    if all(g is not None for g in grads):
        return torch.stack(torch._foreach_norm(grads)).float()
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return None
    norms = torch.zeros(len(grads), device=index.params[0].device)
    norms[present] = torch.stack(torch._foreach_norm([grads[i] for i in present])).float()
    return norms


def layer_matrix(index: LayerIndex, device: torch.device) -> torch.Tensor:
    """``(n_params, n_layers)`` 0/1 matrix: squared parameter norms @ it = squared layer norms."""
    onehot = torch.zeros(len(index.params), len(index), device=device)
    onehot[torch.arange(len(index.params)), index.layer_ids] = 1.0
    return onehot


def grad_norms(index: LayerIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """``(global_norm, per_layer_norms)`` of the gradients in place, as tensors.

    A parameter without a gradient counts as zero. The global norm is the root of the sum
    of the layers' squares, which is exactly ``clip_grad_norm_``'s total norm."""
    device = index.params[0].device
    with_grad = [(i, p.grad) for i, p in enumerate(index.params) if p.grad is not None]
    if not with_grad:
        zeros = torch.zeros(len(index), device=device)
        return zeros.sum(), zeros
    ids = index.layer_ids if len(with_grad) == len(index.params) else index.layer_ids[[i for i, _ in with_grad]]
    per_layer = fused_norms([g for _, g in with_grad], ids, len(index))
    return per_layer.square().sum().sqrt(), per_layer
