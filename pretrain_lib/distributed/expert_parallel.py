"""Expert parallelism (chapter 9.3): each rank holds ``E / p`` of every MoE layer's experts.

Every rank runs the whole model except the experts on its own share of the batch (data
parallelism for attention, norms, router and shared experts). In each MoE layer a rank:

1. routes its tokens (``moe.route``), sorts the kept assignments by expert and tells every rank
   how many rows it will send to each of that rank's experts (an all-to-all of ``E`` counts);
2. **dispatch**: one ``all_to_all_single`` sends each assignment's token vector to the rank that
   holds its expert (split sizes differ per rank: the counts of step 1);
3. runs its own experts on the rows it received;
4. **combine**: the reverse ``all_to_all_single`` returns each output to the token's rank, which
   adds it to the token's row weighted by its gate.

gloo (CPU) supports ``all_to_all_single`` with uneven splits (``all_to_all`` on lists too) and so
does NCCL, so the same code runs on both. The autograd rule is written here (:class:`_AllToAll`):
the gradient of an all-to-all is the all-to-all back with the split sizes swapped, so backward
moves as many bytes as forward.

Gradients (:func:`sync_expert_parallel_grads`): the replicated parameters' gradients are
all-reduced and averaged as DDP does; an expert's gradient already sums the contributions of
every rank's tokens (they came to it through the all-to-all), so it is only divided by ``p`` to
match. With ``train_step(..., dp_group=True, forward_backward=expert_parallel_forward_backward())``
a step equals one process that trains on the ranks' batches as micro-batches. Gradient clipping is
left out here: ``train_step``'s norm would see only this rank's experts.

Bytes per rank per MoE layer and micro-batch (:func:`all_to_all_bytes`): ``(E − E/p)`` counts of
8 bytes, plus ``2 (S + R) · d_model`` values, ``S`` the kept assignments this rank sends to other
ranks' experts and ``R`` those it receives (dispatch and combine forward, the same two backward).
With balanced routing ``S ≈ R ≈ T k (p − 1) / p``.

Run ``torchrun --standalone --nproc_per_node 2 -m pretrain_lib.distributed.expert_parallel``.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from ..data.synthetic import local_shard
from ..model import ModelConfig, seeded_model
from ..moe import MoEFeedForward, moe_layers
from ..optim import build_optimizer
from ..train import clm_objective, default_forward_backward, train_step
from .arguments import base_parser, check_args
from .errors import run_main
from .metrics import read_losses, write_metrics
from .process_group import setup, teardown
from .reference import ADAM_EPS, WEIGHT_DECAY, global_batch


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with autograd: rows ``send[q]`` go to rank ``q``, ``recv[q]`` come from it."""

    @staticmethod
    def forward(ctx, x, send, recv, dispatcher):
        ctx.send, ctx.recv, ctx.dispatcher = send, recv, dispatcher
        return dispatcher.exchange(x, send, recv)

    @staticmethod
    def backward(ctx, grad):
        return ctx.dispatcher.exchange(grad, ctx.recv, ctx.send), None, None, None


