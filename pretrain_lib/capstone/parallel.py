"""The trainer under torchrun: join the process group and apply the configured strategy.

``parallel = "none"`` is one process. ``"ddp"``, ``"fsdp"`` and ``"mesh"`` need torchrun (its
environment variables); the strategies are the distributed package's ``apply_ddp``, ``apply_fsdp``
and (``"mesh"``, chapter 9.1) ``mesh.parallelize`` on a dp × tp device mesh, so the trainer never
re-implements one. On a mesh the data-parallel coordinate decides which batches a rank reads: the
tp ranks of one dp rank read the same ones. gloo on CPUs, NCCL on GPUs and
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
    mesh: object | None = None           # parallel = "mesh": the dp × tp DeviceMesh (set by wrap_model)

    @property
    def dp_rank(self) -> int:
        """Which slice of the data this rank reads."""
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else self.rank

    @property
    def dp_size(self) -> int:
        """How many different slices the ranks read (the batch is this many times one rank's)."""
        return self.mesh["dp"].size() if self.mesh is not None else self.world_size

    @property
    def dp_group(self):
        """``train_step``'s ``dp_group``: the data-parallel group, True for all ranks, None in one process."""
        if self.mesh is not None:
            return self.mesh["dp"].get_group()
        return True if self.world_size > 1 else None

    @property
    def shard_prefix(self) -> str:
        """A sharded checkpoint's key prefix for this rank's tensors: the tp ranks hold different slices
        of the same parameter names (the by-hand split), so each tp coordinate saves under its own name."""
        return f"tp{self.mesh['tp'].get_local_rank()}" if self.mesh is not None else ""


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


def build_run_mesh(info: DistInfo, sizes: dict[str, int]) -> None:
    """``parallel = "mesh"``: the dp × tp mesh over the job's ranks, kept in ``info`` (before the data
    loader is built: it reads the dp coordinate)."""
    from ..distributed.mesh import build_mesh
    if sizes["dp"] * sizes["tp"] != info.world_size:
        raise RuntimeError(f"[parallel] dp = {sizes['dp']} × tp = {sizes['tp']} needs {sizes['dp'] * sizes['tp']} ranks; "
                           f"torchrun started {info.world_size} (--nproc_per_node)")
    info.mesh = build_mesh(info.device.type, {"dp": sizes["dp"], "tp": sizes["tp"]})


def wrap_model(model: nn.Module, parallel: str, info: DistInfo) -> nn.Module:
    """The model the engine trains: unchanged, DDP-wrapped, sharded with FSDP2, or split over the
    device mesh (tensor parallel, then FSDP2; in place)."""
    if parallel == "none":
        return model
    if parallel == "mesh":
        from ..distributed.mesh import parallelize
        return parallelize(model, info.mesh)
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
