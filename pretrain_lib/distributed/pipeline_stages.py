"""A pipeline's pieces on each rank: its stage of the GPT and the schedules that run micro-batches through it.

Rank s holds stage s (:func:`pipeline_stage`): a *contiguous* run of blocks of the course's
GPT (the first stage also the embeddings, the last the final LayerNorm and the output
layer). Activations cross ranks only at stage boundaries, once per micro-batch, forward;
their gradients come back the same way. :class:`ByHandSchedule` runs an order list of
:mod:`.pipeline_schedules` with send/recv; :class:`TorchSchedule` hands the same stage to
``torch.distributed.pipelining``. Both are the engine's ``forward_backward``: they backpropagate
summed token losses and return ``(loss_sum, n_targets)``. No loss is read on the host inside a
schedule (that would serialise the pipeline); the last stage's losses are sent to every rank once,
at the end (:func:`last_stage_losses`).

The output layer is tied to the token embedding, which lives on the first stage; the
last stage keeps a copy and the two gradients are summed after each backward pass, so
both copies take identical steps (what Megatron-LM does for its embedding group).
:mod:`.pipeline_parallel` (the chapter's runner), :mod:`.pipeline_bubble` and
:mod:`.pipeline_placement` train with these pieces.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..model import GPT
from ..objectives import IGNORE_INDEX, clm_loss
from ..utils import wait_for_device
from .metrics import read_losses, tensor_bytes
from .pipeline_schedules import stage_layers
from .process_group import DistContext


class Stage(nn.Module):
    """One pipeline stage cut from the course's GPT; parameter names follow the GPT's."""

    def __init__(self, model: GPT, stage: int, n_stages: int):
        super().__init__()
        bb = model.backbone
        if getattr(model.config, "position", "learned") != "learned":
            raise ValueError(f"pipeline stages are cut from a GPT with learned positions; this model uses "
                             f"position={model.config.position!r}: build it with ModelConfig(position='learned')")
        if not getattr(model.config, "tie_embeddings", True):
            raise ValueError("pipeline stages share the tied output layer between the first and last stage; this "
                             "model's is untied: build it with ModelConfig(tie_embeddings=True)")
        self.first, self.last = stage == 0, stage == n_stages - 1
        self.tied_shape, self.tied_dtype = bb.tok_emb.weight.shape, bb.tok_emb.weight.dtype
        if self.first:
            self.tok_emb, self.pos_emb = bb.tok_emb, bb.pos_emb
        self.blocks = nn.ModuleDict({str(i): bb.blocks[i] for i in stage_layers(len(bb.blocks), n_stages)[stage]})
        if self.last:
            self.ln_f = bb.ln_f
            # the tied output layer's copy on the last stage
            self.head_weight = nn.Parameter(bb.tok_emb.weight.detach().clone())
        # the residual stream keeps the parameters' dtype (under autocast the blocks' bf16 outputs
        # are added to it), so that is what crosses a stage boundary
        self.activation_dtype = bb.ln_f.weight.dtype
        self.d_model = bb.ln_f.normalized_shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """First stage: ids ``(b, t)`` → hidden ``(b, t, d)``; last: hidden → logits ``(b, t, vocab)``."""
        if self.first:
            x = self.tok_emb(x) + self.pos_emb(torch.arange(x.size(1), device=x.device))
        for block in self.blocks.values():
            x = block(x)
        if self.last:
            x = self.ln_f(x) @ self.head_weight.T
        return x

    def tied_weight(self) -> nn.Parameter | None:
        return self.tok_emb.weight if self.first else (self.head_weight if self.last else None)


def pipeline_stage(model: GPT, rank: int, n_stages: int) -> Stage:
    """This rank's stage of ``model`` (the GPT's modules, shared, not copied; the tied head is a copy)."""
    return Stage(model, rank, n_stages)


@dataclass
class PipeGroup:
    """The ranks of one pipeline: this rank's stage index ``rank`` of ``size`` stages, the global rank
    of every stage (``ranks``) and their process group (None: the whole job is one pipeline)."""
    rank: int
    size: int
    ranks: list[int]
    group: dist.ProcessGroup | None
    device: torch.device

    @classmethod
    def whole_job(cls, ctx: DistContext) -> "PipeGroup":
        return cls(ctx.rank, ctx.world_size, list(range(ctx.world_size)), None, ctx.device)


def sync_tied_gradients(stage: Stage, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
    """Sum the tied embedding's gradient over its two copies (first and last stage of ``group``'s pipeline)."""
    w = stage.tied_weight()
    grad = w.grad if (w is not None and w.grad is not None) else \
        torch.zeros(stage.tied_shape, dtype=stage.tied_dtype, device=device)
    grad = grad.contiguous()
    dist.all_reduce(grad, group=group)  # middle stages contribute zeros
    if w is not None:
        w.grad = grad


def n_targets(ids: torch.Tensor) -> torch.Tensor:
    """Target tokens of a CLM batch ``(b, t)``, counted as ``clm_objective`` does (every rank can)."""
    return (ids[:, 1:] != IGNORE_INDEX).sum().float()


def summed_clm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The CLM loss summed over target tokens (what the engine's forward_backward must backpropagate)."""
    return clm_loss(logits.float(), ids) * n_targets(ids)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class ByHandSchedule:
    """Runs this stage's order of forward/backward micro-steps with point-to-point messages.

    Called by ``train_step`` as its ``forward_backward`` with the step's micro-batches (each
    ``{"input_ids": (b / m, t)}``: the first stage embeds them, the last scores them).
    Sends are asynchronous so two neighbours that both send first cannot deadlock. With
    ``timed`` each step records its compute spans and the step's window (barrier to barrier)
    for the bubble measurement. ``ctx`` is the job (one pipeline over all ranks) or a
    :class:`PipeGroup` (one of several pipelines, e.g. the pp dimension of a device mesh).
    """

    def __init__(self, stage: Stage, ctx: DistContext | PipeGroup, order_fn, *, timed: bool = False):
        self.ctx = ctx if isinstance(ctx, PipeGroup) else PipeGroup.whole_job(ctx)
        self.stage, self.order_fn, self.timed = stage, order_fn, timed
        self.bytes_sent = 0
        self.steps: list[dict] = []   # per timed step: busy seconds, window seconds, op durations

    def _clock(self) -> float:
        if self.timed:
            wait_for_device(self.ctx.device)  # on a GPU, a span ends when its kernels have run
        return time.perf_counter()

    def __call__(self, model, micro_batches, objective, *, autocast, no_sync, scaler):
        stage, ctx = self.stage, self.ctx
        micro = [b["input_ids"] for b in micro_batches]
        order = self.order_fn(len(micro), ctx.rank, ctx.size)
        prev = ctx.ranks[ctx.rank - 1] if ctx.rank > 0 else None           # global ranks of the neighbours
        nxt = ctx.ranks[ctx.rank + 1] if ctx.rank < ctx.size - 1 else None
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        pending, spans = [], []
        loss_sum = torch.zeros((), device=ctx.device)
        if self.timed:
            dist.barrier(group=ctx.group)
        window_start = self._clock()
        for op, i in order:
            if op == "F":
                if stage.first:
                    x = micro[i]
                else:
                    x = torch.empty(*micro[i].shape, stage.d_model, dtype=stage.activation_dtype, device=ctx.device)
                    dist.recv(x, src=prev)
                    x.requires_grad_(True)
                t0 = self._clock()
                with autocast_context(ctx.device, autocast):
                    y = stage(x)
                if stage.last:
                    y = summed_clm_loss(y, micro[i])
                    loss_sum = loss_sum + y.detach()
                spans.append(("F", i, t0, self._clock()))
                if not stage.last:
                    pending.append(dist.isend(y.detach().contiguous(), dst=nxt))
                    self.bytes_sent += tensor_bytes(y)
                inputs[i], outputs[i] = x, y
            else:
                grad = None
                if not stage.last:
                    grad = torch.empty_like(outputs[i])
                    dist.recv(grad, src=nxt)
                t0 = self._clock()
                outputs[i].backward(grad)
                spans.append(("B", i, t0, self._clock()))
                if not stage.first:
                    pending.append(dist.isend(inputs[i].grad.contiguous(), dst=prev))
                    self.bytes_sent += tensor_bytes(inputs[i].grad)
                del inputs[i], outputs[i]  # free the micro-batch's activations as soon as possible
        for work in pending:
            work.wait()
        if self.timed:
            dist.barrier(group=ctx.group)  # the window ends when the slowest stage is done: the same window for all
            window = self._clock() - window_start
            f = [e - s for op, _, s, e in spans if op == "F"]
            b = [e - s for op, _, s, e in spans if op == "B"]
            # spans on the machine's monotonic clock, which every process on this machine shares
            self.steps.append({"busy": sum(f) + sum(b), "window": window, "start": window_start,
                               "forward": sum(f) / len(f), "backward": sum(b) / len(b), "spans": spans})
        sync_tied_gradients(stage, ctx.device, ctx.group)
        return loss_sum, sum(n_targets(m) for m in micro).to(ctx.device)


