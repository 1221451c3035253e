"""Grade a whole class: find submissions, grade them N at a time, write the gradebook as they finish.

Layout read: ``SUBMISSIONS_DIR/<student>/<exercise>.ipynb`` (the folder name is the student id;
a notebook is matched to an exercise by its file name, ``<exercise> (1).ipynb`` included, else by
``course.exercise_id`` in its metadata; of several copies of one exercise the newest is graded
and the feedback names the others). Layout written: ``OUT_DIR/gradebook.csv`` (one column per
check, named by its stable ``check_id``) and ``OUT_DIR/feedback/<student>/<exercise>.md``.

Each row is appended (and flushed) when its submission finishes, so an interrupted run loses
nothing; a re-run keeps the rows whose status is ``graded`` and whose file is unchanged, and
grades the rest (``force=True`` grades everything again).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import secrets
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from .feedback import feedback_markdown, fmt_points
from .grader import (DEFAULT_CELL_TIMEOUT_S, DEFAULT_TIMEOUT_S, EXERCISES_DIR, CheckResult, SubmissionResult,
                     grade_notebook)
from .reference import Exercise, default_solutions_dir, load_exercise
from .runner import kill_all_running
from .sandbox import default_memory_limit

BASE_COLUMNS = ["student", "exercise", "points", "max_points", "status"]
STATE_FILE = ".submission_hashes.json"   # which file each graded row came from (resubmissions are regraded)
TOTALS_FILE = "totals.csv"               # one row per student: total points over every exercise


@dataclass
class ClassReport:
    rows_written: int = 0
    skipped: int = 0
    not_graded: list[tuple[str, str, str]] = field(default_factory=list)   # (student, exercise, status)
    missing: list[tuple[str, str]] = field(default_factory=list)
    review: list[tuple[str, str]] = field(default_factory=list)            # answers that touch the grader
    same: list[tuple[str, str, str]] = field(default_factory=list)          # (student, exercise, same as what)
    extra: list[tuple[str, int, int]] = field(default_factory=list)         # (exercise, submitted by, students)
    odd_entries: list[tuple[str, str]] = field(default_factory=list)        # (student, entry not graded and why)
    seconds: float = 0.0


def load_exercises(exercises_dir: Path = EXERCISES_DIR, solutions_dir: Path | None = None) -> dict[str, Exercise]:
    """Every built exercise in ``exercises_dir`` by exercise id, with its probes and solution."""
    exercises_dir = Path(exercises_dir)
    if not exercises_dir.is_dir():
        raise FileNotFoundError(f"exercises folder {exercises_dir} does not exist; run `make exercises` first")
    solutions_dir = Path(solutions_dir) if solutions_dir else default_solutions_dir(exercises_dir)
    found = {}
    for path in sorted(exercises_dir.glob("*.ipynb")):
        ex = load_exercise(path, solutions_dir)
        found[ex.name] = ex
    if not found:
        raise FileNotFoundError(f"no exercise notebooks in {exercises_dir}; run `make exercises` first")
    return found


def check_column(exercise: str, check_id: str) -> str:
    return f"{exercise}: {check_id}"


MAX_NOTEBOOK_BYTES = 16 * 2**20    # what a notebook may weigh; read_submission says the same to the student
MAX_FOLDER_DEPTH = 16              # folders below a student's folder that are searched
MAX_FOLDER_ENTRIES = 10_000        # files and folders looked at in one student's folder
ALL_EXERCISES = "*"                # key of a rejection that concerns the whole student folder


@dataclass(frozen=True)
class Rejected:
    """A submitted entry that is not graded, and why: it becomes that student's ``error`` row."""
    path: Path
    reason: str


@dataclass
class Collected:
    """What :func:`collect_submissions` found in a submissions folder."""
    by_student: dict[str, dict[str, Path | Rejected]] = field(default_factory=dict)
    ignored: dict[tuple[str, str], list[Path | Rejected]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)        # per student: folders not searched
    skipped: list[tuple[str, str]] = field(default_factory=list)    # (student, why) for unmatched odd entries


def claimed_exercise(path: Path) -> str | None:
    """``course.exercise_id`` from a notebook's metadata: a short text or None (read bounded, never a link)."""
    from .sandbox import read_regular_file
    try:
        meta = json.loads(read_regular_file(path, MAX_NOTEBOOK_BYTES).decode("utf-8-sig", errors="replace"))
        claimed = meta.get("metadata", {}).get("course", {}).get("exercise_id")
    except Exception:  # unreadable files are only matched by name
        return None
    return claimed if isinstance(claimed, str) and len(claimed) <= 100 else None


