"""Gradient accumulation under DDP: ``no_sync()`` on all but the last micro-step (chapter 5.2).

Each rank splits its slice of the global batch into ``--micro-steps`` micro-batches and trains
through the engine's ``train_step``. Two variants, from the same initial weights:

- ``no_sync``: the engine's default with a DDP model: every micro-step but the last runs inside
  ``model.no_sync()``, so gradients accumulate locally and DDP all-reduces once per step;
- ``sync_every_micro_step``: ``no_sync`` replaced by a context that does nothing, so DDP
  all-reduces its buckets after *every* micro-batch's backward: k times the bytes for the
  same result (DDP averages each micro-step's gradient; the sum of averages is the average
  of the sum).

Both must equal one process trained on the whole global batch in one piece; the metrics give
each variant's ``bytes_per_step`` (counted by a DDP communication hook) and the saving.

Run: ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m
pretrain_lib.distributed.accumulation --steps 3 --micro-steps 4 --out RUN_DIR``.
"""
from __future__ import annotations

import contextlib

from ..data.synthetic import local_shard
from ..train import clm_objective, train_step
from .arguments import autocast_dtype
from .data_parallel import ByteCounter, counting_allreduce_hook  # one byte-counting hook for chapter 3 and 5
from .errors import run_main
from .harness import StrategyRun
from .metrics import StepTimer, params_of, read_losses, variant_record
from .process_group import DistContext
from .reference import strategy_model, global_batch, strategy_optimizer
from .strategies import apply_ddp

VARIANTS = ("no_sync", "sync_every_micro_step")


def train_variant(variant: str, args, ctx: DistContext) -> dict:
    """``args.steps`` steps of ``args.micro_steps`` micro-batches each; weights, losses, bytes, timings."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose among {', '.join(VARIANTS)}")
    autocast = autocast_dtype(args, ctx.device)
    model = strategy_model(args, ctx.device)
    counter = ByteCounter()
    net = apply_ddp(model, ctx, comm_hook=(counter, counting_allreduce_hook))
    opt = strategy_optimizer(model, args)
    # None: the engine uses net.no_sync on all but the last micro-step; the other variant syncs every time
    no_sync = None if variant == "no_sync" else contextlib.nullcontext
    timer, losses = StepTimer(ctx.device), []
    for step in range(args.steps):
        ids = local_shard(global_batch(step, args), ctx.rank, ctx.world_size).to(ctx.device)
        micro = [{"input_ids": chunk} for chunk in ids.chunk(args.micro_steps)]
        with timer.measure():
            result = train_step(net, micro, clm_objective, opt, autocast=autocast, dp_group=True, no_sync=no_sync)
        losses.append(result.loss)
    return {"params": params_of(model),
            **variant_record(losses=read_losses(losses), bytes_per_step=counter.bytes / args.steps,
                             seconds_per_step=timer.median, ddp_buckets_per_step=counter.buckets / args.steps)}


def _micro_steps_divide(args, ctx: DistContext) -> None:
    if args.micro_steps < 1 or (args.batch // ctx.world_size) % args.micro_steps:
        raise ValueError(f"each rank's {args.batch // ctx.world_size} rows cannot be split into --micro-steps "
                         f"{args.micro_steps}; pick --batch a multiple of world size × micro-steps")


def main(argv: list[str] | None = None) -> None:
    run = StrategyRun("accumulation", "Gradient accumulation under DDP, with and without no_sync().", VARIANTS, argv,
                      add_arguments=lambda p: p.add_argument("--micro-steps", type=int, default=4,
                                                             help="micro-batches per optimiser step on each rank"),
                      check=_micro_steps_divide)
    run.metrics["micro_steps"] = run.args.micro_steps
    for variant in run.variants():
        run.record(variant, train_variant(variant, run.args, run.ctx))
    variants = run.metrics["variants"]
    if {"no_sync", "sync_every_micro_step"} <= set(variants):
        every = variants["sync_every_micro_step"]["bytes_per_step"]
        run.metrics["bytes_saved_per_step"] = every - variants["no_sync"]["bytes_per_step"]
    run.finish()


if __name__ == "__main__":
    run_main(main)
