"""FP8 as a CPU can show it: the two 8-bit float formats, scaling a tensor into them per tensor,
per row or per block, and the rounding error each choice leaves (chapter 9.4).

FP8 training (DeepSeek-V3; torchao's float8 recipes) stores a tensor as 8-bit floats ``q`` plus
a scale: ``x ≈ scale · q`` with ``q = fp8(x / scale)``. The scale maps the largest ``|x|`` of
its group onto the format's largest finite value, so nothing overflows and the group's
values sit as high in the format's range as they can, far from where small values flush to
zero. The smaller the group, the closer each scale fits its values. Rounding to FP8 is exact
on a CPU (torch's float8 dtypes); only the fast FP8 matrix multiply needs a GPU
(:func:`scaled_matmul`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
MANTISSA_BITS = {"e4m3": 3, "e5m2": 2}
GRANULARITIES = ("none", "tensor", "row", "block")


@dataclass(frozen=True)
class FormatInfo:
    """One FP8 format's range. ``relative_step`` is the gap between 1 and the next value
    (``2^-mantissa_bits``): a value rounds to within half of it, relatively, while it is normal."""
    name: str
    max: float
    smallest_normal: float
    smallest_subnormal: float
    relative_step: float


def format_info(name: str) -> FormatInfo:
    if name not in FORMATS:
        raise ValueError(f"FP8 format must be one of {sorted(FORMATS)}, got {name!r}")
    info = torch.finfo(FORMATS[name])
    m = MANTISSA_BITS[name]
    return FormatInfo(name, float(info.max), float(info.smallest_normal), float(info.smallest_normal) * 2.0 ** -m,
                      2.0 ** -m)


def _groups(x: torch.Tensor, granularity: str, block: int) -> torch.Tensor:
    """``x`` as ``(groups, members)``: one scale per row of the result."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    if granularity == "row":
        return rows
    if rows.shape[1] % block:
        raise ValueError(f"block scaling needs the last dimension ({rows.shape[1]}) to be a multiple of block={block}")
    return rows.reshape(-1, block)   # 1 × block tiles along each row (DeepSeek-V3's tiles for activations)


def quantize(x: torch.Tensor, fmt: str = "e4m3", granularity: str = "tensor", *, block: int = 128
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``q`` in the FP8 dtype, shaped ``(groups, members)``, and one fp32 scale
    per group, shaped ``(groups, 1)``; ``granularity`` ``"none"`` casts with scale 1 (what
    happens without scaling: large values saturate or overflow, small ones flush to zero)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    info = format_info(fmt)
    x = x.detach().float()
    if x.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    g = _groups(x, "tensor" if granularity == "none" else granularity, block)
    if granularity == "none":
        scale = torch.ones(g.shape[0], 1)
    else:
        amax = g.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, amax / info.max, torch.ones_like(amax))   # an all-zero group keeps scale 1
    return (g / scale).to(FORMATS[fmt]), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    return (q.float() * scale).reshape(shape)


def fake_quantize(x: torch.Tensor, fmt: str = "e4m3", granularity: str = "tensor", *, block: int = 128) -> torch.Tensor:
    """``x`` rounded through FP8 and back to fp32 (what an FP8 matrix multiply computes with)."""
    q, scale = quantize(x, fmt, granularity, block=block)
    return dequantize(q, scale, x.shape)


def relative_error(x: torch.Tensor, fmt: str = "e4m3", granularity: str = "tensor", *, block: int = 128) -> float:
    """``‖x − fp8(x)‖ / ‖x‖``: the share of the tensor lost to rounding (inf if anything overflowed)."""
    x = x.detach().float()
    norm = x.norm().item()
    if norm == 0:
        raise ValueError("relative error of an all-zero tensor is undefined")
    return (x - fake_quantize(x, fmt, granularity, block=block)).norm().item() / norm


def flushed_share(x: torch.Tensor, fmt: str = "e4m3", granularity: str = "tensor", *, block: int = 128) -> float:
    """Share of the non-zero entries of ``x`` that come back as exactly 0."""
    x = x.detach().float()
    nonzero = x != 0
    if not nonzero.any():
        raise ValueError("the tensor has no non-zero entry")
    back = fake_quantize(x, fmt, granularity, block=block)
    return ((back == 0) & nonzero).sum().item() / nonzero.sum().item()


def scaled_matmul(a: torch.Tensor, b: torch.Tensor, fmt: str = "e4m3") -> torch.Tensor:
    """``a @ b`` with both operands in FP8 (per-tensor scales), on a GPU's FP8 tensor cores
    (``torch._scaled_mm``: compute capability 8.9 or newer). Raises on other devices: a CPU has
    no FP8 matrix multiply, which is why the rest of this module measures rounding, not speed."""
    if a.device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("scaled_matmul needs a CUDA GPU with FP8 support (e.g. H100); this device has none")
    major, minor = torch.cuda.get_device_capability(a.device)
    if (major, minor) < (8, 9):
        raise RuntimeError(f"FP8 matrix multiplies need compute capability 8.9+, this GPU has {major}.{minor}")
    info = format_info(fmt)
    scale_a = (a.abs().amax().float() / info.max).clamp(min=torch.finfo(torch.float32).tiny)
    scale_b = (b.abs().amax().float() / info.max).clamp(min=torch.finfo(torch.float32).tiny)
    qa = (a.float() / scale_a).to(FORMATS[fmt])
    qb = (b.float() / scale_b).to(FORMATS[fmt]).t().contiguous().t()   # the second operand column-major
    return torch._scaled_mm(qa, qb, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)


def rounding_bound(fmt: str) -> float:
    """The worst relative rounding error of one normal value: half a step, ``2^-(m+1)``."""
    return format_info(fmt).relative_step / 2


__all__ = ["FORMATS", "GRANULARITIES", "FormatInfo", "dequantize", "fake_quantize", "flushed_share", "format_info",
           "quantize", "relative_error", "rounding_bound", "scaled_matmul"]
