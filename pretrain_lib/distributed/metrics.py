"""What a strategy run measures and what rank 0 writes: one schema for every strategy.

Every variant of every strategy module reports at least

- ``losses``: the training loss of each step over the whole global batch (read from the
  device once, at the end of the run);
- ``bytes_per_step``: bytes one rank hands to communication per step (the buffers given to
  collectives or sends; where ranks differ, the largest);
- ``seconds_per_step``: the median wall-clock time of a step;
- ``max_abs_diff_vs_single``: the largest weight difference from one process trained on
  the same global batch.

The run itself adds ``strategy``, ``world_size``, ``backend``, ``device``, ``dtype``,
``tolerance``, ``n_params``, ``param_bytes``, ``reference_losses``, ``variants`` and the
worst ``max_abs_diff_vs_single`` over the variants that must be exact.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..utils import wait_for_device

METRICS_FILE = "metrics.json"
# fp32 strategies reproduce one process to float rounding; bf16 autocast rounds every matmul,
# and a different batch split may pick a different kernel, so allow bf16's relative precision
# times the few steps a run takes (every weight moves by at most ~lr per Adam step anyway)
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s elements, in its own dtype."""
    return t.numel() * t.element_size()


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def max_abs_diff(named_a: dict[str, torch.Tensor], named_b: dict[str, torch.Tensor]) -> float:
    """Largest elementwise |a - b| over parameters with the same name (names must match)."""
    if named_a.keys() != named_b.keys():
        raise KeyError(f"parameter names differ: {sorted(set(named_a) ^ set(named_b))[:5]}")
    diffs = [(named_a[k].detach().float().cpu() - named_b[k].detach().float().cpu()).abs().max() for k in named_a]
    return float(torch.stack(diffs).max())


class StepTimer:
    """Wall-clock seconds of each step, the device's queue drained at both ends."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, []

    @contextmanager
    def measure(self) -> Iterator[None]:
        wait_for_device(self.device)
        t0 = time.perf_counter()
        yield
        wait_for_device(self.device)
        self.seconds.append(time.perf_counter() - t0)

    @property
    def median(self) -> float:
        if not self.seconds:
            raise ValueError("no step was timed")
        return sorted(self.seconds)[len(self.seconds) // 2]


def read_losses(losses: Sequence[torch.Tensor]) -> list[float]:
    """The steps' 0-d loss tensors as Python floats, in one device-to-host transfer."""
    if not losses:
        return []
    return torch.stack([l.detach().float() for l in losses]).cpu().tolist()


def variant_record(*, losses: list[float], bytes_per_step: float | None, seconds_per_step: float, **extra) -> dict:
    """One variant's metrics in the common schema (``max_abs_diff_vs_single`` is added by the caller)."""
    return {"losses": losses, "bytes_per_step": bytes_per_step, "seconds_per_step": seconds_per_step, **extra}


def write_metrics(out: Path | None, metrics: dict) -> None:
    """Rank 0 writes ``metrics`` to ``out/metrics.json`` (silently: the folder is a temporary one, and a
    notebook's output shows no machine paths; ``run_torchrun`` returns the metrics and the folder)."""
    if out is None:
        print(json.dumps(metrics, indent=1, default=float))
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1, default=float))
