"""Stop a process and everything it started: one implementation for the launcher and the grader.

Three ways a child's descendants are found, from the most to the least reliable:

* a PID namespace (the grader's bubblewrap sandbox): killing its init kills every process
  in it, ``setsid`` grandchildren included, so :func:`kill_tree` on the sandbox is enough;
* a process group (``start_new_session=True``): :func:`kill_process_group`;
* the parent/child links that are left: :func:`kill_tree` (a grandchild whose parent already
  exited is re-parented and no longer found this way).

Only the standard library and ``psutil`` are used; nothing here imports torch.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def kill_tree(pid: int, *, timeout_s: float = 5.0) -> None:
    """SIGKILL ``pid`` and its descendants (children first looked up, then all killed at once)."""
    import psutil
    try:
        parent = psutil.Process(pid)
        victims = parent.children(recursive=True) + [parent]
    except psutil.Error:
        return
    for proc in victims:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=timeout_s)


def process_group_alive(pgid: int) -> bool:
    """True while any process (zombies excluded) is left in group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")  # killpg(…, 0) also succeeds for zombies; look at /proc where it exists
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def kill_process_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the whole group, wait up to ``grace_s``, then SIGKILL whatever is left and wait for it."""
    if not hasattr(os, "killpg") or pgid <= 1:
        return
    try:
        os.killpg(pgid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not process_group_alive(pgid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    for _ in range(50):  # SIGKILL is not instantaneous; wait until the group is gone
        if not process_group_alive(pgid):
            return
        time.sleep(0.1)
