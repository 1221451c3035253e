"""Run nbval on one assembled notebook, inside the submission's sandbox, and read back its records.

The notebook, nbval's per-cell records and its log live in the submission's scratch folder,
which is ``/tmp`` inside the sandbox and is deleted afterwards. The records are only feedback
(what each cell printed, timeouts, a dead kernel): points are decided from the probe values
in them, which the kernel cannot forge (see ``probe_runner``).
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import nbformat

from ..process_tree import kill_process_group, kill_tree
from .sandbox import Limits, bwrap_command, bwrap_problem, new_scratch, remove_scratch

_KILL_GRACE_S = 20.0            # the plugin enforces the limits; this is the backstop
_ACTIVE: set[subprocess.Popen] = set()
_ACTIVE_LOCK = threading.Lock()
_COUNTER = itertools.count()


@dataclass
class RunOutput:
    records: list[dict]
    log_tail: str
    returncode: int | None
    out_of_memory: bool
    sandboxed: bool


def kill_all_running() -> None:
    """Stop every grading subprocess this process started (used on Ctrl-C)."""
    with _ACTIVE_LOCK:
        procs = list(_ACTIVE)
    for proc in procs:
        kill_tree(proc.pid)
        kill_process_group(proc.pid, grace_s=0)


def _env(scratch_inside: Path, sandboxed: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "JUPYTER_", "IPYTHON", "GRADING_")) and k not in ("PYTHONSTARTUP",)}
    home = scratch_inside / "home"
    env.update({
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",   # only nbval and our plugin: faster, predictable
        "COURSE_HEADLESS": "1", "MPLBACKEND": "Agg", "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "PYTHONDONTWRITEBYTECODE": "1", "JUPYTER_PLATFORM_DIRS": "1",
        "TMPDIR": str(scratch_inside), "TMP": str(scratch_inside), "TEMP": str(scratch_inside), "HOME": str(home),
        "JUPYTER_RUNTIME_DIR": str(scratch_inside / "private" / "runtime"),
        "JUPYTER_DATA_DIR": str(home / ".jupyter-data"), "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
        "IPYTHONDIR": str(home / ".ipython"), "MPLCONFIGDIR": str(home / ".matplotlib"),
        "XDG_CACHE_HOME": str(home / ".cache"), "TORCHINDUCTOR_CACHE_DIR": str(home / ".cache" / "inductor"),
    })
    env.setdefault("OMP_NUM_THREADS", "1")      # --jobs gives the parallelism
    return env


def run_nbval(notebook: nbformat.NotebookNode, *, timeout_s: float, cell_timeout_s: float, memory_bytes: int,
              hide: list[Path], sandbox: bool = True) -> RunOutput:
    """Run nbval on ``notebook`` in a fresh scratch folder (sandboxed when bubblewrap works)."""
    sandboxed = sandbox and bwrap_problem() is None
    scratch = new_scratch(sandboxed)
    limits = Limits(f"{os.getpid()}-{next(_COUNTER)}", memory_bytes)
    try:
        work, private = scratch.root / "work", scratch.root / "private"
        for d in (work, private, private / "runtime", scratch.root / "home"):
            d.mkdir(parents=True)
        nbformat.write(notebook, work / "submission.ipynb")
        (private / "pytest.ini").write_text("[pytest]\n")
        inside = scratch.inside
        results = private / "results.jsonl"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "nbval.plugin",
               "-p", "pretrain_lib.grading.nbval_plugin", "-c", str(inside / "private" / "pytest.ini"),
               "--rootdir", str(inside / "work"), "--nbval", "--nbval-current-env",
               f"--nbval-cell-timeout={max(1, int(round(cell_timeout_s)))}",
               f"--nbval-kernel-startup-timeout={max(10, int(min(60, timeout_s)))}",
               f"--grading-notebook-timeout={timeout_s}",
               f"--grading-results={inside / 'private' / 'results.jsonl'}", str(inside / "work" / "submission.ipynb")]
        if sandboxed:
            cmd = bwrap_command(cmd, scratch, hide=hide, workdir=inside / "work")
        log_path = scratch.root / "pytest.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=work, env=_env(inside, sandboxed), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=limits.preexec)
            with _ACTIVE_LOCK:
                _ACTIVE.add(proc)
            try:
                proc.wait(timeout=timeout_s + _KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                proc.wait()
            finally:
                with _ACTIVE_LOCK:
                    _ACTIVE.discard(proc)
        records = _read_records(results)
        if not sandboxed:  # what the student's code left in the background (a PID namespace needs no help)
            for r in records:
                pid = r.get("kernel_pid") if r.get("event") == "start" else None
                if isinstance(pid, int) and pid not in (os.getpid(), os.getpgrp()):  # the record is the kernel's word
                    kill_process_group(pid, grace_s=0)
            kill_process_group(proc.pid, grace_s=0)
        oom = limits.out_of_memory()
        limits.close()
        with open(log_path, "rb") as log:
            log.seek(max(0, log_path.stat().st_size - 4000))
            tail = log.read().decode("utf-8", errors="replace")
        return RunOutput(records, tail, proc.returncode, oom, sandboxed)
    finally:
        limits.close()
        remove_scratch(scratch)


def _read_records(path: Path, limit_bytes: int = 64 * 2**20) -> list[dict]:
    records = []
    if not path.is_file():
        return records
    with open(path, "rb") as f:
        data = f.read(limit_bytes)
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records
