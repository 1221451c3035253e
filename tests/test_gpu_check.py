"""benchmarks/gpu_check.py's dry mode: without CUDA every step is called and reports it was skipped."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

NAMES = ["cuda_tests", "engine_bf16_compile", "fused_adamw", "fp16_gradscaler", "sdpa_kernel", "fsdp2_one_gpu",
         "gpt2_124m"]


def test_every_step_is_called_and_skipped_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    called = []

    def spy(fn):
        def wrapped():
            called.append(fn.__name__)
            return fn()
        wrapped.__name__ = fn.__name__
        return wrapped

    monkeypatch.setattr(gpu_check, "STEPS", [spy(fn) for fn in gpu_check.STEPS])
    out = tmp_path / "check.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert called == [f"step_{n}" for n in NAMES]
    assert list(report["steps"]) == NAMES
    assert all(r["status"] == "skipped: no CUDA" for r in report["steps"].values())
    assert sum(gpu_check.LIMITS_S.values()) <= 8 * 60 and set(gpu_check.LIMITS_S) == set(NAMES)


def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def step_broken():
        raise RuntimeError("loss did not fall")

    monkeypatch.setattr(gpu_check, "STEPS", [step_broken, gpu_check.step_fused_adamw])
    monkeypatch.setitem(gpu_check.LIMITS_S, "broken", 5)
    results = gpu_check.run_steps()
    assert results["broken"]["status"] == "failed: RuntimeError: loss did not fall"
    assert results["fused_adamw"]["status"].startswith("skipped") or results["fused_adamw"]["status"] == "ok"


def test_a_missing_package_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "NEEDED", [*gpu_check.NEEDED, ("no_such_module_xyz", "no-such-wheel", True)])
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "no-such-wheel" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry mode is for machines without CUDA")
def test_the_command_line_exits_0_with_pythonpath_dot(tmp_path):
    env = {**os.environ, "PYTHONPATH": "."}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "c.json")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(r["status"] == "skipped: no CUDA" for r in json.loads((tmp_path / "c.json").read_text())["steps"].values())
