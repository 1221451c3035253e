"""One run of a strategy on every rank: what each chapter-3 module's ``main()`` shares.

A strategy module's ``main()`` reads top to bottom::

    run = StrategyRun("zero", "ZeRO by hand and with FSDP2.", VARIANTS, argv)
    for variant in run.variants():
        run.record(variant, train_variant(variant, run.args, run.ctx))
    run.finish()

:class:`StrategyRun` parses the common arguments (:func:`.arguments.base_parser` plus
``--variants``), starts the process group, rejects sizes that cannot be split, injects a
requested fault, trains the single-process reference every strategy must reproduce and starts
the metrics with :func:`.reference.run_header`. :meth:`StrategyRun.record` compares a variant's
weights with the reference (``max_abs_diff_vs_single``); :meth:`StrategyRun.finish` writes
``metrics.json`` on rank 0 and tears the group down.
"""
from __future__ import annotations

import argparse
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from .arguments import autocast_dtype, base_parser, check_args
from .faults import inject_fault
from .metrics import max_abs_diff, params_of, write_metrics
from .process_group import DistContext, setup, teardown
from .reference import reference_run, run_header


class StrategyRun:
    """Arguments, process group, reference run and metrics of one strategy's run (see the module doc).

    ``add_arguments(parser)`` adds the module's own options; ``check(args, ctx)`` rejects settings
    this strategy cannot run (it runs before a fault is injected, so a bad setting fails first)."""

    def __init__(self, strategy: str, description: str, variants: Sequence[str], argv: list[str] | None = None, *,
                 add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 check: Callable[[argparse.Namespace, DistContext], None] | None = None):
        parser = base_parser(description)
        parser.add_argument("--variants", default=",".join(variants))
        if add_arguments is not None:
            add_arguments(parser)
        self.args = parser.parse_args(argv)
        self.ctx = setup(self.args.init_timeout)
        check_args(self.args, self.ctx.world_size)
        if check is not None:
            check(self.args, self.ctx)
        inject_fault(self.args, self.ctx)
        self.autocast: torch.dtype | None = autocast_dtype(self.args, self.ctx.device)
        self.reference_grad_norms: list[float] = []
        self.reference_model, losses = reference_run(self.args, self.ctx.device, autocast=self.autocast,
                                                     grad_norms=self.reference_grad_norms)
        self.reference = params_of(self.reference_model)
        self.metrics = run_header(strategy, self.args, self.ctx, self.reference_model, losses, self.autocast)

    def variants(self) -> Iterator[str]:
        """The ``--variants`` in order, every rank starting each one together (so timings compare)."""
        for variant in (v for v in self.args.variants.split(",") if v):
            dist.barrier()
            yield variant

    def record(self, variant: str, out: dict) -> dict[str, torch.Tensor]:
        """Store ``out`` (a variant's record) under ``variant``, with its weights (``out["params"]``,
        removed from the record) compared with the reference; returns those weights."""
        params = out.pop("params")
        out["max_abs_diff_vs_single"] = max_abs_diff(params, self.reference)
        self.metrics["variants"][variant] = out
        return params

    def finish(self, exact: Iterable[str] | None = None, also: Iterable[float] = ()) -> None:
        """The run's ``max_abs_diff_vs_single`` (over the ``exact`` variants, or all, and any further
        differences ``also`` names), then rank 0 writes ``metrics.json`` and the group is torn down."""
        names = set(self.metrics["variants"]) if exact is None else set(exact)
        diffs = [v["max_abs_diff_vs_single"] for k, v in self.metrics["variants"].items() if k in names] + list(also)
        self.metrics["max_abs_diff_vs_single"] = max(diffs) if diffs else float("nan")
        if self.ctx.is_main:
            write_metrics(self.args.out, self.metrics)
        teardown()
