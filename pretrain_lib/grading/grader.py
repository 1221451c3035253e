"""Grade one submitted notebook against its reference exercise with nbval.

Why not run the student's file: nbval compares each cell's new output with the output stored
in the *same* file, so a student who saved wrong (or edited) outputs would be compared with
themselves. The grader therefore takes only the student's ``answer`` cells (matched by cell
id, then by order), puts their sources into the reference exercise notebook (whose check
cells hold the solution's outputs) and runs nbval on that, in a private temporary folder, in
its own process and kernel, under a per-cell and a whole-notebook time limit.
"""
from __future__ import annotations

import copy
import json
import re
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[2]
EXERCISES_DIR = REPO_ROOT / "exercises"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_CELL_TIMEOUT_S = 120.0
OUTPUT_SHOWN_CHARS = 800        # expected / produced text kept in feedback, per check
_KILL_GRACE_S = 20.0            # the plugin enforces the limits; this is the backstop

# Run first in the kernel: caps what one cell may print so a print-in-a-loop cannot fill
# memory or the gradebook (check cells print a few lines, far below the cap).
_OUTPUT_CAP_CELL = '''\
def _grading_cap_output(limit=200_000):
    import sys
    from IPython import get_ipython
    state = {"chars": 0}
    for stream in (sys.stdout, sys.stderr):
        def write(text, _write=stream.write):
            if state["chars"] >= limit:
                return len(text)
            state["chars"] += len(text)
            if state["chars"] > limit:
                text = text[: len(text) - (state["chars"] - limit)] + "\\n[output truncated by the grader]\\n"
            return _write(text)
        stream.write = write
    get_ipython().events.register("pre_run_cell", lambda *args: state.update(chars=0))
_grading_cap_output()
del _grading_cap_output'''
_CAP_CELL_ID = "grading-output-cap"


# An answer cell runs in the same kernel as the checks, so it could replace ``check`` or
# ``print``. That cannot be prevented in-process; it is flagged for the instructor instead.
_TAMPERING = re.compile(r"pretrain_lib\.grading|grading\.checks|\bbuiltins\b|__builtins__|sys\.(stdout|stderr)\s*="
                        r"|^\s*def\s+(check|fmt|print)\b|^\s*(check|fmt|print)\s*=|\bget_ipython\b", re.MULTILINE)


class NotANotebook(ValueError):
    """The submitted file is not a readable Jupyter notebook."""


@dataclass
class Check:
    """One check cell of an exercise: what it is worth and what the solution printed."""
    cell_id: str
    name: str
    max_points: float
    expected: str


@dataclass
class CheckResult:
    check: Check
    passed: bool
    produced: str = ""
    note: str = ""

    @property
    def points(self) -> float:
        return self.check.max_points if self.passed else 0.0


