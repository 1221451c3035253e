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
from .arguments import autocast_dtype
from .errors import run_main
from .harness import StrategyRun
from .metrics import StepTimer, max_abs_diff, params_of, read_losses, tensor_bytes, variant_record
from .process_group import DistContext
from .reference import strategy_model, global_batch, reference_run, strategy_optimizer
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
    model = strategy_model(args, ctx.device)
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
    run = StrategyRun("data_parallel", "Data parallel training by hand, with DDP, and with the double all-reduce "
                      "pitfall.", VARIANTS, argv)
    args, ctx = run.args, run.ctx
    # the same process trained on only batch / p sequences (rank 0's shard): what "same data on every rank" equals
    per_rank_rows = args.batch // ctx.world_size
    one_shard_model, one_shard_losses = reference_run(args, ctx.device, n_rows=per_rank_rows, autocast=run.autocast)
    one_shard = params_of(one_shard_model)
    run.metrics.update(n_param_tensors=len(list(run.reference_model.parameters())), one_shard_rows=per_rank_rows,
                       one_shard_losses=one_shard_losses)
    for variant in run.variants():
        out = train_variant(variant, args, ctx)
        params = run.record(variant, out)
        out["max_abs_diff_vs_one_shard"] = max_abs_diff(params, one_shard)
    run.finish(exact=EXACT_VARIANTS)


if __name__ == "__main__":
    run_main(main)