_COPY = re.compile(r"^(?P<stem>.*?)\s*\((?P<n>\d+)\)$")


def _stem(nb: Path) -> str:
    m = _COPY.match(nb.stem)
    return m["stem"] if m else nb.stem


def _exercise_of(nb: Path, exercises) -> str | None:
    stem = _stem(nb)
    if stem in exercises:
        return stem
    claimed = claimed_exercise(nb)
    return claimed if claimed in exercises else None


def _newest_first(path: Path):
    m = _COPY.match(path.stem)
    try:
        mtime = os.lstat(path).st_mtime
    except OSError:
        mtime = 0.0
    return (-mtime, -(int(m["n"]) if m else 0), len(path.parts), str(path))


def _walk_student(folder: Path) -> tuple[list[Path], list[tuple[Path, str]], list[str]]:
    """Regular ``.ipynb`` files, odd ``.ipynb`` entries with why, and notes, in one student's folder.

    Iterative and bounded (depth, number of entries); nothing is followed through a link and
    nothing but a regular file is ever opened.
    """
    from .sandbox import file_kind
    notebooks, odd, notes = [], [], []
    stack, seen, deep = [(folder, 0)], 0, False
    while stack:
        current, depth = stack.pop()
        try:
            with os.scandir(current) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            notes.append(f"the folder `{current.relative_to(folder)}` could not be read ({exc.strerror})")
            continue
        for entry in entries:
            seen += 1
            if seen > MAX_FOLDER_ENTRIES:
                notes.append(f"your folder holds more than {MAX_FOLDER_ENTRIES:,} files and folders; "
                             "only the first were searched")
                return notebooks, odd, notes
            path = Path(entry.path)
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue
            if entry.name.endswith(".ipynb"):
                if stat.S_ISREG(mode):
                    notebooks.append(path)
                else:
                    why = file_kind(mode) + (" (links are never followed: submit the notebook file itself)"
                                             if stat.S_ISLNK(mode) else "")
                    odd.append((path, why))
                continue
            if stat.S_ISDIR(mode) and entry.name != ".ipynb_checkpoints":
                if depth + 1 > MAX_FOLDER_DEPTH:
                    deep = True
                    continue
                stack.append((path, depth + 1))
    if deep:
        notes.append(f"folders nested more than {MAX_FOLDER_DEPTH} levels deep in your folder were not searched")
    return notebooks, odd, notes


def collect_submissions(submissions_dir: Path, exercises) -> Collected:
    """Every student's notebooks, matched to exercises; odd entries become per-student errors.

    One folder per student (a folder that is a symbolic link is rejected, not followed). In it,
    only regular ``.ipynb`` files are candidates; a link, folder, pipe or device named like an
    exercise is that exercise's error unless a real notebook for it is there too. Of several
    copies of one exercise the most recently modified is graded and the others are ignored.
    """
    found = Collected()
    submissions_dir = Path(submissions_dir)
    with os.scandir(submissions_dir) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        folder = Path(entry.path)
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except OSError:
            continue
        if stat.S_ISLNK(mode):
            found.by_student[entry.name] = {ALL_EXERCISES: Rejected(
                folder, "your submission folder is a symbolic link; links are never followed, so nothing in it was "
                        "graded (submit a real folder with your notebooks)")}
            continue
        if not stat.S_ISDIR(mode):
            continue
        notebooks, odd, notes = _walk_student(folder)
        candidates: dict[str, list[Path | Rejected]] = {}
        for nb in notebooks:
            name = _exercise_of(nb, exercises)
            if name is not None:
                candidates.setdefault(name, []).append(nb)
            elif ".ipynb_checkpoints" not in nb.parts:
                notes.append(f"`{nb.relative_to(folder)}` was not graded: its name is not an exercise's and its "
                             "metadata (`course.exercise_id`) names none")
        for path, why in odd:
            name = _stem(path)
            rel = path.relative_to(folder)
            if name in exercises:
                candidates.setdefault(name, []).append(Rejected(path, f"`{rel}` is {why}, not a notebook file"))
            else:
                found.skipped.append((entry.name, f"{rel} is {why}"))
        matched: dict[str, Path | Rejected] = {}
        for name, paths in candidates.items():
            real = sorted((p for p in paths if isinstance(p, Path)), key=_newest_first)
            odd_ones = [p for p in paths if isinstance(p, Rejected)]
            ordered = real + odd_ones
            matched[name] = ordered[0]
            if len(ordered) > 1:
                found.ignored[(entry.name, name)] = ordered[1:]
        found.by_student[entry.name] = matched
        if notes:
            found.notes[entry.name] = notes
    return found


