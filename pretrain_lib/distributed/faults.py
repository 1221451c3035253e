"""Make one rank fail on purpose, so the tests can see how the launcher reports it."""
from __future__ import annotations

import argparse
import time

from .process_group import DistContext


def inject_fault(args: argparse.Namespace, ctx: DistContext) -> None:
    """``--fault raise`` raises on ``--fault-rank``; ``--fault hang`` sleeps there until killed."""
    if args.fault == "none" or ctx.rank != args.fault_rank:
        return
    if args.fault == "raise":
        raise RuntimeError(f"injected failure on rank {ctx.rank}")
    while True:  # hang: the launcher's time limit must end this
        time.sleep(1.0)
