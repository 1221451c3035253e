"""The architecture options of today's speed-runs, each a ``ModelConfig`` switch, off by default.

- ``norm="rmsnorm"``: RMSNorm (Zhang & Sennrich, 2019) instead of LayerNorm: no mean
  subtraction, no bias, ``x / sqrt(mean(x²) + eps) * g``.
- ``mlp="swiglu"``: the gated MLP of Shazeer (2020), ``down(silu(gate(x)) * up(x))``;
  ``mlp="relu2"``: the squared-ReLU MLP of So et al. (2021), ``down(relu(up(x))²)``.
- ``position="rope"``: rotary position embeddings (Su et al., 2021) rotate each query/key
  pair of channels by an angle proportional to the position, so the score ``q_m · k_n``
  depends on ``m - n`` only; the learned position table goes away.
- ``qk_norm=True``: RMS-normalise queries and keys per head before the dot product
  (Dehghani et al., 2023), which bounds the attention logits.

``prefix_attention_mask`` builds the prefix-LM mask (bidirectional over a prefix, causal after).
Shapes: ``x`` is ``(batch, seq, d_model)``; ``q``/``k`` are ``(batch, heads, seq, head_dim)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
POSITIONS = ("learned", "rope")


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x², last dim) + eps) * weight``, computed in float32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:   # used when a model built on the meta device gets its storage
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return RMSNorm(dim)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")


def swiglu_hidden(d_model: int) -> int:
    """A SwiGLU width with the parameters of a 4·d GELU MLP: 3 · d · h ≈ 2 · d · 4d → h = 8d/3,
    rounded up to a multiple of 8 (as LLaMA does, for tidy matrix shapes)."""
    return 8 * -(-(8 * d_model) // 24)


class GatedMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``; three matrices instead of two."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff)
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ReLU2MLP(nn.Module):
    """``down(relu(up(x))²)``: the same two matrices as the GELU MLP, a cheaper, sparser activation."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())


def rope_tables(seq_len: int, head_dim: int, *, base: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles ``m · θ_i`` with ``θ_i = base^(-2i/head_dim)``: each ``(seq, head_dim/2)``."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings rotate pairs of channels: head_dim must be even, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(x[2i], x[2i+1])`` of ``x`` ``(batch, heads, seq, head_dim)`` by the
    angle at their position: ``(a, b) → (a cos − b sin, a sin + b cos)``."""
    a, b = x.float()[..., 0::2], x.float()[..., 1::2]
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def prefix_attention_mask(seq_len: int, prefix_len: torch.Tensor) -> torch.Tensor:
    """``(batch, 1, seq, seq)`` bool, True where query ``i`` may attend key ``j``: ``j ≤ i``
    (causal) or ``j < prefix_len[b]`` (every query sees the whole prefix, so the prefix is
    encoded bidirectionally while the rest is still predicted left to right)."""
    if prefix_len.dim() != 1:
        raise ValueError(f"prefix_len must be (batch,), got shape {tuple(prefix_len.shape)}")
    pos = torch.arange(seq_len, device=prefix_len.device)
    causal = pos[None, :] <= pos[:, None]                      # (seq_q, seq_k)
    in_prefix = pos[None, :] < prefix_len[:, None]             # (batch, seq_k)
    return (causal[None] | in_prefix[:, None, :])[:, None]