@dataclass
class SubmissionResult:
    """The outcome of grading one notebook; ``status`` is graded, timeout, error or missing."""
    student: str
    exercise: str
    status: str
    checks: list[CheckResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def needs_review(self) -> bool:
        return any(n.startswith("REVIEW:") for n in self.notes)

    @property
    def points(self) -> float:
        return sum(c.points for c in self.checks)

    @property
    def max_points(self) -> float:
        return sum(c.check.max_points for c in self.checks)


# --- reading notebooks ------------------------------------------------------------------------

def _tags(cell) -> list[str]:
    tags = cell.get("metadata", {}).get("tags", [])
    return list(tags) if isinstance(tags, list) else []


def _stream_text(outputs) -> str:
    """What decides a check: the text a cell printed to stdout, and an error if it raised.

    stderr (library warnings) and the value of the last expression are not compared; see
    ``nbval_plugin._printed``.
    """
    parts = []
    for o in outputs:
        kind = o.get("output_type")
        if kind == "stream" and o.get("name") == "stdout":
            text = o.get("text", "")
            parts.append("".join(text) if isinstance(text, list) else text)
        elif kind == "error":
            parts.append(f"{o.get('ename')}: {o.get('evalue')}\n")
    return "".join(parts)


def _check_name(cell, used: set[str]) -> str:
    """A check's name: the first ``PASS name`` line the solution printed, else the cell id."""
    name = cell.get("id") or "check"
    for line in _stream_text(cell.get("outputs", [])).splitlines():
        if line.startswith("PASS "):
            name = line[5:].strip()
            break
    if name in used:
        name = f"{name} [{cell.get('id')}]"
    used.add(name)
    return name


def load_exercise(path: Path) -> nbformat.NotebookNode:
    """Read a reference exercise and check it has what grading needs."""
    nb = nbformat.read(path, as_version=4)
    checks = [c for c in nb.cells if c.cell_type == "code" and "check" in _tags(c)]
    if not checks:
        raise ValueError(f"{path}: no cell tagged 'check'; rebuild it with `python -m pretrain_lib.grading build`")
    for c in checks:
        if not c.outputs:
            raise ValueError(f"{path}: check cell {c.get('id')} has no reference output; "
                             "rebuild it with `python -m pretrain_lib.grading build`")
    return nb


def exercise_checks(exercise: nbformat.NotebookNode) -> list[Check]:
    """The checks of an exercise in notebook order."""
    used: set[str] = set()
    checks = []
    for cell in exercise.cells:
        if cell.cell_type == "code" and "check" in _tags(cell):
            points = cell.metadata.get("points", 1)
            if not isinstance(points, (int, float)) or isinstance(points, bool) or points < 0:
                raise ValueError(f"check cell {cell.get('id')}: 'points' must be a non-negative number, got {points!r}")
            checks.append(Check(cell_id=cell.get("id"), name=_check_name(cell, used), max_points=float(points),
                                expected=_stream_text(cell.outputs)))
    return checks


def exercise_id(exercise: nbformat.NotebookNode, path: Path) -> str:
    return exercise.metadata.get("course", {}).get("exercise_id") or path.stem


def read_submission(path: Path) -> nbformat.NotebookNode:
    """Parse a student's file; raises :class:`NotANotebook` saying what is wrong."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise NotANotebook(f"cannot read the file: {exc.strerror}") from None
    try:
        data = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise NotANotebook(f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                           "was the notebook saved completely? Re-save it in Jupyter and submit again") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells", data.get("worksheets")), list):
        raise NotANotebook("valid JSON but not a Jupyter notebook (no list of 'cells')")
    try:
        nb = nbformat.reads(json.dumps(data), as_version=4)
    except Exception as exc:  # nbformat raises several types for malformed notebooks
        raise NotANotebook(f"not a readable notebook: {type(exc).__name__}: {str(exc)[:200]}") from None
    for cell in nb.cells:
        if not isinstance(cell, dict) or "cell_type" not in cell:
            raise NotANotebook("a cell without a 'cell_type'; the file was edited outside Jupyter")
        if isinstance(cell.get("source"), list):
            cell["source"] = "".join(cell["source"])
        if not isinstance(cell.get("source", ""), str):
            raise NotANotebook("a cell whose 'source' is not text")
    return nb


# --- assembling the notebook that is run ----------------------------------------------------

def assemble(exercise: nbformat.NotebookNode, submission: nbformat.NotebookNode) -> tuple[nbformat.NotebookNode, list[str]]:
    """The reference exercise with the student's answer sources put in; returns it and notes.

    Nothing else of the submission is used: its outputs, check cells, other cells and
    metadata are ignored. Answer cells are matched by cell id; those whose id is not found
    are matched by order with the student's answer-tagged cells left over.
    """
    graded = copy.deepcopy(exercise)
    notes: list[str] = []
    ref_answers = [c for c in graded.cells if c.cell_type == "code" and "answer" in _tags(c)]
    student_code = [c for c in submission.cells if c.get("cell_type") == "code"]
    by_id = {c.get("id"): c for c in student_code if c.get("id")}
    ref_ids = {c.get("id") for c in ref_answers}
    leftovers = [c for c in student_code if "answer" in _tags(c) and c.get("id") not in ref_ids]
    for number, ref in enumerate(ref_answers, 1):
        student_cell = by_id.get(ref.get("id"))
        if student_cell is None and leftovers:
            student_cell = leftovers.pop(0)
            notes.append(f"answer cell {number} (id {ref.get('id')}) was not found by id; "
                         f"used your answer cell with id {student_cell.get('id')} in its place")
        if student_cell is None:
            notes.append(f"answer cell {number} (id {ref.get('id')}) is missing from your notebook "
                         "(deleted, or its tag removed); it was graded as not answered")
            continue
        ref.source = student_cell.get("source", "")
        suspicious = _TAMPERING.search(ref.source)
        if suspicious:
            notes.append(f"REVIEW: answer cell {number} (id {ref.get('id')}) touches the grader or the output "
                         f"streams ({suspicious.group(0).strip()!r}); the instructor will read this cell")
    count = 0
    for cell in graded.cells:
        if cell.cell_type != "code":
            continue
        if "check" in _tags(cell):
            count += 1
            cell.execution_count = count  # nbval compares only cells that have an execution count
        else:
            cell.outputs, cell.execution_count = [], None
    cap = nbformat.v4.new_code_cell(_OUTPUT_CAP_CELL, id=_CAP_CELL_ID)
    cap.metadata["tags"] = ["nbval-ignore-output"]
    graded.cells.insert(0, cap)
    return graded, notes


# --- running nbval ------------------------------------------------------------------------------

_ACTIVE: set[subprocess.Popen] = set()
_ACTIVE_LOCK = threading.Lock()


def _kill_process_tree(proc: subprocess.Popen) -> None:
    import psutil
    try:
        parent = psutil.Process(proc.pid)
        victims = parent.children(recursive=True) + [parent]
    except psutil.Error:
        victims = []
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=5)


def kill_all_running() -> None:
    """Stop every grading subprocess this process started (used on Ctrl-C)."""
    with _ACTIVE_LOCK:
        procs = list(_ACTIVE)
    for proc in procs:
        _kill_process_tree(proc)


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",   # only nbval and our plugin: faster, predictable
        "COURSE_HEADLESS": "1",
        "MPLBACKEND": "Agg",
        "JUPYTER_PLATFORM_DIRS": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    env.setdefault("OMP_NUM_THREADS", "1")      # --jobs gives the parallelism
    env.pop("PYTEST_ADDOPTS", None)
    return env


def run_nbval(notebook: nbformat.NotebookNode, *, timeout_s: float, cell_timeout_s: float) -> tuple[list[dict], str]:
    """Run nbval on ``notebook`` in a fresh temporary folder; returns the plugin's records and the log tail.

    The kernel's working folder holds only this notebook; the records and log live in a
    sibling folder. Everything is deleted afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="grading-") as tmp:
        work, private = Path(tmp, "work"), Path(tmp, "private")
        work.mkdir()
        private.mkdir()
        nb_path = work / "submission.ipynb"
        nbformat.write(notebook, nb_path)
        (private / "pytest.ini").write_text("[pytest]\n")
        results, log_path = private / "results.jsonl", private / "pytest.log"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "nbval.plugin",
               "-p", "pretrain_lib.grading.nbval_plugin", "-c", str(private / "pytest.ini"),
               "--rootdir", str(work), "--nbval", "--nbval-current-env",
               f"--nbval-cell-timeout={max(1, int(round(cell_timeout_s)))}",
               f"--nbval-kernel-startup-timeout={max(10, int(min(60, timeout_s)))}",
               f"--grading-notebook-timeout={timeout_s}", f"--grading-results={results}", str(nb_path)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=work, env=_kernel_env(), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            with _ACTIVE_LOCK:
                _ACTIVE.add(proc)
            try:
                proc.wait(timeout=timeout_s + _KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                _kill_process_tree(proc)
                proc.wait()
            finally:
                with _ACTIVE_LOCK:
                    _ACTIVE.discard(proc)
        records = []
        if results.exists():
            for line in results.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        _kill_kernel_group(records)
        with open(log_path, "rb") as log:
            log.seek(max(0, log_path.stat().st_size - 4000))
            tail = log.read().decode("utf-8", errors="replace")
        if proc.returncode is not None and proc.returncode < 0 or not any(r.get("event") == "end" for r in records):
            tail = f"[the grading process ended without finishing (return code {proc.returncode})]\n" + tail
    return records, tail


def _kill_kernel_group(records: list[dict]) -> None:
    """Kill what the student's code left running in the background (the kernel's process group)."""
    import signal
    if not hasattr(os, "killpg"):  # Windows: no process groups; the kernel was stopped by nbval
        return
    for r in records:
        pid = r.get("kernel_pid") if r.get("event") == "start" else None
        if isinstance(pid, int) and pid > 1:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, OSError):
                pass


