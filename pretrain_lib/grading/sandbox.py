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
    how = "cgroup" if cgroup_root() else "rlimit, per process"
    if problem is None:
        who = f"as nobody (uid {SANDBOX_UID}), " if privilege_drop() is not None else ""
        return (f"sandbox: bubblewrap ({who}course read-only, solutions/exercises/records hidden, "
                f"private /tmp of {fmt_size(SCRATCH_BYTES)}, /dev/shm {fmt_size(SHM_BYTES)}, files up to "
                f"{fmt_size(FILE_SIZE_BYTES)}, no network, PID namespace, minimal environment), "
                f"memory {fmt_size(memory_limit)} ({how}), {DEFAULT_MAX_PROCS} processes per submission")
    return (f"WARNING: NOT SANDBOXED ({problem}): student code runs as you and can read and write your files "
            f"(solutions, other submissions, the gradebook), use the network and leave detached processes running; "
            f"only the time, memory ({fmt_size(memory_limit)}, {how}) and output limits apply. "
            f"Install bubblewrap (apt-get install bubblewrap) for untrusted classes.")


# --- limits -----------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def cgroup_root() -> tuple[str, Path, Path] | None:
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
        self.as_nobody = privilege_drop() is not None   # computed here: preexec must not start processes
        root = cgroup_root()
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
        """Runs in the child between fork and exec: join the cgroups, or set rlimits.

        Always: no file larger than ``FILE_SIZE_BYTES`` (``RLIMIT_FSIZE``) and no core dumps."""
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_BYTES, FILE_SIZE_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.dirs:
            for d in self.dirs:
                with open(d / "cgroup.procs", "w") as f:
                    f.write(str(os.getpid()))
            return
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_bytes, self.memory_bytes))
        # root ignores RLIMIT_NPROC; it counts all of the user's processes (nobody's, when root drops to it)
        if os.getuid() != 0 or self.as_nobody:
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

SANDBOX_UID = SANDBOX_GID = 65534        # "nobody": student code never runs as the grader's user when it is root
SCRATCH_BYTES = 512 * 2**20              # the private /tmp: a tmpfs of this size inside the sandbox
SHM_BYTES = 256 * 2**20                  # /dev/shm, also a sized tmpfs
FILE_SIZE_BYTES = 256 * 2**20            # RLIMIT_FSIZE: the largest file any process of a submission may write


@dataclass
class Scratch:
    """A submission's private folder: ``root`` on the host, ``inside`` the path the code sees.

    Sandboxed, ``inside`` is ``/tmp``: a size-limited tmpfs that lives only as long as the
    sandbox. The folders the grader creates at the top of ``root`` before the run (``work``,
    ``home``…) are created again, empty and writable, in that tmpfs; nothing the code writes
    ever reaches the host's disk. Unsandboxed, ``inside`` is ``root`` itself.
    """
    root: Path
    inside: Path

    def host(self, inside_path: str | Path) -> Path:
        return self.root / Path(inside_path).relative_to(self.inside)


def new_scratch(sandboxed: bool) -> Scratch:
    root = Path(tempfile.mkdtemp(prefix="grading-"))
    return Scratch(root, Path("/tmp") if sandboxed else root)