class TorchSchedule:
    """``torch.distributed.pipelining``'s GPipe or 1F1B as the engine's ``forward_backward``."""

    def __init__(self, stage: Stage, ctx: DistContext, kind: str, n_micro: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        self.stage, self.ctx = stage, ctx
        pipe_stage = PipelineStage(stage, ctx.rank, ctx.world_size, ctx.device)
        schedule = ScheduleGPipe if kind == "gpipe" else Schedule1F1B
        # summed token losses and no 1/m rescaling: the engine divides by the target-token count
        self.schedule = schedule(pipe_stage, n_micro, loss_fn=summed_clm_loss, scale_grads=False)

    def __call__(self, model, micro_batches, objective, *, autocast, no_sync, scaler):
        ids = torch.cat([b["input_ids"] for b in micro_batches])
        losses: list[torch.Tensor] = []
        inputs = (ids,) if self.stage.first else ()                             # the first stage embeds
        scoring = {"target": ids, "losses": losses} if self.stage.last else {}   # the last one scores
        with autocast_context(self.ctx.device, autocast):
            self.schedule.step(*inputs, **scoring)
        sync_tied_gradients(self.stage, self.ctx.device)
        loss_sum = torch.stack(losses).sum().detach() if losses else torch.zeros((), device=self.ctx.device)
        return loss_sum, n_targets(ids).to(self.ctx.device)


def last_stage_losses(losses: list[torch.Tensor], src: int, device: torch.device) -> list[float]:
    """The per-step losses only the last stage computed, sent to every rank in one broadcast."""
    t = torch.stack(losses).float().to(device)
    dist.broadcast(t, src=src)
    return read_losses(list(t))


def bytes_over_ranks(sent: int, steps: int) -> tuple[float, float]:
    """(largest rank's, all ranks') bytes sent per step."""
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, sent)
    return max(per_rank) / steps, sum(per_rank) / steps


def gather_params(stage: Stage, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Every stage's weights on every rank, under the GPT's names (the head copy as ``_head_copy``)."""
    mine = {("_head_copy" if name == "head_weight" else f"backbone.{name}"): p.detach().cpu()
            for name, p in stage.named_parameters()}
    parts = [None] * ctx.world_size
    dist.all_gather_object(parts, mine)
    out = {}
    for part in parts:
        out.update(part)
    return out