# --- grading ---------------------------------------------------------------------------------------

def _truncate(text: str, limit: int = OUTPUT_SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n... [{len(text) - limit} more characters]\n"


def grade_notebook(submission: Path, exercise_path: Path, *, student: str = "", timeout_s: float = DEFAULT_TIMEOUT_S,
                   cell_timeout_s: float = DEFAULT_CELL_TIMEOUT_S) -> SubmissionResult:
    """Grade one submitted notebook against the reference exercise at ``exercise_path``.

    Never raises for a bad submission: the returned status says what happened.
    """
    start = time.monotonic()
    exercise = load_exercise(exercise_path)
    name = exercise_id(exercise, exercise_path)
    checks = exercise_checks(exercise)
    result = SubmissionResult(student=student, exercise=name, status="error",
                              checks=[CheckResult(c, passed=False, note="not run") for c in checks])
    try:
        student_nb = read_submission(submission)
    except NotANotebook as exc:
        result.notes.append(f"{Path(submission).name}: {exc}")
        result.seconds = time.monotonic() - start
        return result
    claimed = student_nb.metadata.get("course", {}).get("exercise_id") if isinstance(
        student_nb.metadata.get("course"), dict) else None
    if claimed and claimed != name:
        result.notes.append(f"the notebook's metadata says it is exercise {claimed!r}, graded as {name!r}")
    graded, notes = assemble(exercise, student_nb)
    result.notes.extend(notes)
    cell_timeout_s = min(cell_timeout_s, timeout_s)
    records, log_tail = run_nbval(graded, timeout_s=timeout_s, cell_timeout_s=cell_timeout_s)
    cells = {r.get("id"): r for r in records if r.get("event") == "cell"}
    finished = any(r.get("event") == "end" for r in records)
    timed_out = any(r.get("timed_out") or r.get("notebook_timed_out") for r in cells.values())
    died = [r for r in cells.values() if r.get("kernel_died")]
    for cr in result.checks:
        rec = cells.get(cr.check.cell_id)
        if rec is None:
            cr.note = "not run"
            continue
        cr.passed = bool(rec.get("passed"))
        cr.produced = _stream_text(rec.get("produced", []))
        cr.note = "" if cr.passed else _failure_note(rec)
    if timed_out or (not finished and time.monotonic() - start >= timeout_s):
        result.status = "timeout"
        slow = next((r for r in records if r.get("timed_out")), None)
        where = f" in the cell with id {slow.get('id')}" if slow else ""
        result.notes.append(f"time limit reached{where} (per cell {cell_timeout_s:g} s, whole notebook {timeout_s:g} s); "
                            "the kernel was stopped and the checks after it scored 0")
    elif died:
        result.status = "error"
        first = min(died, key=lambda r: r.get("index", 0))
        result.notes.append(f"the kernel process died in the cell with id {first.get('id')}: "
                            "the code ended the kernel process (os._exit, os.kill, a crash in native code) or it "
                            "ran out of memory; the checks after it scored 0")
    elif not finished:
        result.status = "error"
        result.notes.append("the grading run did not finish; last lines of its log:\n" + _truncate(log_tail, 1500))
    elif not cells:
        result.status = "error"
        result.notes.append("nbval ran no cell; last lines of its log:\n" + _truncate(log_tail, 1500))
    else:
        result.status = "graded"
    result.seconds = time.monotonic() - start
    return result


def _failure_note(rec: dict) -> str:
    if rec.get("timed_out"):
        return "time limit reached in this cell"
    if rec.get("notebook_timed_out"):
        return "not run: the notebook's time limit was reached"
    if rec.get("kernel_died"):
        return "not run: the kernel had stopped"
    message = (rec.get("message") or "").strip()
    return message.splitlines()[0] if message else "output differs"


# --- feedback ---------------------------------------------------------------------------------------

def _fmt_points(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def feedback_markdown(result: SubmissionResult) -> str:
    """What the student reads: the score, each check, and for a failure expected vs produced."""
    who = f" — {result.student}" if result.student else ""
    lines = [f"# {result.exercise}{who}", "",
             f"**Score: {_fmt_points(result.points)} / {_fmt_points(result.max_points)}** (status: {result.status})", "",
             "Graded by running your answer cells inside the reference exercise: outputs stored in your file, "
             "edited check cells and cells you added are not used.", ""]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    if result.checks:
        lines += ["## Checks", "", "| check | points | result |", "|---|---|---|"]
        for cr in result.checks:
            verdict = "pass" if cr.passed else "FAIL" + (f" ({cr.note})" if cr.note else "")
            name = cr.check.name.replace("|", "\\|")
            lines.append(f"| {name} | {_fmt_points(cr.points)} / {_fmt_points(cr.check.max_points)} | {verdict} |")
        lines.append("")
    failed = [cr for cr in result.checks if not cr.passed and not cr.note.startswith("not run")]
    if failed:
        lines += ["## Failures", ""]
        for cr in failed:
            lines += [f"### {cr.check.name}", "", "Expected:", "", "```", _truncate(cr.check.expected).rstrip(), "```", "",
                      "Your notebook produced:", "", "```", _truncate(cr.produced).rstrip() or "(nothing)", "```", ""]
    return "\n".join(lines)
