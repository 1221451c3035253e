"""Chapter 8.1: continual pretraining from Shakespeare to Python code.

Two domains with one tokenizer (trained on the first domain only, as a released model's is),
batches that mix a replay fraction of the old domain into the new one, and a continuation run
from a checkpoint that records both domains' validation losses per window."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..data.corpus import iter_shakespeare, python_stdlib_paths
from ..data.loader import random_windows
from ..data.tokenizer import train_tokenizer
from ..model import GPT, ModelConfig
from ..train import clm_objective, train
from .common import window_losses


@dataclass
class Domains:
    old_train: torch.Tensor   # Shakespeare (all plays but Hamlet), token ids
    old_valid: torch.Tensor   # Hamlet
    new_train: torch.Tensor   # standard-library code
    new_valid: torch.Tensor   # two held-out code files
    bytes_per_token: dict[str, float]
    code_files: list[str]     # names of the code files, the last two held out
    n_stdlib_files: int
    vocab_size: int


def load_domains(*, shakespeare_chars: int, code_files: int, vocab_size: int) -> Domains:
    """Shakespeare (Hamlet held out) and every k-th file of the sorted Python standard library (the
    selection is the same on every machine with the same Python; the last two files are held out).
    The tokenizer is trained on Shakespeare alone."""
    plays = list(iter_shakespeare())
    old_train_text = "\n".join(p.text for p in plays if p.name != "hamlet")[:shakespeare_chars]
    old_valid_text = next(p.text for p in plays if p.name == "hamlet")
    stdlib = python_stdlib_paths()
    stride = max(1, len(stdlib) // code_files)
    paths = stdlib[::stride][:code_files]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    new_train_text, new_valid_text = "\n".join(texts[:-2]), "\n".join(texts[-2:])
    tokenizer = train_tokenizer(old_train_text.split("\n\n"), vocab_size=vocab_size)
    enc = lambda text: torch.tensor(tokenizer.encode(text).ids)
    old_valid, new_valid = enc(old_valid_text), enc(new_valid_text)
    bpt = {"Shakespeare": len(old_valid_text.encode()) / old_valid.numel(),
           "code": len(new_valid_text.encode()) / new_valid.numel()}
    return Domains(enc(old_train_text), old_valid, enc(new_train_text), new_valid, bpt, [p.name for p in paths],
                   len(stdlib), tokenizer.get_vocab_size())


def mixed_batches(old: torch.Tensor, new: torch.Tensor, replay_fraction: float, *, batch_size: int, seq_len: int,
                  generator: torch.Generator) -> Callable[[int], dict[str, torch.Tensor]]:
    """``next_batch(i)``: ``round(replay_fraction · batch_size)`` windows of the old domain, the rest new."""
    if not 0.0 <= replay_fraction <= 1.0:
        raise ValueError(f"replay_fraction must be in [0, 1], got {replay_fraction}")
    n_old = round(replay_fraction * batch_size)

    def next_batch(i: int) -> dict[str, torch.Tensor]:
        parts = []
        if n_old:
            parts.append(random_windows(old, batch_size=n_old, seq_len=seq_len, generator=generator))
        if batch_size - n_old:
            parts.append(random_windows(new, batch_size=batch_size - n_old, seq_len=seq_len, generator=generator))
        return {"input_ids": torch.cat(parts)}
    return next_batch


@dataclass
class Continuation:
    """Validation losses along a continued run: ``curve[domain]`` at ``steps``; ``final[domain]``
    per window after the last step."""
    steps: list[int] = field(default_factory=list)
    curve: dict[str, list[float]] = field(default_factory=dict)
    final: dict[str, torch.Tensor] = field(default_factory=dict)


def continue_training(checkpoint: dict, config: ModelConfig, domains: Domains, valid: dict[str, torch.Tensor], *,
                      replay_fraction: float, schedule: Callable[[int], float], steps: int, batch_size: int,
                      seed: int, device, eval_every: int | None = None, desc: str = "continue") -> Continuation:
    """Load ``checkpoint`` into a fresh GPT and train ``steps`` steps on mixed batches whose order is
    fixed by ``seed``; evaluate every window of ``valid`` (domain -> windows) every ``eval_every``
    steps (None: only at the end)."""
    model = GPT(config)
    model.load_state_dict(checkpoint)
    out = Continuation(curve={name: [] for name in valid})
    batches = mixed_batches(domains.old_train, domains.new_train, replay_fraction, batch_size=batch_size,
                            seq_len=config.max_seq_len, generator=torch.Generator().manual_seed(seed))

    class Track:
        def on_step(self, state):
            last = state.step == steps
            if last or (eval_every and state.step % eval_every == 0):
                losses = {name: window_losses(model, w) for name, w in valid.items()}
                out.steps.append(state.step)
                for name, per_window in losses.items():
                    out.curve[name].append(float(per_window.mean()))
                if last:
                    out.final = losses

    train(model, batches, clm_objective, steps=steps, lr=float(schedule(0)) or 1e-3, lr_schedule=schedule,
          device=device, seed=seed, callbacks=[Track()], desc=desc)
    return out
