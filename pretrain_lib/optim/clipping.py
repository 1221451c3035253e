"""Clipping by the global gradient norm.

All gradients are treated as one long vector g. If ‖g‖ exceeds ``max_norm`` every gradient is
multiplied by the same factor ``max_norm / ‖g‖``: the update keeps its direction and only its
length changes (clipping each tensor on its own would change the direction).

Order with mixed precision: a ``GradScaler`` multiplies the loss by S, so the gradients are
S times too large; they must be unscaled before the norm is taken, or ``max_norm`` would be
compared with S·‖g‖. The engine (``train.train_step``) calls ``scaler.unscale_`` first, then
normalises by the token count, then clips, then steps.
"""
from __future__ import annotations

from typing import Iterable

import torch


def clip_grad_norm(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients by ``min(1, max_norm / (‖g‖ + 1e-6))``; return ‖g‖ before clipping.

    ‖g‖ is the L2 norm of every gradient together (parameters whose ``.grad`` is ``None``
    are skipped: they contribute nothing and are left alone). Returns a 0-d float32 tensor
    (0 when no parameter has a gradient); no value is read on the host. The 1e-6 matches
    ``torch.nn.utils.clip_grad_norm_`` and keeps a zero gradient finite.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)  # one pass over all tensors instead of a loop
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, factor.to(grads[0].device))
    return total
