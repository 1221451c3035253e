"""Measure all-reduce, all-gather and reduce-scatter on this machine's backend.

For each message size (bytes per rank's input) the module times ``--iters`` calls after
``--warmup`` untimed ones and reports the median, the fastest and the slowest call. Bus
bandwidth rescales the algorithm bandwidth (bytes / time) by what a ring must move per
rank: 2(p-1)/p for all-reduce and (p-1)/p for all-gather and reduce-scatter (Thakur et al.,
2005; ``comm_model.ring_traffic_factor``), so it can be compared with the link's bandwidth.
Each result is also checked against the value one process computes from every rank's input
(``max_abs_diff_vs_single``).

Bytes are counted, not inferred: on Linux ``/proc/self/io`` counts the bytes a process hands to
write-like system calls (``wchar``), and gloo sends every message through a socket, so the change
of ``wchar`` around ``--count-calls`` calls is what this rank put on the wire per call
(``bytes_sent_per_rank``: one number per rank; ``None`` where ``/proc`` is missing). Unlike a
time, a count does not depend on what else runs on the machine. (NCCL on GPUs does not go
through sockets inside a node, so there the count is ``None``.)
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..utils import wait_for_device
from .arguments import base_parser
from .comm_model import RING_OPS, ring_traffic_factor
from .errors import run_main
from .faults import inject_fault
from .metrics import write_metrics
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


def time_calls(ops: list[str], ns: list[int], world: int, device: torch.device, iters: int, warmup: int = 3
               ) -> dict[tuple[str, int], list[float]]:
    """Seconds of each of ``iters`` timed calls per (op, size), after ``warmup`` untimed rounds (inputs
    allocated outside the timed region; rank 0's clock; every call starts after a barrier). Every op and
    size takes its turn call by call (the order reversed every other round), so a burst of load from other
    programs slows every op and size alike instead of whichever was being timed then."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    bufs = {(op, n): (torch.ones(n, device=device),
                      torch.empty(n * world if op == "all_gather" else max(n // world, 1), device=device))
            for op in ops for n in ns}
    times: dict[tuple[str, int], list[float]] = {key: [] for key in bufs}
    order = list(bufs)
    for i in range(warmup + iters):
        for op, n in (order if i % 2 == 0 else order[::-1]):
            x, out = bufs[(op, n)]
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
            if i >= warmup:
                times[(op, n)].append(time.perf_counter() - t0)
    return times


def bytes_written() -> int | None:
    """This process's ``wchar`` (bytes handed to write-like system calls so far), or None without /proc."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def count_bytes_sent(op: str, n: int, world: int, device: torch.device, calls: int = 2) -> float | None:
    """Bytes this rank writes to its sockets per call of ``op`` on ``n`` float32 numbers (mean of ``calls``)."""
    if device.type != "cpu":
        return None
    x = torch.ones(n, device=device)
    out = torch.empty(n * world if op == "all_gather" else max(n // world, 1), device=device)
    fn = {"all_reduce": lambda: dist.all_reduce(x), "all_gather": lambda: _all_gather(out, x),
          "reduce_scatter": lambda: _reduce_scatter(out, x)}[op]
    fn()  # connection set-up is not part of a call's traffic
    dist.barrier()
    before = bytes_written()
    for _ in range(calls):
        fn()
    after = bytes_written()
    dist.barrier()
    return None if before is None or after is None else (after - before) / calls


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Bandwidth of all-reduce, all-gather and reduce-scatter against the ring cost model.")
    parser.add_argument("--sizes", default="1KB,16KB,256KB,1MB,4MB,16MB,64MB", help="bytes per rank's input")
    parser.add_argument("--ops", default="all_reduce,all_gather,reduce_scatter")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per size (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing each size")
    parser.add_argument("--count-calls", type=int, default=2, help="calls whose socket bytes are counted per size")
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
    ns = []
    for size in sizes:
        n = max(size // 4, p)
        ns.append(n - n % p)
    timed = time_calls(ops, ns, p, ctx.device, args.iters, args.warmup)
    for op in ops:
        for n in ns:
            times = sorted(timed[(op, n)])
            seconds = times[len(times) // 2]
            algbw = n * 4 * (p if op == "all_gather" else 1) / seconds  # S / T, S the all-gather's output, else the input
            sent = count_bytes_sent(op, n, p, ctx.device, args.count_calls)
            per_rank = [None] * p
            dist.all_gather_object(per_rank, sent)
            rows.append({"op": op, "bytes": n * 4, "seconds": seconds, "seconds_min": times[0],
                         "seconds_max": times[-1], "iters": len(times), "algbw_GBps": algbw / 1e9,
                         "busbw_GBps": algbw * ring_traffic_factor(op, p) / 1e9, "times": times,
                         "bytes_sent_per_rank": None if None in per_rank else per_rank})
    if ctx.is_main:
        write_metrics(args.out, {"strategy": "collectives", "world_size": p, "backend": ctx.backend,
                                 "device": str(ctx.device), "max_abs_diff_vs_single": worst, "results": rows})
    teardown()


if __name__ == "__main__":
    run_main(main)
