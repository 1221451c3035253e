"""Mixture of experts: a top-k routed feed-forward layer, the ``ModelConfig`` option ``moe_experts > 0``.

Each token's feed-forward output is a weighted sum over ``k`` of ``E`` expert MLPs, chosen per
token by a linear *router* (Shazeer et al., 2017; GShard, Lepikhin et al., 2020; Switch, Fedus
et al., 2021): the model holds ``E`` MLPs' parameters but each token pays for ``k`` of them.
Read top to bottom:

1. :func:`route`: router probabilities ``P = softmax(x W_r)`` ``(tokens, E)``; the ``k`` experts
   with the largest ``P + bias`` are chosen (the bias steers the choice only, DeepSeek-V3); the
   gates are the chosen probabilities, renormalised over the ``k`` when ``k > 1`` (Mixtral,
   DeepSeek-V3), the raw probability when ``k = 1`` (Switch: so the router still gets a gradient).
2. Capacity: with ``capacity_factor = c > 0`` each expert takes at most ``C = ceil(c · T · k / E)``
   of the ``T · k`` assignments of a forward pass; first choices of all tokens (in token order)
   come before second choices (GShard's priority). A *dropped* assignment contributes nothing;
   the residual connection carries that token on. ``c = 0`` keeps every assignment.
3. :func:`balance_loss`: the Switch/GShard auxiliary loss ``E · Σ_i f_i · P̄_i`` (``f_i``: share of
   assignments sent to expert ``i``, ``P̄_i``: mean router probability of ``i``): 1 for a uniform
   router, ``E`` for total collapse onto one expert. It is added to the training loss times
   ``aux_loss_coef`` through the model's ``auxiliary_loss()`` hook, which the engine's
   ``default_forward_backward`` calls after each micro-batch's objective.
4. Auxiliary-loss-free balancing (DeepSeek-V3, Wang et al., 2024): after each optimiser step,
   ``bias_i += bias_rate · sign(mean load − load_i)`` (the engine calls the model's
   ``after_optimizer_step`` hook): an overloaded expert becomes less likely to be chosen.
5. Shared experts (DeepSeek-MoE): ``n_shared`` MLPs every token goes through, added to the routed sum.

Per-layer monitoring (tensors, no host read): ``layer.load`` (assignments per expert in the last
forward, before capacity) and ``layer.dropped`` (assignments dropped by capacity); :func:`expert_load`
stacks the load shares of every layer. ``layer.dispatch`` is None in one process; expert
parallelism (``distributed/expert_parallel.py``) replaces it with an all-to-all over ranks.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class Routing(NamedTuple):
    """One forward's routing of ``T`` tokens: all ``(T, k)`` except ``probs`` ``(T, E)``."""
    probs: torch.Tensor      # softmax of the router logits (no bias)
    experts: torch.Tensor    # chosen expert ids (long), best first
    gates: torch.Tensor      # weight of each chosen expert's output
    keep: torch.Tensor       # bool: False where capacity dropped the assignment


def route(logits: torch.Tensor, top_k: int, *, bias: torch.Tensor | None = None,
          capacity_factor: float = 0.0) -> Routing:
    """Top-k routing of ``logits`` ``(T, E)`` (see the module doc, steps 1 and 2)."""
    T, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must lie in [1, n_experts={E}], got {top_k}")
    probs = logits.float().softmax(dim=-1)
    scores = probs if bias is None else probs + bias          # the bias chooses, it never weighs
    experts = scores.topk(top_k, dim=-1).indices
    gates = probs.gather(1, experts)
    if top_k > 1:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    keep = torch.ones_like(experts, dtype=torch.bool)
    if capacity_factor > 0:
        capacity = math.ceil(capacity_factor * T * top_k / E)
        slot_major = experts.t().reshape(-1)                  # all first choices, then all second choices
        one_hot = F.one_hot(slot_major, E)
        position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # this assignment's place in its expert's queue
        keep = (position < capacity).view(top_k, T).t()
    return Routing(probs, experts, gates.to(logits.dtype), keep)


def capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int | None:
    """Assignments each expert takes in a forward of ``n_tokens``: ``ceil(c · T · k / E)``, None when unlimited."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts) if capacity_factor > 0 else None


def balance_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load-balancing loss ``E · Σ_i f_i · P̄_i`` from ``probs`` ``(T, E)`` and the
    chosen ``experts`` ``(T, k)``. ``f`` is a count (no gradient); the gradient reaches the router
    through ``P̄``, pushing probability away from the experts that received the most tokens."""
    E = probs.size(1)
    f = torch.bincount(experts.reshape(-1), minlength=E).float() / experts.numel()
    return E * (f * probs.float().mean(dim=0)).sum()


