"""Data parallelism: every rank holds the whole model, reads its own slice of the global
batch, and the ranks average their gradients before each optimiser step.

Variants, each trained with the engine's ``train_step`` from the same initial weights:

- ``by_hand``: after backward, one ``all_reduce`` per parameter gradient, divided by the
  world size (:func:`average_gradients`, run as the engine's ``forward_backward``);
- ``ddp``: :func:`~.strategies.apply_ddp`, which buckets gradients and overlaps their
  all-reduce with the rest of the backward pass;
- ``ddp_plus_manual`` (the pitfall): DDP *and* a by-hand all-reduce afterwards. The
  result is the same (averaging averages changes nothing) but every byte is sent twice;
- ``ddp_same_data`` (the other pitfall): DDP, but every rank reads the same rows (the first
  ``batch / p``), as when the data loader is not sharded by rank. Its weights equal one
  process trained on ``batch / p`` sequences, not on the global batch: p ranks do the work of one.

The engine's ``dp_group`` collective gives every rank the loss of the whole global batch;
the losses are read back once, at the end.

Run: ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m
pretrain_lib.distributed.data_parallel --steps 3 --out RUN_DIR``.
"""
from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn

from ..data.synthetic import local_shard
from ..train import clm_objective, default_forward_backward, train_step
from .arguments import autocast_dtype, base_parser, check_args
from .errors import run_main
from .faults import inject_fault
from .metrics import StepTimer, max_abs_diff, params_of, read_losses, tensor_bytes, variant_record, write_metrics
from .process_group import DistContext, setup, teardown
from .reference import build_model, global_batch, reference_run, run_header, strategy_optimizer
from .strategies import apply_ddp


def average_gradients(model: nn.Module) -> int:
    """All-reduce (sum) every gradient, then divide by the world size; returns the bytes handed to all-reduce.

    With equal shards the mean of the ranks' gradients is the gradient of the whole batch.
    (The engine's ``dp_group`` then corrects for unequal target-token counts.)
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


class ByteCounter:
    """DDP communication hook state: counts the bytes of every bucket DDP all-reduces."""

    def __init__(self) -> None:
        self.bytes = 0
        self.buckets = 0


def counting_allreduce_hook(state, bucket):  # no annotations: DDP checks them and this module defers them
    """Like DDP's default hook (average the bucket with one all-reduce), counting bytes on the way."""
    buffer = bucket.buffer()
    state.bytes += tensor_bytes(buffer)
    state.buckets += 1
    world = dist.get_world_size()
    fut = dist.all_reduce(buffer.div_(world), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def by_hand_average(model_to_average: nn.Module, counter: ByteCounter):
    """The engine's micro-batch loop followed by :func:`average_gradients` (a ``forward_backward``)."""

    def forward_backward(model, micro_batches, objective, **kwargs):
        result = default_forward_backward(model, micro_batches, objective, **kwargs)
        counter.bytes += average_gradients(model_to_average)
        return result
    return forward_backward


VARIANTS = ("by_hand", "ddp", "ddp_plus_manual", "ddp_same_data")
# variants that must reproduce one process on the global batch (the same-data pitfall must not)
EXACT_VARIANTS = ("by_hand", "ddp", "ddp_plus_manual")


def train_variant(variant: str, args, ctx: DistContext) -> dict:
    """Train ``args.steps`` steps with ``variant`` and return its weights, losses, bytes and timings."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose among {', '.join(VARIANTS)}")
    autocast = autocast_dtype(args, ctx.device)
    model = build_model(args, ctx.device)
    ddp_bytes, manual_bytes = ByteCounter(), ByteCounter()
    net: nn.Module = model if variant == "by_hand" else \
        apply_ddp(model, ctx, comm_hook=(ddp_bytes, counting_allreduce_hook))
    manual = by_hand_average(model, manual_bytes) if variant in ("by_hand", "ddp_plus_manual") else None
    opt = strategy_optimizer(model, args)
    # the pitfall: every rank reads rank 0's rows, so the ranks' gradients are identical
    shard_rank = 0 if variant == "ddp_same_data" else ctx.rank
    timer, losses = StepTimer(ctx.device), []
    for step in range(args.steps):
        ids = local_shard(global_batch(step, args), shard_rank, ctx.world_size).to(ctx.device)
        with timer.measure():
            result = train_step(net, [{"input_ids": ids}], clm_objective, opt, autocast=autocast, dp_group=True,
                                forward_backward=manual)
        losses.append(result.loss)  # the global batch's loss: the engine all-reduced it
    return {"params": params_of(model),
            **variant_record(losses=read_losses(losses), bytes_per_step=(ddp_bytes.bytes + manual_bytes.bytes) / args.steps,
                             seconds_per_step=timer.median, ddp_buckets_per_step=ddp_bytes.buckets / args.steps)}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Data parallel training by hand, with DDP, and with the double all-reduce pitfall.")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    ctx = setup(args.init_timeout)
    check_args(args, ctx.world_size)
    inject_fault(args, ctx)
    autocast = autocast_dtype(args, ctx.device)
    ref_model, ref_losses = reference_run(args, ctx.device, autocast=autocast)
    ref = params_of(ref_model)
    per_rank_rows = args.batch // ctx.world_size
    one_shard_model, one_shard_losses = reference_run(args, ctx.device, n_rows=per_rank_rows, autocast=autocast)
    one_shard = params_of(one_shard_model)
    metrics = run_header("data_parallel", args, ctx, ref_model, ref_losses, autocast)
    metrics["n_param_tensors"] = len(list(ref_model.parameters()))
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
