"""One bubblewrap sandbox per graded submission, with a memory and a process limit.

What the student's kernel (and everything it starts) gets, when ``bwrap`` works here:

* the whole file system **read-only**, with the course's ``solutions/``, ``exercises/``,
  ``tests/``, ``.git``, the submissions folder and the grader's output folder replaced by
  empty folders;
* a private ``/tmp`` (= ``TMPDIR`` and ``HOME``) that is a fresh folder on disk, deleted
  after the submission: the only place it can write;
* no network (a new network namespace with only loopback), no other processes (a PID
  namespace: when the run ends, every process in it dies, ``setsid`` grandchildren
  included), no capabilities;
* a memory limit and a process limit: a cgroup (v2 or v1) where this user may create one
  (root), else ``RLIMIT_AS`` (per process) and ``RLIMIT_NPROC``.

Without bubblewrap the same command runs directly: limits still apply, but see
:func:`status_line` for what is then not protected.
"""
from __future__ import annotations

import os
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HIDDEN_IN_REPO = ("solutions", "exercises", "tests", ".git", "build", "benchmarks")
DEFAULT_MAX_PROCS = 256
_SANDBOX_FLAGS = ["--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                  "--unshare-uts", "--unshare-cgroup-try", "--unshare-user-try", "--cap-drop", "ALL"]


def parse_size(text: str) -> int:
    """``"2G"``, ``"512M"``, ``"3.5g"`` or a number of bytes -> bytes; raises ValueError saying why."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        value = float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)
    except ValueError:
        raise ValueError(f"expected a size such as 4G or 512M, got {text!r}") from None
    if value < 64 * 2**20:
        raise ValueError(f"memory limit {text!r} is below 64M; a Python kernel cannot start in that")
    return int(value)


def machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_memory_limit(jobs: int) -> int:
    """Half the machine's RAM shared by the submissions graded at once."""
    return max(512 * 2**20, machine_memory() // 2 // max(1, jobs))


def fmt_size(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


@lru_cache(maxsize=1)
def bwrap_problem() -> str | None:
    """None when bubblewrap works here, else why it cannot be used."""
    exe = shutil.which("bwrap")
    if exe is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        run = subprocess.run([exe, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", *_SANDBOX_FLAGS,
                              "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap could not start ({exc})"
    if run.returncode != 0:
        return f"bwrap cannot create namespaces here ({run.stderr.strip()[:200]})"
    return None


def status_line(memory_limit: int, sandboxed: bool | None = None) -> str:
    """The one line every grading run prints about its protection."""
    problem = bwrap_problem() if sandboxed is None else (None if sandboxed else "disabled")
    how = "cgroup" if _cgroup_root() else "rlimit, per process"
    if problem is None:
        return (f"sandbox: bubblewrap (course read-only, solutions/exercises/records hidden, private /tmp, no network, "
                f"PID namespace), memory {fmt_size(memory_limit)} ({how}), "
                f"{DEFAULT_MAX_PROCS} processes per submission")
    return (f"WARNING: NOT SANDBOXED ({problem}): student code runs as you and can read and write your files "
            f"(solutions, other submissions, the gradebook), use the network and leave detached processes running; "
            f"only the time, memory ({fmt_size(memory_limit)}, {how}) and output limits apply. "
            f"Install bubblewrap (apt-get install bubblewrap) for untrusted classes.")


# --- limits -----------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _cgroup_root() -> tuple[str, Path, Path] | None:
    """('v2', dir, dir) or ('v1', memory dir, pids dir) where this process may create cgroups."""
    base = Path("/sys/fs/cgroup")
    candidates = []
    if (base / "cgroup.controllers").exists():
        candidates.append(("v2", base / "pretrain-grading", base / "pretrain-grading"))
    if (base / "memory").is_dir() and (base / "pids").is_dir():
        candidates.append(("v1", base / "memory" / "pretrain-grading", base / "pids" / "pretrain-grading"))
    for kind, mem, pids in candidates:
        try:
            for d in {mem, pids}:
                d.mkdir(exist_ok=True)
            if kind == "v2":
                (mem / "cgroup.subtree_control").write_text("+memory +pids")
            probe = mem / f"probe-{os.getpid()}"
            probe.mkdir()
            ok = (probe / ("memory.max" if kind == "v2" else "memory.limit_in_bytes")).exists()
            probe.rmdir()
            if ok:
                return kind, mem, pids
        except OSError:
            continue
    return None


class Limits:
    """Memory and process limits for one submission's process tree; ``close()`` kills what is left."""

    def __init__(self, name: str, memory_bytes: int, max_procs: int = DEFAULT_MAX_PROCS):
        self.memory_bytes, self.max_procs = memory_bytes, max_procs
        self.dirs: list[Path] = []
        root = _cgroup_root()
        self.kind = root[0] if root else "rlimit"
        if root:
            kind, mem, pids = root
            try:
                if kind == "v2":
                    d = mem / name
                    d.mkdir()
                    (d / "memory.max").write_text(str(memory_bytes))
                    (d / "memory.swap.max").write_text("0") if (d / "memory.swap.max").exists() else None
                    (d / "pids.max").write_text(str(max_procs))
                    self.dirs = [d]
                else:
                    m, p = mem / name, pids / name
                    m.mkdir()
                    p.mkdir()
                    self.dirs = [m, p]
                    (m / "memory.limit_in_bytes").write_text(str(memory_bytes))
                    (p / "pids.max").write_text(str(max_procs))
            except OSError:
                self.close()
                self.kind, self.dirs = "rlimit", []

    def preexec(self) -> None:
        """Runs in the child between fork and exec: join the cgroups, or set rlimits."""
        if self.dirs:
            for d in self.dirs:
                with open(d / "cgroup.procs", "w") as f:
                    f.write(str(os.getpid()))
            return
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_bytes, self.memory_bytes))
        if os.getuid() != 0:  # root ignores RLIMIT_NPROC; it counts all of this user's processes
            n = sum(1 for _ in Path("/proc").glob("[0-9]*")) if Path("/proc").is_dir() else 0
            resource.setrlimit(resource.RLIMIT_NPROC, (n + self.max_procs, n + self.max_procs))

    def out_of_memory(self) -> bool:
        for d in self.dirs:
            for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
                try:
                    for line in (d / name).read_text().splitlines():
                        k, _, v = line.partition(" ")
                        if k == key and int(v) > 0:
                            return True
                except (OSError, ValueError):
                    continue
        return False

    def close(self) -> None:
        """Kill every process still in the cgroup and remove it."""
        import signal
        import time
        for d in self.dirs:
            for _ in range(50):
                try:
                    pids = [int(x) for x in (d / "cgroup.procs").read_text().split()]
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.05)
            for _ in range(20):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
        self.dirs = []


# --- the sandbox -----------------------------------------------------------------------------

@dataclass
class Scratch:
    """A submission's private folder: ``root`` on the host is ``/tmp`` inside the sandbox."""
    root: Path
    inside: Path

    def host(self, inside_path: str | Path) -> Path:
        return self.root / Path(inside_path).relative_to(self.inside)


def new_scratch(sandboxed: bool) -> Scratch:
    root = Path(tempfile.mkdtemp(prefix="grading-"))
    return Scratch(root, Path("/tmp") if sandboxed else root)


def remove_scratch(scratch: Scratch) -> None:
    """Delete the folder even where the student's code removed permissions from its files."""
    def fix(func, path, _exc):
        try:
            os.chmod(os.path.dirname(path), stat.S_IRWXU)
            os.chmod(path, stat.S_IRWXU)
            func(path)
        except OSError:
            pass
    shutil.rmtree(scratch.root, onerror=fix)


def bwrap_command(cmd: list[str], scratch: Scratch, *, hide: list[Path], workdir: Path) -> list[str]:
    """``cmd`` wrapped in bubblewrap: read-only root, ``hide`` emptied, ``scratch`` as /tmp."""
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/dev/shm",
            "--bind", str(scratch.root), "/tmp"]
    tmp_host = Path("/tmp").resolve()  # what the scratch mount hides, wherever tempfile points
    # The scratch hides the host's /tmp. A course checked out under it (a CI clone in
    # /tmp, say) and its Python must stay visible, read-only: mount them again on top.
    kept = []
    for path in (REPO_ROOT, Path(sys.prefix), Path(sys.base_prefix)):
        path = path.resolve()
        if path.is_relative_to(tmp_host) and not any(path.is_relative_to(k) for k in kept):
            kept.append(path)
            args += ["--ro-bind", str(path), str(path)]
    seen = set()
    for path in hide:
        path = Path(path).resolve()
        if not path.exists() or path in seen or path == Path("/"):
            continue
        if path.is_relative_to(tmp_host) and not any(path.is_relative_to(k) for k in kept):
            continue  # under the host's temp folder and not mounted again: the scratch replaces it anyway
        seen.add(path)
        args += ["--tmpfs", str(path)] if path.is_dir() else ["--ro-bind", "/dev/null", str(path)]
    args += [*_SANDBOX_FLAGS, "--chdir", str(workdir), "--"]
    return args + cmd


def hidden_paths(extra: list[Path]) -> list[Path]:
    return [REPO_ROOT / name for name in HIDDEN_IN_REPO] + [Path(p) for p in extra]
