"""Chapter 3's hidden probes on 2 ranks: run the answers on inputs drawn from a secret seed.

``python -m torch.distributed.run --standalone --nproc_per_node=2 -m pretrain_lib.grading.rank_probe
--solution FILE --seed S --out DIR``. ``FILE`` defines ``average_gradients``,
``column_parallel_forward`` and ``gpipe_micro_steps``. Rank 0 writes to ``DIR/metrics.json``
the *values* each function produced on every rank (gradients, output columns, step orders),
never a verdict: the grading process compares them with the same values from the solution.
"""
from __future__ import annotations

from functools import partial

import torch

from ..distributed.arguments import base_parser
from ..distributed.errors import run_main
from ..distributed.exercise_check import run_on_every_rank
from ..distributed.metrics import write_metrics
from ..distributed.process_group import setup, teardown


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _average(fn, seed: int, ctx) -> list:
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    model = _model(seed)
    lo = ctx.rank * (8 // ctx.world_size)
    part = slice(lo, lo + 8 // ctx.world_size)
    torch.nn.functional.mse_loss(model(x[part]), y[part]).backward()
    fn(model)
    return [[round(v, 6) for v in p.grad.flatten().tolist()] for p in model.parameters()]


def _column(fn, seed: int, ctx) -> list:
    g = torch.Generator().manual_seed(seed + 2)
    d_in, d_out = 4 + seed % 5, 2 * (2 + seed % 3)
    x = torch.randn(2, 3, d_in, generator=g)
    w, b = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
    local = fn(x, w, b, ctx.rank, ctx.world_size)
    return [round(v, 5) for v in local.flatten().tolist()] + [list(local.shape)]


def _gpipe(fn, seed: int, ctx) -> list:
    return [[list(s) for s in fn(m)] for m in (1 + seed % 3, 2 + seed % 5)]


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Run Chapter 3's hidden probes on every rank.")
    parser.add_argument("--solution", required=True)
    args = parser.parse_args(argv)
    ctx = setup(args.init_timeout)
    probes = {"average_gradients": _average, "column_parallel_forward": _column, "gpipe_micro_steps": _gpipe}
    values = run_on_every_rank(args.solution, {name: partial(probe, seed=args.seed, ctx=ctx)
                                               for name, probe in probes.items()}, ctx.world_size)
    if ctx.is_main:
        write_metrics(args.out, {"strategy": "exercise-probe", "values": values})
    teardown()


if __name__ == "__main__":
    run_main(main)
