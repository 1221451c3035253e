"""Execute the course's notebooks headlessly with papermill (what ``make run`` does).

Each chapter notebook runs in its own folder (so relative paths behave as in Jupyter),
its executed copy goes to ``build/chapters/<chapter>/<name>.ipynb`` and its figures to
``build/figures/<chapter>/<name>/``. A table of notebook, seconds and status is printed.

With ``--jobs 2`` (what ``make run`` uses) two notebooks run at once, each kernel on one thread
(``OMP_NUM_THREADS=1``): the course's small models keep about one core busy even when torch
may use two, so two one-thread kernels finish the course in little more than half the time.
A notebook whose claims compare wall-clock times (a speed-up, a bandwidth, a copy cost)
declares ``"runs_alone"`` with its reason in its metadata (``metadata.course.runs_alone``);
those run first, one at a time, on an otherwise idle machine with the default threads.
The others start longest first, by the one-thread seconds ``make run`` last recorded in
``chapters/run_seconds.json`` (``--record-seconds``): the longest lessons started last would
leave one core idle while the other finishes them.

A run at the defaults (no ``--params``) also writes ``build/defaults_passed.json``: the notebooks
that passed, every claim checked, and a fingerprint of the files they could depend on. The test
suite then skips the test-size run of a notebook listed there while the fingerprint still matches
(that run checks a subset of what the defaults run checked); any edit to the course reruns it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .utils import REPO_ROOT


@dataclass
class NotebookRun:
    notebook: str  # relative to the repository when it lies inside it
    seconds: float
    ok: bool
    error: str = ""  # the failing cell's last traceback lines and where the executed copy is
    reason: str = ""  # one line: the exception and its message

    @property
    def status(self) -> str:
        return "ok" if self.ok else "FAILED"


def chapter_notebooks(chapters_dir: Path = REPO_ROOT / "chapters") -> list[Path]:
    """Every chapter notebook in course order."""
    return sorted(p for p in chapters_dir.glob("[0-9][0-9]_*/[0-9][0-9]_*.ipynb")
                  if ".ipynb_checkpoints" not in p.parts)


def runs_alone(path: Path) -> str:
    """Why a notebook needs the machine to itself (its ``metadata.course.runs_alone``), or ``""``."""
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, ValueError):
        return ""   # papermill reports a notebook it cannot read; the scheduler need not
    return str(meta.get("course", {}).get("runs_alone", ""))


RUN_SECONDS = REPO_ROOT / "chapters" / "run_seconds.json"


def recorded_seconds(file: Path = RUN_SECONDS) -> dict[str, float]:
    """{notebook as the table names it: seconds of its last recorded run}; empty without a record."""
    try:
        record = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))} if isinstance(record, dict) else {}


def longest_first(paths: list[Path], seconds: dict[str, float]) -> list[Path]:
    """``paths`` by recorded seconds, longest first; notebooks without a record (new ones, of unknown
    cost) first of all, in their order: a long one started last would finish alone."""
    return sorted(paths, key=lambda p: -seconds.get(display_path(p), float("inf")))


def record_seconds(runs: list[NotebookRun], file: Path = RUN_SECONDS) -> None:
    """Merge the seconds of the notebooks that ran ok into ``file`` (what --record-seconds writes)."""
    record = recorded_seconds(file)
    record.update({r.notebook: round(r.seconds) for r in runs if r.ok})
    record = {name: round(seconds) for name, seconds in sorted(record.items())}   # whole seconds, as read back
    Path(file).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


DEFAULTS_RECORD = "defaults_passed.json"   # in the build folder
# under tests/, only what a notebook's test-size run reads; every other file of the checkout counts
TEST_FILES_NOTEBOOKS_READ = ("tests/notebook_params/", "tests/conftest.py", "tests/test_notebooks.py")
SECONDS_FILE = "chapters/run_seconds.json"   # orders the runs, changes no outcome; --record-seconds rewrites it


def tree_fingerprint(root: Path = REPO_ROOT) -> str | None:
    """A hash of every file a notebook's run can depend on, read from disk: the files git tracks or
    would track (ignored build output excluded), tests/ apart from the notebook parameters, plus the
    Python and torch versions. ``None`` outside a git checkout: then nothing is ever reused."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=root, capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError, UnicodeDecodeError):
        return None
    digest = hashlib.sha256(f"{sys.version}|torch {metadata.version('torch')}".encode())
    for name in sorted(set(listed.split("\0")) - {""}):
        if (name.startswith("tests/") and not name.startswith(TEST_FILES_NOTEBOOKS_READ)) or name == SECONDS_FILE:
            continue
        path = Path(root) / name
        if path.is_file():   # a file deleted from the work tree but still in git's index is skipped
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def record_defaults_passed(runs: list[NotebookRun], build_dir: Path, fingerprint: str | None) -> None:
    """Add the notebooks that passed at their defaults to the build folder's record of ``fingerprint``
    (a record of another fingerprint is replaced: its tree is gone)."""
    if fingerprint is None:
        return
    file = Path(build_dir) / DEFAULTS_RECORD
    passed = passed_at_defaults(build_dir, fingerprint)
    passed |= {r.notebook for r in runs if r.ok}
    passed -= {r.notebook for r in runs if not r.ok}
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps({"fingerprint": fingerprint, "passed": sorted(passed)}, indent=1) + "\n",
                    encoding="utf-8")