def find_submissions(submissions_dir: Path, exercises) -> tuple[dict[str, dict[str, Path | Rejected]], dict]:
    """``({student: {exercise: notebook or Rejected}}, {(student, exercise): [ignored copies]})``.

    Of several notebooks for one exercise in a student's folder (a draft and a newer
    ``(1)`` copy), the most recently modified is graded; the others are returned as ignored.
    """
    found = collect_submissions(submissions_dir, exercises)
    return found.by_student, found.ignored


def _sha256(path: Path) -> str | None:
    from .sandbox import read_regular_file
    try:
        return hashlib.sha256(read_regular_file(path, MAX_NOTEBOOK_BYTES)).hexdigest()
    except (OSError, ValueError):
        return None


_DANGEROUS_FIRST = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_safe(value) -> str:
    """A gradebook cell that no spreadsheet runs as a formula (a leading ``'`` is added, see :func:`csv_unsafe`)."""
    text = "" if value is None else str(value)
    if text.startswith(_DANGEROUS_FIRST) and not _is_number(text):
        return "'" + text
    return text


def csv_unsafe(text: str) -> str:
    """The value :func:`csv_safe` was given."""
    return text[1:] if len(text) > 1 and text[0] == "'" and text[1] in "=+-@\t\r'" else text


def _is_number(text: str) -> bool:
    try:
        float(text)
        return text.strip() == text and text[:1] not in ("=", "+", "@")
    except ValueError:
        return False


def printable(name: str) -> str:
    """A student or file name for a terminal line: control characters shown escaped."""
    return name if name.isprintable() else ascii(name)[1:-1]


class Gradebook:
    """``gradebook.csv``, rewritten once at the start, then appended to row by row."""

    def __init__(self, out_dir: Path, columns: list[str]):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "gradebook.csv"
        self.state_path = self.out_dir / STATE_FILE
        self.columns = list(columns)
        self.rows: dict[tuple[str, str], dict] = {}
        self.hashes: dict[str, str] = {}
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                for row in reader:
                    row = {k: csv_unsafe(v or "") for k, v in row.items() if k is not None}
                    if row.get("student") and row.get("exercise"):
                        self.rows[(row["student"], row["exercise"])] = row
                for col in reader.fieldnames or []:
                    if col not in self.columns:
                        self.columns.append(col)
        if self.state_path.exists():
            try:
                self.hashes = json.loads(self.state_path.read_text())
            except json.JSONDecodeError:
                self.hashes = {}

    def is_done(self, student: str, exercise: str, digest: str | None) -> bool:
        row = self.rows.get((student, exercise))
        return (row is not None and row.get("status") == "graded" and digest is not None
                and self.hashes.get(f"{student}/{exercise}") == digest)

    def start(self, keep: set[tuple[str, str]]) -> None:
        """Rewrite the file with the rows kept from an earlier run; later rows are appended."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            for key in sorted(keep):
                writer.writerow({c: csv_safe(self.rows[key].get(c, "")) for c in self.columns})
        os.replace(tmp, self.path)
        self.rows = {k: v for k, v in self.rows.items() if k in keep}

    def append(self, row: dict, digest: str | None) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.columns, restval="").writerow({k: csv_safe(v) for k, v in row.items()})
            f.flush()
            os.fsync(f.fileno())
        key = (row["student"], row["exercise"])
        self.rows[key] = row
        if digest is not None and row["status"] == "graded":
            self.hashes[f"{key[0]}/{key[1]}"] = digest
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.hashes, indent=0, sort_keys=True))
            os.replace(tmp, self.state_path)

    def finish(self) -> None:
        """Sort the rows by student and exercise (the file was complete before this, too); write the totals."""
        self.start(set(self.rows))
        self.write_totals()

    def write_totals(self) -> Path:
        """``totals.csv``: one row per student, their points and the maximum over every exercise in the
        gradebook (a missing or failed exercise counts 0 of its maximum), then each exercise's points."""
        exercises = sorted({e for _, e in self.rows})
        students = sorted({s for s, _ in self.rows})
        path = self.out_dir / TOTALS_FILE
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["student", "points", "max_points", "exercises_graded", *exercises])
            for student in students:
                got, most, graded, per = 0.0, 0.0, 0, []
                for e in exercises:
                    row = self.rows.get((student, e))
                    if row is None:
                        per.append("")
                        continue
                    got += _number(row.get("points"))
                    most += _number(row.get("max_points"))
                    graded += row.get("status") == "graded"
                    per.append(row.get("points", ""))
                writer.writerow([csv_safe(student), fmt_points(got), fmt_points(most), graded, *per])
        os.replace(tmp, path)
        return path


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return 0.0


