"""Chapter 6's experiments: monitored runs of the course GPT that differ in one thing, the
faults 6.2 provokes, the signature a failure leaves in a JSONL log, and short Markdown tables.

    lab = FailureLab(data, steps=80, d_model=64, n_layers=2, n_heads=4, seq_len=64, batch_size=12, lr=2e-3)
    lab.run("healthy")
    lab.run("lr_10x", peak_lr=10 * lab.lr)
    signature(lab.logs["lr_10x"], lab.ln_v)
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from statistics import median
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..optim import cosine_lr
from ..optim.experiments import TokenData, course_gpt, validation_loss_fn, window_batches
from ..train import clm_objective, train
from ..utils import figure_dir
from .core import Monitor, read_jsonl


def legends_above_data(fig, room: float = 0.35):
    """Give each legend of ``fig`` a band of its own above the curves (the top ``room`` of the axis),
    so that it covers no data, a spike included; returns ``fig``."""
    for ax in fig.axes:
        if ax.get_legend() is None:
            continue
        lo, hi = ax.get_ylim()
        if ax.get_yscale() == "log":
            ax.set_ylim(lo, hi * (hi / lo) ** (room / (1 - room)))
        else:
            ax.set_ylim(lo, hi + (hi - lo) * room / (1 - room))
        ax.legend(fontsize=7, loc="upper right")
    return fig


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (for ``lesson.say``); floats are written as given, so format them first."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


class FailureLab:
    """Monitored runs that share the model size, data, schedule and seed, each changing one thing.

    ``run(name, ...)`` trains a fresh course GPT (warmup then cosine, as the course's healthy
    runs) with a :class:`Monitor` writing ``<figure_dir>/<name>.jsonl``, and keeps the log's
    records in ``logs[name]``: every diagnosis in 6.2 reads those records; ``histories[name]`` keeps the
    engine's per-step losses and gradient norms, for a look at steps the log does not sample."""

    def __init__(self, data: TokenData, *, steps: int, d_model: int, n_layers: int, n_heads: int, seq_len: int,
                 batch_size: int, lr: float, log_every: int = 2, seed: int = 0, device: str = "cpu",
                 log_dir: Path | None = None):
        self.data, self.steps, self.lr, self.log_every, self.seed, self.device = data, steps, lr, log_every, seed, device
        self.shape = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, seq_len=seq_len)
        self.batch_size = batch_size
        self.batches = self.batches_for(seed)
        self.val_loss = validation_loss_fn(data.val, seq_len=seq_len)
        self.ln_v = math.log(data.vocab_size)
        self.log_dir = log_dir
        self.logs: dict[str, list[dict]] = {}
        self.monitors: dict[str, Monitor] = {}
        self.histories: dict = {}   # the engine's per-step History of each run (every step, not only logged ones)

    def batches_for(self, seed: int) -> Callable[[int], dict]:
        return window_batches(self.data.train, batch_size=self.batch_size, seq_len=self.shape["seq_len"], seed=seed)

    def fresh_model(self, seed: int | None = None) -> nn.Module:
        return course_gpt(self.data.vocab_size, seed=self.seed if seed is None else seed, **self.shape)

    def run(self, name: str, *, model: nn.Module | None = None, next_batch: Callable | None = None,
            objective: Callable = clm_objective, peak_lr: float | None = None, warmup: int | None = None,
            seed: int | None = None, callbacks: Sequence = (), **overrides) -> Monitor:
        """One monitored run; ``seed`` (default: the lab's) draws both the initialisation and the batches."""
        seed = self.seed if seed is None else seed
        peak_lr = self.lr if peak_lr is None else peak_lr
        warmup = self.steps // 10 if warmup is None else warmup
        schedule = partial(cosine_lr, max_lr=peak_lr, min_lr=peak_lr / 10, warmup_steps=warmup,
                           cosine_steps=self.steps - 1)
        monitor = Monitor((self.log_dir or figure_dir()) / f"{name}.jsonl")
        self.histories[name] = train(
            model if model is not None else self.fresh_model(seed),
            next_batch if next_batch is not None else self.batches_for(seed), objective, steps=self.steps,
            lr=peak_lr, lr_schedule=schedule, log_every=self.log_every, eval_every=self.steps // 2,
            eval_fn=self.val_loss, device=self.device, progress=False, callbacks=[monitor, *callbacks],
            **overrides)
        self.logs[name] = read_jsonl(monitor.jsonl_path)
        self.monitors[name] = monitor
        return monitor


