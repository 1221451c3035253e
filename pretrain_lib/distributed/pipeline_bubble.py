"""The pipeline bubble, measured: one model per micro-batch count, steps alternated between them.

:func:`bubble_sweep` trains the by-hand GPipe schedule of :mod:`.pipeline_stages` at several
micro-batch counts m. The counts take turns within each round (one step each, the order
reversed every other round), so other programs on a shared machine slow every setting alike
and the step-time ratios are paired within a round. Round 0 pays allocation and connection
set-up and is left out.

Every compute span (one micro-batch's forward or backward on one stage) is recorded on the
machine's monotonic clock, which every process on one machine shares. From the spans
:func:`analyse` derives, per m:

- ``measured``: the wall-clock bubble, 1 - busy / window averaged over the stages (window: the
  step from a barrier before the first micro-step to a barrier after the last);
- ``forward_s`` / ``backward_s``: each stage's median op durations; ``simulated``: the schedule
  replayed with them and instant messages; ``closed_form``: the same from
  :func:`.pipeline_schedules.gpipe_bubble` (unequal stages);
- ``message_s``: the median delay between a stage finishing a micro-step and its neighbour
  starting the dependent one, over the messages the neighbour was already waiting for
  (transfer, wake-up and scheduling together); ``replayed_with_messages``: the replay with it;
- ``step_seconds``: each round's step time (the whole ``train_step``).
"""
from __future__ import annotations

import argparse
import statistics

import torch.distributed as dist

from ..train import train_step
from .arguments import autocast_dtype, base_parser
from .metrics import StepTimer
from .pipeline_schedules import bubble_theory, gpipe_bubble, gpipe_order, replay_schedule
from .pipeline_stages import ByHandSchedule, pipeline_stage
from .process_group import DistContext
from .reference import strategy_model, global_batch, strategy_optimizer


def bubble_args(args: argparse.Namespace) -> argparse.Namespace:
    """The run's arguments with the sweep's model and batch sizes."""
    out = base_parser("").parse_args([])
    vars(out).update(vars(args))
    out.d_model, out.seq_len, out.batch = args.bubble_d_model, args.bubble_seq_len, args.bubble_batch
    return out


def message_delays(spans: list[list], n_stages: int) -> list[float]:
    """Delays of the messages a stage was already waiting for: start of the dependent micro-step
    minus the end of the neighbour's micro-step that fed it. ``spans[s]`` is stage s's list of
    ``(op, i, t0, t1)`` in the order it ran them."""
    end = {(op, s, i): t1 for s in range(n_stages) for op, i, _, t1 in spans[s]}
    delays = []
    for s in range(n_stages):
        prev_end = None
        for op, i, t0, t1 in spans[s]:
            src = s - 1 if op == "F" else s + 1
            if 0 <= src < n_stages and (op, src, i) in end:
                sent = end[(op, src, i)]
                if prev_end is None or prev_end <= sent:  # idle when the message was sent: it waited for it
                    delays.append(t0 - sent)
            prev_end = t1
    return delays


def idle_accounting(spans: list[list], n_stages: int, windows: list[float], starts: list[float]) -> list[dict]:
    """Split each stage's step window into what it did (seconds), adding up to the window exactly:

    - ``compute``: its own micro-steps;
    - ``schedule``: waiting for the other stage's compute: the micro-step it needs is still running there, or
      it has finished its own work while the other stage has not (the bubble of the formula);
    - ``hand_off``: the micro-step it needs has finished on the neighbour but this one has not started yet
      (the message's transfer, waking this process, scheduling, Python between micro-steps).
    ``windows[s]`` and ``starts[s]``: stage s's step window (its own clock reading after the opening
    barrier) and where it starts.
    """
    end = {(op, s, i): t1 for s in range(n_stages) for op, i, _, t1 in spans[s]}
    out = []
    for s in range(n_stages):
        acc = {"compute": 0.0, "schedule": 0.0, "hand_off": 0.0}
        start, window = starts[s], windows[s]
        prev_end = start
        for op, i, t0, t1 in spans[s]:
            src = s - 1 if op == "F" else s + 1
            sent = end.get((op, src, i)) if 0 <= src < n_stages else None
            gap = t0 - prev_end
            if sent is None or sent <= prev_end:   # its input was there when it became free
                acc["hand_off"] += gap
            else:
                acc["schedule"] += min(gap, sent - prev_end)
                acc["hand_off"] += max(0.0, t0 - sent)
            acc["compute"] += t1 - t0
            prev_end = t1
        acc["schedule"] += start + window - prev_end  # done, while the other stage still computes
        out.append(acc)
    return out


