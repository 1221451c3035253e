"""μP, the maximal-update parametrisation (Yang et al., 2022, "Tensor Programs V"), for Adam.

Under the standard parametrisation (SP) every matrix starts at std 0.02 and Adam moves each of
its entries by about the learning rate per step, whatever the width. A hidden matrix of fan-in
``n`` then changes its output by ~``lr · n`` (``n`` aligned terms), so the best learning rate
shrinks as the model widens and a value tuned on a small model does not transfer. μP rescales
three things with the width ratio ``m = d_model / mup_base_width`` so that every layer's
activations *and their change per step* stay the same size as the width grows:

- hidden matrices (qkv, proj, MLP): init std = SP std · sqrt(1/m), so ∝ 1/sqrt(fan_in);
  Adam learning rate lr / m;
- embeddings (token, position), biases, norm gains: SP init, learning rate lr.

plus two multipliers in the forward pass:

- the output logits are multiplied by ``1/m``. TP V's μP table has this form for the readout:
  an output *multiplier* 1/fan-in with a constant init and a constant Adam LR, which are exactly
  the input embedding's rules, so a tied table can serve both roles (the mup package's
  ``MuSharedReadout`` does the same) and an untied one (``ModelConfig(tie_embeddings=False)``)
  gets them too. Notebook 9.5 measures that the tie costs μP's wide model: one Adam update for
  the sum of both roles' gradients is a case the derivation does not cover.
- attention scores are ``q·k · sqrt(base_head_dim) / head_dim`` instead of ``q·k / sqrt(head_dim)``:
  after training, q and k are correlated, so q·k grows like ``head_dim``, not its square root.

At ``d_model == mup_base_width`` (m = 1) every rule reduces to SP: μP is SP at the base width,
and the base width is where one tunes. ``mup_base_width = 0`` (the default) is plain SP. The
width ratio assumes ``d_ff`` and the head dimension grow in proportion to ``d_model`` (the
defaults: d_ff = 4·d_model, a fixed number of heads). Decoupled weight decay is multiplied by
each group's LR in AdamW, so the hidden matrices' decay shrinks with them, as in the mup package.
"""
from __future__ import annotations

import math

import torch.nn as nn


def width_ratio(config) -> float:
    """``m = d_model / mup_base_width`` (1.0 under SP)."""
    base = getattr(config, "mup_base_width", 0)
    return config.d_model / base if base else 1.0


def hidden_init_scale(config) -> float:
    """Factor on the SP init std of each hidden matrix: ``sqrt(1/m)``, so std ∝ 1/sqrt(fan_in)."""
    return math.sqrt(1.0 / width_ratio(config))


def hidden_lr_scale(config) -> float:
    """Factor on Adam's learning rate for the hidden matrices: ``1/m``."""
    return 1.0 / width_ratio(config)


def output_multiplier(config) -> float:
    """Factor on the output logits: ``1/m``."""
    return 1.0 / width_ratio(config)


def attention_scale(config) -> float | None:
    """Softmax scale for ``scaled_dot_product_attention``: None (its default, 1/sqrt(head_dim))
    under SP; under μP ``sqrt(base_head_dim) / head_dim``, which is 1/head_dim up to a constant
    chosen so that it equals SP's scale at the base width."""
    if not getattr(config, "mup_base_width", 0):
        return None
    return math.sqrt(config.mup_base_width / config.n_heads) / config.head_dim


def is_hidden_matrix(module_of: dict[int, nn.Module], p: nn.Parameter) -> bool:
    """A ≥2-D weight whose both dimensions grow with the width (not an embedding table, not an
    untied output layer: a module that declares ``readout = True``)."""
    module = module_of.get(id(p))
    return p.dim() >= 2 and not isinstance(module, nn.Embedding) and not getattr(module, "readout", False)


def owners(model: nn.Module) -> dict[int, nn.Module]:
    """``id(parameter) → the module that holds it`` (for :func:`is_hidden_matrix`)."""
    return {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}


def check_config(config) -> None:
    """Reject μP settings the course model does not implement (called by ``ModelConfig``)."""
    base = config.mup_base_width
    if not isinstance(base, int) or isinstance(base, bool) or base < 0:
        raise ValueError(f"ModelConfig.mup_base_width must be 0 (standard parametrisation) or a positive "
                         f"integer, got {base!r}")
    if base and config.moe_experts:
        raise ValueError("mup_base_width is implemented for the dense model only (the MoE router is a readout "
                         "whose μP multiplier is not implemented); set moe_experts=0 or mup_base_width=0")


def require_standard(config, what: str) -> None:
    """Raise when ``config`` asks for μP and ``what`` (a strategy) would silently train it as SP."""
    if getattr(config, "mup_base_width", 0):
        raise ValueError(f"{what} does not implement μP (its attention or its optimiser groups are the standard "
                         f"ones); build the model with mup_base_width=0")


def mup_param_groups(model: nn.Module, config, groups: list[dict], lr: float) -> list[dict]:
    """Split ``groups`` (``optim.param_groups``'s decay / no-decay groups) so the hidden matrices get their
    own group at ``lr · base_width / width``; every group carries its ``lr`` and ``lr_scale`` (the engine's
    schedule multiplies by it). The hidden group comes last: the engine logs group 0's LR, the nominal one."""
    scale = hidden_lr_scale(config)
    module_of = owners(model)
    kept, hidden = [], []
    for g in groups:
        rest = [p for p in g["params"] if not is_hidden_matrix(module_of, p)]
        mats = [p for p in g["params"] if is_hidden_matrix(module_of, p)]
        if rest:
            kept.append({**g, "params": rest, "lr": lr, "lr_scale": 1.0})
        if mats:
            hidden.append({**g, "params": mats, "lr": lr * scale, "lr_scale": scale})
    return kept + hidden
