"""THE training engine: one optimiser step (``train_step``) and the loop around it (``train``).

Every chapter, every parallel strategy, every benchmark and the capstone trainer train
through ``train_step``; a strategy changes the model (or optimiser) it is given, never this
loop. Read it top to bottom:

1. ``train_step``: zero the gradients, run forward + backward on each micro-batch (all but
   the last inside ``no_sync()`` under DDP), normalise the gradient by the number of target
   tokens in the whole window, clip, step. Nothing here reads a tensor's value on the host,
   so a GPU never waits for Python.
2. ``train``: fetch batches, set the learning rate from the schedule, call ``train_step``,
   and every ``log_every`` steps read the losses back in one transfer and call the callbacks.

An *objective* is a function ``(model, batch) -> (mean_loss, n_target_tokens)``; ready-made
ones for CLM and MLM are below. ``n_target_tokens`` may be an int or a 0-d tensor.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .model import check_token_ids
from .objectives import IGNORE_INDEX, clm_loss, mask_tokens, mlm_loss
from .optim import build_optimizer
from .utils import configure_backend, is_headless, resolve_device, seed_everything

Batch = dict[str, torch.Tensor]
Objective = Callable[[nn.Module, Batch], tuple[torch.Tensor, "int | torch.Tensor"]]
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- objectives

def clm_objective(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token prediction on ``batch["input_ids"]`` ``(batch, seq)``."""
    ids = batch["input_ids"]
    loss = clm_loss(model(ids, batch.get("attention_mask")), ids)
    return loss, (ids[:, 1:] != IGNORE_INDEX).sum()


