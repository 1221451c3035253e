"""Pipeline parallelism: consecutive layers on consecutive ranks, micro-batches flowing through.

Rank s holds stage s, a *contiguous* run of blocks of the course's GPT; the stage and the
schedules that run micro-batches through it are in :mod:`.pipeline_stages`, the schedules' orders
and the bubble formula in :mod:`.pipeline_schedules`. This module is the chapter's runner.

Every variant trains with the engine's ``train_step``; the schedule is its
``forward_backward`` (it backpropagates summed token losses and returns ``(loss_sum,
n_targets)``, so the engine normalises by the batch's target tokens as everywhere else).
Variants: ``naive`` (one micro-batch), ``by_hand`` and ``by_hand_1f1b`` (send/recv following
an order list), ``gpipe`` and ``1f1b`` (``torch.distributed.pipelining``), each checked
against one process; then the by-hand GPipe's bubble is measured for several micro-batch
counts. ``round_robin`` (:mod:`.pipeline_placement`) runs the source chapter's placement
(block i on rank i mod p, one batch): it also equals one process, but its activations cross
ranks L - 1 times per forward pass instead of p - 1.
"""
from __future__ import annotations

import torch.distributed as dist

from ..train import train_step
from .arguments import autocast_dtype
from .errors import run_main
from .harness import StrategyRun
from .metrics import StepTimer, variant_record
from .pipeline_bubble import bubble_sweep
from .pipeline_placement import train_placement
from .pipeline_schedules import (bubble_fraction, bubble_theory, gpipe_bubble, gpipe_order, layer_placement,  # noqa: F401
                                 one_f_one_b_order, placement_crossings, simulate_schedule, stage_layers)
from .pipeline_stages import (ByHandSchedule, TorchSchedule, bytes_over_ranks, gather_params, last_stage_losses,
                              pipeline_stage)
from .reference import strategy_model, global_batch, strategy_optimizer


STAGE_VARIANTS = ("naive", "by_hand", "by_hand_1f1b", "gpipe", "1f1b")


def train_variant(variant: str, args, ctx, n_micro: int, *, timed: bool = False) -> dict:
    if variant == "round_robin":  # the source chapter's placement, one batch, no micro-batches
        return train_placement(args, ctx, layer_placement(args.n_layers, ctx.world_size, "round_robin"))
    if variant not in STAGE_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose among {', '.join(STAGE_VARIANTS)}, round_robin")
    autocast = autocast_dtype(args, ctx.device)
    stage = pipeline_stage(strategy_model(args, ctx.device), ctx.rank, ctx.world_size)
    opt = strategy_optimizer(stage, args)
    m = 1 if variant == "naive" else n_micro
    if variant in ("gpipe", "1f1b"):
        schedule = TorchSchedule(stage, ctx, variant, m)
    else:
        schedule = ByHandSchedule(stage, ctx, one_f_one_b_order if variant == "by_hand_1f1b" else gpipe_order,
                                  timed=timed)
    timer, losses = StepTimer(ctx.device), []
    for step in range(args.steps):
        micro = [{"input_ids": chunk} for chunk in global_batch(step, args).to(ctx.device).chunk(m)]
        dist.barrier()
        with timer.measure():
            losses.append(train_step(stage, micro, None, opt, autocast=autocast, forward_backward=schedule).loss)
    params = gather_params(stage, ctx)
    head = params.pop("_head_copy")
    measured = simulated = None
    if isinstance(schedule, ByHandSchedule) and schedule.steps:
        # the first step pays allocation and connection set-up: leave it out when there are others
        steps = schedule.steps[1:] if len(schedule.steps) > 1 else schedule.steps
        mine = {"bubble": sum(bubble_fraction(s["busy"], s["window"]) for s in steps) / len(steps),
                "forward": sorted(s["forward"] for s in steps)[len(steps) // 2],
                "backward": sorted(s["backward"] for s in steps)[len(steps) // 2]}
        per_stage = [None] * ctx.world_size
        dist.all_gather_object(per_stage, mine)
        measured = sum(r["bubble"] for r in per_stage) / ctx.world_size
        # median op durations per stage, then replay the schedule without the machine's noise
        simulated = simulate_schedule([schedule.order_fn(m, s, ctx.world_size) for s in range(ctx.world_size)],
                                      [r["forward"] for r in per_stage], [r["backward"] for r in per_stage])
    most, total = bytes_over_ranks(getattr(schedule, "bytes_sent", 0), args.steps)
    return {"params": params, "n_micro": m,
            **variant_record(losses=last_stage_losses(losses, ctx.world_size - 1, ctx.device),
                             # torch.distributed.pipelining's own sends are not counted
                             bytes_per_step=most if isinstance(schedule, ByHandSchedule) else None,
                             seconds_per_step=timer.median,
                             bytes_per_step_all_ranks=total if isinstance(schedule, ByHandSchedule) else None,
                             tied_copies_max_abs_diff=float((head - params["backbone.tok_emb.weight"]).abs().max()),
                             bubble_measured=measured, bubble_simulated=simulated)}


def _pipeline_arguments(parser) -> None:
    parser.add_argument("--micro", type=int, default=4, help="micro-batches per step for the equivalence runs")
    parser.add_argument("--bubble-micro", default="1,2,4,8",
                        help="micro-batch counts for the bubble measurement ('' to skip)")
    parser.add_argument("--bubble-steps", type=int, default=3,
                        help="timed steps per micro-batch count, the counts taking turns (after one warm-up round)")
    # the bubble is visible only when a micro-step's compute outweighs a message's latency
    parser.add_argument("--bubble-d-model", type=int, default=128)
    parser.add_argument("--bubble-seq-len", type=int, default=64)
    parser.add_argument("--bubble-batch", type=int, default=32)


def _pipeline_fits(args, ctx) -> None:
    if ctx.world_size < 2:
        raise ValueError("a pipeline needs at least 2 ranks: launch with --nproc_per_node=2 or more")
    if args.batch % args.micro:
        raise ValueError(f"--batch {args.batch} is not divisible by --micro {args.micro}")
    stage_layers(args.n_layers, ctx.world_size)  # fails early with a clear message


def main(argv: list[str] | None = None) -> None:
    run = StrategyRun("pipeline_parallel", "Pipeline parallelism: naive split, GPipe and 1F1B, by hand and with "
                      "torch pipelining.", STAGE_VARIANTS + ("round_robin",), argv,
                      add_arguments=_pipeline_arguments, check=_pipeline_fits)
    run.metrics["bubble"] = []
    for variant in run.variants():
        out = train_variant(variant, run.args, run.ctx, run.args.micro)
        run.record(variant, out)
        out["max_abs_diff_vs_single"] = max(out["max_abs_diff_vs_single"], out["tied_copies_max_abs_diff"])
    micro_counts = [int(v) for v in run.args.bubble_micro.split(",") if v]
    if micro_counts:  # the counts take turns step by step (see pipeline_bubble)
        run.metrics["bubble"] = bubble_sweep(run.args, run.ctx, micro_counts, run.args.bubble_steps)
    run.finish()


if __name__ == "__main__":
    run_main(main)
