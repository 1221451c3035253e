"""Small helpers every chapter uses: device choice, seeding, and where figures go."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def mps_available() -> bool:
    """True when Apple's Metal backend (MPS) can run tensors here (Apple silicon, a torch built with it)."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a device request into a ``torch.device``.

    ``"auto"`` picks CUDA when a GPU is visible, else Apple's MPS, else the CPU; the environment
    variable ``COURSE_DEVICE`` (e.g. ``cpu``) overrides that choice for every notebook at once.
    Anything else is passed to ``torch.device`` after checking that a CUDA or MPS request can be
    honoured. MPS runs fp32 matrix products and reductions with its own kernels and in its own
    order, and has no float64, so its results are not the CPU's bit for bit: the course checks
    that compare two computations at rounding level are set for the CPU and CUDA
    (``docs/running.md``, "Apple silicon"; ``COURSE_DEVICE=cpu`` is the way round).
    """
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'auto', 'cpu', 'cuda' or 'mps', got {type(device).__name__}")
    if device == "auto":
        override = os.environ.get("COURSE_DEVICE", "").strip()
        if override and override != "auto":
            return resolve_device(override)
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device={device!r} is not a device torch knows ({exc}); use 'auto', 'cpu', 'cuda' "
                         "or 'mps'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was requested but no CUDA GPU is visible; use device='auto' or 'cpu'")
    if resolved.type == "mps" and not mps_available():
        raise RuntimeError(f"device={device!r} was requested but Apple's MPS backend is not available here "
                           "(it needs Apple silicon and a torch built with MPS); use device='auto' or 'cpu'")
    return resolved


def wait_for_device(device: torch.device | str) -> None:
    """Wait for the work queued on an accelerator (CUDA, MPS) so a timer measures it; a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) and return a CPU generator seeded the same way.

    Course code prefers an explicit generator; seeding the global state as well makes
    module initialisation (``nn.Linear`` weights) reproducible.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def configure_backend(device: torch.device) -> None:
    """Process-wide settings that make a GPU fast without changing results meaningfully.

    On CUDA: TF32 for fp32 matrix multiplies and convolutions (10 mantissa bits instead of
    23 inside the tensor cores, the default of every large training codebase). On the CPU
    nothing changes. Safe to call more than once.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def is_headless() -> bool:
    """True when a notebook runs without a person watching (papermill in ``make run``, tests, CI).

    The runner sets ``COURSE_HEADLESS=1``; CI sets ``CI=true``. Widgets then fall back to
    static figures.
    """
    return os.environ.get("COURSE_HEADLESS", "") not in ("", "0") or os.environ.get("CI", "") == "true"


def figure_dir() -> Path:
    """Folder where notebooks save their figures (``COURSE_FIGURE_DIR`` or ``build/figures``)."""
    path = Path(os.environ.get("COURSE_FIGURE_DIR", REPO_ROOT / "build" / "figures"))
    path.mkdir(parents=True, exist_ok=True)
    return path


class FigureFile(type(Path())):
    """A saved figure's path. A notebook cell that ends with ``save_figure(...)`` displays this
    object, so its repr names the file only, never the machine's folders."""

    def __repr__(self) -> str:
        return f"<figure {self.name}>"


def save_figure(fig, name: str) -> FigureFile:
    """Write ``fig`` as ``<figure_dir>/<name>.png`` and return the path; the notebook still shows it."""
    if not name or "/" in name or "\\" in name:
        raise ValueError(f"figure name must be a plain file stem, got {name!r}")
    path = FigureFile(figure_dir() / f"{name}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def show_figure(fig, name: str) -> FigureFile:
    """Save ``fig`` (a headless run draws nothing on screen, so the file is what a reader sees), display it
    once in the notebook, and close it so the inline backend does not draw it a second time."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    path = save_figure(fig, name)
    display(fig)
    plt.close(fig)
    return path
