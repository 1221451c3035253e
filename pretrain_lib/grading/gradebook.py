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
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from .feedback import feedback_markdown
from .feedback import fmt_points as _fmt_points
from .grader import (DEFAULT_CELL_TIMEOUT_S, DEFAULT_TIMEOUT_S, EXERCISES_DIR, CheckResult, SubmissionResult,
                     grade_notebook)
from .reference import Exercise, default_solutions_dir, load_exercise
from .runner import kill_all_running
from .sandbox import default_memory_limit

BASE_COLUMNS = ["student", "exercise", "points", "max_points", "status"]
STATE_FILE = ".submission_hashes.json"   # which file each graded row came from (resubmissions are regraded)


@dataclass
class ClassReport:
    rows_written: int = 0
    skipped: int = 0
    not_graded: list[tuple[str, str, str]] = field(default_factory=list)   # (student, exercise, status)
    missing: list[tuple[str, str]] = field(default_factory=list)
    review: list[tuple[str, str]] = field(default_factory=list)            # answers that touch the grader
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


def _claimed_exercise(path: Path) -> str | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8", errors="replace")).get("metadata", {})
        return meta.get("course", {}).get("exercise_id")
    except Exception:  # unreadable files are only matched by name
        return None


_COPY = re.compile(r"^(?P<stem>.*?)\s*\((?P<n>\d+)\)$")


def _exercise_of(nb: Path, exercises) -> str | None:
    stem = _COPY.match(nb.stem)["stem"] if _COPY.match(nb.stem) else nb.stem
    if stem in exercises:
        return stem
    claimed = _claimed_exercise(nb)
    return claimed if claimed in exercises else None


def _newest_first(path: Path):
    m = _COPY.match(path.stem)
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = 0.0
    return (-mtime, -(int(m["n"]) if m else 0), len(path.parts), str(path))


def find_submissions(submissions_dir: Path, exercises) -> tuple[dict[str, dict[str, Path]], dict]:
    """``({student: {exercise: notebook}}, {(student, exercise): [ignored copies]})``.

    Of several notebooks for one exercise in a student's folder (a draft and a newer
    ``(1)`` copy), the most recently modified is graded; the others are returned as ignored.
    """
    by_student: dict[str, dict[str, Path]] = {}
    ignored: dict[tuple[str, str], list[Path]] = {}
    for folder in sorted(p for p in Path(submissions_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        notebooks = [p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts]
        candidates: dict[str, list[Path]] = {}
        for nb in notebooks:
            name = _exercise_of(nb, exercises)
            if name is not None:
                candidates.setdefault(name, []).append(nb)
        matched = {}
        for name, paths in candidates.items():
            paths.sort(key=_newest_first)
            matched[name] = paths[0]
            if len(paths) > 1:
                ignored[(folder.name, name)] = paths[1:]
        by_student[folder.name] = matched
    return by_student, ignored


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
                writer.writerow({c: self.rows[key].get(c, "") for c in self.columns})
        os.replace(tmp, self.path)
        self.rows = {k: v for k, v in self.rows.items() if k in keep}

    def append(self, row: dict, digest: str | None) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(row)
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
        """Sort the rows by student and exercise (the file was complete before this, too)."""
        self.start(set(self.rows))


def result_row(result: SubmissionResult) -> dict:
    row = {"student": result.student, "exercise": result.exercise, "points": _fmt_points(result.points),
           "max_points": _fmt_points(result.max_points), "status": result.status}
    for cr in result.checks:
        row[check_column(result.exercise, cr.check.check_id)] = _fmt_points(cr.points)
    return row


def write_feedback(out_dir: Path, result: SubmissionResult) -> Path:
    path = Path(out_dir) / "feedback" / result.student / f"{result.exercise}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(feedback_markdown(result), encoding="utf-8")
    return path


def grade_class(submissions_dir: Path, out_dir: Path, *, exercises_dir: Path = EXERCISES_DIR, jobs: int = 1,
                timeout_s: float = DEFAULT_TIMEOUT_S, cell_timeout_s: float = DEFAULT_CELL_TIMEOUT_S,
                force: bool = False, only: list[str] | None = None, log=sys.stdout,
                solutions_dir: Path | None = None, memory_bytes: int | None = None, sandbox: bool = True,
                seed: int | None = None) -> ClassReport:
    """Grade every student's submissions; returns counts and what could not be graded.

    The exercises graded are ``only`` if given, else every exercise at least one student
    submitted; a student without that notebook gets a ``missing`` row. One secret seed is
    drawn per run (``seed`` fixes it, for tests); ``memory_bytes`` defaults to half the RAM
    divided by ``jobs``.
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
    by_student, ignored = find_submissions(submissions_dir, exercises)
    if not by_student:
        raise FileNotFoundError(f"{submissions_dir} holds no student folders (expected one folder per student)")
    graded_names = sorted(only) if only else sorted({e for subs in by_student.values() for e in subs})
    if not graded_names:
        raise FileNotFoundError(f"no notebook in {submissions_dir} matches an exercise in {exercises_dir} "
                                f"({', '.join(sorted(exercises))})")
    columns = BASE_COLUMNS + [check_column(e, c.check_id) for e in graded_names for c in exercises[e].checks]
    book = Gradebook(out_dir, columns)
    report = ClassReport()
    todo, keep = [], set()
    for student, subs in by_student.items():
        for name in graded_names:
            path = subs.get(name)
            digest = _sha256(path) if path is not None else None
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
        print(f"{result.student:>16} {result.exercise:<20} {result.status:<8} "
              f"{_fmt_points(result.points):>5} / {_fmt_points(result.max_points):<5} {result.seconds:6.1f} s",
              file=log, flush=True)

    runnable = []
    for student, name, path, digest in todo:
        if path is None:
            missing = SubmissionResult(student, name, "missing",
                                       [CheckResult(c, passed=False, note="not run") for c in exercises[name].checks],
                                       [f"no notebook for {name} in {student}'s folder"])
            record(missing, None)
        else:
            runnable.append((student, name, path, digest))
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
                result = SubmissionResult(student, name, "error",
                                          [CheckResult(c, passed=False, note="not run") for c in exercises[name].checks],
                                          [f"the grader failed on this file: {type(exc).__name__}: {exc}"])
            others = ignored.get((student, name))
            if others:
                rel = lambda p: str(p.relative_to(submissions_dir / student))  # noqa: E731
                result.notes.insert(0, f"graded `{rel(path)}`, the newest of your copies of {name}; ignored: "
                                    + ", ".join(f"`{rel(p)}`" for p in others))
            record(result, digest)
    except BaseException:  # Ctrl-C: stop the running kernels; the rows written so far stay
        pool.shutdown(wait=False, cancel_futures=True)
        kill_all_running()
        raise
    pool.shutdown()
    book.finish()
    report.seconds = time.monotonic() - start
    return report