class ExpertParallelDispatch:
    """A layer's ``dispatch``: send assignments to their experts' ranks, run the local experts,
    send the outputs back. ``bytes_sent`` counts what this rank hands to other ranks."""

    def __init__(self, layer: MoEFeedForward, group=None):
        self.layer, self.group = layer, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.per_rank = layer.n_experts // self.world
        self.bytes_sent = 0

    def exchange(self, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=self.group)
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        self.bytes_sent += (sum(send) - send[self.rank]) * row_bytes    # the part to itself never leaves
        return out

    def __call__(self, flat: torch.Tensor, tokens: torch.Tensor, expert_ids: torch.Tensor,
                 gates: torch.Tensor) -> torch.Tensor:
        E, p, per = self.layer.n_experts, self.world, self.per_rank
        order = torch.argsort(expert_ids, stable=True)              # by expert, token order within one
        tokens, expert_ids, gates = tokens[order], expert_ids[order], gates[order]
        sent_per_expert = torch.bincount(expert_ids, minlength=E)
        from_each = self.exchange(sent_per_expert, [per] * p, [per] * p).view(p, per)  # [rank q, my expert j]
        send, recv = sent_per_expert.view(p, per).sum(1).tolist(), from_each.sum(1).tolist()
        x = _AllToAll.apply(flat[tokens], send, recv, self)          # dispatch
        local = torch.arange(per, device=flat.device).repeat(p).repeat_interleave(from_each.reshape(-1))
        y = torch.zeros_like(x)
        for j in range(per):
            rows = (local == j).nonzero().squeeze(1)
            y = y.index_add(0, rows, self.layer.experts[str(self.rank * per + j)](x[rows]))
        back = _AllToAll.apply(y, recv, send, self)                  # combine
        return torch.zeros_like(flat).index_add(0, tokens, gates[:, None] * back)


def apply_expert_parallel(model: nn.Module, group=None) -> nn.Module:
    """Keep this rank's ``E / p`` experts of every MoE layer (under their global names) and route
    through :class:`ExpertParallelDispatch`; in place, returns ``model``."""
    layers = moe_layers(model)
    if not layers:
        raise TypeError("apply_expert_parallel needs a model with MoE layers (ModelConfig.moe_experts > 0)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for layer in layers:
        if layer.n_experts % world:
            raise ValueError(f"{layer.n_experts} experts cannot be split over {world} ranks; pick a multiple of {world}")
        per = layer.n_experts // world
        mine = {str(i) for i in range(rank * per, (rank + 1) * per)}
        layer.experts = nn.ModuleDict({k: v for k, v in layer.experts.items() if k in mine})
        layer.dispatch = ExpertParallelDispatch(layer, group)
    return model


@torch.no_grad()
def sync_expert_parallel_grads(model: nn.Module, group=None) -> None:
    """Average the replicated parameters' gradients over ranks (one all-reduce); divide the
    experts' (already summed over every rank's tokens) by ``p``."""
    world = dist.get_world_size(group)
    experts = {id(p) for layer in moe_layers(model) for p in layer.experts.parameters()}
    replicated = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in experts]
    flat = torch.cat([g.reshape(-1) for g in replicated])
    dist.all_reduce(flat, group=group)
    torch._foreach_copy_(replicated, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in replicated]),
                                                                   replicated)])
    torch._foreach_div_([p.grad for p in model.parameters() if p.grad is not None], world)


def expert_parallel_forward_backward(group=None):
    """``train_step``'s ``forward_backward``: the engine's micro-batch loop, then the gradient sync."""
    def forward_backward(model, micro_batches, objective, **kwargs):
        result = default_forward_backward(model, micro_batches, objective, **kwargs)
        sync_expert_parallel_grads(model, group)
        return result
    return forward_backward


def all_to_all_bytes(*, sent: int, received: int, d_model: int, n_experts: int, world: int,
                     value_bytes: int = 4) -> int:
    """Bytes one rank sends in one MoE layer's forward and backward (see the module doc)."""
    return 8 * (n_experts - n_experts // world) + 2 * (sent + received) * d_model * value_bytes


# ----------------------------------------------------------------------------- the torchrun check

def _config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                       max_seq_len=args.seq_len, moe_experts=args.experts, moe_top_k=args.top_k,
                       moe_capacity_factor=args.capacity_factor, moe_shared_experts=args.shared,
                       moe_aux_loss_coef=args.aux_coef, moe_bias_rate=args.bias_rate)


