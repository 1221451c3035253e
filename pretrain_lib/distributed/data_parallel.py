"""Data parallelism: every rank holds the whole model, reads its own slice of the global
batch, and the ranks average their gradients before each optimiser step.

Three variants run one after another from the same initial weights:

- ``by_hand``: after ``backward()``, one ``all_reduce`` per parameter gradient, divided
  by the world size;
- ``ddp``: ``DistributedDataParallel``, which buckets gradients and overlaps their
  all-reduce with the rest of the backward pass;
- ``ddp_plus_manual`` (the pitfall): DDP *and* a by-hand all-reduce afterwards. The
  result is the same (averaging averages changes nothing) but every byte is sent twice.
- ``ddp_same_data`` (the other pitfall): DDP, but every rank reads the same rows (the first
  ``batch / p``), as when the data loader is not sharded by rank. Its weights equal one
  process trained on ``batch / p`` sequences, not on the global batch: p ranks do the work of one.

Run: ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m
pretrain_lib.distributed.data_parallel --steps 3 --out RUN_DIR``.
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


def average_gradients(model: nn.Module) -> int:
    """All-reduce (sum) every gradient, then divide by the world size; returns bytes sent per rank's input.

    Each rank's loss is the mean over its own shard, so the mean of the ranks' gradients
    is the gradient of the mean over the whole batch (shards have equal size).
    """
    world = dist.get_world_size()
    sent = 0
    for p in model.parameters():
        if p.grad is None:
            continue
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)
        sent += tensor_bytes(p.grad)
    return sent


class _ByteCounter:
    """DDP communication hook state: counts the bytes of every bucket DDP all-reduces."""

    def __init__(self) -> None:
        self.bytes = 0
        self.buckets = 0


def _counting_allreduce_hook(state, bucket):  # no annotations: DDP checks them and this module defers them
    """Like DDP's default hook (average the bucket with one all-reduce), counting bytes on the way."""
    buffer = bucket.buffer()
    state.bytes += tensor_bytes(buffer)
    state.buckets += 1
    world = dist.get_world_size()
    fut = dist.all_reduce(buffer.div_(world), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


VARIANTS = ("by_hand", "ddp", "ddp_plus_manual", "ddp_same_data")
# variants that must reproduce one process on the global batch (the same-data pitfall must not)
EXACT_VARIANTS = ("by_hand", "ddp", "ddp_plus_manual")


def train_variant(variant: str, args, ctx: DistContext) -> dict:
    """Train ``args.steps`` steps with ``variant`` and return its weights, losses, bytes and timings."""
    model = build_model(args, ctx.device)
    counter = _ByteCounter()
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose among {', '.join(VARIANTS)}")
    if variant in ("ddp", "ddp_plus_manual", "ddp_same_data"):
        # device_ids takes the *local* GPU index: a global rank breaks on the second node
        ddp = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        ddp.register_comm_hook(counter, _counting_allreduce_hook)
        net: nn.Module = ddp
    else:
        net = model
    opt = make_optimizer(net.parameters(), args)
    losses, step_seconds, manual_bytes = [], [], 0
    for step in range(args.steps):
        # the pitfall: every rank reads rank 0's rows, so the ranks' gradients are identical
        shard_rank = 0 if variant == "ddp_same_data" else ctx.rank
        ids = local_shard(global_batch(step, args), shard_rank, ctx.world_size).to(ctx.device)
        sync(ctx.device)
        t0 = time.perf_counter()
        loss = clm_loss(net(ids), ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if variant in ("by_hand", "ddp_plus_manual"):
            manual_bytes += average_gradients(model)
        opt.step()
        sync(ctx.device)
        step_seconds.append(time.perf_counter() - t0)
        # report the loss over the whole global batch, not rank 0's shard alone
        losses.append(all_reduce_mean_scalar(loss.item(), ctx.device))
    total_bytes = counter.bytes + manual_bytes
    return {"params": params_of(model), "losses": losses,
            "bytes_per_step": total_bytes / args.steps,
            "ddp_buckets_per_step": counter.buckets / args.steps,
            "seconds_per_step": sorted(step_seconds)[len(step_seconds) // 2]}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Data parallel training by hand, with DDP, and with the double all-reduce pitfall.")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    ctx = setup(args.init_timeout)
    check_args(args, ctx.world_size)
    inject_fault(args, ctx)
    ref_model, ref_losses = reference_run(args, ctx.device)
    ref = params_of(ref_model)
    per_rank_rows = args.batch // ctx.world_size
    one_shard_model, one_shard_losses = reference_run(args, ctx.device, n_rows=per_rank_rows)
    one_shard = params_of(one_shard_model)
    metrics: dict = {"strategy": "data_parallel", "world_size": ctx.world_size, "backend": ctx.backend,
                     "device": str(ctx.device), "n_params": sum(p.numel() for p in ref_model.parameters()),
                     "param_bytes": sum(tensor_bytes(p) for p in ref_model.parameters()),
                     "n_param_tensors": len(list(ref_model.parameters())),
                     "reference_losses": ref_losses, "variants": {}}
    for variant in args.variants.split(","):
        dist.barrier()  # start each variant together so timings compare
        out = train_variant(variant, args, ctx)
        params = out.pop("params")
        out["max_abs_diff_vs_single"] = max_abs_diff(params, ref)
        # the same process trained on only batch / p sequences (rank 0's shard)
        out["max_abs_diff_vs_one_shard"] = max_abs_diff(params, one_shard)
        metrics["variants"][variant] = out
    metrics["one_shard_rows"] = per_rank_rows
    metrics["one_shard_losses"] = one_shard_losses
    exact = [v["max_abs_diff_vs_single"] for k, v in metrics["variants"].items() if k in EXACT_VARIANTS]
    metrics["max_abs_diff_vs_single"] = max(exact) if exact else float("nan")
    if ctx.is_main:
        write_metrics(args.out, metrics)
    teardown()


if __name__ == "__main__":
    run_main(main)
