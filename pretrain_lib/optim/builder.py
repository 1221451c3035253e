"""The one optimiser builder every chapter, strategy and benchmark uses.

``build_optimizer`` is the only place an optimiser is constructed: weight decay goes on the
matrices (dim ≥ 2) only, never on biases or normalisation gains, and a tied weight (the GPT's
token embedding, reused as the output projection) is counted once. On CUDA the fused AdamW
kernel is used (one launch for all parameters instead of several per tensor).

``name="muon"`` gives Muon (``torch.optim.Muon``) for the hidden 2-D matrices and AdamW for
everything else (embeddings, the output head, biases, norm gains), the split the
modded-nanogpt speed-runs use, behind one object the engine steps like any optimiser.

μP (``ModelConfig.mup_base_width > 0``, ``pretrain_lib.mup``): the builder reads the option from the
model's config and gives the hidden matrices their own AdamW group at ``lr · base_width / width``;
embeddings, biases and norm gains keep ``lr``. No flag to pass, so model and optimiser cannot disagree.

Param groups may carry ``lr_scale``: the engine's learning-rate schedule sets each group's
LR to ``schedule(step) * lr_scale`` (1 when absent), so groups with different base LRs keep
their ratio under one schedule.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from ..mup import mup_param_groups

OPTIMIZERS = ("adamw", "muon")


def _unique_trainable(params: Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices with ``weight_decay``; biases and norm gains without.

    Decaying a LayerNorm gain pulls it towards 0, which shrinks that layer's output
    whatever the data says; decaying a bias has no regularising meaning. A tied weight
    appears once (``named_parameters`` already de-duplicates shared tensors; the check
    here also covers parameter lists assembled by hand).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    named = _unique_trainable(model.named_parameters())
    if not named:
        raise ValueError("the model has no trainable parameters")
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The hidden 2-D weight matrices Muon should own.

    Left out: embedding tables (a lookup, each row updated on its own, is not a linear map
    whose singular values mean anything), and any ``nn.Linear`` that projects onto the
    vocabulary (the output head: the course GPT's untied ``OutputLayer``, or tied to the token embedding).
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    excluded: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or getattr(module, "readout", False):   # an untied output layer
            excluded.add(id(module.weight))
        elif isinstance(module, nn.Linear) and vocab is not None and module.out_features == vocab:
            excluded.add(id(module.weight))
    return [p for _, p in _unique_trainable(model.named_parameters()) if p.dim() == 2 and id(p) not in excluded]


class MuonWithAdamW:
    """Muon on some parameters and AdamW on the rest, stepped as one optimiser.

    ``param_groups`` is the concatenation of both optimisers' groups (the same dicts, so the
    engine's schedule writes each group's ``lr`` in place); ``zero_grad``, ``step``,
    ``state_dict`` and ``load_state_dict`` act on both. Each group carries ``optimizer``
    (``"muon"`` or ``"adamw"``) and ``lr_scale``.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError(f"expected a MuonWithAdamW state dict with keys 'muon' and 'adamw', got {sorted(state)}")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])

    def __repr__(self) -> str:
        n_muon = sum(len(g["params"]) for g in self.muon.param_groups)
        n_adam = sum(len(g["params"]) for g in self.adamw.param_groups)
        return f"MuonWithAdamW(muon: {n_muon} matrices, adamw: {n_adam} tensors)"


def _check_common(lr: float, betas: tuple[float, float], eps: float) -> None:
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {betas}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def build_optimizer(model: nn.Module, name: str = "adamw", *, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, fused: bool | None = None,
                    muon_lr: float = 0.02, muon_momentum: float = 0.95,
                    muon_weight_decay: float | None = None):
    """The course's optimiser: ``"adamw"`` (default) or ``"muon"``.

    ``"adamw"``: AdamW over ``param_groups(model, weight_decay)`` (under μP split further by
    ``mup.mup_param_groups``: the hidden matrices at ``lr · base_width / width``). ``fused=None`` picks the
    fused kernel when the parameters live on CUDA and the for-each implementation otherwise
    (both compute the same update).

    ``"muon"``: ``torch.optim.Muon`` (lr ``muon_lr``, momentum ``muon_momentum``, Nesterov,
    5 Newton–Schulz steps) on :func:`muon_matrices`, AdamW (lr ``lr``) on the rest. The Muon
    group's ``lr_scale`` is ``muon_lr / lr``, so a schedule that peaks at ``lr`` takes Muon to
    ``muon_lr`` at the same step. Returns a :class:`MuonWithAdamW`.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {name!r}")
    _check_common(lr, betas, eps)
    groups = param_groups(model, weight_decay)
    if fused is None:
        fused = next(iter(groups[0]["params"])).device.type == "cuda"
    config = getattr(getattr(model, "module", model), "config", None)  # DDP keeps the model in .module
    if getattr(config, "mup_base_width", 0):
        if name != "adamw":
            raise ValueError(f"μP (mup_base_width={config.mup_base_width}) scales Adam's learning rates; "
                             f"it is not implemented for {name!r}: use name='adamw'")
        groups = mup_param_groups(model, config, groups, lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused,
                                 foreach=None if fused else True)

    if not muon_lr > 0:
        raise ValueError(f"muon_lr must be positive, got {muon_lr}")
    if not 0.0 <= muon_momentum < 1.0:
        raise ValueError(f"muon_momentum must lie in [0, 1), got {muon_momentum}")
    matrices = muon_matrices(model)
    if not matrices:
        raise ValueError("the model has no hidden 2-D matrices for Muon; use name='adamw'")
    in_muon = {id(p) for p in matrices}
    adam_groups = []
    for g in groups:  # the same decay split as AdamW, minus Muon's matrices
        rest = [p for p in g["params"] if id(p) not in in_muon]
        if rest:
            adam_groups.append({**g, "params": rest, "optimizer": "adamw", "lr_scale": 1.0})
    muon_wd = weight_decay if muon_weight_decay is None else muon_weight_decay
    muon = torch.optim.Muon([{"params": matrices, "optimizer": "muon", "lr_scale": muon_lr / lr}],
                            lr=muon_lr, weight_decay=muon_wd, momentum=muon_momentum, nesterov=True)
    adamw = torch.optim.AdamW(adam_groups, lr=lr, betas=betas, eps=eps, fused=fused,
                              foreach=None if fused else True)
    return MuonWithAdamW(muon, adamw)
