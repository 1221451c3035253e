"""Peak FLOP/s of a device, the denominator of MFU (model FLOPs utilisation).

For datacenter GPUs the figure is the *dense* tensor-core throughput from the vendor's
datasheet (sparse figures are twice as high and no pretraining run reaches them). For the
CPU, or a GPU missing from the table, nothing is guessed: a large matrix multiply is timed
in the requested dtype and its best rate is used (cached per device and dtype for the
process). nanoGPT assumed an A100's 312 TFLOP/s on every device, which is why some of its
users saw an "MFU" above 100 % on an H100; a table per device avoids that.
"""
from __future__ import annotations

import time
import warnings

import torch

from ..utils import wait_for_device

# (substring of torch.cuda.get_device_name, dtype) -> dense FLOP/s, and where it comes from.
# fp32 means TF32 tensor cores, which pretrain_lib.utils.configure_backend turns on for CUDA.
# Checked in order: the more specific names first ("H100 NVL" before "H100").
_DATASHEETS = [
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 417e12},
     "NVIDIA H100 NVL datasheet (1,671 TFLOPS BF16 with sparsity per GPU, halved for dense)"),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12},
     "NVIDIA H100 datasheet, PCIe column (1,513 TFLOPS BF16 with sparsity, halved for dense)"),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
     "NVIDIA H200 datasheet, SXM (1,979 TFLOPS BF16 with sparsity, halved for dense)"),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
     "NVIDIA H100 datasheet, SXM column (1,979 TFLOPS BF16 with sparsity, halved for dense)"),
    ("B200", {"bf16": 2.25e15, "fp16": 2.25e15, "fp32": 1.1e15},
     "NVIDIA DGX B200 / HGX B200 datasheet (4.5 PFLOPS BF16 with sparsity per GPU, halved for dense)"),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
     "NVIDIA A100 datasheet (312 TFLOPS BF16/FP16 dense, 156 TFLOPS TF32 dense; SXM and PCIe alike)"),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12},
     "NVIDIA L40S datasheet (733 TFLOPS BF16 with sparsity, halved for dense)"),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12},
     "NVIDIA L4 datasheet (242 TFLOPS BF16 with sparsity, halved for dense)"),
]

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}
_MEASURED: dict[tuple[str, str], float] = {}


def dtype_name(dtype: torch.dtype | str | None) -> str:
    """``torch.bfloat16`` / ``"bf16"`` / ``None`` (fp32) -> ``"bf16"`` etc."""
    if isinstance(dtype, str):
        if dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be 'fp32', 'bf16' or 'fp16' (or a torch dtype), got {dtype!r}")
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"no peak FLOP/s for dtype {dtype}; use torch.float32, torch.bfloat16 or torch.float16")
    return _DTYPE_NAMES[dtype]


def datasheet_peak(device_name: str, dtype: torch.dtype | str | None = "bf16") -> tuple[float, str] | None:
    """``(flops_per_second, source)`` for a GPU name in the table, or None when it is not there."""
    name = dtype_name(dtype)
    for key, figures, source in _DATASHEETS:
        if key.lower() in device_name.lower():
            return figures[name], f"{source}; {name}"
    return None


def measure_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype | str | None = "fp32", *,
                       size: int = 1024, repeats: int = 5, cache: bool = True) -> float:
    """Best FLOP/s of a ``size × size`` matrix multiply on ``device`` (2·size³ FLOPs each).

    The best of ``repeats`` timed runs after one warm-up: an upper estimate of what this
    machine's matmul kernels reach right now, which is what MFU should be compared with on
    a CPU (no datasheet gives one number for "a laptop"). Cached per (device, dtype).
    """
    device = torch.device(device)
    name = dtype_name(dtype)
    key = (str(device), name)
    if cache and key in _MEASURED:
        return _MEASURED[key]
    if size <= 0 or repeats <= 0:
        raise ValueError(f"size and repeats must be positive, got {size}, {repeats}")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=torch_dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=torch_dtype)
    torch.mm(a, b)
    wait_for_device(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        wait_for_device(device)
        best = min(best, time.perf_counter() - start)
    flops = 2.0 * size ** 3 / best
    if cache:
        _MEASURED[key] = flops
    return flops


def peak_flops_info(device: torch.device | str, dtype: torch.dtype | str | None = "bf16") -> tuple[float, str]:
    """``(peak FLOP/s, where the figure comes from)`` for ``device`` computing in ``dtype``.

    CUDA: the datasheet table above, else a measured probe with a warning. Apple's MPS and the
    CPU: the measured probe (no datasheet gives one number for them). Never a silent default.
    """
    device = torch.device(device)
    name = dtype_name(dtype)
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        found = datasheet_peak(gpu, name)
        if found is not None:
            return found
        warnings.warn(f"{gpu!r} is not in pretrain_lib.monitor.peak's datasheet table; MFU uses a measured "
                      f"matmul peak instead. Pass peak_flops= to Monitor to use the datasheet figure.",
                      stacklevel=2)
        return measure_peak_flops(device, name, size=8192), f"measured: best {name} 8192² matmul on {gpu}"
    if device.type == "cpu":
        return measure_peak_flops(device, name), f"measured: best {name} 1024² matmul on this CPU"
    if device.type == "mps":
        return measure_peak_flops(device, name, size=4096), f"measured: best {name} 4096² matmul on this Apple GPU"
    raise ValueError(f"no peak FLOP/s known for device type {device.type!r}; pass peak_flops= explicitly")


def peak_flops(device: torch.device | str, dtype: torch.dtype | str | None = "bf16") -> float:
    """Peak dense FLOP/s of ``device`` in ``dtype`` (see :func:`peak_flops_info` for the source)."""
    return peak_flops_info(device, dtype)[0]


def mfu(flops_per_token: float, tokens_per_second: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak FLOP/s."""
    if not peak > 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak!r}")
    if flops_per_token < 0 or tokens_per_second < 0:
        raise ValueError("flops_per_token and tokens_per_second must be non-negative")
    return flops_per_token * tokens_per_second / peak
