"""Preemption and Ctrl-C: a signal to a real training process, then --resume (issue 21).

SIGTERM (a scheduler's preemption) or SIGUSR1 (SLURM's warning before the time limit) must
finish the current logged step, write a checkpoint and exit with the documented code; the
resumed run must reproduce the uninterrupted run's losses bit for bit. Ctrl-C prints one line
naming the last checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain_lib.capstone import checkpoint as ckpt
from pretrain_lib.capstone.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
STEPS = 60


def table(out_dir, cache_dir, num_workers=0, **train) -> dict:
    return {"out_dir": str(out_dir), "seed": 7,
            "model": {"n_layers": 1, "n_heads": 2, "d_model": 32, "seq_len": 16, "dropout": 0.1},
            "data": {"corpus": "shakespeare", "max_docs": 1, "tokenizer": "char", "cache_dir": str(cache_dir),
                     "num_workers": num_workers},
            "train": {"steps": STEPS, "batch_size": 4, "warmup_steps": 3, "log_every": 1, "eval_every": 20,
                      "eval_batches": 2, "sample_tokens": 0, "lr": 3e-3, "tensorboard": False, **train},
            "checkpoint": {"every": 20, "keep": 2}}


def write_toml(path: Path, values: dict) -> Path:
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items() if not isinstance(v, dict)]
    for section, items in values.items():
        if isinstance(items, dict):
            lines += [f"[{section}]", *(f"{k} = {json.dumps(v)}" for k, v in items.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def launch(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COURSE_HEADLESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pretrain_lib.train", "--config", str(config), *extra], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)   # its own process group: a signal can go to it and its workers


def losses(out_dir: Path) -> dict[int, float]:
    lines = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln]
    steps = [ln["step"] for ln in lines if "loss" in ln]
    assert len(steps) == len(set(steps)), "a step logged twice"
    return {ln["step"]: ln["loss"] for ln in lines if "loss" in ln}


def _logged_step(metrics: Path) -> int:
    """The highest training step in ``metrics.jsonl`` so far (evaluation lines repeat a step; a line being
    written may be incomplete)."""
    if not metrics.is_file():
        return 0
    steps = [0]
    for line in metrics.read_text().splitlines():
        try:
            steps.append(int(json.loads(line).get("step", 0)))
        except ValueError:
            break
    return max(steps)


def signal_after(proc: subprocess.Popen, metrics: Path, step: int, sig: int, *, group: bool = False) -> None:
    """Send ``sig`` once training step ``step`` is logged: to the process, or (``group``) to it and its loader
    workers at once, as a scheduler signals every process of a job."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if _logged_step(metrics) >= step:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            return
        time.sleep(0.002)
    pytest.fail("the run ended before the signal could be sent; make it longer")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("preemption-data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    folder = tmp_path_factory.mktemp("uninterrupted")
    proc = launch(write_toml(folder / "ref.toml", table(folder / "out", cache_dir)))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    return losses(folder / "out")


@pytest.mark.parametrize("sig, num_workers", [(signal.SIGTERM, 0), (signal.SIGTERM, 2), (signal.SIGUSR1, 0)],
                         ids=["SIGTERM-0-workers", "SIGTERM-2-workers", "SIGUSR1-0-workers"])
def test_a_preempted_run_checkpoints_exits_75_and_resumes_bit_identically(tmp_path, cache_dir, reference, sig,
                                                                         num_workers):
    config = write_toml(tmp_path / "run.toml", table(tmp_path / "out", cache_dir, num_workers))
    proc = launch(config)
    signal_after(proc, tmp_path / "out" / "metrics.jsonl", 23 + 4 * num_workers, sig,   # not a checkpoint step
                 group=num_workers > 0)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out + err
    assert "Traceback" not in err
    stopped = max(losses(tmp_path / "out"))
    assert 23 <= stopped < STEPS
    assert f"{signal.Signals(sig).name} received: checkpoint written at step {stopped}" in out
    assert ckpt.list_checkpoints(tmp_path / "out")[-1][0] == stopped, "the checkpoint is at the step the run stopped"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["preempted"] == signal.Signals(sig).name

    resumed = launch(config, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out + err
    assert f"resumed from ckpt_{stopped:08d}.pt at step {stopped}" in out
    after = losses(tmp_path / "out")
    assert sorted(after) == list(range(1, STEPS + 1)) and after == reference, "bit-identical to the uninterrupted run"


def test_ctrl_c_prints_one_line_naming_the_last_checkpoint(tmp_path, cache_dir):
    config = write_toml(tmp_path / "run.toml", table(tmp_path / "out", cache_dir) | {
        "checkpoint": {"every": 10, "keep": 2}})
    proc = launch(config)
    signal_after(proc, tmp_path / "out" / "metrics.jsonl", 25, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out + err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    found = re.fullmatch(r"stopped at step (\d+); last checkpoint at step (\d+); continue with --resume", err.strip())
    assert found, err
    step, saved = map(int, found.groups())
    assert 25 <= step < STEPS and saved == step // 10 * 10 == ckpt.list_checkpoints(tmp_path / "out")[-1][0]


def test_the_command_line_refuses_an_earlier_run_and_a_missing_checkpoint(tmp_path, cache_dir):
    config = write_toml(tmp_path / "run.toml", table(tmp_path / "out", cache_dir, steps=4, warmup_steps=1, eval_every=2) | {
        "checkpoint": {"every": 2, "keep": 1}})
    missing = launch(config, "--resume")
    _, err = missing.communicate(timeout=120)
    assert missing.returncode == 2 and err.startswith("error: --resume: there is no checkpoint") and "Traceback" not in err
    first = launch(config)
    assert first.wait(timeout=120) == 0
    second = launch(config)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and "already holds a run" in err and "--overwrite" in err
    third = launch(config, "--overwrite")
    assert third.communicate(timeout=120) and third.returncode == 0
    requeued = launch(config, "--resume=auto", "--set", "train.steps=6")   # a requeued job: continues
    out, err = requeued.communicate(timeout=120)
    assert requeued.returncode == 0 and "resumed from ckpt_00000004.pt at step 4" in out, err
    fresh = launch(config, "--resume=auto", "--out", str(tmp_path / "fresh"))   # a first job: starts afresh
    assert fresh.communicate(timeout=120) and fresh.returncode == 0 and max(losses(tmp_path / "fresh")) == 4


@pytest.mark.xdist_group("torchrun")   # never two 2-rank jobs on 2 cores at once
def test_sigterm_to_torchrun_checkpoints_every_rank_at_one_step_and_resumes(tmp_path, cache_dir):
    from pretrain_lib.distributed.launch import kill_process_group, run_torchrun, torchrun_command
    values = table(tmp_path / "out", cache_dir, steps=40, batch_size=2, eval_every=40) | {
        "parallel": "ddp", "checkpoint": {"every": 40, "keep": 2}}
    values["model"]["dropout"] = 0.0
    config = write_toml(tmp_path / "ddp.toml", values)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COURSE_HEADLESS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.Popen(torchrun_command("pretrain_lib.train", nproc_per_node=2, args=["--config", str(config)]),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        signal_after(proc, tmp_path / "out" / "metrics.jsonl", 6, signal.SIGTERM)   # to the agent, as srun does
        out, _ = proc.communicate(timeout=120)
    finally:
        kill_process_group(proc.pid, grace_s=0.0)
    assert "SIGTERM received: checkpoint written at step" in out, out[-3000:]
    (step, path), = ckpt.list_checkpoints(tmp_path / "out")
    state = ckpt.load_checkpoint(path)
    assert state["world_size"] == 2 and len(state["loader"]) == len(state["rng"]) == 2
    assert state["loader"][0]["position"] == state["loader"][1]["position"] == step * 2, "both ranks at one step"
    assert max(losses(tmp_path / "out")) == step < 40
    resumed = run_torchrun("pretrain_lib.train", args=["--config", str(config), "--resume"], stream=False,
                           run_dir=tmp_path / "out", timeout_s=300)
    assert resumed.metrics["start_step"] == step
    assert sorted(losses(tmp_path / "out")) == list(range(1, 41))
