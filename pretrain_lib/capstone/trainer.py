"""The capstone trainer: one config file → a complete, resumable pretraining run.

    python -m pretrain_lib.train --config configs/gpt-char-tiny.toml [--resume] [--set key=value ...]
    pretrain_lib.train.run("configs/gpt-char-tiny.toml")          # the same from Python

It prepares the data (cached), builds the model and the optimiser, and trains through the
engine's ``train()``; evaluation, checkpoints and the monitor are engine callbacks. Nothing
here steps an optimiser.

Exact resume. A checkpoint holds what the next step depends on: weights, optimiser moments,
the step (so the schedule continues where it was), tokens seen, the loader's position, the
Python/NumPy/torch (CPU and CUDA) RNG states, the MLM masking generator, the monitor's
state and the config. The engine counts steps from 0 in each call of ``train()``, so the
callbacks below are handed a view of its state with the global step (``_GlobalStep``).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..data.tokenizer import special_token_ids
from ..model import GPT, MaskedLM, ModelConfig
from ..monitor import Monitor
from ..optim import build_optimizer, cosine_lr, wsd_lr
from ..train import TrainConfig, clm_objective, mlm_objective, train
from ..utils import is_headless, resolve_device, seed_everything
from . import checkpoint as ckpt
from .config import RunConfig, exactness_differences, load_config
from .data import PreparedData, prepare_data, train_loader, validation_batches
from .data import _resolve as resolve_path
from .evaluate import fill_mask, gpt_sample, mlm_eval_objective, perplexity, validation_loss
from .parallel import init_distributed, load_full_state_dicts, wrap_model
from .sharded import load_sharded, save_sharded


@dataclass
class RunResult:
    out_dir: Path
    config: RunConfig
    start_step: int                     # 0, or the step the run resumed from
    steps: int                          # the global step reached
    losses: list[float]                 # training loss per step trained in this call
    eval_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    checkpoint_seconds: list[float] = field(default_factory=list)   # training time each checkpoint cost
    checkpoint_write_seconds: list[float] = field(default_factory=list)  # each write, on its background thread
    resume_seconds: float = 0.0                                     # loading the checkpoint, when resuming
    model: torch.nn.Module | None = None
    data: PreparedData | None = None


# ----------------------------------------------------------------------------- building blocks

def build_model(config: RunConfig, vocab_size: int) -> torch.nn.Module:
    m = config.model
    mc = ModelConfig(vocab_size=vocab_size, d_model=m.d_model, n_heads=m.n_heads, n_layers=m.n_layers,
                     d_ff=m.d_ff or None, max_seq_len=m.seq_len + 1,  # a window is seq_len inputs + 1 target
                     dropout=m.dropout, causal=m.kind == "gpt", position=m.position)
    return GPT(mc) if m.kind == "gpt" else MaskedLM(mc)


def lr_schedule(config: RunConfig):
    t = config.train
    if t.schedule == "constant":
        return lambda step: t.lr
    if t.schedule == "cosine":
        end = t.decay_steps or t.steps
        return lambda step: cosine_lr(step, max_lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                                      cosine_steps=max(end, t.warmup_steps))
    decay = t.decay_steps or max(1, t.steps // 5)
    stable = max(0, t.steps - t.warmup_steps - decay)
    return lambda step: wsd_lr(step, max_lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                               stable_steps=stable, decay_steps=decay)


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About what one checkpoint takes on disk: fp32 weights plus AdamW's two moments."""
    return 3 * sum(p.numel() * 4 for p in model.parameters()) + (1 << 20)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # NumPy's key array as a tensor: checkpoints load with weights_only=True, which refuses ndarrays
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EndlessBatches:
    """The loader's epochs one after another, for as many steps as the run needs.

    ``restore_rng``: RNG states to put back when iteration begins. The engine seeds the
    global RNG when ``train()`` starts and only then asks for batches, so this is the first
    moment a resumed run can restore the RNG without the engine overwriting it.
    """

    def __init__(self, loader, restore_rng: dict | None = None):
        self.loader, self.restore_rng = loader, restore_rng

    def __iter__(self):
        if self.restore_rng is not None:
            set_rng_state(self.restore_rng)
            self.restore_rng = None
        while True:
            yield from self.loader


