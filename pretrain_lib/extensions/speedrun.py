"""Chapter 8.2: the ingredients of today's pretraining speed-runs, one switch each, on the
course GPT, measured against the baseline over several seeds.

A variant is ``(ModelConfig changes, optimiser name, data layout)``. Every run of one seed
shares the batch order (a generator seeded by the seed), the schedule and the validation
windows, so the difference between a variant and the baseline of the same seed is a paired
measurement (``pretrain_lib.lesson.paired_difference``)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..data.corpus import iter_shakespeare
from ..data.packing import pack_documents, pad_documents
from ..data.tokenizer import encode_texts, special_token_ids, train_tokenizer
from ..model import GPT, ModelConfig
from ..objectives import IGNORE_INDEX
from ..optim import build_optimizer, cosine_lr
from ..optim.accumulation import labelled_clm_objective
from ..optim.builder import muon_matrices
from ..train import train, train_step
from ..utils import seed_everything
from .common import fixed_windows, window_losses

# name -> (ModelConfig changes, optimiser, data layout)
VARIANTS: dict[str, tuple[dict, str, str]] = {
    "baseline": ({}, "adamw", "packed"),
    "RoPE": ({"position": "rope"}, "adamw", "packed"),
    "RMSNorm": ({"norm": "rmsnorm"}, "adamw", "packed"),
    "SwiGLU MLP": ({"mlp": "swiglu"}, "adamw", "packed"),
    "ReLU² MLP": ({"mlp": "relu2"}, "adamw", "packed"),
    "QK-norm": ({"qk_norm": True}, "adamw", "packed"),
    "Muon": ({}, "muon", "packed"),
    "padding, not packing": ({}, "adamw", "padded"),
}


@dataclass
class SpeedrunData:
    vocab_size: int
    seq_len: int
    n_speeches: int
    packed: torch.Tensor          # (blocks, seq_len): speeches joined by <|endoftext|>, cut into full blocks
    padded_ids: torch.Tensor      # (speeches, seq_len): one speech per row, [PAD] after it
    padded_mask: torch.Tensor     # 1 on real tokens
    valid: torch.Tensor           # (windows, seq_len): fixed Hamlet windows

    @property
    def real_fraction(self) -> float:
        """Share of the padded rows' positions that hold a real token."""
        return self.padded_mask.float().mean().item()


def load_speedrun_data(*, corpus_chars: int, vocab_size: int, seq_len: int, val_windows: int) -> SpeedrunData:
    """The plays but Hamlet, one document per speech (paragraph); Hamlet held out for validation."""
    plays = list(iter_shakespeare())
    text = "\n".join(p.text for p in plays if p.name != "hamlet")[:corpus_chars]
    tokenizer = train_tokenizer(text.split("\n\n"), vocab_size=vocab_size)
    specials = special_token_ids(tokenizer)
    speeches = encode_texts(tokenizer, [s for s in text.split("\n\n") if s.strip()])
    packed = pack_documents(speeches, block_size=seq_len, eot_id=specials["<|endoftext|>"])
    padded_ids, padded_mask = pad_documents(speeches, max_length=seq_len, pad_id=specials["[PAD]"])
    hamlet = torch.tensor(tokenizer.encode(next(p.text for p in plays if p.name == "hamlet")).ids)
    return SpeedrunData(tokenizer.get_vocab_size(), seq_len, len(speeches), packed, padded_ids, padded_mask,
                        fixed_windows(hamlet, seq_len=seq_len, n_windows=val_windows))


def batch_fn(data: SpeedrunData, layout: str, batch_size: int, generator: torch.Generator
             ) -> Callable[[int], dict[str, torch.Tensor]]:
    """``next_batch(i)``: ``batch_size`` random packed blocks, or padded speeches with their mask."""
    if layout not in ("packed", "padded"):
        raise ValueError(f"layout must be 'packed' or 'padded', got {layout!r}")

    def next_batch(i: int) -> dict[str, torch.Tensor]:
        if layout == "packed":
            pick = torch.randint(data.packed.size(0), (batch_size,), generator=generator)
            return {"input_ids": data.packed[pick], "labels": data.packed[pick]}
        pick = torch.randint(data.padded_ids.size(0), (batch_size,), generator=generator)
        ids, mask = data.padded_ids[pick], data.padded_mask[pick]
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}
    return next_batch