# ----------------------------------------------------------------------------- the faults of 6.2

def bad_init(model: nn.Module, std: float = 1.0) -> nn.Module:
    """Redraw every weight matrix (every parameter of 2 or more dimensions) with this standard deviation."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model


def unshifted_clm_objective(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The off-by-one bug: the targets are the inputs themselves, not the inputs shifted left by one,
    so the logits at position t are scored against token t, which the model can see."""
    ids = batch["input_ids"]
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids.reshape(-1)), torch.tensor(ids.numel())


def poisoned_batches(next_batch: Callable[[int], dict], step: int) -> Callable[[int], dict]:
    """``next_batch`` whose batch of the engine's ``step`` (1-based, so batch index ``step - 1``)
    carries a NaN ``loss_factor``; every other batch carries 1.0. Pair with :func:`poisonable`."""
    def batches(i: int) -> dict:
        return {**next_batch(i), "loss_factor": torch.tensor(float("nan") if i == step - 1 else 1.0)}
    return batches


def poisonable(objective: Callable = clm_objective) -> Callable:
    """``objective`` with its loss multiplied by the batch's ``loss_factor`` (NaN on the poisoned batch)."""
    def poisoned_objective(model, batch):
        loss, n = objective(model, batch)
        return loss * batch["loss_factor"].to(loss.device), n
    return poisoned_objective


class KeepWeights:
    """An engine callback keeping a copy of the weights after each of the steps in ``keep``."""

    def __init__(self, keep):
        self.keep, self.weights = set(keep), {}

    def on_step(self, state) -> None:
        if state.step in self.keep:
            self.weights[state.step] = [p.detach().clone() for p in state.model.parameters()]

    def same(self, a: int, b: int) -> bool:
        """Whether the weights after step ``a`` and after step ``b`` are bit for bit equal."""
        return all(torch.equal(x, y) for x, y in zip(self.weights[a], self.weights[b]))


# ----------------------------------------------------------------------------- reading a log

def _median_ratio(record: dict) -> float:
    return median(record["layer_update_ratios"].values())


def signature(records: list[dict], ln_v: float, *, early_steps: int = 10) -> dict:
    """The numbers 6.2 reads a failure from, all taken from a monitor's JSONL records.

    ``loss0/lnV``: the first logged loss over ``ln |V|``; ``final``: the smoothed training loss at
    the end; ``val``: the last validation loss; ``gap``: final minus val; ``max_gn``: the largest
    pre-clip gradient norm of any step (the windows' ``grad_norm_max``); ``early_gn``: the largest
    over the first ``early_steps`` steps; ``ur_first`` / ``ur_last``: the median over layers of
    ‖ΔW‖/‖W‖ at the first and last logged steps; ``anomalies``: the kinds flagged, and
    ``first_anomaly``: the step of the first one (None if none)."""
    rows = [r for r in records if r.get("loss") is not None]
    ratios = [r for r in rows if r.get("layer_update_ratios")]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    norms = [(r["step"], r["grad_norm_max"]) for r in rows if r.get("grad_norm_max") is not None]
    found = [a for r in records for a in r.get("anomalies") or ()]
    return {"loss0/lnV": rows[0]["loss"] / ln_v, "final": rows[-1]["loss_smooth"], "val": vals[-1],
            "gap": rows[-1]["loss_smooth"] - vals[-1], "max_gn": max(v for _, v in norms),
            "early_gn": max(v for s, v in norms if s <= early_steps),
            "ur_first": _median_ratio(ratios[0]), "ur_last": _median_ratio(ratios[-1]),
            "anomalies": sorted({a["kind"] for a in found}),
            "first_anomaly": min((a["step"] for a in found), default=None)}


def loss_at(records: list[dict], step: int, key: str = "loss") -> float:
    """The logged ``key`` at the last logged step at or before ``step``."""
    rows = [r for r in records if r.get(key) is not None and r["step"] <= step]
    if not rows:
        raise ValueError(f"no logged {key} at or before step {step}")
    return rows[-1][key]
