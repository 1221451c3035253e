"""Seconds per submission when grading one exercise: serial (``--jobs 1``) vs ``--jobs 2``.

A class of ``--students`` copies of the solution notebook (the slowest honest submission: every
check runs to the end) is graded twice with ``pretrain_lib.grading.gradebook.grade_class``,
into fresh output folders, so nothing is skipped. Baseline: serial grading, one kernel at a
time. Ours: ``--jobs 2``, two kernels at once. Each submission pays for a pytest process, a
kernel start and the exercise's imports (torch for Chapter 1), which is why the per-submission
time does not go to zero on a tiny exercise.

    python benchmarks/grading.py [--exercise 01_objectives] [--students 6] [--out benchmarks/results/grading.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from pretrain_lib.grading.gradebook import grade_class

REPO = Path(__file__).resolve().parent.parent


def time_class(solution: Path, exercise: str, students: int, jobs: int, exercises_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="grading-bench-") as tmp:
        subs = Path(tmp, "submissions")
        for i in range(students):
            (subs / f"s{i:03d}").mkdir(parents=True)
            shutil.copy(solution, subs / f"s{i:03d}" / f"{exercise}.ipynb")
        with open(os.devnull, "w") as quiet:
            start = time.perf_counter()
            report = grade_class(subs, Path(tmp, "out"), exercises_dir=exercises_dir, jobs=jobs, log=quiet)
            seconds = time.perf_counter() - start
    if report.not_graded:
        raise RuntimeError(f"some copies of the solution could not be graded: {report.not_graded}")
    return {"jobs": jobs, "students": students, "seconds": round(seconds, 2),
            "seconds_per_submission": round(seconds / students, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exercise", default="01_objectives")
    parser.add_argument("--students", type=int, default=6)
    parser.add_argument("--solutions", type=Path, default=REPO / "solutions")
    parser.add_argument("--exercises", type=Path, default=REPO / "exercises")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "grading.json"))
    args = parser.parse_args(argv)
    solution = args.solutions / f"{args.exercise}.ipynb"
    if not solution.exists() or not (args.exercises / solution.name).exists():
        raise SystemExit(f"need {solution} and {args.exercises / solution.name}; run `make exercises` first")

    serial = time_class(solution, args.exercise, args.students, 1, args.exercises)
    parallel = time_class(solution, args.exercise, args.students, 2, args.exercises)
    ratio = serial["seconds"] / parallel["seconds"]
    result = {"exercise": args.exercise, "baseline_serial": serial, "ours_jobs_2": parallel,
              "speedup": round(ratio, 2), "cpus": os.cpu_count(), "platform": platform.platform(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1 (grader default)")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"exercise {args.exercise}, {args.students} submissions, {os.cpu_count()} CPUs")
    print(f"baseline  --jobs 1: {serial['seconds_per_submission']:6.2f} s per submission ({serial['seconds']} s)")
    print(f"ours      --jobs 2: {parallel['seconds_per_submission']:6.2f} s per submission ({parallel['seconds']} s)")
    print(f"ratio: {ratio:.2f}x  -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
