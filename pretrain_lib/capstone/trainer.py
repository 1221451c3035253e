"""The capstone trainer: one config file → a complete, resumable pretraining run.

    python -m pretrain_lib.train --config configs/gpt-char-tiny.toml [--resume] [--set key=value ...]
    pretrain_lib.capstone.trainer.run("configs/gpt-char-tiny.toml")   # the same from Python

``run`` is a list of named steps: choose the threads, prepare the data (cached), build the
model, claim ``out_dir`` (fresh start or resume, refusing what would lose work), restore a
checkpoint, build the optimiser and the monitor, and train through the engine's ``train()``
from the checkpoint's step. The run's tokenizer is copied into ``out_dir`` (``tokenizer.json``,
the ``tokenizers`` format for the char tokenizer too) and each checkpoint records its
fingerprint, so generating from or exporting a run needs only its folder, not the data cache. Evaluation is the engine's ``eval_fn`` with :class:`Evaluator`
on its ``on_eval`` hook; checkpoints and preemption are :class:`Checkpointer`'s ``on_step``.
Nothing here steps an optimiser. The command line is :mod:`.cli`.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.tokenizer import special_token_ids
from ..model import ModelConfig, seeded_model
from ..monitor import AnomalyRules, Monitor
from ..optim import build_optimizer, cosine_lr, wsd_lr
from ..train import TrainConfig, clm_objective, mlm_objective, train
from ..utils import is_headless, resolve_device, seed_everything
from . import checkpoint as ckpt
from .callbacks import Checkpointer, Evaluator, ValidationSet, validation_fn
from .config import RunConfig, config_from_dict, load_config, resolve_paths, schedule_warnings
from .data import PreparedData, prepare_data, resolve_path, train_loader
from .parallel import DistInfo, build_run_mesh, init_distributed, load_full_state_dicts, wrap_model
from .preemption import RunInterrupted, StopRequests
from .resume import (EndlessBatches, ResumePoint, check_resumable, claim_out_dir, load_loader_state,
                     load_model_weights, rng_state, set_rng_state)
from .sharded import load_sharded
from .threads import set_training_threads

RUN_TOKENIZER = "tokenizer.json"    # the run's tokenizer, inside out_dir

__all__ = ["RunResult", "run", "run_model", "RUN_TOKENIZER", "save_run_tokenizer", "lr_schedule", "checkpoint_bytes", "truncate_metrics", "Checkpointer",
           "Evaluator", "EndlessBatches", "rng_state", "set_rng_state"]


@dataclass
class RunResult:
    out_dir: Path
    config: RunConfig
    start_step: int                     # 0, or the step the run resumed from
    steps: int                          # the global step reached
    losses: list[float]                 # training loss per step trained in this call
    eval_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    val_bits_per_byte: list[float] = field(default_factory=list)   # GPT: at each evaluation, tokenizer-free
    samples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0            # the training loop's process CPU time (all threads)
    tokens_per_second: float = 0.0
    checkpoint_seconds: list[float] = field(default_factory=list)   # training time each checkpoint cost
    checkpoint_write_seconds: list[float] = field(default_factory=list)  # each write, on its background thread
    resume_seconds: float = 0.0                                     # loading the checkpoint, when resuming
    preempted: str | None = None        # "SIGTERM" / "SIGUSR1" when a signal stopped the run after a checkpoint
    threads: int = 0                    # CPU threads per process
    model: torch.nn.Module | None = None
    data: PreparedData | None = None


# ----------------------------------------------------------------------------- building blocks

def run_model(config: RunConfig, vocab_size: int) -> torch.nn.Module:
    """The run's model (GPT or MaskedLM, from ``config.model``), initialised from ``config.seed``."""
    m = config.model
    mc = ModelConfig(vocab_size=vocab_size, d_model=m.d_model, n_heads=m.n_heads, n_layers=m.n_layers,
                     d_ff=m.d_ff or None, max_seq_len=m.seq_len + 1,  # a window is seq_len inputs + 1 target
                     dropout=m.dropout, causal=m.kind == "gpt", position=m.position,
                     moe_experts=m.moe_experts, moe_top_k=m.moe_top_k, moe_capacity_factor=m.moe_capacity_factor,
                     moe_shared_experts=m.moe_shared_experts, moe_aux_loss_coef=m.moe_aux_loss_coef,
                     moe_bias_rate=m.moe_bias_rate,
                     norm=m.norm, mlp=m.mlp, qk_norm=m.qk_norm, tie_embeddings=m.tie_embeddings)
    return seeded_model(mc, config.seed)


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


