"""Grade one submitted notebook: the student's answers, the reference exercise, hidden probes.

1. Only the student's answers are taken from their file, matched by the names each answer
   defines (``layout.match_answers``), with the helper cells they use (a cell of the student's
   defining a name an answer uses); everything else comes from the reference exercise.
2. The assembled notebook runs under nbval in the submission's sandbox (``runner``). Its check
   cells print PASS/FAIL lines as the student saw them; their reference outputs stay outside,
   and no probe code, seed or expected value enters this kernel.
3. After the kernel has ended, a fresh probe process in a sandbox of its own loads the same
   answers and calls them on inputs drawn from a secret seed (``probe_runner.run_isolated``);
   it receives the probe code and the seed only after the answers are loaded, and its values
   come back on its own stdout pipe. The same probes run on the solution's answers in a
   separate trusted process (``reference``). A check scores its points when the probe's judge,
   run here, accepts the student's values *and* the visible output shows the reference lines
   (extra lines, such as a leftover debug print, are allowed when a probe decides). Patching
   ``print``, the checks, IPython hooks or the probe machinery in the kernel, reading files or
   hard-coding the visible cases therefore gains nothing.
"""
from __future__ import annotations

import ast
import copy
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from . import layout
from .feedback import feedback_markdown  # noqa: F401 - the grader's public face: grade, then write feedback
from .probe_runner import python_cells, run_isolated
from .reference import Exercise, load_exercise, reference_values
from .review import review_source
from .runner import run_nbval
from .sandbox import default_memory_limit, hidden_paths

REPO_ROOT = Path(__file__).resolve().parents[2]
EXERCISES_DIR = REPO_ROOT / "exercises"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_CELL_TIMEOUT_S = 120.0


class NotANotebook(ValueError):
    """The submitted file is not a readable Jupyter notebook."""


@dataclass
class CheckResult:
    check: "object"          # reference.Check
    passed: bool
    produced: str = ""
    note: str = ""
    hidden: str = ""         # why the hidden probe failed ("" when it passed or did not run)

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
    ignored_cells: list[tuple[int, str]] = field(default_factory=list)

    @property
    def needs_review(self) -> bool:
        return any(n.startswith("REVIEW:") for n in self.notes)

    @property
    def points(self) -> float:
        return sum(c.points for c in self.checks)

    @property
    def max_points(self) -> float:
        return sum(c.check.max_points for c in self.checks)


def _same_output(produced: str, expected: str, extra_lines_ok: bool = False) -> bool:
    """The same printed lines; with ``extra_lines_ok`` (a check whose points come from a hidden probe),
    the expected lines in order among others, so a leftover debug print costs nothing."""
    def norm(t):
        return [line.rstrip() for line in t.strip().splitlines()]
    got, want = norm(produced), norm(expected)
    if got == want:
        return True
    if not extra_lines_ok or not want:
        return False
    it = iter(got)
    return all(any(line == w for line in it) for w in want)


