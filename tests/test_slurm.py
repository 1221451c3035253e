"""The course's sbatch script under a real Slurm (issue 25): one node on this machine.

``LocalSlurm`` starts munged, slurmctld and slurmd in a temporary folder. The capstone's
``pretrain.sbatch`` is submitted as a learner would submit it, with command-line options that
fit one CPU node and a short config. First an uninterrupted job; then the same job preempted
with ``scancel --signal=USR1 --batch`` (what ``#SBATCH --signal=B:USR1@180`` sends before the
time limit): the script's trap passes the signal to the trainer, which writes a checkpoint; the
script requeues the job, and the requeued job (``--resume=auto``) finishes with the same losses
as the uninterrupted one, bit for bit. Skips, saying why, without root or Slurm's packages
(``apt-get install -y slurm-wlm munge``; ``.ci/run`` installs them). ``make slurm-check``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from pretrain_lib.distributed.launch import free_port
from pretrain_lib.distributed.local_slurm import LocalSlurm, missing_requirements
from test_scale_out import logged_step, losses   # the two-node tests read the same metrics.jsonl

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "chapters" / "03_distributed" / "slurm" / "pretrain.sbatch"
STEPS = 600   # long enough that the signal lands mid-run on a fast machine (60 steps took 1.0 s and finished first)

pytestmark = [pytest.mark.xdist_group("torchrun"),   # a 2-rank job: never beside another on 2 cores
              pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements()))]


def job_args(out_dir: Path, cache_dir: Path) -> list[str]:
    """The trainer's arguments after the script's own: a 1-layer model, STEPS steps, a checkpoint every STEPS // 3."""
    values = {"seed": 7, "model.n_layers": 1, "model.n_heads": 2, "model.d_model": 32, "model.seq_len": 16,
              "model.dropout": 0.0, "data.max_docs": 1, "data.cache_dir": str(cache_dir), "train.steps": STEPS,
              "train.batch_size": 2, "train.warmup_steps": 3, "train.log_every": 1, "train.eval_every": STEPS,
              "train.eval_batches": 2, "train.sample_tokens": 0, "train.lr": 3e-3, "train.tensorboard": False,
              "checkpoint.every": STEPS // 3, "checkpoint.keep": 2}
    return ["--out", str(out_dir), *(x for k, v in values.items() for x in ("--set", f"{k}={json.dumps(v)}"))]



def test_pretrain_sbatch_runs_is_preempted_requeued_and_resumes_exactly(tmp_path):
    with LocalSlurm(tmp_path / "slurm") as slurm:
        def submit(name: str) -> int:
            # the script's #SBATCH lines ask for 2 nodes of 8 GPUs; options on the command line override them
            options = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=00:10:00",
                       f"--output={tmp_path / name}.out", f"--job-name={name}"]
            env = {"PYTHON": sys.executable, "CONFIG": str(REPO / "configs" / "gpt-char-tiny.toml"),
                   "PARALLEL": "ddp", "GPUS_PER_NODE": "2", "RDZV_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
                   "COURSE_HEADLESS": "1", "PYTHONPATH": str(REPO)}
            return slurm.submit(SCRIPT, options=options, args=job_args(tmp_path / name, tmp_path / "data"),
                                env=env, cwd=REPO)

        began = time.monotonic()
        whole = submit("whole")
        done = slurm.wait_for(whole, lambda j: j["JobState"] == "COMPLETED", "the uninterrupted job to complete")
        whole_s = time.monotonic() - began
        reference = losses(tmp_path / "whole")
        assert sorted(reference) == list(range(1, STEPS + 1)) and done["ExitCode"] == "0:0"

        began = time.monotonic()
        cut = submit("cut")
        deadline = time.monotonic() + 300
        while logged_step(tmp_path / "cut" / "metrics.jsonl") < STEPS // 3 + 5:   # past the first checkpoint, short of the second
            assert time.monotonic() < deadline and slurm.job(cut)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), \
                (tmp_path / "cut.out").read_text()
            time.sleep(0.01)
        slurm.command("scancel", "--signal=USR1", "--batch", str(cut))   # as --signal=B:USR1@180 would
        slurm.wait_for(cut, lambda j: j["JobState"] == "PENDING" and int(j["Restarts"]) >= 1, "the requeue")
        # Slurm holds a requeued job for 120 s (Reason=BeginTime); an operator may start it at once, as here, but
        # not within the second its old step was killed: slurmd compares credential times in whole seconds and
        # refuses a launch whose credential is no newer than the revocation ("Job credential revoked", job FAILED)
        time.sleep(2)
        slurm.command("scontrol", "update", f"JobId={cut}", "StartTime=now")
        job = slurm.wait_for(cut, lambda j: j["JobState"] == "COMPLETED" and int(j["Restarts"]) >= 1,
                             "the requeued job to complete", timeout_s=400)
        cut_s = time.monotonic() - began
        output = (tmp_path / "cut.out").read_text()
        print(f"slurm: uninterrupted job {whole_s:.1f} s; preempted, requeued and resumed job {cut_s:.1f} s, "
              f"{job['Restarts']} restart(s)")
        assert "SIGUSR1, the time limit is near" in output and "requeueing job" in output, output[-3000:]
        assert "SIGUSR1 received: checkpoint written at step" in output, output[-3000:]
        assert "resumed from ckpt_" in output, output[-3000:]
        assert losses(tmp_path / "cut") == reference, "the requeued job continued exactly where the signal stopped it"