def result_row(result: SubmissionResult) -> dict:
    row = {"student": result.student, "exercise": result.exercise, "points": fmt_points(result.points),
           "max_points": fmt_points(result.max_points), "status": result.status}
    for cr in result.checks:
        row[check_column(result.exercise, cr.check.check_id)] = fmt_points(cr.points)
    return row


def write_feedback(out_dir: Path, result: SubmissionResult) -> Path:
    path = Path(out_dir) / "feedback" / result.student / f"{result.exercise}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(feedback_markdown(result), encoding="utf-8")
    return path


def _answers_fingerprint(nb, ex: Exercise) -> str | None:
    """A digest of a notebook's answers as graded (matched by name, blank lines and trailing spaces and
    the solution markers ignored); None when no answer differs from the exercise's stubs."""
    from . import layout

    def norm(src: str) -> str:
        keep = [line.rstrip() for line in src.replace("\r\n", "\n").splitlines()]
        return "\n".join(x for x in keep if x.strip() and x.strip() not in ("# BEGIN SOLUTION", "# END SOLUTION"))

    match = layout.match_answers(ex.notebook.cells, nb.cells)
    stubs = {c.get("id"): c.get("source", "") for c in ex.notebook.cells if layout.is_code(c, "answer")}
    answers = [norm(match.sources.get(rid, "") or "") for rid in ex.answer_ids]
    if all(a == norm(stubs.get(rid, "")) for a, rid in zip(answers, ex.answer_ids)):
        return None
    return hashlib.sha256("\n\x00\n".join(answers).encode("utf-8", errors="replace")).hexdigest()


def _same_answers(runnable, exercises) -> dict[tuple[str, str], str]:
    """``{(student, exercise): what its answers are identical to}``: the reference solution, or classmates."""
    from .grader import NotANotebook, read_submission
    prints: dict[tuple[str, str], str] = {}
    for student, name, path, _ in runnable:
        try:
            fp = _answers_fingerprint(read_submission(path), exercises[name])
        except (NotANotebook, Exception):  # an unreadable file gets its own error when graded
            fp = None
        if fp is not None:
            prints[(student, name)] = fp
    reference: dict[str, str | None] = {}
    for name in {n for _, n in prints}:
        sol = exercises[name].solution
        try:
            reference[name] = _answers_fingerprint(read_submission(sol), exercises[name]) if sol else None
        except Exception:
            reference[name] = None
    groups: dict[tuple[str, str], list[str]] = {}
    for (student, name), fp in prints.items():
        groups.setdefault((name, fp), []).append(student)
    same = {}
    for (name, fp), students in groups.items():
        for student in students:
            if fp == reference.get(name):
                same[(student, name)] = "the reference solution"
            elif len(students) > 1:
                same[(student, name)] = ", ".join(f"{o}/{name}" for o in students if o != student)
    return same


