"""Start a strategy module under torchrun from a notebook, a test or a terminal.

``run_torchrun("pretrain_lib.distributed.data_parallel", args=["--steps", "3"])`` runs
``python -m torch.distributed.run --standalone --nproc_per_node=2 -m MODULE ARGS ...``
as a child process in its own session, streams its output as it comes, and returns a
:class:`RunResult` with the exit code, the log and the metrics rank 0 wrote to the run
directory. A rank that raises becomes a :class:`RankFailedError` carrying that rank's
traceback; a run past ``timeout_s`` has its whole process group killed and becomes a
:class:`LaunchTimeoutError`.

``run_nodes(module, nnodes=2, args=[...])`` is the multi-node launch on one machine: one
torchrun agent per "node", each started separately as it would be on its own host, meeting
through torchrun's c10d rendezvous on a free localhost port, which assigns the node ranks.
"""
from __future__ import annotations

import json
import os
import socket
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
    node_logs: list[str] = field(default_factory=list)  # each agent's own output (run_nodes: one per node)


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


def torchrun_command(module: str, *, nproc_per_node: int = 2, args: Sequence[str] = (), nnodes: int = 1,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "course", max_restarts: int = 0) -> list[str]:
    """The command line: this interpreter's torch.distributed.run, never a ``torchrun`` on PATH
    (a notebook kernel's PATH may lack the virtual environment's scripts).

    Without ``rdzv_endpoint``: ``--standalone`` (one node). With it: one node's agent of an
    ``nnodes``-node job, joining the c10d rendezvous at ``HOST:PORT``, as on a cluster.
    ``max_restarts``: how often the agent restarts its whole group of ranks after one fails.
    """
    if rdzv_endpoint is None:
        if nnodes != 1:
            raise ValueError(f"nnodes={nnodes} needs rdzv_endpoint='HOST:PORT' (the head node's address)")
        where = ["--standalone"]
    else:
        where = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc_per_node}",
            f"--max_restarts={max_restarts}", "-m", module, *map(str, args)]


def free_port() -> int:
    """A TCP port nothing listens on now (the operating system's choice), for a rendezvous on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(module: str, *, nproc_per_node: int = 2, args: Sequence[str] = (), timeout_s: float = 300,
                 env: dict[str, str] | None = None, run_dir: str | Path | None = None, stream: bool = True,
                 check: bool = True, max_restarts: int = 0) -> RunResult:
    """Run ``module`` on ``nproc_per_node`` ranks and return its result.

    ``args`` go to the module; ``--out RUN_DIR`` is added unless given (a fresh temporary
    folder by default). ``stream`` prints the job's output line by line as it arrives
    (into the notebook cell or the terminal). With ``check`` a failed rank raises
    :class:`RankFailedError`; a run longer than ``timeout_s`` always raises
    :class:`LaunchTimeoutError` after killing every process it started. ``max_restarts``:
    torchrun's elasticity, the agent restarting every rank after one failed.
    """
    _check_launch(module, nproc_per_node, timeout_s)
    args, run_dir = _with_out(args, run_dir)
    command = torchrun_command(module, nproc_per_node=nproc_per_node, args=args, max_restarts=max_restarts)
    return _run_agents([command], run_dir, env=env, timeout_s=timeout_s, stream=stream, check=check)


def run_nodes(module: str, *, nnodes: int = 2, nproc_per_node: int = 1, args: Sequence[str] = (),
              timeout_s: float = 300, env: dict[str, str] | None = None, run_dir: str | Path | None = None,
              stream: bool = True, check: bool = True, port: int | None = None) -> RunResult:
    """Run ``module`` as an ``nnodes``-node job on this machine: one torchrun agent per node.

    Each agent is its own process, started with the command a cluster's node would run
    (``--nnodes``, ``--rdzv-backend=c10d``, ``--rdzv-endpoint=localhost:PORT``); the
    rendezvous, not this function, decides which agent is node 0. Every agent gets the same
    ``--out`` (a shared file system). The log interleaves the agents' lines, each prefixed
    ``[node i]`` (i: the order of starting, not the rank); ``result.node_logs`` holds each
    agent's own output. Errors and time limits as in :func:`run_torchrun`.
    """
    _check_launch(module, nproc_per_node, timeout_s)
    if not isinstance(nnodes, int) or nnodes < 1:
        raise ValueError(f"nnodes must be a positive integer, got {nnodes!r}")
    args, run_dir = _with_out(args, run_dir)
    endpoint, job_id = f"localhost:{port or free_port()}", f"course-{os.getpid()}-{time.time_ns()}"
    commands = [torchrun_command(module, nproc_per_node=nproc_per_node, args=args, nnodes=nnodes,
                                 rdzv_endpoint=endpoint, rdzv_id=job_id) for _ in range(nnodes)]
    return _run_agents(commands, run_dir, env=env, timeout_s=timeout_s, stream=stream, check=check)


def _check_launch(module: str, nproc_per_node: int, timeout_s: float) -> None:
    if not isinstance(module, str) or not module or "/" in module:
        raise ValueError(f"module must be a dotted module name such as 'pretrain_lib.distributed.zero', got {module!r}")
    if not isinstance(nproc_per_node, int) or nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be a positive integer, got {nproc_per_node!r}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")


def _with_out(args: Sequence[str], run_dir: str | Path | None) -> tuple[list[str], Path]:
    """The module's arguments with ``--out RUN_DIR``, and that folder, created and without a stale result."""
    args = [str(a) for a in args]
    if "--out" in args:
        run_dir = Path(args[args.index("--out") + 1])
    else:
        run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="torchrun-"))
        args += ["--out", str(run_dir)]
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in [run_dir / METRICS_FILE, *run_dir.glob("error_rank*.txt")]:
        stale.unlink(missing_ok=True)
    return args, run_dir


