"""The command line every strategy module accepts, and the checks on it."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

DTYPE_CHOICES = ("auto", "fp32", "bf16")


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
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="autocast dtype: 'auto' is bf16 on CUDA and fp32 on the CPU")
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


def autocast_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """The engine's ``autocast`` argument: None (fp32) or ``torch.bfloat16``."""
    choice = getattr(args, "dtype", "auto")
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if choice == "bf16" else None


def dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
