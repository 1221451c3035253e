"""What every strategy module shares: process-group setup and teardown, the tiny model,
the global batch, the single-process reference run, and the metrics file.

A strategy's ``main`` runs on every rank under torchrun. Backend and device follow the
hardware: NCCL and ``cuda:LOCAL_RANK`` when CUDA is present, gloo and the CPU otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ..model import GPT, ModelConfig
from ..objectives import clm_loss

METRICS_FILE = "metrics.json"

# torch 2.13 renames these two collectives (*_single); the old names work on every torch this
# course supports (>= 2.4), so keep them and silence the notice in every rank's log.
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(init_timeout_s: float = 60.0) -> DistContext:
    """Join the process group that torchrun describes through environment variables.

    ``init_timeout_s`` bounds both the rendezvous and every later collective, so a missing
    or dead peer fails within that time instead of hanging forever.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"environment variables {missing} are not set: start this module with torchrun, e.g. "
                           "python -m torch.distributed.run --standalone --nproc_per_node=2 -m <module>, or from "
                           "Python with pretrain_lib.distributed.launch.run_torchrun")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and local_world <= torch.cuda.device_count():
        device = torch.device("cuda", local_rank)  # one GPU per process: NCCL refuses two ranks on one GPU
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        if torch.cuda.is_available() and local_rank == 0:
            print(f"{local_world} processes per node but {torch.cuda.device_count()} GPU(s): running on the CPU with gloo",
                  flush=True)
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=init_timeout_s),
                            device_id=device if backend == "nccl" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def teardown() -> None:
    """Wait for every rank, then leave the process group.

    Without the barrier a rank can tear down its communicator while a peer is still
    inside a collective; under load that aborts the process at exit (SIGABRT) even
    though every result was correct.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every strategy accepts; defaults are small enough for a 2-core laptop."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=3, help="optimiser steps")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences), split across ranks")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="run directory: rank 0 writes metrics.json there")
    p.add_argument("--init-timeout", type=float, default=60.0, help="seconds before a missing peer is an error")
    p.add_argument("--fault", choices=("none", "raise", "hang"), default="none",
                   help="inject a failure on --fault-rank (used by the tests of the launcher)")
    p.add_argument("--fault-rank", type=int, default=1)
    return p


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Reject sizes that cannot be split evenly, with a message saying what to change."""
    for name in ("steps", "batch", "seq_len", "vocab", "d_model", "n_heads", "n_layers"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.batch % world_size:
        raise ValueError(f"--batch {args.batch} is not divisible by the {world_size} ranks; pick a multiple of "
                         f"{world_size}")


def inject_fault(args: argparse.Namespace, ctx: DistContext) -> None:
    """Make one rank fail (raise) or hang (sleep), so tests can see how the launcher reports it."""
    if args.fault == "none" or ctx.rank != args.fault_rank:
        return
    if args.fault == "raise":
        raise RuntimeError(f"injected failure on rank {ctx.rank}")
    while True:  # hang: the launcher's time limit must end this
        time.sleep(1.0)


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                       max_seq_len=args.seq_len)


def build_model(args: argparse.Namespace, device: torch.device | str = "cpu") -> GPT:
    """The course's GPT, initialised from ``args.seed`` so every rank starts identical."""
    torch.manual_seed(args.seed)
    return GPT(model_config(args)).to(device)


def global_batch(step: int, args: argparse.Namespace) -> torch.Tensor:
    """The whole step's batch ``(batch, seq_len)`` of token ids, the same on every rank.

    Each sequence follows x[t+1] = (a·x[t] + c) mod V from a random start, so the model
    has something learnable and the loss falls within a few steps.
    """
    g = torch.Generator().manual_seed(1_000_003 * (args.seed + 1) + step)
    start = torch.randint(0, args.vocab, (args.batch, 1), generator=g)
    offsets = torch.arange(args.seq_len)
    return (start + 7 * offsets) % args.vocab


def local_shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of the global batch: ``(batch / world, seq)``.

    Each rank reads different sequences; together they cover the global batch once.
    """
    if batch.size(0) % world_size:
        raise ValueError(f"batch of {batch.size(0)} cannot be split evenly over {world_size} ranks")
    per = batch.size(0) // world_size
    return batch[rank * per:(rank + 1) * per]


def make_optimizer(params, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Plain AdamW with one parameter group: the optimiser every strategy and the reference use.

    ``eps=1e-6`` rather than 1e-8: Adam divides each gradient by its own running scale, so
    for a gradient near 1e-9 a rounding difference between two summation orders (one
    process vs an all-reduce) would become a whole step of size ``lr``. A larger eps
    bounds that amplification; the strategies themselves are exact either way.
    """
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, eps=1e-6)


def reference_run(args: argparse.Namespace, device: torch.device | str = "cpu",
                  n_rows: int | None = None) -> tuple[GPT, list[float]]:
    """One process training on the full global batch: the result every strategy must reproduce.

    ``n_rows`` keeps only the first rows of each step's batch ``(n_rows, seq_len)``: what one
    rank alone would train on (used to show what the "same data on every rank" mistake equals).
    """
    model = build_model(args, device)
    opt = make_optimizer(model.parameters(), args)
    losses = []
    for step in range(args.steps):
        ids = global_batch(step, args)[:n_rows].to(device)
        loss = clm_loss(model(ids), ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def max_abs_diff(named_a: dict[str, torch.Tensor], named_b: dict[str, torch.Tensor]) -> float:
    """Largest elementwise |a - b| over parameters with the same name (names must match)."""
    if named_a.keys() != named_b.keys():
        raise KeyError(f"parameter names differ: {sorted(set(named_a) ^ set(named_b))[:5]}")
    return max(float((named_a[k].detach().float().cpu() - named_b[k].detach().float().cpu()).abs().max())
               for k in named_a)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def all_reduce_mean_scalar(value: float, device: torch.device) -> float:
    """Average a Python number over ranks (for reporting: rank 0's loss alone is not the loss)."""
    t = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so a timer measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_metrics(out: Path | None, metrics: dict) -> None:
    """Rank 0 writes ``metrics`` to ``out/metrics.json`` (and prints a one-line summary)."""
    if out is None:
        print(json.dumps(metrics, indent=1, default=float))
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1, default=float))
    print(f"[rank 0] wrote {out / METRICS_FILE}")


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a strategy's ``main``; if it raises, save the traceback as ``error_rank<R>.txt`` in
    the run directory (the launcher turns it into an exception naming that rank) and exit 1."""
    try:
        main(argv)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the launcher
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        rank = os.environ.get("RANK", "?")
        text = traceback.format_exc()
        out = _out_dir(sys.argv[1:] if argv is None else argv)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"error_rank{rank}.txt").write_text(text)
        print(f"[rank {rank}] failed:\n{text}", file=sys.stderr, flush=True)
        sys.exit(1)


def _out_dir(argv: list[str]) -> Path | None:
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--out="):
            return Path(a.split("=", 1)[1])
    return None
