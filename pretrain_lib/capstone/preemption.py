"""Stopping a run without losing it: preemption signals, Ctrl-C, and the exit codes.

A cluster that preempts a job (or reaches its time limit) sends SIGTERM, or with
``#SBATCH --signal=B:USR1@120`` SIGUSR1 some time before. The handler below only records
the signal; the checkpointer acts on it at the next logged step (at most ``train.log_every``
steps later), writes a checkpoint, waits until it is on disk, and the run stops with
:data:`EXIT_PREEMPTED`. A checkpoint taken at a logged step is one a resume continues
exactly, and under torchrun every rank agrees on that step through one small all-reduce.
Ctrl-C stops at once and names the last checkpoint (:class:`RunInterrupted`).
"""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

EXIT_OK = 0
EXIT_BAD_INPUT = 2           # a config, a path or a checkpoint the run refuses; nothing was trained
EXIT_PREEMPTED = 75          # sysexits' EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; run with --resume
EXIT_INTERRUPTED = 130       # 128 + SIGINT, the shell's code for Ctrl-C
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


class StopRequests:
    """Records SIGTERM / SIGUSR1 while a run trains (a context manager; the old handlers come back after).

    Handlers can only be installed from the main thread; elsewhere (a run started from a
    worker thread) the signals keep their usual effect.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for name in PREEMPTION_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, world_size: int = 1, device: torch.device | None = None) -> str | None:
        """The signal to stop for, the same on every rank: a signal that reached any rank stops all.

        A collective: under torchrun every rank must call it at the same step.
        """
        if world_size == 1:
            return self.received
        code = 0 if self.received is None else PREEMPTION_SIGNALS.index(self.received) + 1
        flag = torch.tensor([code], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code = int(flag.item())
        return None if code == 0 else PREEMPTION_SIGNALS[code - 1]


class RunInterrupted(Exception):
    """Ctrl-C during training: where the run stood and the last checkpoint safely on disk."""

    def __init__(self, step: int, checkpoint_step: int | None):
        self.step, self.checkpoint_step = step, checkpoint_step
        if checkpoint_step is None:
            text = f"stopped at step {step}; no checkpoint was written yet; start again without --resume"
        else:
            text = f"stopped at step {step}; last checkpoint at step {checkpoint_step}; continue with --resume"
        super().__init__(text)