class _GlobalStep:
    """Shows a callback the engine's state with the run's global step, token count and config.

    The engine's ``state.step`` counts from 0 in every ``train()`` call, and its config's
    ``steps`` is what is left; a resumed run starts at ``offset``. Each hook sees the global
    step, tokens and the whole run's ``steps``/``eval_every`` for the duration of the call only.
    """

    def __init__(self, callback, offset: int, tokens_offset: int, run_config: TrainConfig):
        self.callback, self.offset, self.tokens_offset = callback, offset, tokens_offset
        self.run_config = run_config

    def _call(self, hook: str, state) -> None:
        fn = getattr(self.callback, hook, None)
        if fn is None:
            return
        saved = state.step, state.tokens_seen, dict(state.metrics), state.config
        state.step += self.offset
        state.config = self.run_config
        state.tokens_seen += self.tokens_offset
        if "step" in state.metrics:
            state.metrics["step"] += self.offset
        if "tokens_seen" in state.metrics:
            state.metrics["tokens_seen"] += self.tokens_offset
        try:
            fn(state)
        finally:
            state.step, state.tokens_seen, state.config = saved[0], saved[1], saved[3]
            if "val_loss" in state.metrics and "val_loss" not in saved[2]:
                saved[2]["val_loss"] = state.metrics["val_loss"]
            state.metrics = saved[2]

    def on_step(self, state):
        self._call("on_step", state)

    def on_eval(self, state):
        self._call("on_eval", state)

    def on_end(self, state):
        self._call("on_end", state)


# ----------------------------------------------------------------------------- callbacks

class Evaluator:
    """Every ``eval_every`` global steps and at the last step: validation loss, perplexity, and
    a GPT sample or a BERT fill-mask; then the listeners' ``on_eval`` (the monitor)."""

    def __init__(self, config: RunConfig, data: PreparedData, result: RunResult, listeners=(), log=print):
        self.config, self.result, self.listeners, self.log = config, result, list(listeners), log
        self.tokenizer = data.tokenizer()
        self.batches = validation_batches(data, config)
        self.is_gpt = config.model.kind == "gpt"

    def on_step(self, state) -> None:
        t = self.config.train
        if state.step % t.eval_every and state.step != t.steps:
            return
        model = getattr(state.model, "module", state.model)
        objective = clm_objective if self.is_gpt else mlm_eval_objective(
            self.tokenizer, mlm_probability=self.config.data.mlm_probability, seed=self.config.seed)
        loss = validation_loss(model, self.batches, objective)
        self.result.eval_steps.append(state.step)
        self.result.val_losses.append(loss)
        state.metrics = {**state.metrics, "step": state.step, "val_loss": loss, "val_perplexity": perplexity(loss)}
        line = f"step {state.step}: val loss {loss:.4f}, perplexity {perplexity(loss):.2f}"
        if self.is_gpt and t.sample_tokens:
            sample = gpt_sample(model, self.tokenizer, max_new_tokens=t.sample_tokens, seed=self.config.seed)
            self.result.samples.append(sample)
            line += f"\n--- sample ---\n{sample}\n--------------"
        elif not self.is_gpt:
            top = fill_mask(model, self.tokenizer, "To be, or not to be, that is the [MASK]")[0]
            line += "; fill-mask top-5: " + ", ".join(f"{tok!r} {p:.2f}" for tok, p in top)
        self.log(line)
        for listener in self.listeners:
            if hasattr(listener, "on_eval"):
                listener.on_eval(state)


class Checkpointer:
    """Every ``checkpoint.every`` global steps and at the last step: an atomic checkpoint."""

    def __init__(self, config: RunConfig, out_dir: Path, loader, monitor, mlm_generator, result: RunResult, dist_info):
        self.config, self.out_dir, self.loader, self.monitor = config, out_dir, loader, monitor
        self.mlm_generator, self.result, self.dist = mlm_generator, result, dist_info
        self.writer = ckpt.BackgroundWriter()

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
                   "config": self.config.to_dict(), "world_size": self.dist.world_size}
        if weights:  # every rank holds the same replicated state under DDP
            payload["model"] = getattr(state.model, "module", state.model).state_dict()
            payload["optimizer"] = state.optimizer.state_dict()
        return payload

    def on_step(self, state) -> None:
        c = self.config
        if state.step % c.checkpoint.every and state.step != c.train.steps:
            return
        start = time.perf_counter()
        if c.parallel == "fsdp":  # every rank writes its own shards: nothing is gathered
            path = save_sharded(self.out_dir, state.step, state.model, state.optimizer,
                                self.state(state, weights=False), rank=self.dist.rank)
            if self.dist.rank == 0:
                ckpt.point_and_prune(self.out_dir, path, keep=c.checkpoint.keep)
        else:
            payload = self.state(state)
            if self.dist.rank == 0:  # training waits for a copy of the state; the write overlaps the next steps
                self.writer.submit(self.out_dir, state.step, payload, keep=c.checkpoint.keep)
        self.result.checkpoint_seconds.append(time.perf_counter() - start)
        if self.dist.world_size > 1:
            dist.barrier()

    def on_end(self, state) -> None:
        self.writer.wait()   # the run's last checkpoint is on disk when run() returns
        self.result.checkpoint_write_seconds = list(self.writer.write_seconds)


