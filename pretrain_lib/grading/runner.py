"""Run nbval on one assembled notebook, inside the submission's sandbox, and read back its records.

Nothing produced inside the sandbox is read back from a file: the notebook and pytest's
configuration are copied into the sandbox's private ``/tmp`` (a sized tmpfs) from memory, and
nbval's per-cell records and its log come back through two pipes the grader holds, read into
bounded buffers (a flood is cut, never stored). The records are only feedback (what each cell
printed, timeouts, a dead kernel): points are decided from the probe values, which the kernel
cannot forge (see ``probe_runner``). The log is shown to the student only through
:func:`_safe_log_tail`, with the grader's paths and long numbers (seeds) masked.

The command gets a minimal, explicit environment (:func:`_env`): nothing of the grader's own
environment (tokens, paths, settings) is inherited.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import nbformat

from ..process_tree import kill_process_group, kill_tree
from .sandbox import (REPO_ROOT, SANDBOX_GID, SANDBOX_UID, Limits, bwrap_command, bwrap_problem, new_scratch,
                      privilege_drop, remove_scratch)

_KILL_GRACE_S = 20.0            # the plugin enforces the limits; this is the backstop
_ACTIVE: set[subprocess.Popen] = set()
_ACTIVE_LOCK = threading.Lock()
_COUNTER = itertools.count()
RECORDS_LIMIT_BYTES = 64 * 2**20   # per-cell records kept from one run; beyond it the rest is drained and dropped
LOG_TAIL_BYTES = 16 * 2**10        # the end of pytest's log kept for the feedback of a run that did not finish
_DRAIN_AFTER_EXIT_S = 3.0          # how long the pipes are read after the run ended (then closed, whatever holds them)


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
    """The whole environment of the graded run: fixed values only, nothing inherited."""
    home = scratch_inside / "home"
    path = os.pathsep.join(dict.fromkeys([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]))
    return {
        "PATH": path, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONPATH": str(REPO_ROOT),
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",   # only nbval and our plugin: faster, predictable
        "COURSE_HEADLESS": "1", "MPLBACKEND": "Agg", "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "PYTHONDONTWRITEBYTECODE": "1", "JUPYTER_PLATFORM_DIRS": "1", "OMP_NUM_THREADS": "1",
        "TMPDIR": str(scratch_inside), "TMP": str(scratch_inside), "TEMP": str(scratch_inside), "HOME": str(home),
        "JUPYTER_RUNTIME_DIR": str(scratch_inside / "private" / "runtime"),
        "JUPYTER_DATA_DIR": str(home / ".jupyter-data"), "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
        "IPYTHONDIR": str(home / ".ipython"), "MPLCONFIGDIR": str(home / ".matplotlib"),
        "XDG_CACHE_HOME": str(home / ".cache"), "TORCHINDUCTOR_CACHE_DIR": str(home / ".cache" / "inductor"),
    }


class _Drain(threading.Thread):
    """Reads one pipe to its end, keeping at most ``limit`` bytes (the head, or the tail)."""

    def __init__(self, fd: int, limit: int, keep_tail: bool = False):
        super().__init__(daemon=True)
        self.fd, self.limit, self.keep_tail = fd, limit, keep_tail
        self.chunks: list[bytes] = []
        self.size = 0
        self.overflow = False
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if not ready:
                    continue
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    return
                if self.keep_tail:
                    self.chunks.append(chunk)
                    self.size += len(chunk)
                    while self.size - len(self.chunks[0]) >= self.limit:
                        self.size -= len(self.chunks.pop(0))
                elif self.size + len(chunk) <= self.limit:
                    self.chunks.append(chunk)
                    self.size += len(chunk)
                else:
                    self.overflow = True       # drained and dropped, so the writer never blocks
        except OSError:
            return

    def data(self) -> bytes:
        data = b"".join(self.chunks)
        return data[-self.limit:] if self.keep_tail else data


def _memory_file(name: str, data: bytes) -> int:
    """A file descriptor holding ``data`` at offset 0, on no disk when the system allows it."""
    try:
        fd = os.memfd_create(name, getattr(os, "MFD_CLOEXEC", 0))
    except (AttributeError, OSError):
        handle = tempfile.TemporaryFile()
        fd = os.dup(handle.fileno())
        handle.close()
    view, written = memoryview(data), 0
    while written < len(view):
        written += os.write(fd, view[written:])
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def run_nbval(notebook: nbformat.NotebookNode, *, timeout_s: float, cell_timeout_s: float, memory_bytes: int,
              hide: list[Path], sandbox: bool = True) -> RunOutput:
    """Run nbval on ``notebook`` in a fresh scratch folder (sandboxed when bubblewrap works)."""
    sandboxed = sandbox and bwrap_problem() is None
    scratch = new_scratch(sandboxed)
    limits = Limits(f"{os.getpid()}-{next(_COUNTER)}", memory_bytes)
    fds: list[int] = []
    readers: list[_Drain] = []
    try:
        work, private = scratch.root / "work", scratch.root / "private"
        for d in (work, private, scratch.root / "home"):
            d.mkdir()
        inside = scratch.inside
        notebook_bytes = nbformat.writes(notebook).encode("utf-8")
        ini = b"[pytest]\n"
        results_r, results_w = os.pipe()
        log_r, log_w = os.pipe()
        fds += [results_r, results_w, log_r, log_w]
        pass_fds = [results_w]
        files = {}
        if sandboxed:
            nb_fd, ini_fd = _memory_file("submission", notebook_bytes), _memory_file("pytest-ini", ini)
            fds += [nb_fd, ini_fd]
            pass_fds += [nb_fd, ini_fd]
            files = {str(inside / "work" / "submission.ipynb"): nb_fd, str(inside / "private" / "pytest.ini"): ini_fd}
            if privilege_drop() is not None:   # nobody reopens the pipes through /dev/fd
                for fd in (results_w, log_w):
                    os.fchown(fd, SANDBOX_UID, SANDBOX_GID)
        else:
            (work / "submission.ipynb").write_bytes(notebook_bytes)
            (private / "pytest.ini").write_bytes(ini)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "nbval.plugin",
               "-p", "pretrain_lib.grading.nbval_plugin", "-c", str(inside / "private" / "pytest.ini"),
               "--rootdir", str(inside / "work"), "--nbval", "--nbval-current-env",
               f"--nbval-cell-timeout={max(1, int(round(cell_timeout_s)))}",
               f"--nbval-kernel-startup-timeout={max(10, int(min(60, timeout_s)))}",
               f"--grading-notebook-timeout={timeout_s}",
               f"--grading-results=/dev/fd/{results_w}", str(inside / "work" / "submission.ipynb")]
        if sandboxed:
            cmd = bwrap_command(cmd, scratch, hide=hide, workdir=inside / "work", files=files)
        readers = [_Drain(results_r, RECORDS_LIMIT_BYTES), _Drain(log_r, LOG_TAIL_BYTES, keep_tail=True)]
        for reader in readers:
            reader.start()
        proc = subprocess.Popen(cmd, cwd=work, env=_env(inside, sandboxed), stdout=log_w, stderr=log_w,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=limits.preexec,
                                pass_fds=pass_fds)
        for fd in (results_w, log_w):      # only the child holds the write ends now
            os.close(fd)
            fds.remove(fd)
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
        if not sandboxed:  # what the student's code left in the background (a PID namespace needs no help)
            for r in _records(readers[0].data()):
                pid = r.get("kernel_pid") if r.get("event") == "start" else None
                if isinstance(pid, int) and pid not in (os.getpid(), os.getpgrp()):  # the record is the kernel's word
                    kill_process_group(pid, grace_s=0)
            kill_process_group(proc.pid, grace_s=0)
        oom = limits.out_of_memory()
        limits.close()
        for reader in readers:
            reader.join(_DRAIN_AFTER_EXIT_S)
        records = _records(readers[0].data())
        tail = readers[1].data().decode("utf-8", errors="replace")
        if readers[0].overflow:
            tail += f"\n[the run's records passed {RECORDS_LIMIT_BYTES // 2**20} MB; the rest was dropped]"
        return RunOutput(records, _safe_log_tail(tail, scratch.root), proc.returncode, oom, sandboxed)
    finally:
        for reader in readers:
            reader.stop.set()
        for reader in readers:
            reader.join(1.0)
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        limits.close()
        remove_scratch(scratch)


def _records(data: bytes) -> list[dict]:
    """The JSON-object lines of the records (anything else is skipped)."""
    records = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
_LONG_NUMBER = re.compile(r"(?<![\w.])-?\d{9,}(?![\w.])")
_LONG_HEX = re.compile(r"\b[0-9a-fA-F]{16,}\b")


def _safe_log_tail(text: str, scratch_root: Path, limit: int = 1500) -> str:
    """The end of the run's log as it may be shown to a student.

    The grader's own paths (scratch folder, course, Python, home, temp folder) are replaced by
    placeholders, long numbers (a seed) and long hex strings (a nonce) are masked, control
    characters removed, and at most ``limit`` characters of whole lines kept.
    """
    places = {str(scratch_root): "<scratch>", str(REPO_ROOT): "<course>", sys.prefix: "<python>",
              sys.base_prefix: "<python>", os.path.realpath(sys.base_prefix): "<python>",
              tempfile.gettempdir(): "<tmp>", os.path.expanduser("~"): "<home>"}
    for path, label in sorted(places.items(), key=lambda kv: -len(kv[0])):
        if len(path) > 1:
            text = text.replace(path, label)
    text = _LONG_HEX.sub("<hex>", _LONG_NUMBER.sub("<number>", _CONTROL.sub("", text)))
    if len(text) > limit:
        text = text[-limit:]
        text = text[text.find("\n") + 1:] if "\n" in text else text
    return text