def read_submission(path: Path, *, max_bytes: int = 16 * 2**20, max_cell_chars: int = 512 * 2**10,
                    max_cells: int = 20_000) -> nbformat.NotebookNode:
    """Parse a student's file; raises :class:`NotANotebook` saying what is wrong.

    Bounded before anything is parsed: only a regular file is read (never through a symbolic
    link, never a folder, a pipe or a device), of at most ``max_bytes``; then at most
    ``max_cells`` cells, each code cell at most ``max_cell_chars`` characters. A UTF-8
    byte-order mark, Windows line endings and nbformat 4.0-4.4 files (no cell ids) read like
    any other notebook. Stored outputs and attachments are dropped: the grader never uses them.
    """
    import errno

    from .sandbox import read_regular_file
    try:
        raw = read_regular_file(path, max_bytes)
    except ValueError:
        raise NotANotebook(f"the file is larger than {max_bytes // 2**20} MB, the limit for one notebook; clear its "
                           "outputs (in Jupyter: Kernel, Restart Kernel and Clear All Outputs), save it and "
                           "submit again") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotANotebook("the file is a symbolic link, not a notebook; submit the notebook file itself") from None
        if exc.errno == errno.EINVAL and str(exc.strerror).startswith("not a regular file"):
            raise NotANotebook(f"not a notebook file: it is {str(exc.strerror).split('(', 1)[-1].rstrip(')')}") \
                from None
        raise NotANotebook(f"cannot read the file: {exc.strerror}") from None
    text = raw.decode("utf-8-sig", errors="replace")      # a byte-order mark is accepted
    del raw
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NotANotebook(f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                           "was the notebook saved completely? Re-save it in Jupyter and submit again") from None
    except RecursionError:
        raise NotANotebook("not a readable notebook: its JSON is nested too deeply") from None
    del text
    if not isinstance(data, dict) or not isinstance(data.get("cells", data.get("worksheets")), list):
        raise NotANotebook("valid JSON but not a Jupyter notebook (no list of 'cells')")
    raw_cells = data["cells"] if isinstance(data.get("cells"), list) else [
        c for w in data["worksheets"] if isinstance(w, dict) and isinstance(w.get("cells"), list) for c in w["cells"]]
    if len(raw_cells) > max_cells:
        raise NotANotebook(f"{len(raw_cells)} cells, over the limit of {max_cells} for one notebook")
    for number, cell in enumerate(raw_cells, 1):
        if not isinstance(cell, dict):
            continue
        for key in ("source", "input"):
            src = cell.get(key)
            size = len(src) if isinstance(src, str) else sum(len(x) for x in src if isinstance(x, str)) \
                if isinstance(src, list) else 0
            if size > max_cell_chars and cell.get("cell_type") != "markdown":
                raise NotANotebook(f"cell {number} holds {size:,} characters, over the limit of {max_cell_chars:,} "
                                   "for one cell; an answer is a few functions: remove the pasted data or output")
        if "outputs" in cell:
            cell["outputs"] = []
        cell.pop("attachments", None)
    try:
        nb = nbformat.reads(json.dumps(data), as_version=4)
    except Exception as exc:  # nbformat raises several types for malformed notebooks
        raise NotANotebook(f"not a readable notebook: {type(exc).__name__}: {str(exc)[:200]}") from None
    for cell in nb.cells:
        if not isinstance(cell, dict) or "cell_type" not in cell:
            raise NotANotebook("a cell without a 'cell_type'; the file was edited outside Jupyter")
        if isinstance(cell.get("source"), list):
            cell["source"] = "".join(x for x in cell["source"] if isinstance(x, str))
        if not isinstance(cell.get("source", ""), str):
            raise NotANotebook("a cell whose 'source' is not text")
        if "\r" in cell.get("source", ""):                # Windows (or old Mac) line endings
            cell["source"] = cell["source"].replace("\r\n", "\n").replace("\r", "\n")
    return nb


# --- assembling ---------------------------------------------------------------------------------

NOTES_CAP = 40                 # notes in one feedback file (the rest are counted)
NOTE_CHARS = 1_500             # characters of one note
IGNORED_LISTED = 10            # ignored cells named one by one
_BODY_MAGICS = re.compile(r"\A\s*%%(time|capture)\b[^\n]*(\n|\Z)")


@dataclass
class Assembled:
    notebook: nbformat.NotebookNode
    notes: list[str]
    ignored: list[tuple[int, str]]
    missing: set[str]                                  # names of answers not found
    probe_cells: list[tuple[str, str]] = field(default_factory=list)   # (cell id, source) the probes load


def _names(ex: Exercise, ref_id: str) -> list[str]:
    return ex.defines.get(ref_id, [])


def strip_body_magic(source: str) -> str:
    """``%%time`` / ``%%capture`` cells run their body as Python: grade the body (IPython would run it)."""
    return _BODY_MAGICS.sub("", source, count=1) if isinstance(source, str) else source