def passed_at_defaults(build_dir: Path = REPO_ROOT / "build", fingerprint: str | None = None) -> set[str]:
    """The notebooks (as the table names them) that passed at their defaults on a tree whose
    fingerprint is ``fingerprint`` (this checkout's now, by default); empty without a matching record."""
    fingerprint = fingerprint or tree_fingerprint()
    try:
        record = json.loads((Path(build_dir) / DEFAULTS_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(record, dict) or fingerprint is None or record.get("fingerprint") != fingerprint:
        return set()
    return {str(n) for n in record.get("passed", [])}


def _one_thread_per_kernel() -> None:
    """Worker start-up: kernels started from here (they inherit the environment) use one thread."""
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run_all(paths: list[Path], *, jobs: int = 1, parameters: dict | None = None, on_done=None,
            **execute_options) -> list[NotebookRun]:
    """Execute ``paths`` and return their runs in the same order: one at a time, or ``jobs`` at once
    after the notebooks that declare ``runs_alone`` have run, each alone. ``parameters`` maps a
    notebook's stem to its overrides; ``on_done(run)`` is called as each notebook finishes."""
    parameters, on_done = parameters or {}, on_done or (lambda run: None)
    results: dict[Path, NotebookRun] = {}
    for p in paths:
        if jobs == 1 or runs_alone(p):
            results[p] = execute_notebook(p, parameters=parameters.get(Path(p).stem), **execute_options)
            on_done(results[p])
    shared = longest_first([p for p in paths if p not in results], recorded_seconds())
    if shared:
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, initializer=_one_thread_per_kernel,
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(execute_notebook, p, parameters=parameters.get(Path(p).stem), **execute_options): p
                       for p in shared}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                on_done(results[futures[future]])
    return [results[p] for p in paths]


def display_path(path: Path) -> str:
    """``path`` relative to the repository (what the table shows), or as given when it lies outside."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def one_line_reason(exc: BaseException, limit: int = 160) -> str:
    """``AssertionError: claim 'x' failed ...``: the notebook's exception on one line, shortened."""
    name, value = getattr(exc, "ename", None), getattr(exc, "evalue", None)  # papermill's cell error
    text = f"{name}: {value}" if name else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _ipc_kernel_manager(socket_dir: str):
    """A kernel manager whose kernel talks over Unix sockets in ``socket_dir`` (mode 0700).

    Over TCP, ipykernel warns on every start that its traffic is unencrypted and readable by
    anyone on the machine's loopback; Unix sockets in a private folder are reachable by this
    user only, so the warning's cause is gone rather than hidden. The socket prefix must be an
    absolute path: the kernel runs in the notebook's folder, the client in ours.
    """
    from jupyter_client import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            kwargs.setdefault("transport", "ipc")
            kwargs.setdefault("ip", os.path.join(socket_dir, "kernel"))
            super().__init__(**kwargs)

    return IPCKernelManager


def execute_notebook(path: Path, *, build_dir: Path = REPO_ROOT / "build", parameters: dict | None = None,
                     timeout_s: int = 1800, kernel_name: str = "python3") -> NotebookRun:
    """Run one notebook with papermill; never raises for a failing notebook, reports it."""
    import papermill as pm

    path = Path(path).resolve()
    chapter = path.parent.name
    out = build_dir / "chapters" / chapter / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = build_dir / "figures" / chapter / path.stem
    saved = {k: os.environ.get(k) for k in ("COURSE_HEADLESS", "COURSE_FIGURE_DIR", "PYDEVD_DISABLE_FILE_VALIDATION")}
    os.environ.update(COURSE_HEADLESS="1", COURSE_FIGURE_DIR=str(figures), PYDEVD_DISABLE_FILE_VALIDATION="1")
    socket_dir = tempfile.mkdtemp(prefix="course-kernel-") if os.name == "posix" else None  # no Unix sockets on Windows
    engine_options = {"kernel_manager_class": _ipc_kernel_manager(socket_dir)} if socket_dir else {}
    start = time.perf_counter()
    try:
        pm.execute_notebook(str(path), str(out), parameters=parameters or {}, cwd=str(path.parent),
                            kernel_name=kernel_name, execution_timeout=timeout_s, progress_bar=False,
                            log_output=False, **engine_options)
        return NotebookRun(display_path(path), time.perf_counter() - start, True)
    except Exception as exc:  # papermill wraps the cell's error; keep its message for the table
        message = "\n".join(str(exc).strip().splitlines()[-15:])
        if out.exists():  # papermill writes the copy as it goes; a notebook it cannot read has none
            message += f"\n(executed copy with the failing cell: {display_path(out)})"
        return NotebookRun(display_path(path), time.perf_counter() - start, False, message, one_line_reason(exc))
    finally:
        if socket_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def progress_line(run: NotebookRun, width: int = 0) -> str:
    """The line printed as each notebook finishes: name, seconds, ok or FAILED with its reason."""
    line = f"{run.notebook:<{width}}  {run.seconds:7.1f} s  {run.status}"
    return line + (f": {run.reason}" if run.reason else "")


def print_table(runs: list[NotebookRun], file=None, wall_s: float | None = None) -> None:
    file = file or sys.stdout  # looked up per call: a caller (or a test) may have replaced sys.stdout
    width = max([len(r.notebook) for r in runs] + [8])
    print(f"\n{'notebook':<{width}}  {'seconds':>9}  status", file=file)
    print("-" * (width + 20), file=file)
    for r in runs:
        print(progress_line(r, width), file=file)
    total = sum(r.seconds for r in runs)
    failed = sum(not r.ok for r in runs)
    print("-" * (width + 20), file=file)
    wall = f" ({wall_s:.0f} s of wall time, notebooks in parallel)" if wall_s is not None else ""
    print(f"{len(runs)} notebook(s), {total:.0f} s{wall}, {failed} failed", file=file)


def _read_params(parser: argparse.ArgumentParser, file: str | None) -> dict:
    if not file:
        return {}
    try:
        overrides = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        parser.error(f"--params {file}: cannot read it as JSON ({exc})")
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        parser.error(f"--params {file}: expected {{notebook_stem: {{parameter: value}}}}, "
                     "e.g. tests/notebook_params/01_objectives.json")
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain_lib.notebooks",
        description="Execute chapter notebooks headlessly with papermill into build/ (what `make run` does). "
                    "Example, one notebook at the test suite's small sizes: python -m pretrain_lib.notebooks "
                    "chapters/01_objectives/01_masked_lm.ipynb --params tests/notebook_params/01_objectives.json")
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: every chapter notebook)")
    parser.add_argument("--build-dir", default=str(REPO_ROOT / "build"))
    parser.add_argument("--params", help="JSON file {notebook_stem: {param: value}} of parameter overrides")
    parser.add_argument("--timeout", type=int, default=1800, help="per-cell time limit in seconds")
    parser.add_argument("--jobs", type=int, default=1,
                        help="notebooks run at once, one thread each (notebooks that declare runs_alone run "
                             "first, one at a time); make run uses 2")
    parser.add_argument("--record-seconds", action="store_true",
                        help=f"write each notebook's seconds into {display_path(RUN_SECONDS)}, which orders the "
                             "notebooks longest first (make run RECORD=1, at the defaults with --jobs 2)")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.notebooks] or chapter_notebooks()
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"no such notebook(s): {', '.join(missing)}")
    overrides = _read_params(parser, args.params)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    width = max(len(display_path(p)) for p in paths)
    for p in paths:
        if args.params and p.stem not in overrides:
            print(f"({p.stem} has no entry in {args.params}: it runs at its defaults)", flush=True)
    before = None if args.params else tree_fingerprint()
    start = time.perf_counter()
    runs = run_all(paths, jobs=args.jobs, parameters=overrides, build_dir=Path(args.build_dir),
                   timeout_s=args.timeout, on_done=lambda run: print(progress_line(run, width), flush=True))
    wall = time.perf_counter() - start
    print_table(runs, wall_s=wall if args.jobs > 1 else None)
    if before is not None and tree_fingerprint() == before:   # a file edited during the run proves nothing
        record_defaults_passed(runs, Path(args.build_dir), before)
    if args.record_seconds:
        record_seconds(runs)
    for r in runs:
        if not r.ok:
            print(f"\n{r.notebook} failed:\n{r.error}", file=sys.stderr)
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
