"""Start a strategy module under torchrun from a notebook, a test or a terminal.

``run_torchrun("pretrain_lib.distributed.data_parallel", args=["--steps", "3"])`` runs
``python -m torch.distributed.run --standalone --nproc_per_node=2 -m MODULE ARGS ...``
as a child process in its own session, streams its output as it comes, and returns a
:class:`RunResult` with the exit code, the log and the metrics rank 0 wrote to the run
directory. A rank that raises becomes a :class:`RankFailedError` carrying that rank's
traceback; a run past ``timeout_s`` has its whole process group killed and becomes a
:class:`LaunchTimeoutError`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..process_tree import kill_process_group, process_group_alive  # noqa: F401 (process_group_alive: for callers)
from ..utils import REPO_ROOT
from .metrics import METRICS_FILE


@dataclass
class RunResult:
    returncode: int
    log: str
    metrics: dict
    run_dir: Path
    seconds: float
    command: list[str] = field(default_factory=list)
    pgid: int = -1  # the child's process group (all ranks live in it)


class RankFailedError(RuntimeError):
    """A rank raised; ``rank`` and ``rank_traceback`` say which and where."""

    def __init__(self, rank: int | None, rank_traceback: str, log: str, returncode: int):
        self.rank, self.rank_traceback, self.log, self.returncode = rank, rank_traceback, log, returncode
        who = f"rank {rank}" if rank is not None else "a rank"
        super().__init__(f"{who} failed (torchrun exit code {returncode}):\n{rank_traceback.strip()}")


class LaunchTimeoutError(TimeoutError):
    """The job ran past its time limit; its whole process group was killed."""

    def __init__(self, timeout_s: float, log: str, pgid: int):
        self.timeout_s, self.log, self.pgid = timeout_s, log, pgid
        tail = "\n".join(log.strip().splitlines()[-15:])
        super().__init__(f"torchrun job still running after {timeout_s:.0f} s: killed its process group {pgid} "
                         f"(a rank probably waits for a peer that never arrives). Last lines:\n{tail}")


def torchrun_command(module: str, *, nproc_per_node: int = 2, args: Sequence[str] = ()) -> list[str]:
    """The command line: this interpreter's torch.distributed.run, never a ``torchrun`` on PATH
    (a notebook kernel's PATH may lack the virtual environment's scripts)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "--max_restarts=0", "-m", module, *map(str, args)]


def run_torchrun(module: str, *, nproc_per_node: int = 2, args: Sequence[str] = (), timeout_s: float = 300,
                 env: dict[str, str] | None = None, run_dir: str | Path | None = None, stream: bool = True,
                 check: bool = True) -> RunResult:
    """Run ``module`` on ``nproc_per_node`` ranks and return its result.

    ``args`` go to the module; ``--out RUN_DIR`` is added unless given (a fresh temporary
    folder by default). ``stream`` prints the job's output line by line as it arrives
    (into the notebook cell or the terminal). With ``check`` a failed rank raises
    :class:`RankFailedError`; a run longer than ``timeout_s`` always raises
    :class:`LaunchTimeoutError` after killing every process it started.
    """
    if not isinstance(module, str) or not module or "/" in module:
        raise ValueError(f"module must be a dotted module name such as 'pretrain_lib.distributed.zero', got {module!r}")
    if not isinstance(nproc_per_node, int) or nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be a positive integer, got {nproc_per_node!r}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    args = [str(a) for a in args]
    if "--out" in args:
        run_dir = Path(args[args.index("--out") + 1])
    else:
        run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="torchrun-"))
        args += ["--out", str(run_dir)]
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in [run_dir / METRICS_FILE, *run_dir.glob("error_rank*.txt")]:
        stale.unlink(missing_ok=True)

    child_env = dict(os.environ)
    child_env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: more threads contend for the cores
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p)
    child_env.update(env or {})
    command = torchrun_command(module, nproc_per_node=nproc_per_node, args=args)

    lines: list[str] = []
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=child_env, cwd=str(REPO_ROOT), start_new_session=True)
    pgid = proc.pid  # start_new_session: the child leads a new process group with its own pid

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if stream:
                print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_process_group(pgid)
        proc.wait()
        reader.join(timeout=5)
        raise LaunchTimeoutError(timeout_s, "".join(lines), pgid) from None
    except BaseException:  # e.g. KeyboardInterrupt in a notebook: leave nothing running
        kill_process_group(pgid)
        proc.wait()
        raise
    reader.join(timeout=10)
    # torchrun has exited; make sure no rank it started outlived it
    kill_process_group(pgid, grace_s=0.0)
    log = "".join(lines)
    metrics_path = run_dir / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    result = RunResult(returncode, log, metrics, run_dir, time.perf_counter() - start, command, pgid)
    if check and returncode != 0:
        rank, text = _first_rank_error(run_dir)
        raise RankFailedError(rank, text or "\n".join(log.strip().splitlines()[-30:]), log, returncode)
    if check and not metrics:
        raise RuntimeError(f"the job exited 0 but rank 0 wrote no {METRICS_FILE} in {run_dir}")
    return result


def _first_rank_error(run_dir: Path) -> tuple[int | None, str]:
    files = sorted(run_dir.glob("error_rank*.txt"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None, ""
    name = files[0].stem.removeprefix("error_rank")
    return (int(name) if name.isdigit() else None), files[0].read_text()


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m pretrain_lib.distributed.launch",
                                description="Run a strategy module under torchrun and print its metrics.")
    p.add_argument("module")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("module_args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    result = run_torchrun(a.module, nproc_per_node=a.nproc, args=a.module_args, timeout_s=a.timeout)
    print(json.dumps(result.metrics, indent=1))
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