def _used_names(source: str) -> set[str]:
    tree = layout.parse(source)
    if tree is None:
        return set(re.findall(r"[A-Za-z_]\w*", source))
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def _helpers(match: layout.Match, cells, answer_ids: list[str]) -> dict[str, list[int]]:
    """Ignored cells defining names the answers use (directly or through another helper): answer id -> cell numbers."""
    by_number = {n: c for n, c in enumerate(cells, 1)}
    candidates = {}
    for n, _ in match.ignored:
        src = by_number[n].get("source", "")
        names = layout.defined_names(src)
        if names:
            candidates[n] = (src, names)
    slot_uses = {rid: _used_names(match.sources.get(rid, "")) for rid in answer_ids if match.sources.get(rid)}
    placed: dict[int, str] = {}
    changed = True
    while changed:
        changed = False
        for n, (src, names) in candidates.items():
            users = [rid for rid, used in slot_uses.items() if names & used]
            users += [placed[m] for m in placed if m != n and names & _used_names(candidates[m][0])]
            if not users:
                continue
            slot = min(users, key=answer_ids.index)
            if placed.get(n) != slot:
                placed[n] = slot
                changed = True
    out: dict[str, list[int]] = {}
    for n in sorted(placed):
        out.setdefault(placed[n], []).append(n)
    return out


def assemble(ex: Exercise, submission: nbformat.NotebookNode, seed: int | None = None) -> Assembled:
    """The reference exercise with the student's answers (and the helper cells they use) in.

    No probe code and no seed enter this notebook: the hidden probes run afterwards in a
    process of their own (``probe_runner.run_isolated``) on ``probe_cells``.
    """
    graded = copy.deepcopy(ex.notebook)
    student_cells = copy.deepcopy(submission.cells)
    for cell in student_cells:
        if cell.get("cell_type") == "code":
            cell["source"] = strip_body_magic(cell.get("source", ""))
    match = layout.match_answers(ex.notebook.cells, student_cells)
    notes = list(match.notes)
    missing: set[str] = set()
    for rid in match.missing:
        names = _names(ex, rid)
        missing.update(names)
        notes.append(f"no cell of your notebook defines {layout.names_label(names)}; that answer was graded as not "
                     "answered (was its cell deleted, or the function renamed?)")
    helpers = _helpers(match, student_cells, ex.answer_ids)
    helper_numbers = {n for numbers in helpers.values() for n in numbers}
    ignored = [(n, first) for n, first in match.ignored if n not in helper_numbers]
    for n in sorted(helper_numbers):
        slot = next(rid for rid, numbers in helpers.items() if n in numbers)
        defined = sorted(layout.defined_names(student_cells[n - 1].get("source", "")))
        notes.append(f"your cell {n} defines {layout.names_label(defined[:5])}, which your answers use: it was run "
                     f"before the answer defining {layout.names_label(_names(ex, slot))}")
    listed = ", ".join(f"{n} (`{first}`)" for n, first in ignored[:IGNORED_LISTED])
    if ignored:
        more = f" and {len(ignored) - IGNORED_LISTED} more" if len(ignored) > IGNORED_LISTED else ""
        notes.append(f"your cell{'s' if len(ignored) > 1 else ''} {listed}{more} "
                     f"{'are' if len(ignored) > 1 else 'is'} not an answer cell and define{'' if len(ignored) > 1 else 's'} "
                     "no name your answers use, so "
                     f"{'they were' if len(ignored) > 1 else 'it was'} not run")
    reviewed = [(f"the answer defining {layout.names_label(_names(ex, rid))}", match.sources.get(rid))
                for rid in ex.answer_ids]
    reviewed += [(f"your helper cell {n}", student_cells[n - 1].get("source", "")) for n in sorted(helper_numbers)]
    for what, source in reviewed:
        if not source:
            continue
        for reason in review_source(source, forbidden=ex.forbidden, modules=ex.module_names):
            notes.append(f"REVIEW: {what} {reason}; the instructor will read this answer")
    cells = []
    for cell in graded.cells:
        if layout.is_code(cell, "answer"):
            for n in helpers.get(cell.get("id"), []):
                helper = nbformat.v4.new_code_cell(student_cells[n - 1].get("source", ""), id=f"grading-helper-{n}")
                helper.metadata["grading_helper"] = n
                cells.append(helper)
            cell.source = match.sources.get(cell.get("id"), "")
        cells.append(cell)
    for cell in cells:
        if cell.cell_type != "code":
            continue
        cell.metadata["tags"] = sorted(set(layout.tags(cell)) | {"nbval-ignore-output"})
        if layout.is_code(cell, "check"):
            cell.outputs = []                      # the expected output never enters the sandbox
    graded.cells = cells
    layout.number_checks(graded.cells)
    probe_cells = [(c.get("id"), c.source) for c in graded.cells
                   if c.cell_type == "code" and not layout.is_code(c, "check") and c.source.strip()]
    return Assembled(graded, notes, ignored, missing, probe_cells)