def _max_diff(mine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    d = torch.tensor(max(float((v.float() - ref[k].float()).abs().max()) for k, v in mine.items()))
    dist.all_reduce(d, op=dist.ReduceOp.MAX)           # each rank compares its own experts
    return float(d)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Expert parallelism with all-to-all dispatch and combine, against one process.")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--shared", type=int, default=1)
    parser.add_argument("--aux-coef", type=float, default=0.01)
    parser.add_argument("--bias-rate", type=float, default=1e-3)
    args = parser.parse_args(argv)
    ctx = setup(args.init_timeout)
    check_args(args, ctx.world_size)
    rank, world, config = ctx.rank, ctx.world_size, _config(args)

    # one process: the ranks' shards as micro-batches of one step; record every micro-batch's routing
    ref = seeded_model(config, args.seed).to(ctx.device)
    ref_opt = build_optimizer(ref, lr=args.lr, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS)
    routings: list[list] = []

    def recording(model, batch):
        out = clm_objective(model, batch)
        routings.append([layer.last_routing for layer in moe_layers(model)])
        return out

    ep = apply_expert_parallel(seeded_model(config, args.seed).to(ctx.device))
    with torch.no_grad():   # eval mode: this check's tokens must not count toward the bias step's load
        shard0 = local_shard(global_batch(0, args), rank, world).to(ctx.device)
        logits_diff = float((ep.eval()(shard0) - ref.eval()(shard0)).abs().max())
    ep.train(), ref.train()
    ep_opt = build_optimizer(ep, lr=args.lr, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS)
    forward_backward = expert_parallel_forward_backward()
    ref_losses, ep_losses, measured, predicted = [], [], [], []
    for step in range(args.steps):
        batch = global_batch(step, args).to(ctx.device)
        routings.clear()
        ref_losses.append(train_step(ref, [{"input_ids": local_shard(batch, q, world)} for q in range(world)],
                                     recording, ref_opt).loss)
        before = sum(layer.dispatch.bytes_sent for layer in moe_layers(ep))
        ep_losses.append(train_step(ep, [{"input_ids": local_shard(batch, rank, world)}], clm_objective, ep_opt,
                                    dp_group=True, forward_backward=forward_backward).loss)
        measured.append(sum(layer.dispatch.bytes_sent for layer in moe_layers(ep)) - before)
        owner = lambda r: r.experts[r.keep] // (config.moe_experts // world)   # noqa: E731
        predicted.append(sum(all_to_all_bytes(
            sent=int((owner(routings[rank][i]) != rank).sum()),
            received=sum(int((owner(routings[q][i]) == rank).sum()) for q in range(world) if q != rank),
            d_model=config.d_model, n_experts=config.moe_experts, world=world) for i in range(config.n_layers)))
        if step == 0:
            grads = {k: p.grad for k, p in ep.named_parameters()}
            grad_diff = _max_diff(grads, {k: p.grad for k, p in ref.named_parameters()})
    weight_diff = _max_diff(ep.state_dict(), ref.state_dict())       # the router biases included
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"measured": measured, "predicted": predicted})
    tokens = args.batch // world * args.seq_len
    uniform = all_to_all_bytes(sent=round(tokens * args.top_k * (world - 1) / world),
                               received=round(tokens * args.top_k * (world - 1) / world), d_model=args.d_model,
                               n_experts=args.experts, world=world) * args.n_layers
    metrics = {"strategy": "expert_parallel", "world_size": world, "backend": ctx.backend, "dtype": "fp32",
               "tolerance": 1e-5, "n_experts": args.experts, "experts_per_rank": args.experts // world,
               "logits_max_abs_diff": max(_gather_max(logits_diff), 0.0), "grad_max_abs_diff": grad_diff,
               "max_abs_diff_vs_single": weight_diff, "reference_losses": read_losses(ref_losses),
               "losses": read_losses(ep_losses), "bytes_per_step": per_rank,
               "uniform_routing_bytes_per_step": uniform,
               "router_bias": [layer.bias.tolist() for layer in moe_layers(ep)]}
    if ctx.is_main:
        write_metrics(args.out, metrics)
    teardown()


def _gather_max(value: float) -> float:
    t = torch.tensor(value)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


if __name__ == "__main__":
    run_main(main)
