"""The capstone's engine callbacks: what happens after an evaluation and when a checkpoint is due.

The engine (``pretrain_lib.train.train``) runs the validation loss through its ``eval_fn``
every ``eval_every`` steps and at the last step, then calls ``on_eval``; :class:`Evaluator`
adds perplexity, a GPT's bits per byte (``val_bits_per_byte``, :mod:`pretrain_lib.evaluate`'s
measure on the same fixed validation windows, so a char run and a BPE run compare on one axis in
``metrics.jsonl``) and a GPT sample or a BERT fill-mask there; the monitor, listed after it,
records every ``val_*`` figure it put in ``state.metrics``. :class:`Checkpointer` writes in
``on_step``: every ``checkpoint.every`` steps, at the last step, and at the first logged step
after a preemption signal (:mod:`.preemption`).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from ..evaluate.metrics import bits_per_byte, token_byte_lengths
from ..train import clm_objective
from . import checkpoint as ckpt
from .config import RunConfig
from .data import PreparedData, validation_batches
from .evaluate import fill_mask, gpt_sample, mlm_eval_objective, perplexity, validation_loss
from .preemption import StopRequests
from .resume import rng_state
from .sharded import save_sharded


class ValidationSet:
    """The fixed validation batches every evaluation reads, and for a GPT the UTF-8 bytes their
    target tokens decode to (the denominator of bits per byte, counted once)."""

    def __init__(self, config: RunConfig, data: PreparedData):
        self.batches = validation_batches(data, config)
        self.target_tokens = sum(b["input_ids"][:, 1:].numel() for b in self.batches)
        self.target_bytes = None
        if config.model.kind == "gpt":
            lengths = token_byte_lengths(data.tokenizer())
            self.target_bytes = int(sum(lengths[b["input_ids"][:, 1:].numpy()].sum() for b in self.batches))

    def bits_per_byte(self, val_loss: float) -> float | None:
        """The token-weighted mean loss back to summed nats, per byte of text (None for an MLM)."""
        if self.target_bytes is None:
            return None
        return bits_per_byte(val_loss * self.target_tokens, self.target_bytes)


def validation_fn(config: RunConfig, data: PreparedData, validation: ValidationSet | None = None):
    """The engine's ``eval_fn``: the token-weighted validation loss on the same fixed batches every time."""
    batches = (validation or ValidationSet(config, data)).batches
    tokenizer = data.tokenizer()

    def evaluate(model) -> float:
        model = getattr(model, "module", model)   # DDP: every rank holds the whole model
        objective = clm_objective if config.model.kind == "gpt" else mlm_eval_objective(
            tokenizer, mlm_probability=config.data.mlm_probability, seed=config.seed)
        return validation_loss(model, batches, objective)

    return evaluate


class Evaluator:
    """After each evaluation: perplexity, bits per byte (GPT), a GPT sample or a BERT fill-mask, one
    log line, and the result lists. Runs before the monitor's ``on_eval``, which records the
    ``val_*`` figures it puts in ``state.metrics``."""

    def __init__(self, config: RunConfig, data: PreparedData, result, log=print,
                 validation: ValidationSet | None = None):
        self.config, self.result, self.log = config, result, log
        self.tokenizer = data.tokenizer()
        self.validation = validation or ValidationSet(config, data)

    def on_eval(self, state) -> None:
        loss = state.metrics["val_loss"]
        self.result.eval_steps.append(state.step)
        self.result.val_losses.append(loss)
        state.metrics["val_perplexity"] = perplexity(loss)
        line = f"step {state.step}: val loss {loss:.4f}, perplexity {perplexity(loss):.2f}"
        bpb = self.validation.bits_per_byte(loss)
        if bpb is not None:
            state.metrics["val_bits_per_byte"] = bpb
            self.result.val_bits_per_byte.append(bpb)
            line += f", {bpb:.4f} bits/byte"
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
                 data_fingerprint: str, tokenizer_fingerprint: str | None = None,
                 stops: StopRequests | None = None, log=print):
        self.config, self.out_dir, self.loader, self.monitor = config, out_dir, loader, monitor
        self.mlm_generator, self.result, self.dist = mlm_generator, result, dist_info
        self.data_fingerprint, self.stops, self.log = data_fingerprint, stops, log
        self.tokenizer_fingerprint = tokenizer_fingerprint   # load_run checks out_dir's tokenizer.json against it
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
                   "data_fingerprint": self.data_fingerprint, "tokenizer_fingerprint": self.tokenizer_fingerprint}
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
        if c.parallel in ("fsdp", "mesh"):  # every rank writes its own shards: nothing is gathered
            path = save_sharded(self.out_dir, state.step, state.model, state.optimizer,
                                self.state(state, weights=False), rank=self.dist.rank, prefix=self.dist.shard_prefix)
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
