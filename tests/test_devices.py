"""device="auto": CUDA, then Apple's MPS, then the CPU, with availability monkeypatched (no GPU needed)."""
from __future__ import annotations

import pytest
import torch

from pretrain_lib import utils
from pretrain_lib.utils import resolve_device


@pytest.fixture
def machine(monkeypatch):
    """Pretend this machine has the given accelerators."""
    monkeypatch.delenv("COURSE_DEVICE", raising=False)

    def pretend(*, cuda: bool, mps: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return pretend


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, "cuda"),   # a CUDA GPU wins over everything
    (True, False, "cuda"),
    (False, True, "mps"),   # Apple silicon without CUDA
    (False, False, "cpu"),
])
def test_auto_prefers_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device() == torch.device(expected)


def test_mps_available_follows_torch(machine):
    machine(cuda=False, mps=True)
    assert utils.mps_available() is True
    machine(cuda=False, mps=False)
    assert utils.mps_available() is False


def test_explicit_requests_are_checked(machine):
    machine(cuda=False, mps=False)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda:0")
    with pytest.raises(RuntimeError, match="MPS backend is not available"):
        resolve_device("mps")
    machine(cuda=False, mps=True)
    assert resolve_device("mps") == torch.device("mps")


def test_a_device_object_passes_through_and_bad_requests_say_what_works(machine):
    machine(cuda=False, mps=False)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda' or 'mps'"):
        resolve_device("gpu")
    with pytest.raises(TypeError, match="must be a string"):
        resolve_device(0)


def test_course_device_overrides_auto_only(machine, monkeypatch):
    machine(cuda=False, mps=True)
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert resolve_device("auto") == torch.device("cpu")  # a Mac user forcing the CPU for every notebook
    assert resolve_device("mps") == torch.device("mps")   # an explicit request still wins
    monkeypatch.setenv("COURSE_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):  # the override is checked like a request
        resolve_device("auto")


def test_wait_for_device_synchronises_the_right_accelerator(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", str(device))))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("mps", None)))
    utils.wait_for_device("cpu")
    utils.wait_for_device(torch.device("mps"))
    utils.wait_for_device("cuda:1")
    assert calls == [("mps", None), ("cuda", "cuda:1")]


def test_peak_flops_on_mps_is_measured_not_refused(monkeypatch):
    from pretrain_lib.monitor import peak
    asked = []
    monkeypatch.setattr(peak, "measure_peak_flops",
                        lambda device, name, size=1024: asked.append((str(device), name, size)) or 5e12)
    value, source = peak.peak_flops_info("mps", "bf16")
    assert (value, asked) == (5e12, [("mps", "bf16", 4096)]) and "Apple GPU" in source
    with pytest.raises(ValueError, match="no peak FLOP/s known"):
        peak.peak_flops_info("meta", "fp32")