def _has_tensorboard() -> bool:
    import importlib.util
    return importlib.util.find_spec("tensorboard") is not None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run wrote after its last checkpoint: the resumed run writes them again."""
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    ckpt.atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


# ----------------------------------------------------------------------------- the run

def _as_config(config, overrides) -> RunConfig:
    if isinstance(config, RunConfig):
        if overrides:
            from .config import config_from_dict
            return config_from_dict(config.to_dict(), overrides)
        return config
    return load_config(config, overrides)


def run(config: RunConfig | str | Path, *, resume: bool = False, overrides=(), progress: bool | None = None,
        verbose: bool = True) -> RunResult:
    """Train the run ``config`` describes (a :class:`RunConfig` or the path of a TOML file).

    ``resume=True`` continues from the newest good checkpoint in ``out_dir`` (a fresh start
    when there is none); a resume whose config changes an exactness key is refused unless
    ``allow_config_change = true``. Returns a :class:`RunResult`.
    """
    config = _as_config(config, overrides)
    info = init_distributed(config.parallel)
    log = print if verbose and info.rank == 0 else (lambda *a, **k: None)
    out_dir = resolve_path(config.out_dir)
    seed_everything(config.seed)
    data = prepare_data(config.data, verbose=verbose and info.rank == 0) if info.rank == 0 else None
    if info.world_size > 1:
        dist.barrier()
        data = data or prepare_data(config.data, verbose=False)
    model = build_model(config, data.vocab_size)
    if info.rank == 0:
        ckpt.check_output_dir(out_dir, need_bytes=checkpoint_bytes(model) * (config.checkpoint.keep + 1))
    device = resolve_device(config.device if info.device is None else str(info.device))
    t = config.train
    kwargs = {} if t.optimizer == "adamw" else {"name": t.optimizer}
    loader = train_loader(data, config, rank=info.rank, world_size=info.world_size)
    mlm_generator = None
    if config.model.kind == "bert":
        tok = data.tokenizer()
        mlm_generator = torch.Generator().manual_seed(config.seed + 1)
        specials = special_token_ids(tok)
        objective = mlm_objective(mask_token_id=specials["[MASK]"], vocab_size=data.vocab_size,
                                  special_token_ids=list(specials.values()),
                                  mlm_probability=config.data.mlm_probability, generator=mlm_generator)
    else:
        objective = clm_objective

    start_step, tokens_offset, restore_rng, monitor_state = 0, 0, None, None
    result = RunResult(out_dir=out_dir, config=config, start_step=0, steps=0, losses=[], data=data)
    begin = time.perf_counter()
    found = ckpt.load_latest(out_dir, log=log) if resume else None
    if found is not None:
        path, saved = found
        diffs = exactness_differences(saved["config"], config.to_dict())
        if saved.get("world_size", 1) != info.world_size:
            diffs.append(f"world_size: {saved.get('world_size', 1)} -> {info.world_size}")
        if diffs and not config.allow_config_change:
            raise ckpt.CheckpointError(
                f"refusing to resume from {path}: these settings differ from the checkpoint's and would make the run "
                "differ from an uninterrupted one:\n  " + "\n  ".join(diffs) +
                "\nrestore them, or pass --set allow_config_change=true to resume anyway")
        if "sharded" not in saved:  # a sharded checkpoint is read into the wrapped model below
            model.load_state_dict(saved["model"])
        start_step, tokens_offset = int(saved["step"]), int(saved["tokens_seen"])
        loader.load_state_dict(saved["loader"][info.rank])
        restore_rng, monitor_state = saved["rng"][info.rank], saved.get("monitor")
        if mlm_generator is not None and saved.get("mlm_generator") is not None:
            mlm_generator.set_state(saved["mlm_generator"])
        result.start_step = start_step
        log(f"resumed from {path.name} at step {start_step}" + (" (config changed: " + "; ".join(diffs) + ")"
                                                                  if diffs else ""))
    model = wrap_model(model.to(device), config.parallel, info)
    optimizer = build_optimizer(model, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), **kwargs)
    if found is not None and "sharded" in found[1]:
        if config.parallel != "fsdp":
            raise ckpt.CheckpointError(f"{found[0]} holds FSDP shards; resume it with --set parallel=fsdp, or load its "
                                       "weights into one process with capstone.sharded.load_sharded_model")
        load_sharded(found[1]["sharded"], model, optimizer)
    elif found is not None and config.parallel == "fsdp":
        load_full_state_dicts(model, optimizer, found[1]["model"], found[1]["optimizer"])
    elif found is not None:
        optimizer.load_state_dict(found[1]["optimizer"])
    if found is not None:
        result.resume_seconds = time.perf_counter() - begin  # read + verify + load, up to the first step

    metrics_path = out_dir / "metrics.jsonl"
    if info.rank == 0 and start_step:
        truncate_metrics(metrics_path, start_step)
    show = (not is_headless() and sys.stderr.isatty()) if t.progress == "auto" else t.progress == "on"
    show = (show if progress is None else progress) and info.rank == 0
    monitor = Monitor(metrics_path if info.rank == 0 else None, log_every=t.log_every, progress=show,
                      tensorboard_dir=out_dir / "tensorboard" if t.tensorboard and info.rank == 0
                      and _has_tensorboard() else None, seq_len=config.model.seq_len + 1, warmup_steps=t.warmup_steps)
    if monitor_state is not None:
        monitor.load_state_dict(monitor_state)
    evaluator = Evaluator(config, data, result, listeners=[monitor], log=log)
    checkpointer = Checkpointer(config, out_dir, loader, monitor, mlm_generator, result, info)
    remaining = t.steps - start_step
    if remaining <= 0:
        log(f"nothing to do: the checkpoint is at step {start_step} and train.steps = {t.steps}")
        result.steps, result.model = start_step, model
        return result
    schedule = lr_schedule(config)
    engine_config = TrainConfig(
        steps=remaining, lr=t.lr, lr_schedule=lambda step: schedule(step + start_step), weight_decay=t.weight_decay,
        betas=(t.beta1, t.beta2), grad_clip=t.grad_clip or None, grad_accum_steps=t.grad_accum_steps, dtype=t.dtype,
        compile={"auto": None, "on": True, "off": False}[t.compile], log_every=t.log_every, seed=config.seed,
        device=str(device))
    run_view = replace(engine_config, steps=t.steps, eval_every=t.eval_every)
    callbacks = [_GlobalStep(cb, start_step, tokens_offset, run_view) for cb in (monitor, evaluator, checkpointer)]
    history = train(model, EndlessBatches(loader, restore_rng), objective, engine_config, callbacks=callbacks,
                    optimizer=optimizer, progress=False, desc=Path(config.out_dir).name,  # the monitor's bar
                    dp_group=True if info.world_size > 1 else None)
    result.losses, result.steps, result.seconds = history.losses, start_step + len(history.losses), history.seconds
    result.tokens_per_second, result.model = history.tokens_per_second * info.world_size, model
    return result


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain_lib.train",
                                     description="Pretrain a GPT or BERT from a TOML config (configs/*.toml).")
    parser.add_argument("--config", required=True, help="path of the TOML config, e.g. configs/gpt-char-tiny.toml")
    parser.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in out_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set train.steps=300 (repeatable)")
    parser.add_argument("--out", default=None, help="same as --set out_dir=DIR (the torchrun launcher passes it)")
    args = parser.parse_args(argv)
    overrides = args.overrides + ([f"out_dir={json.dumps(args.out)}"] if args.out else [])
    try:
        result = run(args.config, resume=args.resume, overrides=overrides)
    except (ValueError, ckpt.CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main:
        # the summary the torchrun launcher (pretrain_lib.distributed.launch) returns to a notebook
        summary = {"start_step": result.start_step, "steps": result.steps, "losses": result.losses,
                   "eval_steps": result.eval_steps, "val_losses": result.val_losses, "seconds": result.seconds,
                   "tokens_per_second": result.tokens_per_second}
        ckpt.atomic_write_bytes(result.out_dir / "metrics.json", json.dumps(summary).encode())
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if result.val_losses and is_main:
        print(f"done: step {result.steps}, val loss {result.val_losses[-1]:.4f}, "
              f"{result.tokens_per_second:,.0f} tokens/s, {result.seconds:.1f} s; output in {result.out_dir}")
    return 0