def save_run_tokenizer(out_dir: Path, data: PreparedData) -> Path:
    """Copy the prepared data's tokenizer into ``out_dir`` (atomically), so the run folder is self-contained."""
    path = Path(out_dir) / RUN_TOKENIZER
    ckpt.atomic_write_bytes(path, Path(data.tokenizer_path).read_bytes())
    return path


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About what one checkpoint takes on disk: fp32 weights plus AdamW's two moments."""
    return 3 * sum(p.numel() * 4 for p in model.parameters()) + (1 << 20)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run wrote after its last checkpoint: the resumed run writes them again."""
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    ckpt.atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


def _has_tensorboard() -> bool:
    import importlib.util
    return importlib.util.find_spec("tensorboard") is not None


# ----------------------------------------------------------------------------- the run, step by step

def run(config: RunConfig | str | Path, *, resume: bool | str = False, overwrite: bool | None = None, overrides=(),
        progress: bool | None = None, verbose: bool = True) -> RunResult:
    """Train the run ``config`` describes (a :class:`RunConfig` or the path of a TOML file).

    ``resume``: ``False`` starts a new run (an ``out_dir`` holding an earlier run is refused
    unless ``overwrite=True`` or the config's ``overwrite = true``, as on the command line); ``True`` continues from the newest good
    checkpoint (none is an error); ``"auto"`` continues when there is one. A resume whose
    config changes an exactness key, or whose data changed, is refused unless
    ``allow_config_change = true``. SIGTERM/SIGUSR1 stop the run after a checkpoint
    (``result.preempted``); Ctrl-C raises :class:`RunInterrupted` naming the last checkpoint.
    """
    config = resolve_paths(_as_config(config, overrides))   # relative paths: from the working directory
    info = init_distributed(config.parallel)
    log = print if verbose and info.rank == 0 else (lambda *a, **k: None)
    threads_before = torch.get_num_threads()
    try:
        with StopRequests() as stops:
            return _run(config, info, log, stops, resume=resume, overwrite=overwrite, progress=progress,
                        verbose=verbose)
    finally:
        torch.set_num_threads(threads_before)   # a notebook calling run() keeps its own setting


def _run(config: RunConfig, info: DistInfo, log, stops: StopRequests, *, resume, overwrite, progress,
         verbose) -> RunResult:
    threads = _choose_threads(config, log)
    for warning in schedule_warnings(config):
        log(f"warning: {warning}")
    out_dir = resolve_path(config.out_dir)
    seed_everything(config.seed)
    data = _prepare_data(config, info, verbose)
    model = run_model(config, data.vocab_size)
    point = _claim_out_dir(out_dir, config, info, model, resume=resume, overwrite=overwrite, log=log)
    if info.rank == 0:
        save_run_tokenizer(out_dir, data)
    result = RunResult(out_dir=out_dir, config=config, start_step=0, steps=0, losses=[], data=data, threads=threads)
    if config.parallel == "mesh":
        build_run_mesh(info, {"dp": config.mesh.dp, "tp": config.mesh.tp})
    loader = train_loader(data, config, rank=info.dp_rank, world_size=info.dp_size)
    objective, mlm_generator = _objective(config, data)
    begin = time.perf_counter()
    if point is not None:
        _restore(point, config, data, info, model, loader, mlm_generator, result, log)
    device = resolve_device(config.device if info.device is None else str(info.device))
    model = wrap_model(model.to(device), config.parallel, info)
    optimizer = _optimizer(config, model, point, info)
    if point is not None:
        result.resume_seconds = time.perf_counter() - begin  # read + verify + load, up to the first step
    result.model = model
    if result.start_step >= config.train.steps:
        log(f"nothing to do: the checkpoint is at step {result.start_step} and train.steps = {config.train.steps}")
        result.steps = result.start_step
        return result
    monitor = _monitor(config, out_dir, info, progress, point)
    checkpointer = Checkpointer(config, out_dir, loader, monitor, mlm_generator, result, info,
                                data_fingerprint=data.fingerprint,
                                tokenizer_fingerprint=data.meta["tokenizer_fingerprint"], stops=stops, log=log)
    validation = ValidationSet(config, data)
    # on_eval: perplexity and bits per byte, then the log line that records them
    callbacks = [Evaluator(config, data, result, log=log, validation=validation), monitor, checkpointer]
    batches = EndlessBatches(loader, None if point is None else point.state["rng"][info.rank])
    try:
        history = train(model, batches, objective, _engine_config(config, device), callbacks=callbacks,
                        optimizer=optimizer, eval_fn=validation_fn(config, data, validation), progress=False,
                        desc=Path(config.out_dir).name, dp_group=info.dp_group,
                        start_step=result.start_step, tokens_offset=0 if point is None else point.tokens_seen)
    except KeyboardInterrupt:
        checkpointer.finish()   # a write in flight completes: it is the last checkpoint
        raise RunInterrupted(checkpointer.step_reached or result.start_step,
                             checkpointer.last_saved or (result.start_step or None)) from None
    result.losses, result.seconds, result.cpu_seconds = history.losses, history.seconds, history.cpu_seconds
    result.steps = result.start_step + len(history.losses)
    result.tokens_per_second = history.tokens_per_second * info.dp_size   # tp ranks share their dp rank's tokens
    return result


def _as_config(config, overrides) -> RunConfig:
    if isinstance(config, RunConfig):
        return config_from_dict(config.to_dict(), overrides) if overrides else config
    return load_config(config, overrides)


def _choose_threads(config: RunConfig, log) -> int:
    threads, warning = set_training_threads(config.train.threads)
    if warning:
        log(f"warning: {warning}")
    return threads


def _prepare_data(config: RunConfig, info: DistInfo, verbose: bool) -> PreparedData:
    """Rank 0 prepares (or finds) the cached data; the other ranks read it after a barrier."""
    data = prepare_data(config.data, verbose=verbose) if info.rank == 0 else None
    if info.world_size > 1:
        dist.barrier()
        data = data or prepare_data(config.data, verbose=False)
    return data


def _claim_out_dir(out_dir: Path, config: RunConfig, info: DistInfo, model, *, resume, overwrite,
                   log) -> ResumePoint | None:
    """Fresh start or resume (see :func:`resume.claim_out_dir`), after checking the folder can hold the checkpoints."""
    if info.rank == 0:
        ckpt.check_output_dir(out_dir, need_bytes=checkpoint_bytes(model) * (config.checkpoint.keep + 1))
    if config.overwrite:
        overwrite = True
    mode = bool(overwrite)   # None (the default) refuses an earlier run, as the command line does
    point = claim_out_dir(out_dir, resume=resume, overwrite=mode, log=log)
    if point is None and info.rank == 0:
        ckpt.clear_run(out_dir)   # --overwrite, or --resume=auto over a run killed before its first checkpoint
    if info.world_size > 1:
        dist.barrier()
    return point


def _objective(config: RunConfig, data: PreparedData):
    """The training objective, and for BERT the masking generator a checkpoint saves."""
    if config.model.kind != "bert":
        return clm_objective, None
    specials = special_token_ids(data.tokenizer())
    generator = torch.Generator().manual_seed(config.seed + 1)
    objective = mlm_objective(mask_token_id=specials["[MASK]"], vocab_size=data.vocab_size,
                              special_token_ids=list(specials.values()),
                              mlm_probability=config.data.mlm_probability, generator=generator)
    return objective, generator


def _restore(point: ResumePoint, config: RunConfig, data: PreparedData, info: DistInfo, model, loader,
             mlm_generator, result: RunResult, log) -> None:
    """Everything but the optimiser (built after the model is wrapped) from the checkpoint."""
    diffs = check_resumable(point, config, data_fingerprint=data.fingerprint, world_size=info.world_size)
    if not point.sharded:  # a sharded checkpoint is read into the wrapped model with the optimiser
        load_model_weights(model, point)
    load_loader_state(loader, point, info.rank, data_changed_ok=config.allow_config_change, log=log)
    if mlm_generator is not None and point.state.get("mlm_generator") is not None:
        mlm_generator.set_state(point.state["mlm_generator"])
    result.start_step = point.step
    if info.rank == 0:
        truncate_metrics(resolve_path(config.out_dir) / "metrics.jsonl", point.step)
    log(f"resumed from {point.path.name} at step {point.step}"
        + (" (config changed: " + "; ".join(diffs) + ")" if diffs else ""))


def _optimizer(config: RunConfig, model, point: ResumePoint | None, info: DistInfo | None = None
               ) -> torch.optim.Optimizer:
    """The optimiser, with the checkpoint's moments: from shards, from a full state into FSDP, or plainly."""
    t = config.train
    kwargs = {} if t.optimizer == "adamw" else {"name": t.optimizer, "muon_lr": t.muon_lr}
    optimizer = build_optimizer(model, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), **kwargs)
    if point is None:
        return optimizer
    if point.sharded:
        if config.parallel not in ("fsdp", "mesh"):
            raise ckpt.CheckpointError(f"{point.path} holds FSDP shards; resume it with the run's parallel setting "
                                       "(fsdp, or its [parallel] mesh), or load its weights into one process with "
                                       "capstone.sharded.load_sharded_model")
        load_sharded(point.state["sharded"], model, optimizer, prefix=info.shard_prefix if info else "")
    elif config.parallel == "mesh":
        raise ckpt.CheckpointError(f"{point.path} is a whole-model checkpoint; a mesh run resumes only from its own "
                                   "sharded checkpoints (start a new run, or resume with the checkpoint's parallel)")
    elif config.parallel == "fsdp":
        load_full_state_dicts(model, optimizer, point.state["model"], point.state["optimizer"])
    else:
        try:
            optimizer.load_state_dict(point.state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise ckpt.CheckpointError(f"the optimiser state in {point.path} does not fit train.optimizer = "
                                       f"{t.optimizer!r} ({exc}); resume with the checkpoint's optimiser, or start a "
                                       "new run") from None
    return optimizer


def _monitor(config: RunConfig, out_dir: Path, info: DistInfo, progress: bool | None,
             point: ResumePoint | None) -> Monitor:
    t = config.train
    show = (not is_headless() and sys.stderr.isatty()) if t.progress == "auto" else t.progress == "on"
    show = (show if progress is None else progress) and info.rank == 0
    monitor = Monitor(out_dir / "metrics.jsonl" if info.rank == 0 else None, log_every=t.log_every, progress=show,
                      tensorboard_dir=out_dir / "tensorboard" if t.tensorboard and info.rank == 0
                      and _has_tensorboard() else None, seq_len=config.model.seq_len + 1,
                      rules=AnomalyRules(warmup_steps=t.warmup_steps))
    if point is not None and point.state.get("monitor") is not None:
        monitor.load_state_dict(point.state["monitor"])
    return monitor


def _engine_config(config: RunConfig, device: torch.device) -> TrainConfig:
    t = config.train
    return TrainConfig(steps=t.steps, lr=t.lr, lr_schedule=lr_schedule(config), weight_decay=t.weight_decay,
                       betas=(t.beta1, t.beta2), grad_clip=t.grad_clip or None, grad_accum_steps=t.grad_accum_steps,
                       dtype=t.dtype, compile={"auto": None, "on": True, "off": False}[t.compile],
                       log_every=t.log_every, eval_every=t.eval_every, seed=config.seed, device=str(device))
