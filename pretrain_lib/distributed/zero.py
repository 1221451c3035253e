"""ZeRO: shard what data parallelism replicates.

With data parallelism every rank stores all parameters (Ψ numbers), all gradients (Ψ)
and all of Adam's state (2Ψ). ZeRO (Rajbhandari et al., 2020) splits them over the p
ranks: stage 1 shards the optimiser state, stage 2 also the gradients, stage 3 also the
parameters. Variants run here, each checked against one process on the global batch:

- ``zero1``: ``ZeroRedundancyOptimizer`` around AdamW under DDP (stage 1);
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every block and the root (stage 3);
- ``by_hand``: stage 3 written out: the flat parameter vector is sharded; each step
  all-gathers it, runs forward/backward on the full copy, reduce-scatters the flat
  gradient so each rank receives the averaged slice it owns, and updates only that slice.

Each variant measures the bytes per rank of parameters, gradients and optimiser state.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..objectives import clm_loss
from .common import (DistContext, all_reduce_mean_scalar, base_parser, build_model, check_args, global_batch,
                     inject_fault, local_shard, make_optimizer, max_abs_diff, params_of, reference_run, run_main,
                     setup, sync, teardown, tensor_bytes, write_metrics)


def zero_memory_formula(n_params: int, world_size: int, stage: int, *, param_bytes: int = 4, grad_bytes: int = 4,
                        optim_bytes: int = 8) -> dict[str, float]:
    """Bytes per rank for parameters, gradients and optimiser state under ZeRO ``stage`` (0 = plain DDP).

    fp32 AdamW (the default) stores 4 bytes per parameter, 4 per gradient and 8 of state
    (two moments). The paper's mixed-precision accounting is ``param_bytes=2,
    grad_bytes=2, optim_bytes=12`` (fp32 master copy + two moments): 16Ψ for stage 0.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    p = world_size
    return {"params": n_params * param_bytes / (p if stage >= 3 else 1),
            "grads": n_params * grad_bytes / (p if stage >= 2 else 1),
            "optim": n_params * optim_bytes / (p if stage >= 1 else 1)}


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:  # skip the scalar step counter
                total += _local(v).numel() * v.element_size()
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly DTensor) tensor this rank stores."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class FlatShardedModel:
    """ZeRO-3 by hand: each rank owns 1/p of the flat parameter vector and its Adam state.

    ``model`` is the compute copy; its parameters are overwritten from the all-gathered
    flat vector before every forward pass (a real implementation frees them after use).
    """

    def __init__(self, model: nn.Module, ctx: DistContext, args):
        self.model, self.ctx = model, ctx
        self.params = [p for p in model.parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        self.numel = flat.numel()
        self.padded = -(-self.numel // ctx.world_size) * ctx.world_size  # pad so the shards are equal
        self.shard_size = self.padded // ctx.world_size
        full = torch.zeros(self.padded, device=flat.device)
        full[:self.numel] = flat
        lo = ctx.rank * self.shard_size
        self.shard = nn.Parameter(full[lo:lo + self.shard_size].clone())
        self.opt = make_optimizer([self.shard], args)
        self.bytes_sent = 0

    def gather_params(self) -> None:
        """All-gather the shards into the full flat vector and copy it into the model."""
        full = torch.empty(self.padded, device=self.shard.device)
        dist.all_gather_into_tensor(full, self.shard.detach())
        self.bytes_sent += tensor_bytes(full)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(full[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def reduce_scatter_grads(self) -> None:
        """Flatten the full gradients and reduce-scatter them: this rank gets the averaged slice it owns."""
        flat = torch.zeros(self.padded, device=self.shard.device)
        flat[:self.numel] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                       for p in self.params])
        mine = torch.empty(self.shard_size, device=self.shard.device)
        dist.reduce_scatter_tensor(mine, flat, op=dist.ReduceOp.SUM)
        self.bytes_sent += tensor_bytes(flat)
        self.shard.grad = mine / self.ctx.world_size
        for p in self.params:
            p.grad = None  # the full gradient is not kept: only the owned slice is

    def memory(self) -> dict[str, int]:
        b = self.shard.element_size()
        return {"params": self.shard_size * b, "grads": self.shard_size * b, "optim": _state_bytes(self.opt)}


def train_variant(variant: str, args, ctx: DistContext) -> dict:
    model = build_model(args, ctx.device)
    sharded: FlatShardedModel | None = None
    if variant == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        net: nn.Module = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.AdamW, lr=args.lr,
                                      weight_decay=0.01, eps=1e-6)
    elif variant == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for block in model.backbone.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        net, opt = model, make_optimizer(model.parameters(), args)
    elif variant == "by_hand":
        sharded = FlatShardedModel(model, ctx, args)
        net, opt = model, sharded.opt
    else:
        raise ValueError(f"unknown variant {variant!r}; choose among zero1, fsdp2, by_hand")
    losses, step_seconds, grad_bytes = [], [], 0
    for step in range(args.steps):
        ids = local_shard(global_batch(step, args), ctx.rank, ctx.world_size).to(ctx.device)
        sync(ctx.device)
        t0 = time.perf_counter()
        if sharded is not None:
            sharded.gather_params()
        loss = clm_loss(net(ids), ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sharded is not None:
            sharded.reduce_scatter_grads()
        grad_bytes = sum(_local(p.grad).numel() * p.grad.element_size()
                         for p in ([sharded.shard] if sharded else model.parameters()) if p.grad is not None)
        opt.step()
        sync(ctx.device)
        step_seconds.append(time.perf_counter() - t0)
        losses.append(all_reduce_mean_scalar(loss.item(), ctx.device))

    sent_per_step = sharded.bytes_sent / args.steps if sharded is not None else None
    if sharded is not None:
        sharded.gather_params()  # assemble the final weights to compare them
        memory = sharded.memory()
        full = params_of(model)
    else:
        memory = {"params": sum(_local(p).numel() * p.element_size() for p in model.parameters()),
                  "grads": grad_bytes, "optim": _state_bytes(opt.optim if variant == "zero1" else opt)}
        full = {k: _full(v).detach() for k, v in model.named_parameters()}
    # ZeroRedundancyOptimizer assigns whole tensors to ranks, so shards are uneven: report every rank
    per_rank = [None] * ctx.world_size
    dist.all_gather_object(per_rank, memory)
    return {"params": full, "losses": losses, "memory_per_rank": per_rank,
            "seconds_per_step": sorted(step_seconds)[len(step_seconds) // 2],
            "bytes_sent_per_step": sent_per_step}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("ZeRO-1 (ZeroRedundancyOptimizer), FSDP2 and ZeRO-3 by hand, with per-rank memory.")
    parser.add_argument("--variants", default="zero1,fsdp2,by_hand")
    args = parser.parse_args(argv)
    ctx = setup(args.init_timeout)
    check_args(args, ctx.world_size)
    inject_fault(args, ctx)
    ref_model, ref_losses = reference_run(args, ctx.device)
    ref = params_of(ref_model)
    n_params = sum(p.numel() for p in ref_model.parameters())
    metrics: dict = {"strategy": "zero", "world_size": ctx.world_size, "backend": ctx.backend,
                     "device": str(ctx.device), "n_params": n_params, "reference_losses": ref_losses,
                     "formula_bytes": {f"stage{s}": zero_memory_formula(n_params, ctx.world_size, s) for s in range(4)},
                     "variants": {}}
    for variant in args.variants.split(","):
        dist.barrier()
        out = train_variant(variant, args, ctx)
        out["max_abs_diff_vs_single"] = max_abs_diff(out.pop("params"), ref)
        metrics["variants"][variant] = out
    metrics["max_abs_diff_vs_single"] = max(v["max_abs_diff_vs_single"] for v in metrics["variants"].values())
    if ctx.is_main:
        write_metrics(args.out, metrics)
    teardown()


if __name__ == "__main__":
    run_main(main)