def _run_agents(commands: list[list[str]], run_dir: Path, *, env, timeout_s: float, stream: bool,
                check: bool) -> RunResult:
    """Start every agent in its own session, pump their output, wait for all, leave nothing running."""
    child_env = dict(os.environ)
    child_env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: more threads contend for the cores
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p)
    child_env.update(env or {})
    several = len(commands) > 1
    lines: list[str] = []
    node_lines: list[list[str]] = [[] for _ in commands]
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                              env=child_env, cwd=str(REPO_ROOT), start_new_session=True) for c in commands]
    pgids = [p.pid for p in procs]  # start_new_session: each agent leads a new process group with its own pid

    def pump(i: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            node_lines[i].append(line)
            shown = f"[node {i}] {line}" if several else line
            lines.append(shown)
            if stream:
                print(shown, end="", flush=True)

    readers = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout_s
    try:
        returncodes = [p.wait(timeout=max(0.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for pgid, proc in zip(pgids, procs):
            kill_process_group(pgid)
            proc.wait()
        for r in readers:
            r.join(timeout=5)
        raise LaunchTimeoutError(timeout_s, "".join(lines), pgids[0]) from None
    except BaseException:  # e.g. KeyboardInterrupt in a notebook: leave nothing running
        for pgid, proc in zip(pgids, procs):
            kill_process_group(pgid)
            proc.wait()
        raise
    for r in readers:
        r.join(timeout=10)
    for pgid in pgids:  # torchrun has exited; make sure no rank it started outlived it
        kill_process_group(pgid, grace_s=0.0)
    log = "".join(lines)
    returncode = next((rc for rc in returncodes if rc != 0), 0)
    metrics_path = run_dir / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    result = RunResult(returncode, log, metrics, run_dir, time.perf_counter() - start, commands[0], pgids[0],
                       ["".join(n) for n in node_lines])
    if check and returncode != 0:
        rank, text = _first_rank_error(run_dir)
        raise RankFailedError(rank, text or "\n".join(log.strip().splitlines()[-30:]), log, returncode)
    if check and not metrics:
        raise RuntimeError(f"the job exited 0 but rank 0 wrote no {METRICS_FILE} in {run_dir}")
    return result


def rank_processes(agent_pid: int) -> dict[int, int]:
    """The ranks a torchrun agent is running now, as ``{global rank: pid}`` (read from each child's ``RANK``).

    For a test or a lesson that takes one rank away, as a failed host would.
    """
    import psutil
    ranks = {}
    for child in psutil.Process(agent_pid).children():
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            ranks[int(rank)] = child.pid
    return ranks


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
