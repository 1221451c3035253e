"""Measure all-reduce, all-gather and reduce-scatter on this machine's backend.

For each message size (bytes per rank's input) the module times ``--iters`` calls after
``--warmup`` untimed ones and reports the median, the fastest and the slowest call. Bus
bandwidth rescales the algorithm bandwidth (bytes / time) by what a ring must move per
rank: 2(p-1)/p for all-reduce and (p-1)/p for all-gather and reduce-scatter (Thakur et al.,
2005; ``comm_model.ring_traffic_factor``), so it can be compared with the link's bandwidth.
Each result is also checked against the value one process computes from every rank's input
(``max_abs_diff_vs_single``).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .arguments import base_parser
from .comm_model import RING_OPS, ring_traffic_factor
from .errors import run_main
from .faults import inject_fault
from .metrics import wait_for_device, write_metrics
from .process_group import setup, teardown

# torch >= 2.13 names these collectives *_single and deprecates the old names; use whichever exists
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def parse_size(text: str) -> int:
    """'1KB', '64MB', '4096' → bytes (powers of 1024)."""
    units = {"KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit) and t[:-len(unit)].strip().isdigit():
            return int(t[:-len(unit)]) * factor
    if t.isdigit():
        return int(t)
    raise ValueError(f"cannot read message size {text!r}; write e.g. 4096, 1KB or 64MB")


def rank_input(rank: int, n: int, device: torch.device) -> torch.Tensor:
    """Rank ``rank``'s input: known to every rank, so each can check the collective's result."""
    return torch.arange(n, dtype=torch.float32, device=device) % 97 + rank


def run_op(op: str, n: int, rank: int, world: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``op`` once on ``n`` float32 numbers per rank; return (result, what one process computes)."""
    x = rank_input(rank, n, device)
    everyone = [rank_input(r, n, device) for r in range(world)]
    if op == "all_reduce":
        dist.all_reduce(x)
        return x, torch.stack(everyone).sum(0)
    if op == "all_gather":
        out = torch.empty(n * world, device=device)
        _all_gather(out, x)
        return out, torch.cat(everyone)
    if op == "reduce_scatter":
        if n % world:
            raise ValueError(f"reduce_scatter needs a size divisible by {world}")
        out = torch.empty(n // world, device=device)
        _reduce_scatter(out, x)
        return out, torch.stack(everyone).sum(0).chunk(world)[rank]
    raise ValueError(f"unknown collective {op!r}; choose among {', '.join(RING_OPS)}")


def time_op(op: str, n: int, world: int, device: torch.device, iters: int, warmup: int = 3) -> list[float]:
    """Seconds of each of ``iters`` timed calls, after ``warmup`` untimed ones (inputs allocated
    outside the timed region). Rank 0's clock; every call starts after a barrier."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    x = torch.ones(n, device=device)
    out = torch.empty(n * world if op == "all_gather" else max(n // world, 1), device=device)
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        wait_for_device(device)
        t0 = time.perf_counter()
        if op == "all_reduce":
            dist.all_reduce(x)
        elif op == "all_gather":
            _all_gather(out, x)
        else:
            _reduce_scatter(out, x)
        wait_for_device(device)
        if i >= warmup:  # warm-ups pay connection setup and allocation
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Bandwidth of all-reduce, all-gather and reduce-scatter against the ring cost model.")
    parser.add_argument("--sizes", default="1KB,16KB,256KB,1MB,4MB,16MB,64MB", help="bytes per rank's input")
    parser.add_argument("--ops", default="all_reduce,all_gather,reduce_scatter")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per size (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing each size")
    args = parser.parse_args(argv)
    ctx = setup(args.init_timeout)
    inject_fault(args, ctx)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    ops = args.ops.split(",")
    p = ctx.world_size
    worst = 0.0
    for op in ops:  # correctness first, on a small message
        got, want = run_op(op, 64 * p, ctx.rank, p, ctx.device)
        worst = max(worst, float((got - want).abs().max()))
    rows = []
    for op in ops:
        for size in sizes:
            n = max(size // 4, p)
            n -= n % p
            times = sorted(time_op(op, n, p, ctx.device, args.iters, args.warmup))
            seconds = times[len(times) // 2]
            algbw = n * 4 / seconds
            rows.append({"op": op, "bytes": n * 4, "seconds": seconds, "seconds_min": times[0],
                         "seconds_max": times[-1], "iters": len(times), "algbw_GBps": algbw / 1e9,
                         "busbw_GBps": algbw * ring_traffic_factor(op, p) / 1e9})
    if ctx.is_main:
        write_metrics(args.out, {"strategy": "collectives", "world_size": p, "backend": ctx.backend,
                                 "device": str(ctx.device), "max_abs_diff_vs_single": worst, "results": rows})
    teardown()


if __name__ == "__main__":
    run_main(main)
