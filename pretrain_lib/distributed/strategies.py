"""Parallel strategies as functions applied to a model (torchtitan's ``parallelize`` style).

Each function takes the course's ``GPT`` (or its optimiser's settings) and returns what the
engine's ``train_step`` trains; none of them contains a training loop:

- :func:`apply_ddp`: replicate, all-reduce gradients in buckets during backward;
- :func:`apply_fsdp`: FSDP2 ``fully_shard`` on every block and the root (ZeRO-3), optionally
  with a bf16 ``MixedPrecisionPolicy``;
- :func:`apply_zero1`: shard Adam's state over the ranks (an optimiser wrapper, under DDP);
- :func:`apply_tensor_parallel` (in :mod:`.tensor_parallel_layers`): Megatron-style column/row splits;
- :func:`pipeline_stage` (in :mod:`.pipeline_stages`): this rank's contiguous stage of the GPT;
- :func:`apply_context_parallel` (in :mod:`.context_parallel`): ring attention over this rank's shard
  of the sequence (chapter 9.2).

Under data parallelism pass ``dp_group=True`` to ``train_step``: it all-reduces the loss and
the target-token count together and rescales the averaged gradients, so the step equals one
process on the global batch even when ranks hold different numbers of target tokens.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..optim import param_groups
from .context_parallel import apply_context_parallel
from .pipeline_stages import pipeline_stage
from .process_group import DistContext
from .tensor_parallel_layers import apply_tensor_parallel

__all__ = ["apply_context_parallel", "apply_ddp", "apply_fsdp", "apply_tensor_parallel", "apply_zero1",
           "bf16_mixed_precision", "pipeline_stage"]


def apply_ddp(model: nn.Module, ctx: DistContext, *, comm_hook: tuple[object, Callable] | None = None
              ) -> DistributedDataParallel:
    """Wrap ``model`` in DDP on this rank's device; ``comm_hook=(state, hook)`` replaces the all-reduce."""
    # device_ids takes the *local* GPU index: a global rank breaks on the second node
    ddp = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if comm_hook is not None:
        ddp.register_comm_hook(*comm_hook)
    return ddp


def bf16_mixed_precision():
    """FSDP2's policy for bf16 compute: gather bf16 weights, reduce gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, mesh, *, mixed_precision=None) -> nn.Module:
    """Shard ``model`` with FSDP2 (in place): each block is one unit gathered just before it runs.

    ``mesh`` is a 1-D ``DeviceMesh`` over the data-parallel ranks; ``mixed_precision`` a
    ``MixedPrecisionPolicy`` (e.g. :func:`bf16_mixed_precision` on GPUs) or None for fp32.
    """
    from torch.distributed.fsdp import fully_shard
    kwargs = {"mesh": mesh} if mixed_precision is None else {"mesh": mesh, "mp_policy": mixed_precision}
    blocks = getattr(getattr(model, "backbone", None), "blocks", None)
    if blocks is None:
        raise TypeError(f"apply_fsdp expects the course's GPT (model.backbone.blocks), got {type(model).__name__}")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)  # the root unit: embeddings, final LayerNorm, the tied output layer
    return model


def apply_zero1(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
                eps: float = 1e-8) -> torch.optim.Optimizer:
    """ZeRO stage 1: ``ZeroRedundancyOptimizer`` around AdamW, each rank stepping its share of the tensors.

    The parameter groups are the engine's (``optim.param_groups``: decay on matrices only), and
    the settings the same as ``build_optimizer``'s, so the update equals the unsharded one.
    ``model`` is usually DDP-wrapped (the gradients are averaged before the sharded step).
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer
    return ZeroRedundancyOptimizer(param_groups(model, weight_decay), optimizer_class=torch.optim.AdamW, lr=lr,
                                   betas=betas, eps=eps)
