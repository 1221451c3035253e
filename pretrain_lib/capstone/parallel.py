"""The trainer under torchrun: join the process group and apply the configured strategy.

``parallel = "none"`` is one process. ``"ddp"`` and ``"fsdp"`` need torchrun (its
environment variables); the strategies are the distributed package's ``apply_ddp`` and
``apply_fsdp``, so the trainer never re-implements one. gloo on CPUs, NCCL on GPUs and
multi-node rendezvous all come from :func:`pretrain_lib.distributed.process_group.setup`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None   # None: the config's device
    context: object | None = None        # the distributed package's DistContext


def init_distributed(parallel: str) -> DistInfo:
    """One process for ``"none"``; otherwise join torchrun's process group (once)."""
    if parallel == "none":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("this process runs under torchrun with several ranks but parallel = 'none': "
                               "every rank would train the same model alone; pass --set parallel=ddp (or fsdp)")
        return DistInfo()
    if "RANK" not in os.environ:
        raise RuntimeError(f"parallel = {parallel!r} needs torchrun, e.g. python -m torch.distributed.run "
                           "--standalone --nproc_per_node=2 -m pretrain_lib.train --config ... --set parallel=ddp")
    from ..distributed.process_group import DistContext, setup
    if dist.is_initialized():
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]),
                          torch.device("cpu") if dist.get_backend() == "gloo" else
                          torch.device("cuda", int(os.environ["LOCAL_RANK"])), dist.get_backend())
    else:
        ctx = setup()
    return DistInfo(ctx.rank, ctx.world_size, ctx.device, ctx)


def wrap_model(model: nn.Module, parallel: str, info: DistInfo) -> nn.Module:
    """The model the engine trains: unchanged, DDP-wrapped, or sharded with FSDP2 (in place)."""
    if parallel == "none":
        return model
    from ..distributed.strategies import apply_ddp, apply_fsdp
    if parallel == "ddp":
        return apply_ddp(model, info.context)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    return apply_fsdp(model, mesh)


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                          optim_state: dict) -> None:
    """Load an unsharded checkpoint (one process's or DDP's) into a model FSDP has sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))