def analyse(n_micro: int, per_rank_steps: list[list[dict]], step_seconds: list[float]) -> dict:
    """One micro-batch count's row from every rank's timed steps (round 0 already left out)."""
    p = len(per_rank_steps)
    rounds = len(per_rank_steps[0])
    bubbles = [sum(1.0 - per_rank_steps[s][r]["busy"] / per_rank_steps[s][r]["window"] for s in range(p)) / p
               for r in range(rounds)]
    f = [statistics.median(e - b for st in per_rank_steps[s] for op, _, b, e in st["spans"] if op == "F")
         for s in range(p)]
    bw = [statistics.median(e - b for st in per_rank_steps[s] for op, _, b, e in st["spans"] if op == "B")
          for s in range(p)]
    delays = [d for r in range(rounds) for d in message_delays([per_rank_steps[s][r]["spans"] for s in range(p)], p)]
    message = statistics.median(delays) if delays else 0.0
    orders = [gpipe_order(n_micro, s, p) for s in range(p)]
    simulated, makespan = replay_schedule(orders, f, bw)
    with_messages, makespan_msg = replay_schedule(orders, f, bw, message_s=message)
    parts = [idle_accounting([per_rank_steps[s][r]["spans"] for s in range(p)], p,
                             [per_rank_steps[s][r]["window"] for s in range(p)],
                             [per_rank_steps[s][r]["start"] for s in range(p)]) for r in range(rounds)]
    # mean over rounds and stages, as fractions of each stage's window
    shares = {k: sum(parts[r][s][k] / per_rank_steps[s][r]["window"] for r in range(rounds) for s in range(p))
                 / (rounds * p)
              for k in ("compute", "schedule", "hand_off")}
    hand_off_per_step = [sum(st["hand_off"] for st in parts[r]) / p for r in range(rounds)]
    last = len(per_rank_steps[0]) - 1  # one step's timeline, relative to its window's start
    timeline = [[[op, i, t0 - per_rank_steps[s][last]["start"], t1 - per_rank_steps[s][last]["start"]]
                 for op, i, t0, t1 in per_rank_steps[s][last]["spans"]] for s in range(p)]
    return {"n_micro": n_micro, "theory": bubble_theory(p, n_micro),
            "measured": sum(bubbles) / rounds, "measured_per_round": bubbles,
            "forward_s": f, "backward_s": bw, "simulated": simulated, "simulated_makespan_s": makespan,
            "closed_form": gpipe_bubble(f, bw, n_micro),
            "message_s": message, "n_messages_timed": len(delays),
            "replayed_with_messages": with_messages, "replayed_with_messages_makespan_s": makespan_msg,
            "window_s": [per_rank_steps[0][r]["window"] for r in range(rounds)],
            "busy_s": [[per_rank_steps[s][r]["busy"] for r in range(rounds)] for s in range(p)],
            "window_shares": shares, "hand_off_s_per_step": hand_off_per_step,
            "step_seconds": step_seconds, "seconds_per_step": statistics.median(step_seconds),
            "timeline": timeline}


def bubble_sweep(args: argparse.Namespace, ctx: DistContext, micro_counts: list[int], rounds: int) -> list[dict]:
    """Train the by-hand GPipe at every count in ``micro_counts``, alternating, ``rounds`` timed steps each."""
    bargs = bubble_args(args)
    for m in micro_counts:
        if bargs.batch % m:
            raise ValueError(f"--bubble-batch {bargs.batch} is not divisible by {m} micro-batches")
    autocast = autocast_dtype(bargs, ctx.device)
    runs = {}
    for m in micro_counts:
        stage = pipeline_stage(strategy_model(bargs, ctx.device), ctx.rank, ctx.world_size)
        runs[m] = (stage, strategy_optimizer(stage, bargs), ByHandSchedule(stage, ctx, gpipe_order, timed=True),
                   StepTimer(ctx.device))
    for r in range(rounds + 1):
        for m in (micro_counts if r % 2 == 0 else micro_counts[::-1]):
            stage, opt, schedule, timer = runs[m]
            micro = [{"input_ids": c} for c in global_batch(r, bargs).to(ctx.device).chunk(m)]
            dist.barrier()
            with timer.measure():
                train_step(stage, micro, None, opt, autocast=autocast, forward_backward=schedule)
    rows = []
    for m in micro_counts:
        _, _, schedule, timer = runs[m]
        mine = schedule.steps[1:]  # round 0 is the warm-up
        per_rank = [None] * ctx.world_size
        dist.all_gather_object(per_rank, mine)
        row = analyse(m, per_rank, timer.seconds[1:])
        row["n_layers"] = bargs.n_layers
        rows.append(row)
    return rows
