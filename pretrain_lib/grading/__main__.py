"""Command line: ``python -m pretrain_lib.grading {build,grade,check}``.

* ``build [NAMES]``: regenerate exercises/ from solutions/ (what ``make exercises`` runs).
* ``grade SUBMISSIONS_DIR --out OUT_DIR [--jobs N] [--timeout S] [--force]``: grade a class;
  exit 0 when every submission was graded (whatever the scores), 1 when some could not be
  (timeout or error, listed on stderr), 2 on bad arguments.
* ``check NOTEBOOK``: a student grades their own file exactly as the instructor would.

Both print one line on stderr saying how submissions are sandboxed (or that they are not).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return x


def _jobs(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _size(value: str) -> int:
    from .sandbox import parse_size
    try:
        return parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    from .grader import DEFAULT_CELL_TIMEOUT_S, DEFAULT_TIMEOUT_S, EXERCISES_DIR
    parser = argparse.ArgumentParser(prog="python -m pretrain_lib.grading",
                                     description="Build exercises from solutions and grade submissions with nbval.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="regenerate exercises/ from solutions/")
    build.add_argument("names", nargs="*", help="solution stems to rebuild, e.g. 01_objectives (default: all)")

    def limits(p):
        p.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                       help=f"whole-notebook time limit per submission (default {DEFAULT_TIMEOUT_S:g})")
        p.add_argument("--cell-timeout", type=_positive, default=DEFAULT_CELL_TIMEOUT_S, metavar="SECONDS",
                       help=f"time limit for one cell (default {DEFAULT_CELL_TIMEOUT_S:g}, at most --timeout)")
        p.add_argument("--exercises", type=Path, default=EXERCISES_DIR, metavar="DIR",
                       help="folder of reference exercise notebooks (default: the course's exercises/)")
        p.add_argument("--solutions", type=Path, default=None, metavar="DIR",
                       help="folder of solution notebooks the hidden probes compare with (default: solutions/ "
                            "beside --exercises, else the course's)")
        p.add_argument("--memory-limit", type=_size, default=None, metavar="SIZE",
                       help="memory for one submission, e.g. 4G (default: half the RAM divided by --jobs)")
        p.add_argument("--no-sandbox", action="store_true",
                       help="run student code without bubblewrap (trusted code, or to measure the sandbox's cost)")

    grade = sub.add_parser("grade", help="grade a folder of submissions (one sub-folder per student)")
    grade.add_argument("submissions", type=Path, metavar="SUBMISSIONS_DIR")
    grade.add_argument("--out", type=Path, required=True, metavar="OUT_DIR",
                       help="where gradebook.csv and feedback/<student>/<exercise>.md go")
    grade.add_argument("--jobs", type=_jobs, default=1, metavar="N", help="grade N submissions at once (default 1)")
    grade.add_argument("--force", action="store_true", help="grade again the submissions already graded in OUT_DIR")
    grade.add_argument("--only", action="append", metavar="EXERCISE",
                       help="grade only this exercise (repeatable; default: every exercise someone submitted)")
    limits(grade)
    check = sub.add_parser("check", help="grade your own notebook before submitting, as the instructor will")
    check.add_argument("notebook", type=Path, metavar="NOTEBOOK")
    check.add_argument("--exercise", default=None, help="exercise id (default: from the file's name or metadata)")
    limits(check)
    return parser


def _status(args, jobs: int = 1) -> None:
    from .sandbox import default_memory_limit, status_line
    memory = args.memory_limit or default_memory_limit(jobs)
    print(status_line(memory, sandboxed=False if args.no_sandbox else None), file=sys.stderr, flush=True)


def _check(args) -> int:
    from .feedback import feedback_markdown
    from .gradebook import claimed_exercise, load_exercises
    from .grader import grade_notebook
    try:
        exercises = load_exercises(args.exercises, args.solutions)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = args.notebook
    if path.is_symlink() or not path.is_file():
        print(f"error: {path} is not a notebook file (a link or a folder is not graded)", file=sys.stderr)
        return 2
    name = args.exercise or (path.stem if path.stem in exercises else None)
    if name is None:
        name = claimed_exercise(path)
    if name not in exercises:
        print(f"error: cannot tell which exercise {path.name} is; name it like one of {sorted(exercises)} "
              "or pass --exercise", file=sys.stderr)
        return 2
    _status(args)
    result = grade_notebook(path, exercises[name], timeout_s=args.timeout, cell_timeout_s=args.cell_timeout,
                            memory_bytes=args.memory_limit, sandbox=not args.no_sandbox)
    print(feedback_markdown(result))
    print(f"score: {result.points:g} / {result.max_points:g} ({result.status})")
    return 0 if result.status == "graded" else 1


def _grade(args) -> int:
    from .gradebook import grade_class, printable
    _status(args, args.jobs)
    try:
        report = grade_class(args.submissions, args.out, exercises_dir=args.exercises, jobs=args.jobs,
                             timeout_s=args.timeout, cell_timeout_s=args.cell_timeout, force=args.force,
                             only=args.only, solutions_dir=args.solutions, memory_bytes=args.memory_limit,
                             sandbox=not args.no_sandbox)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{report.rows_written} rows written, {report.skipped} kept from an earlier run, "
          f"{report.seconds:.1f} s; gradebook: {args.out / 'gradebook.csv'}, totals per student: "
          f"{args.out / 'totals.csv'}")
    for exercise, count, students in report.extra:
        print(f"extra: {exercise} was submitted by {count} of {students} students; the others get no 'missing' row "
              f"for it (pass --only {exercise} to list them)", file=sys.stderr)
    for student, exercise in report.missing:
        print(f"missing: {printable(student)}/{exercise}", file=sys.stderr)
    for student, why in report.odd_entries:
        print(f"not graded: {printable(student)}/{printable(why)}", file=sys.stderr)
    for student, exercise in report.review:
        print(f"review: {printable(student)}/{exercise} (an answer uses a forbidden shortcut; see the REVIEW notes "
              "in its feedback)", file=sys.stderr)
    for student, exercise, what in report.same:     # information, not a failure: stdout
        print(f"same answers: {printable(student)}/{exercise} = {printable(what)}")
    if report.not_graded:
        print(f"{len(report.not_graded)} submission(s) could not be graded (see their feedback files):",
              file=sys.stderr)
        for student, exercise, status in report.not_graded:
            print(f"  {printable(student)}/{exercise}: {status}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build":
        from .build import build_all
        build_all(names=args.names or None)
        return 0
    if args.command == "check":
        return _check(args)
    if args.command == "grade":
        return _grade(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
