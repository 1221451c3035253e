"""The GPU check: every CUDA path of the course, run once on a lent GPU, figures in one JSON.

Meant for a machine where a recent PyTorch with CUDA is already installed and nothing can be
downloaded: no virtual environment, run from a checkout with ``PYTHONPATH=.``::

    PYTHONPATH=. python benchmarks/gpu_check.py --out build/gpu_check.json

It first checks the project's other packages that these steps import (``NEEDED`` below; carry
them as wheels and ``pip install --no-index --find-links wheels/ NAME``) and names any that is
missing. Then, each step bounded by its own time limit (7 minutes in all at most, ``LIMITS_S``):

1. ``cuda_tests``: the test suite's CUDA tests (``pytest -k cuda``: bf16 + compile through the
   engine, pinned loader batches, DDP with NCCL on one GPU, the device choice);
2. ``engine_bf16_compile``: the engine in bf16 with ``torch.compile``: the loss falls, and the
   graph breaks that ``torch._dynamo`` counted (``utils.counters["graph_break"]``, and
   ``torch._dynamo.explain`` on the forward) are reported;
3. ``fused_adamw``: ``build_optimizer`` picks the fused AdamW on CUDA and one of its steps equals
   the for-each implementation's;
4. ``fp16_gradscaler``: fp16 through the engine (its GradScaler), loss falls, scale reported;
5. ``sdpa_kernel``: which kernel ``scaled_dot_product_attention`` dispatches to for the course
   GPT's causal attention (flash / memory-efficient / cuDNN / math), each backend timed alone;
6. ``fsdp2_one_gpu``: FSDP2 (``apply_fsdp``) on one GPU with NCCL equals the unsharded model;
7. ``gpt2_124m``: GPT-2 small's shape on synthetic tokens, bf16 + compile + fused AdamW, 50 steps
   timed after warm-up: tokens/s, MFU against ``monitor.peak``'s datasheet peak, peak memory.

Without CUDA every step is still called and reports ``"skipped: no CUDA"``; the script exits 0
(``tests/test_gpu_check.py`` runs this dry mode). With CUDA it exits 1 if a step failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Packages outside torch that the steps import: (import name, pip name, pure Python?).
NEEDED = [("numpy", "numpy", False), ("tqdm", "tqdm", True), ("pytest", "pytest", True),
          ("pluggy", "pluggy", True), ("iniconfig", "iniconfig", True), ("packaging", "packaging", True),
          ("tokenizers", "tokenizers", False), ("psutil", "psutil", False)]
GPT2_STEPS, GPT2_WARMUP = 50, 10
LIMITS_S = {"cuda_tests": 150, "engine_bf16_compile": 60, "fused_adamw": 20, "fp16_gradscaler": 30,
            "sdpa_kernel": 20, "fsdp2_one_gpu": 30, "gpt2_124m": 120}


class Skipped(Exception):
    """A step that cannot run here; its message is the reason."""


class StepTimeout(Exception):
    pass


def missing_packages() -> list[str]:
    return [pip for name, pip, _ in NEEDED if importlib.util.find_spec(name) is None]


def _need_cuda():
    import torch
    if not torch.cuda.is_available():
        raise Skipped("no CUDA")
    return torch.device("cuda", 0)


def _tiny_gpt(vocab: int = 256, d: int = 256, heads: int = 4, layers: int = 4, seq: int = 256, seed: int = 0):
    from pretrain_lib.model import ModelConfig, seeded_model
    return seeded_model(ModelConfig(vocab_size=vocab, d_model=d, n_heads=heads, n_layers=layers, max_seq_len=seq),
                        seed)


def _patterned_batches(device, vocab: int = 256, batch: int = 16, seq: int = 256, pool: int = 8):
    """Learnable synthetic data: each row counts upwards by a row-specific stride (mod vocab)."""
    import torch
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(pool):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        stride = torch.randint(1, 4, (batch, 1), generator=g)
        rows.append(((start + stride * torch.arange(seq)) % vocab).to(device))
    return lambda i: {"input_ids": rows[i % pool]}


def step_cuda_tests() -> dict:
    _need_cuda()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests/test_engine.py",
           "tests/test_data_pipeline.py", "tests/test_distributed.py", "tests/test_devices.py"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LIMITS_S["cuda_tests"] - 5)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0:
        raise RuntimeError(f"CUDA tests failed ({summary}):\n{done.stdout[-3000:]}{done.stderr[-1000:]}")
    return {"summary": summary, "command": " ".join(cmd[1:])}


def step_engine_bf16_compile() -> dict:
    device = _need_cuda()
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters
    from pretrain_lib.train import clm_objective, train
    torch._dynamo.reset()
    counters.clear()
    model, batches = _tiny_gpt(), _patterned_batches(device)
    start = time.perf_counter()
    history = train(model, batches, clm_objective, steps=60, lr=3e-3, dtype="bf16", compile=True, device="cuda",
                    log_every=10, progress=False)
    seconds = time.perf_counter() - start
    breaks = sum(counters["graph_break"].values())
    explained = torch._dynamo.explain(model)(batches(0)["input_ids"])
    out = {"loss_first": history.losses[0], "loss_last": history.losses[-1], "seconds_incl_compile": seconds,
           "graph_breaks_counted": breaks, "graph_break_reasons": sorted(counters["graph_break"]),
           "explain_graph_breaks": explained.graph_break_count, "explain_graphs": explained.graph_count}
    if not history.losses[-1] < 0.5 * history.losses[0]:
        raise RuntimeError(f"bf16 + compile: the loss did not halve ({out})")
    return out


def step_fused_adamw() -> dict:
    device = _need_cuda()
    import torch
    from pretrain_lib.optim import build_optimizer
    from pretrain_lib.train import clm_objective, train_step
    batches = _patterned_batches(device)
    after = {}
    for fused in (None, False):    # None: build_optimizer's choice on CUDA (fused); False: for-each
        model = _tiny_gpt().to(device)
        opt = build_optimizer(model, lr=1e-3, fused=fused)
        if fused is None and not opt.param_groups[0].get("fused"):
            raise RuntimeError("build_optimizer did not pick the fused AdamW on CUDA")
        torch.backends.cuda.matmul.allow_tf32 = False    # compare the optimisers, not TF32 rounding
        for i in range(3):
            train_step(model, [batches(i)], clm_objective, opt, grad_clip=1.0)
        after[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
    diff = (after[None] - after[False]).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"fused AdamW differs from for-each by {diff:.2e} after 3 steps")
    return {"fused_picked": True, "max_abs_diff_vs_foreach_3_steps": diff}


def step_fp16_gradscaler() -> dict:
    device = _need_cuda()
    import torch
    from pretrain_lib.optim import build_optimizer
    from pretrain_lib.train import clm_objective, train, train_step
    batches = _patterned_batches(device)
    history = train(_tiny_gpt(), batches, clm_objective, steps=40, lr=3e-3, dtype="fp16", compile=False,
                    device="cuda",
                    log_every=10, progress=False)
    model = _tiny_gpt().to(device)   # the scaler the engine builds, driven directly to read its scale
    opt, scaler = build_optimizer(model, lr=1e-3), torch.amp.GradScaler("cuda")
    for i in range(5):
        train_step(model, [batches(i)], clm_objective, opt, grad_clip=1.0, autocast=torch.float16, scaler=scaler)
    out = {"loss_first": history.losses[0], "loss_last": history.losses[-1],
           "skipped_steps": history.skipped_steps, "scale_after_5_steps": scaler.get_scale()}
    if not history.losses[-1] < 0.5 * history.losses[0]:
        raise RuntimeError(f"fp16 + GradScaler: the loss did not halve ({out})")
    return out


def step_sdpa_kernel() -> dict:
    device = _need_cuda()
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    q, k, v = (torch.randn(8, 12, 1024, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    timings = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(10):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True)
                torch.cuda.synchronize()
            timings[backend.name] = 1000 * (time.perf_counter() - start) / 10
        except RuntimeError as exc:
            timings[backend.name] = f"unavailable: {str(exc).splitlines()[0][:120]}"
    model = _tiny_gpt(d=768, heads=12, layers=1, seq=1024).to(device)   # the course's attention at GPT-2's heads
    ids = torch.randint(0, 256, (8, 1024), device=device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.autocast("cuda", dtype=torch.bfloat16):
        model(ids).sum().backward()
    names = sorted({e.key for e in prof.key_averages()})
    attention = [n for n in names if any(s in n.lower() for s in ("flash", "efficient", "fmha", "cudnn", "attention"))]
    kind = ("flash" if any("flash" in n.lower() for n in attention) else
            "memory-efficient" if any("efficient" in n.lower() or "fmha" in n.lower() for n in attention) else
            "cudnn" if any("cudnn" in n.lower() for n in attention) else "math (no fused kernel)")
    return {"ms_per_call_by_backend_8x12x1024x64_bf16": timings, "course_gpt_kernel": kind,
            "course_gpt_attention_kernels": attention[:8]}


def step_fsdp2_one_gpu() -> dict:
    device = _need_cuda()
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from pretrain_lib.distributed.strategies import apply_fsdp
    from pretrain_lib.optim import build_optimizer
    from pretrain_lib.train import clm_objective, train_step
    torch.backends.cuda.matmul.allow_tf32 = False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    try:
        batches, losses = _patterned_batches(device), {}
        for sharded in (False, True):
            model = _tiny_gpt().to(device)
            if sharded:
                apply_fsdp(model, init_device_mesh("cuda", (1,)))
            opt = build_optimizer(model, lr=1e-3, fused=False)
            losses[sharded] = [train_step(model, [batches(i)], clm_objective, opt, grad_clip=1.0).loss.item()
                               for i in range(10)]
    finally:
        dist.destroy_process_group()
    diff = max(abs(a - b) for a, b in zip(losses[True], losses[False]))
    if diff > 1e-4:
        raise RuntimeError(f"FSDP2 on one GPU differs from the plain model by {diff:.2e} in loss over 10 steps")
    return {"max_abs_loss_diff_vs_unsharded_10_steps": diff, "loss_last": losses[True][-1]}


def step_gpt2_124m() -> dict:
    device = _need_cuda()
    import torch
    from pretrain_lib.model import ModelConfig, seeded_model
    from pretrain_lib.monitor.peak import peak_flops_info
    from pretrain_lib.train import clm_objective, train
    batch, seq, vocab = 16, 1024, 50257
    model = seeded_model(ModelConfig(vocab_size=vocab, d_model=768, n_heads=12, n_layers=12, max_seq_len=seq), 0)
    g = torch.Generator().manual_seed(0)
    pool = [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(4)]
    marks = {}

    class Clock:
        def on_step(self, state):
            if state.step in (GPT2_WARMUP, GPT2_WARMUP + GPT2_STEPS):
                torch.cuda.synchronize()
                marks[state.step] = time.perf_counter()
                if state.step == GPT2_WARMUP:
                    torch.cuda.reset_peak_memory_stats()

    history = train(model, lambda i: {"input_ids": pool[i % 4]}, clm_objective, steps=GPT2_WARMUP + GPT2_STEPS,
                    lr=6e-4, dtype="bf16", compile=True, device="cuda", log_every=GPT2_STEPS + GPT2_WARMUP,
                    callbacks=[Clock()], progress=False)
    seconds = marks[GPT2_WARMUP + GPT2_STEPS] - marks[GPT2_WARMUP]
    tokens_per_s = GPT2_STEPS * batch * seq / seconds
    peak, source = peak_flops_info(device, "bf16")
    flops_per_token = model.flops_per_token(seq)
    return {"gpu": torch.cuda.get_device_name(device), "params": sum(p.numel() for p in model.parameters()),
            "batch_tokens": batch * seq, "timed_steps": GPT2_STEPS, "warmup_steps": GPT2_WARMUP,
            "ms_per_step": 1000 * seconds / GPT2_STEPS, "tokens_per_s": tokens_per_s,
            "flops_per_token": flops_per_token, "peak_flops": peak, "peak_source": source,
            "mfu": flops_per_token * tokens_per_s / peak, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss_last": history.losses[-1]}


STEPS = [step_cuda_tests, step_engine_bf16_compile, step_fused_adamw, step_fp16_gradscaler, step_sdpa_kernel,
         step_fsdp2_one_gpu, step_gpt2_124m]


def _alarm(signum, frame):
    raise StepTimeout()


def run_steps() -> dict:
    """Call every step in order; each reports ``ok`` with its figures, ``skipped: why`` or ``failed: why``."""
    results = {}
    for fn in STEPS:
        name = fn.__name__.removeprefix("step_")
        limit = LIMITS_S[name]
        start = time.perf_counter()
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(limit)
        try:
            figures = fn()
            results[name] = {"status": "ok", **figures}
        except Skipped as why:
            results[name] = {"status": f"skipped: {why}"}
        except StepTimeout:
            results[name] = {"status": f"failed: over its {limit} s limit"}
        except Exception as exc:   # one failed step must not hide the others' figures
            results[name] = {"status": f"failed: {type(exc).__name__}: {exc}"}
        finally:
            signal.alarm(0)
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        print(f"{name:<22} {results[name]['status'][:100]} ({results[name]['seconds']:.1f} s)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where to write the JSON")
    args = parser.parse_args(argv)
    missing = missing_packages()
    if missing:
        print(f"gpu_check: missing package(s) {', '.join(missing)}: carry their wheels and run\n"
              f"  pip install --no-index --find-links wheels/ {' '.join(missing)}", file=sys.stderr)
        return 2
    import torch
    report = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
              "cuda": torch.version.cuda, "platform": platform.platform(), "python": platform.python_version(),
              "packages_checked": [pip for _, pip, _ in NEEDED], "time_limits_s": LIMITS_S}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    start = time.perf_counter()
    report["steps"] = run_steps()
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} ({report['total_seconds']} s)")
    failed = [n for n, r in report["steps"].items() if r["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
