"""Notebook 9.3's runs: dense GPTs and mixture-of-experts GPTs trained alike, with expert load recorded.

Two tasks. **Text** (:func:`run_text_arm`): random windows of a token stream (the notebook uses
Shakespeare as characters, ``mup_runs.char_tokens``), validation on fixed held-out windows. **Facts** (:func:`run_fact_arm`): a table of
random facts ``(a, b) → c`` over a small vocabulary, each a 3-token sequence whose only target is
``c``; nothing about one fact predicts another, so the model can only store them, and the number
it can store grows with its parameters. That is the regime in which a mixture of experts, which
adds parameters without adding compute per token, can pay.

Every arm of one seed shares the initial seed, the batch order and the schedule, so an arm minus
another arm of the same seed is a paired measurement (``lesson.paired_difference``). ``imbalance``
is the busiest expert's share of the assignments over the uniform share ``1/E`` (1: balanced;
``E/k``: every token on the same ``k`` experts), averaged over the MoE layers, recorded at every
step from ``layer.load`` (no extra forward).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .data.loader import random_windows
from .extensions.common import window_losses
from .model import GPT, ModelConfig
from .moe import moe_layers
from .optim import build_optimizer, cosine_lr
from .optim.accumulation import labelled_clm_objective
from .train import train
from .utils import seed_everything


@dataclass
class ArmRun:
    name: str
    seed: int
    total_params: int
    active_params: int                       # matmul_params: what a token multiplies by
    flops_per_token: float
    steps: int = 0
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)   # facts only: share of the table recalled
    imbalance: list[float] = field(default_factory=list)   # per step, mean over MoE layers
    dropped: list[int] = field(default_factory=list)       # assignments dropped by capacity, per step
    loads: list[torch.Tensor] = field(default_factory=list)  # per step: (n_moe_layers, E) assignments per expert
    mean_gate: list[float] = field(default_factory=list)     # per step: the kept assignments' mean gate, over layers
    final_windows: torch.Tensor | None = None
    seconds: float = 0.0

    @property
    def final(self) -> float:
        return float(self.final_windows.mean()) if self.final_windows is not None else self.eval_losses[-1]

    @property
    def accuracy(self) -> float:
        return self.eval_accuracy[-1]


def imbalance(model: torch.nn.Module) -> float:
    """The busiest expert's share over ``1/E``, averaged over the MoE layers (last forward)."""
    layers = moe_layers(model)
    return sum(float(m.load.max() / m.load.mean()) for m in layers) / len(layers)


def over_capacity(loads: torch.Tensor, capacity_factor: float) -> float:
    """Share of the assignments that a capacity of ``ceil(c · T · k / E)`` per expert would drop, from
    ``loads`` ``(..., E)`` (assignments per expert in one forward; ``T · k`` is their sum)."""
    n_experts = loads.size(-1)
    assigned = loads.sum(-1, keepdim=True)
    cap = torch.ceil(capacity_factor * assigned / n_experts)
    return float((loads - cap).clamp(min=0).sum() / assigned.sum())