def grade_class(submissions_dir: Path, out_dir: Path, *, exercises_dir: Path = EXERCISES_DIR, jobs: int = 1,
                timeout_s: float = DEFAULT_TIMEOUT_S, cell_timeout_s: float = DEFAULT_CELL_TIMEOUT_S,
                force: bool = False, only: list[str] | None = None, log=sys.stdout,
                solutions_dir: Path | None = None, memory_bytes: int | None = None, sandbox: bool = True,
                seed: int | None = None) -> ClassReport:
    """Grade every student's submissions; returns counts and what could not be graded.

    The exercises graded are ``only`` if given, else every exercise at least one student
    submitted. A student without that notebook gets a ``missing`` row when the exercise is
    named in ``only`` or at least half the class submitted it (one student's extra exercise
    makes no ``missing`` rows for the others). An entry that cannot be graded (a link, a
    folder or pipe named like a notebook, a file over the size limit) is that student's
    ``error`` row; the others are graded. One secret seed is drawn per run (``seed`` fixes
    it, for tests); ``memory_bytes`` defaults to half the RAM divided by ``jobs``.
    """
    start = time.monotonic()
    submissions_dir, out_dir = Path(submissions_dir), Path(out_dir)
    if not submissions_dir.is_dir():
        raise NotADirectoryError(f"submissions folder {submissions_dir} does not exist or is not a folder")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if timeout_s <= 0 or cell_timeout_s <= 0:
        raise ValueError("time limits must be positive numbers of seconds")
    exercises = load_exercises(exercises_dir, solutions_dir)
    seed = secrets.randbits(62) if seed is None else seed
    memory_bytes = memory_bytes or default_memory_limit(jobs)
    if only:
        unknown = sorted(set(only) - set(exercises))
        if unknown:
            raise ValueError(f"unknown exercise(s) {unknown}; known: {sorted(exercises)}")
    found = collect_submissions(submissions_dir, exercises)
    by_student, ignored = found.by_student, found.ignored
    if not by_student:
        raise FileNotFoundError(f"{submissions_dir} holds no student folders (expected one folder per student)")
    submitted_by = {}
    for subs in by_student.values():
        for e in subs:
            if e != ALL_EXERCISES:
                submitted_by[e] = submitted_by.get(e, 0) + 1
    graded_names = sorted(only) if only else sorted(submitted_by)
    if not graded_names:
        raise FileNotFoundError(f"no notebook in {submissions_dir} matches an exercise in {exercises_dir} "
                                f"({', '.join(sorted(exercises))})")
    report = ClassReport(odd_entries=list(found.skipped))
    everyone = set(only or []) | {e for e, n in submitted_by.items() if 2 * n >= len(by_student)}
    report.extra = [(e, submitted_by[e], len(by_student)) for e in graded_names if e not in everyone]
    columns = BASE_COLUMNS + [check_column(e, c.check_id) for e in graded_names for c in exercises[e].checks]
    book = Gradebook(out_dir, columns)
    todo, keep = [], set()
    for student, subs in by_student.items():
        for name in graded_names:
            path = subs.get(name)
            if path is None and name not in everyone:
                continue                    # an exercise few submitted: no "missing" (or folder error) row for the rest
            path = path or subs.get(ALL_EXERCISES)
            digest = _sha256(path) if isinstance(path, Path) else None
            if not force and book.is_done(student, name, digest):
                keep.add((student, name))
                report.skipped += 1
            else:
                todo.append((student, name, path, digest))
    book.start(keep)

    def record(result: SubmissionResult, digest: str | None) -> None:
        book.append(result_row(result), digest)
        write_feedback(out_dir, result)
        report.rows_written += 1
        if result.status in ("timeout", "error"):
            report.not_graded.append((result.student, result.exercise, result.status))
        elif result.status == "missing":
            report.missing.append((result.student, result.exercise))
        if result.needs_review:
            report.review.append((result.student, result.exercise))
        print(f"{printable(result.student):>16} {result.exercise:<20} {result.status:<8} "
              f"{fmt_points(result.points):>5} / {fmt_points(result.max_points):<5} {result.seconds:6.1f} s",
              file=log, flush=True)

    def not_run(name: str) -> list[CheckResult]:
        return [CheckResult(c, passed=False, note="not run") for c in exercises[name].checks]

    runnable = []
    for student, name, path, digest in todo:
        if path is None:
            record(SubmissionResult(student, name, "missing", not_run(name),
                                    [f"no notebook for {name} in your folder"] + found.notes.get(student, [])), None)
        elif isinstance(path, Rejected):
            record(SubmissionResult(student, name, "error", not_run(name), [path.reason]), None)
        else:
            runnable.append((student, name, path, digest))
    same = _same_answers(runnable, exercises)
    hide = [submissions_dir, out_dir]
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(grade_notebook, path, exercises[name], student=student, timeout_s=timeout_s,
                               cell_timeout_s=cell_timeout_s, seed=seed, memory_bytes=memory_bytes, sandbox=sandbox,
                               hide=hide): (student, name, path, digest)
                   for student, name, path, digest in runnable}
        for future in as_completed(futures):
            student, name, path, digest = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # a grader bug on one file must not stop the class
                result = SubmissionResult(student, name, "error", not_run(name),
                                          [f"the grader failed on this file ({type(exc).__name__}); "
                                           "the instructor has the details"])
                print(f"grader error on {printable(student)}/{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            others = ignored.get((student, name))
            if others:
                def rel(p):
                    return str((p.path if isinstance(p, Rejected) else p).relative_to(submissions_dir / student))
                result.notes.insert(0, f"graded `{rel(path)}`, the newest of your copies of {name}; ignored: "
                                    + ", ".join(f"`{rel(p)}`" for p in others))
            result.notes[1 if others else 0:1 if others else 0] = found.notes.get(student, [])
            if (student, name) in same:
                what = same[(student, name)]
                report.same.append((student, name, what))
                result.notes.append("NOTE: your answers are character for character the same as "
                                    + ("the course's reference solution" if what == "the reference solution"
                                       else "another submission in this class")
                                    + "; the instructor is told of every such match")
            record(result, digest)
    except BaseException:  # Ctrl-C: stop the running kernels; the rows written so far stay
        pool.shutdown(wait=False, cancel_futures=True)
        kill_all_running()
        raise
    pool.shutdown()
    book.finish()
    report.seconds = time.monotonic() - start
    return report
