"""The capstone's engine callbacks: what happens after an evaluation and when a checkpoint is due.

The engine (``pretrain_lib.train.train``) runs the validation loss through its ``eval_fn``
every ``eval_every`` steps and at the last step, then calls ``on_eval``; :class:`Evaluator`
adds perplexity and a GPT sample or a BERT fill-mask there. :class:`Checkpointer` writes in
``on_step``: every ``checkpoint.every`` steps, at the last step, and at the first logged step
after a preemption signal (:mod:`.preemption`).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from ..train import clm_objective
from . import checkpoint as ckpt
from .config import RunConfig
from .data import PreparedData, validation_batches
from .evaluate import fill_mask, gpt_sample, mlm_eval_objective, perplexity, validation_loss
from .preemption import StopRequests
from .resume import rng_state
from .sharded import save_sharded


def validation_fn(config: RunConfig, data: PreparedData):
    """The engine's ``eval_fn``: the token-weighted validation loss on the same fixed batches every time."""
    batches = validation_batches(data, config)
    tokenizer = data.tokenizer()

    def evaluate(model) -> float:
        model = getattr(model, "module", model)   # DDP: every rank holds the whole model
        objective = clm_objective if config.model.kind == "gpt" else mlm_eval_objective(
            tokenizer, mlm_probability=config.data.mlm_probability, seed=config.seed)
        return validation_loss(model, batches, objective)

    return evaluate


class Evaluator:
    """After each evaluation: perplexity, a GPT sample or a BERT fill-mask, one log line, and the result lists."""

    def __init__(self, config: RunConfig, data: PreparedData, result, log=print):
        self.config, self.result, self.log = config, result, log
        self.tokenizer = data.tokenizer()

    def on_eval(self, state) -> None:
        loss = state.metrics["val_loss"]
        self.result.eval_steps.append(state.step)
        self.result.val_losses.append(loss)
        state.metrics["val_perplexity"] = perplexity(loss)
        line = f"step {state.step}: val loss {loss:.4f}, perplexity {perplexity(loss):.2f}"
        model = getattr(state.model, "module", state.model)
        if self.config.model.kind == "gpt" and self.config.train.sample_tokens:
            sample = gpt_sample(model, self.tokenizer, max_new_tokens=self.config.train.sample_tokens,
                                seed=self.config.seed)
            self.result.samples.append(sample)
            line += f"\n--- sample ---\n{sample}\n--------------"
        elif self.config.model.kind == "bert":
            top = fill_mask(model, self.tokenizer, "To be, or not to be, that is the [MASK]")[0]
            line += "; fill-mask top-5: " + ", ".join(f"{tok!r} {p:.2f}" for tok, p in top)
        self.log(line)


class Checkpointer:
    """Every ``checkpoint.every`` steps, at the last step, and after a preemption signal: an atomic checkpoint."""

    def __init__(self, config: RunConfig, out_dir: Path, loader, monitor, mlm_generator, result, dist_info, *,
                 data_fingerprint: str, stops: StopRequests | None = None, log=print):
        self.config, self.out_dir, self.loader, self.monitor = config, out_dir, loader, monitor
        self.mlm_generator, self.result, self.dist = mlm_generator, result, dist_info
        self.data_fingerprint, self.stops, self.log = data_fingerprint, stops, log
        self.writer = ckpt.BackgroundWriter()
        self.step_reached = 0                       # the last step trained (for Ctrl-C's message)
        self.last_saved: int | None = None           # the last step whose checkpoint was handed to the writer

    def state(self, state, *, weights: bool = True) -> dict:
        """What a resume needs; ``weights=False`` leaves out the model and optimiser (a sharded
        checkpoint writes them as shards)."""
        # Each rank reads its own slice and draws its own dropout masks: keep every rank's loader and RNG
        # state, indexed by rank (one all-gather of small objects).
        loaders, rngs = [self.loader.state_dict()], [rng_state()]
        if self.dist.world_size > 1:
            loaders, rngs = [None] * self.dist.world_size, [None] * self.dist.world_size
            dist.all_gather_object(loaders, self.loader.state_dict())
            dist.all_gather_object(rngs, rng_state())
        payload = {"step": state.step, "tokens_seen": state.tokens_seen, "loader": loaders, "rng": rngs,
                   "mlm_generator": None if self.mlm_generator is None else self.mlm_generator.get_state(),
                   "monitor": self.monitor.state_dict() if hasattr(self.monitor, "state_dict") else None,
                   "config": self.config.to_dict(), "world_size": self.dist.world_size,
                   "data_fingerprint": self.data_fingerprint}
        if weights:  # every rank holds the same replicated state under DDP
            payload["model"] = getattr(state.model, "module", state.model).state_dict()
            payload["optimizer"] = state.optimizer.state_dict()
        return payload

    def on_step(self, state) -> None:
        self.step_reached = state.step
        c = self.config
        logged = state.step % c.train.log_every == 0 or state.step == c.train.steps
        # only at logged steps: every rank asks together, and a resume from here repeats no metrics line
        signal_name = self.stops.agreed(self.dist.world_size, self.dist.device) if self.stops and logged else None
        if state.step % c.checkpoint.every and state.step != c.train.steps and not signal_name:
            return
        self.save(state)
        if signal_name:
            self.writer.wait()   # on disk before the process exits
            self.result.preempted = signal_name
            self.log(f"{signal_name} received: checkpoint written at step {state.step}; stopping (continue with "
                     "--resume)")
            state.stop = True

    def save(self, state) -> None:
        start = time.perf_counter()
        c = self.config
        if c.parallel == "fsdp":  # every rank writes its own shards: nothing is gathered
            path = save_sharded(self.out_dir, state.step, state.model, state.optimizer,
                                self.state(state, weights=False), rank=self.dist.rank)
            if self.dist.rank == 0:
                ckpt.point_and_prune(self.out_dir, path, keep=c.checkpoint.keep)
        else:
            payload = self.state(state)
            if self.dist.rank == 0:  # training waits for a copy of the state; the write overlaps the next steps
                self.writer.submit(self.out_dir, state.step, payload, keep=c.checkpoint.keep)
        self.last_saved = state.step
        self.result.checkpoint_seconds.append(time.perf_counter() - start)
        if self.dist.world_size > 1:
            dist.barrier()

    def finish(self) -> None:
        """Wait for the write in flight: the run's last checkpoint is on disk after this."""
        self.writer.wait()
        self.result.checkpoint_write_seconds = list(self.writer.write_seconds)

    def on_end(self, state) -> None:
        self.finish()
