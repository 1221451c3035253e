"""Scale-out proven on one machine (issue 25): two torchrun agents joined by the c10d rendezvous,
and torchrun's elastic restart after a lost rank.

Two "nodes" are two torchrun agents started separately, as each host of a cluster would start
its own (``launch.run_nodes``). With DDP and with FSDP they must train the capstone config as
one process does on the same global batch (weights within 1e-5), and a run continued from a
checkpoint the two nodes wrote must equal their uninterrupted run bit for bit. Elastic restart:
one rank SIGKILLed mid-run, the agent restarts the group (``--max-restarts 1``), the trainer
continues from its last checkpoint (``--resume=auto``), and the losses equal the uninterrupted
run's. Everything waits on events (a logged step, a line), never on a fixed sleep.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from pretrain_lib.capstone import checkpoint as ckpt
from pretrain_lib.capstone import run
from pretrain_lib.distributed.launch import kill_process_group, rank_processes, run_nodes, torchrun_command

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "gpt-char-tiny.toml"   # the capstone's smallest config; the overrides shrink it
STEPS, EVERY = 24, 4
KILL_AFTER = 10      # the elastic test kills rank 1 once this step is logged (not a checkpoint step)


def overrides(out_dir, cache_dir, *, parallel: str = "none", batch_size: int = 4) -> list[str]:
    """A capstone run small enough for seconds: 24 steps, a checkpoint every 4, dropout off (ranks would
    draw their own masks), one document of the corpus. ``batch_size`` is per rank."""
    values = {"out_dir": str(out_dir), "seed": 7, "parallel": parallel, "model.n_layers": 1, "model.n_heads": 2,
              "model.d_model": 32, "model.seq_len": 16, "model.dropout": 0.0, "data.max_docs": 1,
              "data.cache_dir": str(cache_dir), "train.steps": STEPS, "train.batch_size": batch_size,
              "train.warmup_steps": 3, "train.log_every": 1, "train.eval_every": STEPS, "train.eval_batches": 2,
              "train.sample_tokens": 0, "train.lr": 3e-3, "train.tensorboard": False, "checkpoint.every": EVERY,
              "checkpoint.keep": STEPS // EVERY}
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def trainer_args(out_dir, cache_dir, parallel: str, *extra: str) -> list[str]:
    sets = [x for o in overrides(out_dir, cache_dir, parallel=parallel, batch_size=2) for x in ("--set", o)]
    return ["--config", str(CONFIG), *sets, *extra]


def losses(out_dir: Path) -> dict[int, float]:
    lines = [json.loads(ln) for ln in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if ln]
    steps = [ln["step"] for ln in lines if "loss" in ln]
    assert len(steps) == len(set(steps)), "a step logged twice"
    return {ln["step"]: ln["loss"] for ln in lines if "loss" in ln}


def logged_step(metrics: Path) -> int:
    """The highest training step in ``metrics.jsonl`` so far (a line being written may be incomplete)."""
    steps = [0]
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            steps.append(int(json.loads(line).get("step", 0)))
        except ValueError:
            break
    return max(steps)


def weights_at(out_dir: Path, step: int, parallel: str, single) -> dict[str, torch.Tensor]:
    """The weights of the run's checkpoint at ``step``, as one process's state dict."""
    if parallel == "fsdp":
        from pretrain_lib.capstone import sharded
        from pretrain_lib.capstone.trainer import run_model
        model = run_model(single.config, single.data.vocab_size)
        return sharded.load_sharded_model(out_dir / f"ckpt_{step:08d}.dcp", model).state_dict()
    return ckpt.load_checkpoint(out_dir / ckpt.checkpoint_name(step))["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("scale-out-data")


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir):
    """One process, batch 4: the reference for two nodes of batch 2 each."""
    out = tmp_path_factory.mktemp("single") / "out"
    return run(CONFIG, overrides=overrides(out, cache_dir), progress=False, verbose=False)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, cache_dir):
    """Uninterrupted two-node runs, launched once per strategy and shared by the tests below."""
    done = {}

    def get(parallel: str):
        if parallel not in done:
            out = tmp_path_factory.mktemp(f"two-nodes-{parallel}") / "out"
            done[parallel] = run_nodes("pretrain_lib.train", nnodes=2, args=trainer_args(out, cache_dir, parallel),
                                       run_dir=out, env={"LOGLEVEL": "INFO"}, stream=False, timeout_s=400)
        return done[parallel]
    return get


@pytest.mark.xdist_group("torchrun")   # never two 2-rank jobs on 2 cores at once
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_nodes_equal_one_process_and_resume_exactly(parallel, single, two_nodes, cache_dir, tmp_path):
    whole = two_nodes(parallel)
    # the rendezvous, not the launch order, gave each agent its node rank: 0 and 1, one each
    node_ranks = sorted(int(m) for log in whole.node_logs for m in re.findall(r"group_rank=(\d+)", log))
    assert node_ranks == [0, 1], whole.log[-3000:]
    assert all("group_world_size=2" in log for log in whole.node_logs)
    # one process and two nodes after EVERY steps: fp32 rounding only (the all-reduce sums in another order)
    one = ckpt.load_checkpoint(single.out_dir / ckpt.checkpoint_name(EVERY))["model"]
    weight_diff = max_difference(weights_at(whole.run_dir, EVERY, parallel, single), one)
    loss_diff = max(abs(a - b) for a, b in zip(single.losses[:EVERY], whole.metrics["losses"][:EVERY]))
    drift = max_difference(weights_at(whole.run_dir, STEPS, parallel, single), single.model.state_dict())
    print(f"{parallel}: two nodes vs one process after {EVERY} steps: max weight difference {weight_diff:.2e}, "
          f"max loss difference {loss_diff:.2e}; after {STEPS} steps {drift:.2e} (Adam amplifies the rounding); "
          f"launch took {whole.seconds:.1f} s")
    assert len(whole.metrics["losses"]) == STEPS and weight_diff <= 1e-5 and loss_diff <= 1e-5

    # a run continued from the two nodes' checkpoint at STEPS - EVERY (the last one removed) equals the whole run
    cut = tmp_path / "cut"
    shutil.copytree(whole.run_dir, cut)
    last = cut / (f"ckpt_{STEPS:08d}.dcp" if parallel == "fsdp" else ckpt.checkpoint_name(STEPS))
    shutil.rmtree(last) if last.is_dir() else last.unlink()
    resumed = run_nodes("pretrain_lib.train", nnodes=2, args=trainer_args(cut, cache_dir, parallel, "--resume"),
                        run_dir=cut, stream=False, timeout_s=400)
    assert resumed.metrics["start_step"] == STEPS - EVERY
    assert losses(cut) == losses(whole.run_dir), "resumed from the two nodes' checkpoint: bit for bit"
    again, two = weights_at(cut, STEPS, parallel, single), weights_at(whole.run_dir, STEPS, parallel, single)
    assert all(torch.equal(again[k], two[k]) for k in two)


@pytest.mark.xdist_group("torchrun")
def test_elastic_restart_after_a_lost_rank_resumes_exactly(two_nodes, cache_dir, tmp_path):
    """torchrun --max-restarts 1: rank 1 SIGKILLed after step 10 is logged, the agent restarts both ranks, and
    --resume=auto continues from the last checkpoint (step 8 or later); the losses equal the uninterrupted run's."""
    reference = losses(two_nodes("ddp").run_dir)
    out = tmp_path / "out"
    command = torchrun_command("pretrain_lib.train", nproc_per_node=2, max_restarts=1,
                               args=trainer_args(out, cache_dir, "ddp", "--resume=auto"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COURSE_HEADLESS": "1", "LOGLEVEL": "INFO",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    agent = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    lines: list[tuple[float, str]] = []   # (when it arrived, the line)

    def read() -> None:
        for line in agent.stdout:
            lines.append((time.monotonic(), line))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while logged_step(out / "metrics.jsonl") < KILL_AFTER:
            assert agent.poll() is None and time.monotonic() < deadline, "the run ended before rank 1 was killed"
            time.sleep(0.002)
        victim = rank_processes(agent.pid)[1]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        agent.wait(timeout=300)
        reader.join(timeout=10)
    finally:
        kill_process_group(agent.pid, grace_s=0.0)
    log = "".join(ln for _, ln in lines)
    assert agent.returncode == 0, "\n".join(ln for ln in log.splitlines() if not ln.startswith(("I1", "W1", "  ")))[-6000:]
    resumed_at = next(t for t, ln in lines if "resumed from ckpt_" in ln)
    step = int(re.search(r"resumed from ckpt_\d+\.pt at step (\d+)", log).group(1))
    assert step >= KILL_AFTER - EVERY and step % EVERY == 0 and step < STEPS, "from the last checkpoint before the kill"
    assert "restart_count=1" in log, "the agent restarted the group once"
    print(f"elastic restart: SIGKILL of rank 1 to the restarted ranks' resume took {resumed_at - killed_at:.1f} s")
    assert losses(out) == reference, "every step once, the same losses as the uninterrupted run, bit for bit"


def test_a_multi_node_launch_names_the_rendezvous_and_refuses_bad_input():
    command = torchrun_command("m", nproc_per_node=1, nnodes=2, rdzv_endpoint="localhost:29500", rdzv_id="job7",
                               max_restarts=1)
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:29500", "--rdzv-id=job7",
            "--nproc_per_node=1", "--max_restarts=1"} <= set(command) and "--standalone" not in command
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command("m", nnodes=2)
    with pytest.raises(ValueError, match="nnodes"):
        run_nodes("pretrain_lib.train", nnodes=0)