def cap_notes(notes: list[str]) -> list[str]:
    """Notes without repeats, each at most ``NOTE_CHARS`` long, at most ``NOTES_CAP`` of them."""
    seen, out = set(), []
    for note in notes:
        note = str(note)
        note = note if len(note) <= NOTE_CHARS else note[:NOTE_CHARS] + " [...]"
        if note not in seen:
            seen.add(note)
            out.append(note)
    if len(out) > NOTES_CAP:
        keep = [n for n in out if n.startswith("REVIEW:")][:NOTES_CAP // 2]
        rest = [n for n in out if n not in keep][:NOTES_CAP - len(keep)]
        dropped = len(out) - len(keep) - len(rest)
        out = [n for n in out if n in keep or n in rest] + [f"... and {dropped} more notes"]
    return out


# --- grading ------------------------------------------------------------------------------------

def grade_notebook(submission: Path, exercise: Exercise | Path, *, student: str = "",
                   timeout_s: float = DEFAULT_TIMEOUT_S, cell_timeout_s: float = DEFAULT_CELL_TIMEOUT_S,
                   seed: int | None = None, memory_bytes: int | None = None, sandbox: bool = True,
                   hide: list[Path] = ()) -> SubmissionResult:
    """Grade one submitted notebook against a reference exercise. Never raises for a bad submission."""
    start = time.monotonic()
    ex = exercise if isinstance(exercise, Exercise) else load_exercise(Path(exercise))
    seed = secrets.randbits(62) if seed is None else seed
    result = SubmissionResult(student=student, exercise=ex.name, status="error",
                              checks=[CheckResult(c, passed=False, note="not run") for c in ex.checks])
    try:
        student_nb = read_submission(submission)
    except NotANotebook as exc:
        result.notes.append(f"{Path(submission).name}: {exc}")
        result.seconds = time.monotonic() - start
        return result
    course = student_nb.metadata.get("course")
    claimed = course.get("exercise_id") if isinstance(course, dict) else None
    if isinstance(claimed, str) and claimed and claimed != ex.name:
        result.notes.append(f"the notebook's metadata says it is exercise {claimed[:80]!r}, graded as {ex.name!r}")
    reference, ref_note = reference_values(ex, seed)
    if ref_note:
        result.notes.append(ref_note)
    unprobed = [c.check_id for c in ex.checks if c.check_id not in ex.judges]
    if reference is not None and unprobed:
        result.notes.append(f"checks {', '.join(unprobed)} have no hidden probe: their points come from the visible "
                            "output only")
    built = assemble(ex, student_nb)
    result.notes.extend(built.notes)
    result.ignored_cells = built.ignored
    cell_timeout_s = min(cell_timeout_s, timeout_s)
    memory_bytes = memory_bytes or default_memory_limit(1)
    hide = hidden_paths([ex.path.parent, *([ex.solution.parent] if ex.solution else []), *hide])
    run = run_nbval(built.notebook, timeout_s=timeout_s, cell_timeout_s=cell_timeout_s,
                    memory_bytes=memory_bytes, sandbox=sandbox, hide=hide)
    probes_out = _probe(ex, built, run, reference, seed, result, timeout_s=timeout_s, cell_timeout_s=cell_timeout_s,
                        memory_bytes=memory_bytes, sandbox=sandbox, hide=hide)
    _score(result, run, built, ex, reference, seed, probes_out)
    _status(result, run, timeout_s, cell_timeout_s, memory_bytes, time.monotonic() - start)
    result.notes = cap_notes(result.notes)
    result.seconds = time.monotonic() - start
    return result


PROBE_GRACE_S = 30.0    # the probe process's limit is the notebook's plus this (Python and torch start again)


def _probe(ex: Exercise, built: Assembled, run, reference: dict | None, seed: int, result: SubmissionResult, *,
           timeout_s: float, cell_timeout_s: float, memory_bytes: int, sandbox: bool, hide: list[Path]) -> dict:
    """The hidden probes' values from a fresh probe process, after the kernel has ended.

    It loads the cells the kernel completed, in order, up to the first cell that hit a time
    limit or ended the kernel (what follows scored 0 anyway), and probes the checks that ran.
    """
    if reference is None:
        return {}
    cells = {r.get("id"): r for r in run.records if r.get("event") == "cell"}
    ran = [c.check_id for c in ex.checks if c.check_id in ex.judges and c.cell_id in cells]
    if not ran:
        return {}
    sources = []
    for cid, source in built.probe_cells:
        rec = cells.get(cid)
        if rec is None or rec.get("timed_out") or rec.get("notebook_timed_out") or rec.get("kernel_died"):
            break
        sources.append(source)
    values, note = run_isolated(python_cells(sources), ex.probe_source, ran, seed,
                                timeout_s=timeout_s + PROBE_GRACE_S, cell_timeout_s=cell_timeout_s,
                                memory_bytes=memory_bytes, hide=hide, sandbox=sandbox)
    if note:
        result.notes.append(note + "; the checks it did not report scored 0")
    return values


def _score(result: SubmissionResult, run, built: Assembled, ex: Exercise, reference: dict | None, seed: int,
           probes_out: dict | None = None) -> None:
    cells = {r.get("id"): r for r in run.records if r.get("event") == "cell"}
    probes_out = probes_out or {}
    for cr in result.checks:
        rec = cells.get(cr.check.cell_id)
        if rec is None:
            cr.note = "not run"
            continue
        cr.note = ""
        cr.produced = layout.stream_text(rec.get("produced", []))
        probed = reference is not None and cr.check.check_id in ex.judges
        visible = bool(rec.get("passed")) and _same_output(cr.produced, cr.check.expected, extra_lines_ok=probed)
        answer = cr.check.answer
        if answer and answer in built.missing:
            cr.passed, cr.note = False, f"`{answer}` was not found in your notebook"
            continue
        ok, why = _judge(ex, cr.check.check_id, probes_out.get(cr.check.check_id), reference, seed)
        cr.passed = visible and ok
        if not visible:
            cr.note = _failure_note(rec) if not rec.get("passed") else "output differs from the reference"
        if not ok:
            cr.hidden = why
            cr.note = cr.note or "wrong on the grader's hidden inputs"


def _scrub(text: str, seed: int) -> str:
    """Never show the secret seed (or the numbers the probes derive from it) in feedback."""
    for n in sorted({int(seed), int(seed) % 2**31, int(seed) % 10**6, int(seed) % 2**32}, reverse=True):
        if n >= 1000:
            text = text.replace(str(n), "(secret)")
    return text


def _judge(ex: Exercise, cid: str, student, reference: dict | None, seed: int) -> tuple[bool, str]:
    if reference is None or cid not in ex.judges:   # nothing to compare with: visible output only
        return True, ""
    ref = reference.get(cid)
    if not isinstance(ref, dict) or "value" not in ref:
        return False, f"the grader's reference failed on this check ({(ref or {}).get('error', 'no value')})"
    inputs = ex.inputs.get(cid) or "fresh inputs drawn from this grading run's secret seed"
    if not isinstance(student, dict):
        return False, "the hidden check did not report (see the notes: the probe process stopped or timed out)"
    if "error" in student or "value" not in student:
        error = _scrub(str(student.get("error", "an error"))[:200], seed)
        if error == "not implemented yet":
            return False, "not answered yet (the stub raises NotImplementedError)"
        return False, f"your code raised {error} (inputs: {inputs})"
    try:
        ok, why = ex.judges[cid](student["value"], ref["value"], seed)
    except Exception as exc:  # a malformed value from the probe process fails the check, not the grader
        return False, (f"your code returned values of an unexpected shape or type ({type(exc).__name__}; "
                       f"inputs: {inputs})")
    if ok is True:
        return True, ""
    why = _scrub(str(why or "the values differ from the expected ones")[:400], seed)
    return False, f"{why} (inputs: {inputs})"


def _failure_note(rec: dict) -> str:
    if rec.get("timed_out"):
        return "time limit reached in this cell"
    if rec.get("notebook_timed_out"):
        return "not run: the notebook's time limit was reached"
    if rec.get("kernel_died"):
        return "not run: the kernel had stopped"
    errors = [o for o in rec.get("produced", []) if o.get("output_type") == "error"]
    if errors:
        what = f"{errors[0].get('ename')}: {errors[0].get('evalue')}".strip().rstrip(":").splitlines()[0]
        return f"the cell raised {what[:200]}"
    message = (rec.get("message") or "").strip()
    return message.splitlines()[0][:300] if message else "the cell raised an error"


def _status(result: SubmissionResult, run, timeout_s: float, cell_timeout_s: float, memory_bytes, elapsed: float):
    cells = [r for r in run.records if r.get("event") == "cell"]
    finished = any(r.get("event") == "end" for r in run.records)
    timed_out = any(r.get("timed_out") or r.get("notebook_timed_out") for r in cells)
    died = [r for r in cells if r.get("kernel_died")]
    if run.out_of_memory:
        result.status = "error"
        result.notes.append(f"out of memory: the code used more than the grader's memory limit "
                            f"({(memory_bytes or 0) / 2**30:.1f} GB) and was stopped; the checks after it scored 0")
    elif timed_out or (not finished and elapsed >= timeout_s):
        result.status = "timeout"
        slow = next((r for r in cells if r.get("timed_out")), None)
        where = f" in the cell with id {slow.get('id')}" if slow else ""
        result.notes.append(f"time limit reached{where} (per cell {cell_timeout_s:g} s, whole notebook "
                            f"{timeout_s:g} s); the kernel was stopped and the checks after it scored 0")
    elif died:
        result.status = "error"
        first = min(died, key=lambda r: r.get("index", 0))
        result.notes.append(f"the kernel process died in the cell with id {first.get('id')}: the code ended the kernel "
                            "process (os._exit, os.kill, a crash in native code) or ran out of memory; "
                            "the checks after it scored 0")
    elif not finished or not cells:
        result.status = "error"
        tail = run.log_tail if len(run.log_tail) < 1500 else "..." + run.log_tail[-1500:]
        result.notes.append(f"the grading run did not finish (return code {run.returncode}); last lines of its log:\n"
                            + tail)
    else:
        result.status = "graded"


__all__ = ["assemble", "feedback_markdown", "grade_notebook", "load_exercise", "read_submission", "NotANotebook",
           "SubmissionResult", "CheckResult"]