class MoEFeedForward(nn.Module):
    """The routed feed-forward layer of a block: ``(batch, seq, d_model)`` → the same shape.

    ``make_expert()`` builds one expert (the block's MLP kind at ``d_ff``); ``n_shared`` more are
    shared by every token. Expert ``i`` is ``experts[str(i)]`` (a ``ModuleDict``, so a rank that
    holds some experts under expert parallelism keeps their names)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, make_expert: Callable[[], nn.Module], *,
                 capacity_factor: float = 0.0, n_shared: int = 0, aux_loss_coef: float = 0.0,
                 bias_rate: float = 0.0):
        super().__init__()
        if n_experts < 2 or not 1 <= top_k <= n_experts:
            raise ValueError(f"an MoE layer needs n_experts >= 2 and 1 <= top_k <= n_experts, "
                             f"got n_experts={n_experts}, top_k={top_k}")
        if capacity_factor < 0 or aux_loss_coef < 0 or bias_rate < 0 or n_shared < 0:
            raise ValueError("capacity_factor, aux_loss_coef, bias_rate and n_shared must be >= 0")
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.aux_loss_coef, self.bias_rate = aux_loss_coef, bias_rate
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleDict({str(i): make_expert() for i in range(n_experts)})
        self.shared = nn.ModuleList(make_expert() for _ in range(n_shared))
        self.register_buffer("bias", torch.zeros(n_experts))                          # saved: resumes exactly
        self.register_buffer("load", torch.zeros(n_experts), persistent=False)        # last forward
        self.register_buffer("step_load", torch.zeros(n_experts), persistent=False)   # since the last step
        self.register_buffer("dropped", torch.zeros((), dtype=torch.long), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.last_routing: Routing | None = None
        self.dispatch: Callable | None = None   # expert parallelism's all-to-all (None: one process)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        r = route(self.router(flat), self.top_k, bias=self.bias if self.bias_rate > 0 else None,
                  capacity_factor=self.capacity_factor)
        self.last_routing = r
        with torch.no_grad():
            self.load = torch.bincount(r.experts.reshape(-1), minlength=self.n_experts).float()
            self.dropped = (~r.keep).sum()
            if self.training:
                self.step_load += self.load
        self.aux_loss = balance_loss(r.probs, r.experts) * self.aux_loss_coef if self.aux_loss_coef > 0 else None
        tokens, slots = r.keep.nonzero(as_tuple=True)          # the kept assignments, in token order
        expert_ids = r.experts[tokens, slots]
        gates = r.gates[tokens, slots]
        run = self.dispatch or self.run_experts
        out = run(flat, tokens, expert_ids, gates)
        for shared in self.shared:
            out = out + shared(flat)
        return out.view(shape)

    def run_experts(self, flat: torch.Tensor, tokens: torch.Tensor, expert_ids: torch.Tensor,
                    gates: torch.Tensor) -> torch.Tensor:
        """One process: each expert runs on the tokens assigned to it; outputs are added back
        at their tokens, weighted by their gates."""
        out = torch.zeros_like(flat)
        for name, expert in self.experts.items():
            mine = expert_ids == int(name)
            out = out.index_add(0, tokens[mine], gates[mine, None] * expert(flat[tokens[mine]]))
        return out

    @torch.no_grad()
    def update_bias(self, all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """DeepSeek-V3's step: ``bias_i += rate · sign(mean load − load_i)`` over the step's load
        (summed over data-parallel ranks by ``all_reduce`` when given), then the count restarts."""
        if self.bias_rate > 0:
            load = self.step_load.clone()
            if all_reduce is not None:
                all_reduce(load)
            self.bias += self.bias_rate * torch.sign(load.mean() - load)
        self.step_load.zero_()


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the MoE layers' weighted balancing losses from the last forward, or None."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def expert_load(model: nn.Module) -> torch.Tensor:
    """``(n_moe_layers, E)``: each layer's share of the last forward's assignments per expert."""
    loads = [m.load / m.load.sum().clamp(min=1) for m in moe_layers(model)]
    if not loads:
        raise ValueError("this model has no MoE layer (set ModelConfig.moe_experts)")
    return torch.stack(loads)


def inactive_expert_params(model: nn.Module) -> int:
    """Parameters a token skips: the ``E − k`` routed experts it is not sent to, in each MoE layer
    (0 for a dense model). The model's total less this is its *active* parameter count."""
    n = 0
    for m in moe_layers(model):
        per_expert = sum(p.numel() for p in next(iter(m.experts.values())).parameters())
        n += (m.n_experts - m.top_k) * per_expert
    return n