def mlm_objective(*, mask_token_id: int, vocab_size: int, special_token_ids: Sequence[int],
                  mlm_probability: float = 0.15, generator: torch.Generator | None = None) -> Objective:
    """An MLM objective that masks each batch afresh (dynamic masking, as RoBERTa does)."""

    def objective(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = mask_tokens(batch["input_ids"], mask_token_id=mask_token_id, vocab_size=vocab_size,
                                     special_token_ids=special_token_ids, mlm_probability=mlm_probability,
                                     generator=generator)
        loss = mlm_loss(model(inputs, batch.get("attention_mask")), labels)
        return loss, (labels != IGNORE_INDEX).sum()

    return objective


def sparse_mlm_objective(*, mask_token_id: int, vocab_size: int, special_token_ids: Sequence[int],
                         mlm_probability: float = 0.15, generator: torch.Generator | None = None) -> Objective:
    """``train.mlm_objective`` with the MLM head run at the masked positions only.

    The same masks (``objectives.mask_tokens``, the same generator draws) and the same loss, the mean
    cross-entropy over the masked tokens; but the head's projection onto the vocabulary, most of a small
    encoder's compute, is done for the 15 % of positions that carry a label instead of all of them
    ("sparse prediction", Geiping & Goldstein 2022). ``model`` must be a ``MaskedLM``."""

    def objective(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = mask_tokens(batch["input_ids"], mask_token_id=mask_token_id, vocab_size=vocab_size,
                                     special_token_ids=special_token_ids, mlm_probability=mlm_probability,
                                     generator=generator)
        lm = _unwrap(model)     # under DDP or torch.compile, the MaskedLM inside
        hidden = lm.backbone(inputs, batch.get("attention_mask"))
        chosen = labels != IGNORE_INDEX
        h = lm.head_ln(torch.nn.functional.gelu(lm.head_dense(hidden[chosen])))          # MaskedLM.forward's head, on (n_masked, d)
        logits = h @ lm.backbone.tok_emb.weight.T + lm.head_bias
        n = chosen.sum()
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[chosen], reduction="sum") / n.clamp(min=1)
        return loss, n

    return objective


# ----------------------------------------------------------------------------- one step

class StepResult(tuple):
    """``(loss, grad_norm)`` as 0-d tensors (unpacks as a pair); ``.n_targets`` is the window's
    target-token count, also a tensor. Nothing has been read on the host."""

    def __new__(cls, loss: torch.Tensor, grad_norm: torch.Tensor, n_targets: torch.Tensor, skipped: bool = False):
        self = super().__new__(cls, (loss, grad_norm))
        self.n_targets = n_targets
        self.skipped = skipped  # True when skip_nonfinite found a NaN/inf and did not step
        return self

    @property
    def loss(self) -> torch.Tensor:
        return self[0]

    @property
    def grad_norm(self) -> torch.Tensor:
        return self[1]


def _autocast(device_type: str, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def _as_tensor(n: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    return n.to(device=device, dtype=torch.float32) if isinstance(n, torch.Tensor) else \
        torch.tensor(float(n), device=device)


def default_forward_backward(model: nn.Module, micro_batches: Sequence[Batch], objective: Objective, *,
                             autocast: torch.dtype | None, no_sync: Callable[[], Any] | None,
                             scaler: torch.amp.GradScaler | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over every micro-batch; returns ``(loss_sum, n_targets)`` (tensors).

    Each micro-batch contributes its *summed* token loss (mean × count), so after dividing
    the gradient by the window's total count the step equals one big batch, however
    unevenly the targets are spread over micro-batches (padding, MLM's random 15 %, a
    ragged last batch). A model with an ``auxiliary_loss()`` method (the MoE balancing loss)
    has that loss, times the count, added to what backward sees; the returned loss leaves it out.
    """
    device = next(model.parameters()).device
    if no_sync is None:
        no_sync = getattr(model, "no_sync", None)  # DDP: skip the all-reduce until the last micro-step
    auxiliary = getattr(_unwrap(model), "auxiliary_loss", None)  # e.g. the MoE balancing loss
    loss_sum = torch.zeros((), device=device)
    n_total = torch.zeros((), device=device)
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        sync_ctx = no_sync() if (no_sync is not None and i < last) else contextlib.nullcontext()
        with sync_ctx:
            with _autocast(device.type, autocast):
                mean_loss, n = objective(model, batch)
            n = _as_tensor(n, device)
            summed = mean_loss.float() * n
            aux = auxiliary() if auxiliary is not None else None
            # the auxiliary loss is trained (weighted like the objective's mean) but not reported
            total = summed if aux is None else summed + aux.float() * n
            (scaler.scale(total) if scaler is not None else total).backward()
        loss_sum = loss_sum + summed.detach()
        n_total = n_total + n
    return loss_sum, n_total


def global_grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together, as a tensor (one fused pass, no host read)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def train_step(model: nn.Module, micro_batches: Sequence[Batch], objective: Objective,
               optimizer: torch.optim.Optimizer, *, grad_clip: float | None = None,
               autocast: torch.dtype | None = None, no_sync: Callable[[], Any] | None = None,
               dp_group: dist.ProcessGroup | bool | None = None, scaler: torch.amp.GradScaler | None = None,
               forward_backward: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
               skip_nonfinite: bool = False) -> StepResult:
    """One optimiser step over one or more micro-batches; returns ``StepResult(loss, grad_norm)``.

    The window's loss is normalised by its number of target tokens (not by the number of
    micro-batches). Under data parallelism (``dp_group``: a process group, or ``True`` for
    the default group) the token count and summed loss are all-reduced together in one
    small collective, and the gradient, which DDP/FSDP have *averaged* over ranks, is
    rescaled by ``world / global_count``: the step equals one process training on the
    whole global batch. ``grad_norm`` is the global norm before clipping.
    ``forward_backward`` replaces the micro-batch loop (the pipeline schedule uses this); it
    must call backward on summed token losses and return ``(loss_sum, n_targets)``.
    After the step, a model's ``after_optimizer_step(all_reduce)`` runs when it has one (the MoE
    bias update; ``all_reduce`` sums a tensor over the data-parallel group, None in one process).
    ``skip_nonfinite=True`` leaves the weights and optimiser state untouched when the loss or
    the gradient norm is NaN/inf (a poisoned batch); deciding that costs one host read per step.
    """
    if len(micro_batches) == 0:
        raise ValueError("train_step needs at least one micro-batch")
    optimizer.zero_grad(set_to_none=True)
    run = forward_backward or default_forward_backward
    loss_sum, n_total = run(model, micro_batches, objective, autocast=autocast, no_sync=no_sync, scaler=scaler)
    scale_by = 1.0
    all_reduce = None
    if dp_group is not None and dp_group is not False and dist.is_initialized():
        group = None if dp_group is True else dp_group
        stats = torch.stack([loss_sum.float(), n_total.float()])
        dist.all_reduce(stats, group=group)
        loss_sum, n_total = stats[0], stats[1]
        scale_by = dist.get_world_size(group)

        def all_reduce(t: torch.Tensor) -> None:
            dist.all_reduce(t, group=group)
    n_safe = n_total.clamp(min=1.0)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip and report the true gradient, not the scaled one
    if params:
        torch._foreach_mul_([p.grad for p in params], scale_by / n_safe)
    # A model split by hand over ranks (tensor parallel) knows which gradients are slices: it supplies the norm
    norm_of_split = getattr(_unwrap(model), "grad_norm", None)
    if norm_of_split is not None:
        grad_norm = norm_of_split()
        if grad_clip is not None:   # torch's clip_grad_norm_ rule: scale by min(1, clip / (norm + 1e-6))
            torch._foreach_mul_([p.grad for p in params], min(1.0, grad_clip / (float(grad_norm) + 1e-6)))
    elif grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    else:
        grad_norm = global_grad_norm(params)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2/DTensor: the norm is sharded; every rank joins this collective
        grad_norm = grad_norm.full_tensor()
    if skip_nonfinite and scaler is None and not bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_sum / n_safe, grad_norm, n_total, skipped=True)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step itself when the scaled gradient overflowed
        scaler.update()
    else:
        optimizer.step()
    after_step = getattr(_unwrap(model), "after_optimizer_step", None)  # e.g. MoE bias balancing
    if after_step is not None:
        after_step(all_reduce)
    return StepResult(loss_sum / n_safe, grad_norm, n_total)


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainConfig:
    """What ``train`` needs; every field has a default that suits a 2-core laptop run."""
    steps: int = 100
    lr: float = 3e-4
    lr_schedule: Callable[[int], float] | None = None   # step (0-based) -> learning rate
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    grad_accum_steps: int = 1
    dtype: str = "fp32"               # "fp32" | "bf16" | "fp16" (fp16: CUDA only, with a GradScaler)
    compile: bool | None = None       # None: on for CUDA, off on the CPU (40–90 s to compile for ~1.07×)
    log_every: int = 10               # read losses back to the host every this many steps
    max_nonfinite_steps: int = 0      # >0: skip up to this many NaN/inf steps in a row, then stop (1 read/step)
    eval_every: int | None = None
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.max_nonfinite_steps, int) or self.max_nonfinite_steps < 0:
            raise ValueError(f"TrainConfig.max_nonfinite_steps must be a non-negative integer, "
                             f"got {self.max_nonfinite_steps!r}")
        for name in ("steps", "grad_accum_steps", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or self.eval_every <= 0):
            raise ValueError(f"TrainConfig.eval_every must be a positive integer or None, got {self.eval_every!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be positive or None, got {self.grad_clip}")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.lr_schedule is not None and not callable(self.lr_schedule):
            raise TypeError("TrainConfig.lr_schedule must be a function of the step, or None")


@dataclass
class TrainHistory:
    losses: list[float] = field(default_factory=list)         # training loss per step
    grad_norms: list[float] = field(default_factory=list)     # pre-clip global gradient norm per step
    lrs: list[float] = field(default_factory=list)            # learning rate used at each step
    target_tokens: list[int] = field(default_factory=list)    # tokens that gave a learning signal, per step
    input_tokens: list[int] = field(default_factory=list)     # tokens fed to the model, per step
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)   # steps whose update was skipped (NaN/inf)
    seconds: float = 0.0
    cpu_seconds: float = 0.0          # this process's CPU time over the same span (all threads): less load-sensitive

    def final_loss(self, last: int = 10) -> float:
        """Mean of the last ``last`` training losses (less noisy than the very last one)."""
        if not self.losses:
            raise ValueError("no steps were trained")
        tail = self.losses[-last:]
        return sum(tail) / len(tail)

    @property
    def tokens_per_second(self) -> float:
        return sum(self.input_tokens) / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class TrainState:
    """What callbacks see. ``step`` counts completed optimiser steps; ``last`` is that step's
    ``StepResult`` (tensors, gradients still in place); ``metrics`` holds the last logged
    host values. A callback may set ``stop = True`` to end training after this step."""
    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    batches: Any
    history: TrainHistory
    last: StepResult | None = None
    lr: float = 0.0
    tokens_seen: int = 0
    data_seconds: float = 0.0          # host time spent waiting for batches since the start
    metrics: dict = field(default_factory=dict)
    nonfinite_in_a_row: int = 0
    stop: bool = False


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


def _to_device(batch: Batch, device: torch.device, vocab_size: int | None) -> Batch:
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise TypeError(f"a batch must be a dict with 'input_ids', got {type(batch).__name__}")
    if vocab_size is not None:
        check_token_ids(batch["input_ids"], vocab_size)
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) if v.device.type == "cpu" else v.to(device)
                for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def _batch_source(batches) -> Callable[[int], Batch]:
    """``batches`` is a ``next_batch(i) -> dict`` callable or any iterable of batch dicts."""
    if callable(batches) and not hasattr(batches, "__iter__"):
        return batches
    iterator = iter(batches)

    def fetch(_: int) -> Batch:
        try:
            return next(iterator)
        except StopIteration:
            raise RuntimeError("the batch iterable ran out before the last step; give more data or fewer steps") \
                from None
    return fetch


def _call(callbacks, hook: str, state: TrainState) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(state)


def train(model: nn.Module, batches, objective: Objective, config: TrainConfig | None = None, *,
          callbacks: Iterable[Any] = (), optimizer: torch.optim.Optimizer | None = None,
          eval_fn: Callable[[nn.Module], float] | None = None, progress: bool | None = None,
          desc: str = "train", dp_group: dist.ProcessGroup | bool | None = None, start_step: int = 0,
          tokens_offset: int = 0, **overrides) -> TrainHistory:
    """Train ``model`` for ``config.steps`` optimiser steps and return the loss history.

    ``batches``: ``next_batch(i) -> dict`` (called once per micro-batch with a running index)
    or an iterable of dicts (a ``ResumableLoader``), each holding ``input_ids`` ``(batch, seq)``
    and optionally ``attention_mask``. Keyword ``overrides`` set ``TrainConfig`` fields, so
    ``train(model, next_batch, clm_objective, steps=200, lr=1e-3)`` works without a config.
    ``eval_fn(model)`` runs every ``eval_every`` steps and at the end, in eval mode without
    gradients. Callbacks may define ``on_step(state)``, ``on_eval(state)``, ``on_end(state)``.
    ``start_step`` continues a run: the loop trains steps ``start_step .. config.steps - 1``, so
    the schedule, ``state.step``, the logged steps and ``eval_every`` all count the whole run's
    steps; ``tokens_offset`` is the tokens the earlier part of the run saw (``state.tokens_seen``
    starts there). The history holds the steps trained in this call.
    ``progress=None`` shows a bar unless the run is headless (papermill, CI). ``dp_group``
    is passed to ``train_step`` (default: the whole world when ``model`` is DDP-wrapped).
    """
    valid = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(f"train() got unknown settings {unknown}; valid ones are {sorted(valid)}")
    config = replace(config, **overrides) if config is not None else TrainConfig(**overrides)
    callbacks = list(callbacks)
    if not isinstance(start_step, int) or not 0 <= start_step < config.steps:
        raise ValueError(f"train(start_step={start_step!r}) must lie in [0, steps={config.steps})")

    seed_everything(config.seed)
    device = resolve_device(config.device)
    configure_backend(device)
    amp_dtype = DTYPES[config.dtype]
    scaler = None
    if config.dtype == "fp16":
        if device.type != "cuda":
            raise ValueError("dtype='fp16' needs a CUDA GPU (a GradScaler guards its narrow range); "
                             "use 'bf16' or 'fp32' on the CPU")
        scaler = torch.amp.GradScaler("cuda")
    model.to(device).train()
    base = _unwrap(model)
    vocab_size = getattr(getattr(base, "config", None), "vocab_size", None)
    opt = optimizer if optimizer is not None else build_optimizer(
        model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps)
    use_compile = device.type == "cuda" if config.compile is None else config.compile
    forward_model = torch.compile(model) if use_compile else model
    fetch = _batch_source(batches)
    history = TrainHistory()
    state = TrainState(step=start_step, model=model, optimizer=opt, config=config, batches=batches, history=history,
                       tokens_seen=tokens_offset)

    if progress is None:
        progress = not is_headless()
    from tqdm.auto import tqdm
    bar = tqdm(total=config.steps, initial=start_step, desc=desc, disable=not progress)

    pending: list[StepResult] = []     # steps not yet read back to the host
    start, cpu_start = time.perf_counter(), time.process_time()
    micro_index = start_step * config.grad_accum_steps   # a callable source continues where the run stood
    for step in range(start_step, config.steps):
        if config.lr_schedule is not None:
            lr = float(config.lr_schedule(step))
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        state.lr = opt.param_groups[0]["lr"]
        history.lrs.append(state.lr)
        fetch_start = time.perf_counter()
        micro = []
        for _ in range(config.grad_accum_steps):
            micro.append(_to_device(fetch(micro_index), device, vocab_size))
            micro_index += 1
        state.data_seconds += time.perf_counter() - fetch_start
        n_input = sum(b["input_ids"].numel() for b in micro)
        history.input_tokens.append(n_input)
        state.tokens_seen += n_input

        result = train_step(forward_model, micro, objective, opt, grad_clip=config.grad_clip,
                            autocast=amp_dtype, scaler=scaler,
                            dp_group=dp_group if dp_group is not None else hasattr(model, "no_sync"),
                            skip_nonfinite=config.max_nonfinite_steps > 0)
        pending.append(result)
        state.step, state.last = step + 1, result
        if result.skipped:
            history.skipped_steps.append(step)
            state.nonfinite_in_a_row += 1
            if state.nonfinite_in_a_row > config.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{state.nonfinite_in_a_row} non-finite steps in a row (the last at step {step}, limit "
                    f"max_nonfinite_steps={config.max_nonfinite_steps}); the weights are those before the "
                    "first of them. Lower the learning rate or inspect those batches")
        else:
            state.nonfinite_in_a_row = 0

        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:   # whole-run step numbers
            _read_back(pending, history, step + 1 - len(pending))
            pending.clear()
            state.metrics = {"step": step + 1, "loss": history.losses[-1], "grad_norm": history.grad_norms[-1],
                             "lr": state.lr, "tokens_seen": state.tokens_seen,
                             "seconds": time.perf_counter() - start}
            bar.set_postfix(loss=f"{history.final_loss(10):.3f}", refresh=False)
        _call(callbacks, "on_step", state)
        bar.update(1)

        if config.eval_every and eval_fn is not None and ((step + 1) % config.eval_every == 0
                                                          or step + 1 == config.steps):
            model.eval()
            with torch.no_grad():
                value = float(eval_fn(model))
            model.train()
            history.eval_steps.append(step + 1)
            history.eval_losses.append(value)
            # this evaluation's val_* keys only: an earlier evaluation's extras must not be logged again
            kept = {k: v for k, v in state.metrics.items() if not k.startswith("val_")}
            state.metrics = {**kept, "step": step + 1, "val_loss": value}
            _call(callbacks, "on_eval", state)
        if state.stop:
            if pending:
                _read_back(pending, history, step + 1 - len(pending))
                pending.clear()
            break
    history.seconds, history.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    bar.close()
    _call(callbacks, "on_end", state)
    return history


def _read_back(pending: list[StepResult], history: TrainHistory, first_step: int) -> None:
    """Copy the pending steps' loss, norm and token count to the host in one transfer."""
    values = torch.stack([torch.stack([r.loss.float(), r.grad_norm.float().to(r.loss.device),
                                       r.n_targets.float()]) for r in pending]).cpu().tolist()
    for offset, ((loss, norm, n), result) in enumerate(zip(values, pending)):
        if not math.isfinite(loss) and not result.skipped:
            raise FloatingPointError(f"loss became {loss} at step {first_step + offset}; lower the learning "
                                     "rate, add warmup, or check that batch for bad values")
        history.losses.append(loss)
        history.grad_norms.append(norm)
        history.target_tokens.append(int(n))


# ----------------------------------------------------------------------------- the capstone trainer
# The capstone trainer (config, data, checkpoints, callbacks, command line) sits above this engine in
# pretrain_lib/capstone/ and trains through train() above; this module never imports it. Its command line
# keeps its old name: ``python -m pretrain_lib.train --config configs/NAME.toml`` runs capstone.cli when this
# file is executed as __main__ (a separate module object, so no import cycle).

if __name__ == "__main__":
    # An entry point, not a dependency: the engine never imports the capstone that sits above it.
    import runpy
    runpy.run_module("pretrain_lib.capstone.cli", run_name="__main__", alter_sys=True)