def build_variant(name: str, base_config: dict, *, seed: int, peak_lr: float, muon_lr: float
                  ) -> tuple[nn.Module, object, str]:
    """The model (initialised from ``seed``), its optimiser and its data layout."""
    changes, optimizer_name, layout = VARIANTS[name]
    seed_everything(seed)
    model = GPT(ModelConfig(**base_config, **changes))
    return model, build_optimizer(model, optimizer_name, lr=peak_lr, muon_lr=muon_lr), layout


@dataclass
class VariantRun:
    name: str
    seed: int
    params: int
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    final_windows: torch.Tensor | None = None     # per-window validation losses after the last step
    extra: dict[int, float] = field(default_factory=dict)  # step -> validation loss at requested steps
    target_tokens: int = 0

    @property
    def final(self) -> float:
        return float(self.final_windows.mean())


def run_variant(data: SpeedrunData, name: str, *, seed: int, base_config: dict, steps: int, batch_size: int,
                peak_lr: float, muon_lr: float, warmup_steps: int, eval_points: int, device,
                extra_eval_steps: tuple[int, ...] = ()) -> VariantRun:
    """Train one variant with one seed; evaluate on the fixed windows ``eval_points`` times and at
    ``extra_eval_steps`` (an equal-compute point, say)."""
    model, optimizer, layout = build_variant(name, base_config, seed=seed, peak_lr=peak_lr, muon_lr=muon_lr)
    schedule = lambda step: cosine_lr(step, max_lr=peak_lr, min_lr=peak_lr / 10, warmup_steps=warmup_steps,
                                      cosine_steps=steps - 1)
    run = VariantRun(name, seed, model.num_params())
    every = max(1, steps // eval_points)

    class Evaluate:
        def on_step(self, state):
            if state.step % every == 0 or state.step == steps or state.step in extra_eval_steps:
                losses = window_losses(model, data.valid)
                if state.step % every == 0 or state.step == steps:
                    run.eval_steps.append(state.step)
                    run.eval_losses.append(float(losses.mean()))
                if state.step in extra_eval_steps:
                    run.extra[state.step] = float(losses.mean())
                if state.step == steps:
                    run.final_windows = losses

    history = train(model, batch_fn(data, layout, batch_size, torch.Generator().manual_seed(seed)),
                    labelled_clm_objective, steps=steps, lr=peak_lr, lr_schedule=schedule, optimizer=optimizer,
                    callbacks=[Evaluate()], device=device, seed=seed, desc=f"{name} (seed {seed})")
    run.target_tokens = sum(history.target_tokens)
    return run


def muon_flops_per_step(model: nn.Module, ns_steps: int = 5) -> float:
    """FLOPs of Muon's Newton–Schulz iterations in one optimiser step.

    Each iteration on an ``m × n`` matrix ``X`` (``m ≤ n``) computes ``A = X Xᵀ`` (2m²n),
    ``B = bA + cA²`` (2m³) and ``aX + BX`` (2m²n): 4m²n + 2m³ FLOPs, independent of the batch."""
    total = 0.0
    for p in muon_matrices(model):
        m, n = sorted(p.shape)
        total += ns_steps * (4 * m * m * n + 2 * m ** 3)
    return total


def alternating_step_times(data: SpeedrunData, names: list[str], *, base_config: dict, batch_size: int,
                           peak_lr: float, muon_lr: float, rounds: int, steps_per_turn: int, device,
                           seed: int = 0) -> dict[str, list[float]]:
    """Seconds per training step of each variant, measured in turns: every round times
    ``steps_per_turn`` steps of each variant one after the other, so that a change in the
    machine's load hits all variants alike. Returns, per variant, the median step time of each round
    (the first step of each model, a warm-up, is not timed)."""
    setups = {}
    for name in names:
        model, optimizer, layout = build_variant(name, base_config, seed=seed, peak_lr=peak_lr, muon_lr=muon_lr)
        model.to(device).train()
        batches = batch_fn(data, layout, batch_size, torch.Generator().manual_seed(seed))
        step = lambda m=model, o=optimizer, b=batches: train_step(
            m, [{k: v.to(device) for k, v in b(0).items()}], labelled_clm_objective, o, grad_clip=1.0)
        step()  # warm-up: allocations, first-call overheads
        setups[name] = step
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name, step in setups.items():
            per_step = []
            for _ in range(steps_per_turn):
                start = time.perf_counter()
                result = step()
                float(result.loss)  # wait for the step to finish (GPU)
                per_step.append(time.perf_counter() - start)
            times[name].append(statistics.median(per_step))
    return times