def _train_arm(model: GPT, run: ArmRun, next_batch: Callable, evaluate: Callable[[GPT, bool], None], *,
               steps: int, lr: float, warmup_steps: int, eval_points: int, weight_decay: float, device) -> ArmRun:
    """Warmup + cosine to ``lr/10``; load and drops every step, ``evaluate(model, last)`` at
    ``eval_points`` evenly spaced steps."""
    every = max(1, steps // eval_points)
    has_moe = bool(moe_layers(model))
    run.steps = steps

    class Record:
        def on_step(self, state):
            if has_moe:
                run.imbalance.append(imbalance(model))
                run.dropped.append(sum(int(m.dropped) for m in moe_layers(model)))
                run.loads.append(torch.stack([m.load.detach().cpu() for m in moe_layers(model)]))
                run.mean_gate.append(sum(float(m.last_routing.gates.detach()[m.last_routing.keep].mean())
                                         for m in moe_layers(model)) / len(moe_layers(model)))
            if state.step % every == 0 or state.step == steps:
                run.eval_steps.append(state.step)
                evaluate(model, state.step == steps)

    schedule = lambda step: cosine_lr(step, max_lr=lr, min_lr=lr / 10, warmup_steps=warmup_steps,  # noqa: E731
                                      cosine_steps=steps - 1)
    start = time.perf_counter()
    train(model, next_batch, labelled_clm_objective, steps=steps, lr=lr, lr_schedule=schedule,
          optimizer=build_optimizer(model, lr=lr, weight_decay=weight_decay), callbacks=[Record()],
          device=device, seed=run.seed, progress=False, desc=f"{run.name} (seed {run.seed})")
    run.seconds = time.perf_counter() - start
    return run


def _new_arm(name: str, seed: int, config: ModelConfig) -> tuple[GPT, ArmRun]:
    seed_everything(seed)
    model = GPT(config)
    return model, ArmRun(name, seed, model.num_params(), model.matmul_params(), model.flops_per_token())


def run_text_arm(train_ids: torch.Tensor, valid_windows: torch.Tensor, name: str, changes: dict, *, seed: int,
                 base_config: dict, steps: int, batch_size: int, lr: float, warmup_steps: int, eval_points: int,
                 device="cpu") -> ArmRun:
    """Train ``GPT(ModelConfig(**base_config, **changes))`` from ``seed`` on random windows of ``train_ids``
    (the order fixed by ``seed``); validation loss on ``valid_windows`` per evaluation, per window at the end."""
    model, run = _new_arm(name, seed, ModelConfig(**base_config, **changes))
    generator = torch.Generator().manual_seed(seed)

    def next_batch(_: int) -> dict:
        ids = random_windows(train_ids, batch_size=batch_size, seq_len=model.config.max_seq_len, generator=generator)
        return {"input_ids": ids, "labels": ids}

    def evaluate(model, last):
        losses = window_losses(model, valid_windows)
        run.eval_losses.append(float(losses.mean()))
        if last:
            run.final_windows = losses

    return _train_arm(model, run, next_batch, evaluate, steps=steps, lr=lr, warmup_steps=warmup_steps,
                      eval_points=eval_points, weight_decay=0.1, device=device)


# ----------------------------------------------------------------------------- the facts task

@dataclass(frozen=True)
class FactTable:
    """``facts[i] = (a, b, c)``: the ``N`` distinct pairs ``(a, b)`` and their random answers ``c``."""
    facts: torch.Tensor
    vocab_size: int

    @property
    def bits(self) -> float:
        """Information in the answers: ``N · log2(V)`` bits (each ``c`` is uniform over ``V``)."""
        return len(self.facts) * math.log2(self.vocab_size)


def fact_table(n_facts: int, vocab_size: int, seed: int = 0) -> FactTable:
    """``n_facts`` distinct random pairs over ``vocab_size`` tokens, each with a uniformly random answer."""
    if not 0 < n_facts <= vocab_size ** 2:
        raise ValueError(f"n_facts must lie in [1, vocab_size² = {vocab_size ** 2}], got {n_facts}")
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randperm(vocab_size ** 2, generator=g)[:n_facts]
    answers = torch.randint(vocab_size, (n_facts,), generator=g)
    return FactTable(torch.stack([pairs // vocab_size, pairs % vocab_size, answers], dim=1), vocab_size)


def fact_batches(table: FactTable, batch_size: int, seed: int) -> Callable[[int], dict]:
    """Batches of ``batch_size`` facts drawn with replacement; only the answer is a target."""
    gen = torch.Generator().manual_seed(seed)

    def next_batch(_: int) -> dict:
        x = table.facts[torch.randint(len(table.facts), (batch_size,), generator=gen)]
        labels = x.clone()
        labels[:, :2] = -100
        return {"input_ids": x, "labels": labels}

    return next_batch


@torch.no_grad()
def fact_recall(model: GPT, table: FactTable) -> tuple[float, float]:
    """(share of the table's answers the model's argmax gets right, mean loss on the answers in nats)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    facts = table.facts.to(device)
    logits = model(facts)[:, 1].float()          # the logit at ``b`` predicts ``c``
    model.train(was_training)
    return float((logits.argmax(-1) == facts[:, 2]).float().mean()), float(F.cross_entropy(logits, facts[:, 2]))


def run_fact_arm(table: FactTable, name: str, changes: dict, *, seed: int, base_config: dict, steps: int,
                 batch_size: int, lr: float, warmup_steps: int, eval_points: int, device="cpu") -> ArmRun:
    """Train ``GPT(ModelConfig(**base_config, **changes))`` on the fact table; recall and loss per evaluation."""
    model, run = _new_arm(name, seed, ModelConfig(**base_config, **changes))

    def evaluate(model, last):
        accuracy, loss = fact_recall(model, table)
        run.eval_accuracy.append(accuracy)
        run.eval_losses.append(loss)

    # no weight decay: it would pull stored facts toward zero, a forgetting pressure this task does not need
    return _train_arm(model, run, fact_batches(table, batch_size, seed), evaluate, steps=steps, lr=lr,
                      warmup_steps=warmup_steps, eval_points=eval_points, weight_decay=0.0, device=device)
