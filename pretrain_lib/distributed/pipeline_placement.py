"""The source chapter's layer placement, run: block i on rank ``placement[i]`` (round-robin: i mod p).

Any placement computes the same model as one process; what changes is how often the
activations travel. Contiguous stages cross ranks p - 1 times per forward pass; round-robin
crosses between every pair of blocks, L - 1 times, while only one rank computes at a time.
:class:`PlacementPass` is the engine's ``forward_backward`` for such a placement.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..model import GPT
from ..train import train_step
from .arguments import autocast_dtype
from .metrics import StepTimer, tensor_bytes, variant_record
from .pipeline_stages import autocast_context, bytes_over_ranks, last_stage_losses, n_targets, summed_clm_loss
from .pipeline_schedules import placement_crossings
from .process_group import DistContext
from .reference import strategy_model, global_batch, strategy_optimizer


def _segments(placement: list[int]) -> list[tuple[int, list[int]]]:
    """Runs of consecutive blocks on the same rank: [(rank, [block indices]), ...]."""
    segments: list[tuple[int, list[int]]] = []
    for i, r in enumerate(placement):
        if segments and segments[-1][0] == r:
            segments[-1][1].append(i)
        else:
            segments.append((r, [i]))
    return segments


class PlacementPass:
    """One forward and backward pass of the whole batch with block i on rank ``placement[i]``
    (embeddings with block 0, final LayerNorm and output layer with the last block); the
    engine's ``forward_backward`` for the round-robin pitfall.

    Consecutive blocks on the same rank form a segment; the activation ``(b, t, d)`` is sent
    at every segment boundary forward and its gradient comes back the same way. Only one rank
    computes at a time.
    """

    def __init__(self, model: GPT, placement: list[int], ctx: DistContext):
        self.model, self.placement, self.ctx = model, placement, ctx
        self.segments = _segments(placement)
        self.bytes_sent = 0

    def __call__(self, model, micro_batches, objective, *, autocast, no_sync, scaler):
        bb, ctx = self.model.backbone, self.ctx
        ids = micro_batches[0]["input_ids"]
        b, t = ids.shape
        saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        pending = []
        loss_sum = torch.zeros((), device=ctx.device)
        last = len(self.segments) - 1
        for k, (owner, layers) in enumerate(self.segments):
            if owner != ctx.rank:
                continue
            with autocast_context(ctx.device, autocast):
                if k == 0:
                    x_in = None
                    h = bb.tok_emb(ids) + bb.pos_emb(torch.arange(t, device=ids.device))
                else:
                    x_in = torch.empty(b, t, bb.ln_f.normalized_shape[0], dtype=bb.ln_f.weight.dtype, device=ids.device)
                    dist.recv(x_in, src=self.segments[k - 1][0])
                    x_in.requires_grad_(True)
                    h = x_in
                for i in layers:
                    h = bb.blocks[i](h)
                if k == last:
                    h = summed_clm_loss(bb.ln_f(h) @ bb.tok_emb.weight.T, ids)
                    loss_sum = loss_sum + h.detach()
            if k != last:
                pending.append(dist.isend(h.detach().contiguous(), dst=self.segments[k + 1][0]))
                self.bytes_sent += tensor_bytes(h)
            saved[k] = (x_in, h)
        for k in reversed(range(len(self.segments))):
            if self.segments[k][0] != ctx.rank:
                continue
            x_in, out = saved.pop(k)
            if k == last:
                out.backward()
            else:
                grad = torch.empty_like(out)
                dist.recv(grad, src=self.segments[k + 1][0])
                out.backward(grad)
            if x_in is not None:
                pending.append(dist.isend(x_in.grad.contiguous(), dst=self.segments[k - 1][0]))
                self.bytes_sent += tensor_bytes(x_in.grad)
        for work in pending:
            work.wait()
        # the tied weight's two uses may sit on two ranks: sum their gradients (zeros elsewhere)
        w = bb.tok_emb.weight
        grad = (w.grad if w.grad is not None else torch.zeros_like(w)).contiguous()
        dist.all_reduce(grad)
        if ctx.rank in (self.placement[0], self.placement[-1]):
            w.grad = grad
        return loss_sum, n_targets(ids).to(ctx.device)


def _owned_by(name: str, placement: list[int]) -> set[int]:
    """The ranks that hold (and update) parameter ``name`` of the GPT under ``placement``."""
    if name.startswith("backbone.blocks."):
        return {placement[int(name.split(".")[2])]}
    if name.startswith("backbone.ln_f"):
        return {placement[-1]}
    if name == "backbone.tok_emb.weight":  # the embedding and the tied output layer
        return {placement[0], placement[-1]}
    return {placement[0]}


def train_placement(args, ctx: DistContext, placement: list[int]) -> dict:
    """Train with :class:`PlacementPass`: each rank computes and updates only the blocks it holds
    (the optimiser skips parameters that received no gradient)."""
    autocast = autocast_dtype(args, ctx.device)
    model = strategy_model(args, ctx.device)
    opt = strategy_optimizer(model, args)
    runner = PlacementPass(model, placement, ctx)
    timer, losses = StepTimer(ctx.device), []
    for step in range(args.steps):
        ids = global_batch(step, args).to(ctx.device)
        dist.barrier()
        with timer.measure():
            losses.append(train_step(model, [{"input_ids": ids}], None, opt, autocast=autocast,
                                     forward_backward=runner).loss)
    parts = [None] * ctx.world_size
    dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in model.named_parameters()
                                   if ctx.rank in _owned_by(k, placement)})
    params: dict[str, torch.Tensor] = {}
    copies = [part["backbone.tok_emb.weight"] for part in parts if "backbone.tok_emb.weight" in part]
    for part in parts:
        params.update(part)
    most, total = bytes_over_ranks(runner.bytes_sent, args.steps)
    return {"params": params, "n_micro": 1,
            **variant_record(losses=last_stage_losses(losses, placement[-1], ctx.device), bytes_per_step=most,
                             seconds_per_step=timer.median, bytes_per_step_all_ranks=total,
                             tied_copies_max_abs_diff=max(float((c - copies[0]).abs().max()) for c in copies),
                             bubble_measured=None, bubble_simulated=None,
                             crossings_per_forward=placement_crossings(placement))}
