"""Counting host reads: every place Python asks for a tensor's *value* (``.item()``, ``float(t)``,
``if t:``, ``.tolist()``...). On a GPU each one waits until the device has finished all queued
work, so a loop that reads once per parameter stalls hundreds of times per step.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

_READS = ("item", "__int__", "__float__", "__bool__", "tolist", "__index__")
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class HostReads:
    """The reads counted inside :func:`count_host_reads`: ``.count`` and ``.by_file``."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    @property
    def count(self) -> int:
        return len(self.calls)

    def by_file(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, filename in self.calls:
            out[filename] = out.get(filename, 0) + 1
        return out


@contextlib.contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """Count tensor-value reads made by code outside torch's own files while the block runs.

    torch's internals are left out: its for-each AdamW reads step counters that live on
    the host by design (the fused CUDA kernel reads none). Not thread-safe; for measuring.
    """
    reads = HostReads()
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def counting(name: str):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not caller.startswith(_TORCH_DIR):
                reads.calls.append((name, caller))
            return original(self, *args, **kwargs)
        return wrapper

    try:
        for name in _READS:
            setattr(torch.Tensor, name, counting(name))
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def source_style_grad_norm(model: torch.nn.Module) -> float:
    """The pitfall, kept to measure it: the gradient norm built with one ``.item()`` per
    parameter, the way the source chapter's monitor does (a host read per tensor)."""
    total = 0.0
    for p in model.parameters():
        if p.grad is not None:
            total += p.grad.norm(2).item() ** 2
    return total ** 0.5


class SourceStyleRecorder:
    """An engine callback recording what the source chapter's monitor records, its way:
    loss, gradient norm (per-parameter reads, every step) and learning rate."""

    def __init__(self):
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.lrs: list[float] = []

    def on_step(self, state) -> None:
        self.losses.append(state.last.loss.item())
        self.grad_norms.append(source_style_grad_norm(state.model))
        self.lrs.append(state.optimizer.param_groups[0]["lr"])


class TimedCallback:
    """Wraps an engine callback and adds up the seconds spent in its ``on_step`` after ``warmup``
    steps (``.seconds``): what watching costs, measured inside the same run as the training."""

    def __init__(self, inner, warmup: int = 0):
        self.inner, self.warmup, self.seconds = inner, warmup, 0.0

    def on_step(self, state) -> None:
        start = time.perf_counter()
        self.inner.on_step(state)
        if state.step > self.warmup:
            self.seconds += time.perf_counter() - start

    def on_eval(self, state) -> None:
        getattr(self.inner, "on_eval", lambda s: None)(state)

    def on_end(self, state) -> None:
        getattr(self.inner, "on_end", lambda s: None)(state)