def remove_tree(root: Path) -> str | None:
    """Delete ``root`` and everything in it; never raises. Returns None, or why something was left.

    Iterative (a 3,000-deep tree needs no recursion and no path longer than one name: each
    step opens the next folder relative to the current one), never follows a symbolic link,
    and gives back the permissions the student's code removed.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot inspect the scratch folder: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(root)
            return None
        except OSError as exc:
            return f"cannot remove the scratch folder: {exc.strerror}"
    names: list[str] = []          # the path from root to the current folder, one name per level
    try:
        fd = os.open(root, flags)
    except OSError:
        try:
            os.chmod(root, stat.S_IRWXU)
            fd = os.open(root, flags)
        except OSError as exc:
            return f"cannot open the scratch folder: {exc.strerror}"
    problem = None
    steps = 0
    try:
        while True:
            steps += 1
            if steps > 10_000_000:
                problem = "too many entries"
                break
            child = None
            try:
                entries = list(os.scandir(fd))
            except OSError as exc:
                entries, problem = [], f"cannot list a folder: {exc.strerror}"
            for entry in entries:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if is_dir:
                    try:
                        child = os.open(entry.name, flags, dir_fd=fd)
                    except PermissionError:
                        try:
                            os.chmod(entry.name, stat.S_IRWXU, dir_fd=fd)
                            child = os.open(entry.name, flags, dir_fd=fd)
                        except OSError as exc:
                            problem = f"cannot open a folder: {exc.strerror}"
                            continue
                    except OSError as exc:
                        problem = f"cannot open a folder: {exc.strerror}"
                        continue
                    names.append(entry.name)
                    break
                try:
                    os.unlink(entry.name, dir_fd=fd)
                except OSError as exc:
                    problem = f"cannot remove a file: {exc.strerror}"
            if child is not None:
                try:
                    os.fchmod(child, stat.S_IRWXU)   # a folder the code made unwritable
                except OSError:
                    pass
                os.close(fd)
                fd = child
                continue
            if not names:
                break
            parent = os.open("..", flags, dir_fd=fd)
            os.close(fd)
            fd = parent
            name = names.pop()
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError as exc:       # something could not be deleted inside: skip it for good
                problem = f"cannot remove a folder: {exc.strerror}"
                try:
                    os.rename(name, f".left-{steps}", src_dir_fd=fd, dst_dir_fd=fd)
                except OSError:
                    break
    except OSError as exc:
        problem = f"cleanup stopped: {exc.strerror}"
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.rmdir(root)
    except OSError as exc:
        problem = problem or f"cannot remove the scratch folder: {exc.strerror}"
    return problem


def remove_scratch(scratch: Scratch) -> None:
    """Delete the scratch folder; never raises (a grade never turns into an error here)."""
    problem = remove_tree(scratch.root)
    if problem:
        print(f"grading: could not remove all of a scratch folder ({problem})", file=sys.stderr)


def read_regular_file(path: Path | str, limit_bytes: int, *, dir_fd: int | None = None) -> bytes:
    """The bytes of a regular file, never following a symbolic link and never blocking.

    Raises OSError (``errno`` set) for a link (ELOOP), a folder, a pipe, a device or a socket
    (EINVAL, with a message saying what it is), and ValueError when it is larger than
    ``limit_bytes`` (nothing is read then).
    """
    import errno
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file ({file_kind(st.st_mode)})")
        if st.st_size > limit_bytes:
            raise ValueError(f"{st.st_size} bytes, over the limit of {limit_bytes}")
        chunks, left = [], limit_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit_bytes:
            raise ValueError(f"more than {limit_bytes} bytes")
        return data
    finally:
        os.close(fd)


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


@lru_cache(maxsize=1)
def privilege_drop() -> tuple[str, ...] | None:
    """The command prefix that makes the sandboxed command run as ``nobody``, or None.

    Only when the grader is root (then bubblewrap runs privileged, keeps only the rights to
    change user, and ``setpriv`` gives them up for good: no capabilities, an empty bounding
    set, no supplementary groups; bubblewrap sets no-new-privileges, so no set-uid program
    can regain them). A grader that is not root already runs the code as an ordinary user.
    """
    if os.geteuid() != 0 or shutil.which("setpriv") is None or bwrap_problem() is not None:
        return None
    prefix = ("setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", "--clear-groups", "--inh-caps=-all",
              "--bounding-set=-all", "--")
    try:
        run = subprocess.run(["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", *_flags(True),
                              *prefix, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if run.returncode == 0 else None


def _flags(drop: bool) -> list[str]:
    if not drop:
        return list(_SANDBOX_FLAGS)
    # privileged bubblewrap without a user namespace (one would map nobody to root outside)
    return [f for f in _SANDBOX_FLAGS if f != "--unshare-user-try"] + [
        "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]


def _traversable_by_others(path: Path) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IXOTH)
    except OSError:
        return False


def bwrap_command(cmd: list[str], scratch: Scratch, *, hide: list[Path], workdir: Path,
                  files: dict[str, int] | None = None) -> list[str]:
    """``cmd`` wrapped in bubblewrap: read-only root, ``hide`` emptied, a sized tmpfs as /tmp.

    The folders at the top of ``scratch.root`` are created, empty and writable, in the tmpfs.
    ``files`` maps a path inside the sandbox to an open file descriptor whose content is
    copied there (the caller passes these descriptors to the child with ``pass_fds``).
    When the grader is root, the command runs as ``nobody`` (:func:`privilege_drop`).
    """
    drop = privilege_drop()
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--perms", "1777", "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm",
            "--perms", "1777", "--size", str(SCRATCH_BYTES), "--tmpfs", "/tmp"]
    tmp_host = Path("/tmp").resolve()  # what the scratch mount hides, wherever tempfile points
    # What the code must still read: the course and its Python. The scratch hides the host's
    # /tmp (a CI clone there); running as nobody, a folder only root may enter (/root, where
    # pyenv keeps Python) would hide them too. Such a folder is replaced by an empty one and
    # the paths needed are mounted again, read-only, at the same place.
    needed = []
    for path in (REPO_ROOT, Path(sys.prefix), Path(sys.base_prefix), Path(os.path.realpath(sys.executable)).parent):
        path = path.resolve()
        if not any(path.is_relative_to(k) for k in needed):
            needed = [k for k in needed if not k.is_relative_to(path)] + [path]
    covered: list[Path] = [tmp_host]
    kept: list[Path] = []
    for path in needed:
        top = next((c for c in covered if path.is_relative_to(c)), None)
        if top is None and drop is not None:
            top = next((a for a in reversed(path.parents) if a != Path("/") and not _traversable_by_others(a)), None)
            if top is not None and top != tmp_host:
                covered.append(top)
                args += ["--tmpfs", str(top)]
        if top is None:
            continue
        inside_top = Path("/tmp") if top == tmp_host else top
        for parent in reversed(path.relative_to(top).parents):
            if parent != Path("."):
                args += ["--perms", "0755", "--dir", str(inside_top / parent)]
        args += ["--ro-bind", str(path), str(inside_top / path.relative_to(top))]
        kept.append(path)
    seen = set()
    for path in hide:
        path = Path(path).resolve()
        if not path.exists() or path in seen or path == Path("/"):
            continue
        if any(path.is_relative_to(c) for c in covered) and not any(path.is_relative_to(k) for k in kept):
            continue  # under an emptied folder and not mounted again: hidden anyway
        seen.add(path)
        args += ["--tmpfs", str(path)] if path.is_dir() else ["--ro-bind", "/dev/null", str(path)]
    try:
        made = sorted(p.name for p in scratch.root.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        made = []
    for name in made:
        args += ["--perms", "0777", "--dir", str(scratch.inside / name)]
    for dest, fd in (files or {}).items():
        args += ["--perms", "0644", "--file", str(fd), str(dest)]
    args += [*_flags(drop is not None), "--chdir", str(workdir), "--"]
    return args + list(drop or ()) + list(cmd)


def hidden_paths(extra: list[Path]) -> list[Path]:
    return [REPO_ROOT / name for name in HIDDEN_IN_REPO] + [Path(p) for p in extra]
