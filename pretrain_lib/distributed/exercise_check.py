"""Grade the Chapter 3 exercise on 2 ranks: run a student's functions under torchrun.

``--solution FILE`` is a Python file defining ``average_gradients(model)``,
``column_parallel_forward(x, weight, bias, rank, world_size)`` and
``gpipe_micro_steps(n_micro)``. Each is checked against the library's reference on every
rank; rank 0 writes ``{"name": {"ok": bool, "error": str}}`` to the run directory. A
function that raises costs its own check only.
"""
from __future__ import annotations

import runpy
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.synthetic import local_shard
from ..objectives import clm_loss
from .arguments import base_parser
from .errors import run_main
from .metrics import write_metrics
from .pipeline_schedules import gpipe_order
from .process_group import setup, teardown
from .reference import strategy_model, global_batch


def _check_average_gradients(fn, args, ctx) -> bool:
    ref = strategy_model(args, ctx.device)
    ids = global_batch(0, args).to(ctx.device)
    clm_loss(ref(ids), ids).backward()
    model = strategy_model(args, ctx.device)
    mine = local_shard(ids, ctx.rank, ctx.world_size)
    clm_loss(model(mine), mine).backward()
    fn(model)
    return all(torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5)
               for p, q in zip(model.parameters(), ref.parameters()))


def _check_column_parallel(fn, args, ctx) -> bool:
    g = torch.Generator().manual_seed(5)
    x, w, b = (t.to(ctx.device) for t in (torch.randn(3, 5, 8, generator=g), torch.randn(12, 8, generator=g),
                                          torch.randn(12, generator=g)))
    local = fn(x, w, b, ctx.rank, ctx.world_size)
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local.contiguous())  # the ranks' columns, side by side, must be the full output
    return bool(torch.allclose(torch.cat(parts, dim=-1), F.linear(x, w, b), atol=1e-6))


def _check_gpipe(fn, args, ctx) -> bool:
    return all([tuple(s) for s in fn(m)] == gpipe_order(m, ctx.rank, ctx.world_size) for m in (1, 3, 4))


def run_on_every_rank(solution: str, probes: dict[str, Callable[[Callable], Any]], world_size: int) -> dict:
    """Load a student's file and call each probe with the student's function of the same name, on
    this rank; returns ``{name: [per-rank {"value": ...} or {"error": "..."}]}`` (a collective:
    every rank calls it). A missing, unfinished or crashing function costs its own probe only.
    The hidden probes of the grader (``grading.rank_probe``) run through the same function."""
    ns = runpy.run_path(solution)
    out = {}
    for name, probe in probes.items():
        try:
            if name not in ns:
                raise NameError(f"{name} is not defined")
            value = {"value": probe(ns[name])}
        except NotImplementedError:
            value = {"error": "not implemented yet"}
        except Exception as exc:  # the student's bug costs this probe only
            value = {"error": f"{type(exc).__name__}: {str(exc)[:150]}"}
        per_rank = [None] * world_size
        dist.all_gather_object(per_rank, value)
        out[name] = per_rank
    return out


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Run a student's Chapter 3 functions on every rank.")
    parser.add_argument("--solution", required=True)
    args = parser.parse_args(argv)
    ctx = setup(args.init_timeout)
    checks = {"average_gradients": _check_average_gradients, "column_parallel_forward": _check_column_parallel,
              "gpipe_micro_steps": _check_gpipe}
    per_rank = run_on_every_rank(args.solution, {name: partial(check, args=args, ctx=ctx)
                                                 for name, check in checks.items()}, ctx.world_size)
    results = {}
    for name, values in per_rank.items():  # a check passes only if it passed on every rank
        errors = [v["error"] for v in values if "error" in v]
        results[name] = {"ok": not errors and all(bool(v["value"]) for v in values),
                         "error": errors[0] if errors else ""}
    if ctx.is_main:
        write_metrics(args.out, {"strategy": "exercise", "results": results})
    teardown()


if __name__ == "__main__":
    run_main(main)
