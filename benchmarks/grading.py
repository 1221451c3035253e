"""Seconds per submission when grading one exercise: with and without the sandbox, ``--jobs 1`` and ``2``.

A class of ``--students`` copies of the solution notebook (the slowest honest submission: every
check and every hidden probe runs to the end) is graded four times with
``pretrain_lib.grading.gradebook.grade_class`` into fresh output folders, so nothing is
skipped: unsandboxed and sandboxed (bubblewrap, cgroup or rlimit limits), each serially and
with two kernels at once. Baseline: unsandboxed, ``--jobs 1``. Each submission pays for a
pytest process, a kernel start and the exercise's imports (torch for Chapter 1), then the
hidden probes; each run also pays once for the trusted reference process.

    python benchmarks/grading.py [--exercise 01_objectives] [--students 4] [--out benchmarks/results/grading.json]
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
from pretrain_lib.grading.sandbox import bwrap_problem

REPO = Path(__file__).resolve().parent.parent


def time_class(solution: Path, exercise: str, students: int, jobs: int, exercises_dir: Path, sandbox: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="grading-bench-") as tmp:
        subs = Path(tmp, "submissions")
        for i in range(students):
            (subs / f"s{i:03d}").mkdir(parents=True)
            shutil.copy(solution, subs / f"s{i:03d}" / f"{exercise}.ipynb")
        with open(os.devnull, "w") as quiet:
            start = time.perf_counter()
            report = grade_class(subs, Path(tmp, "out"), exercises_dir=exercises_dir, jobs=jobs, log=quiet,
                                 sandbox=sandbox)
            seconds = time.perf_counter() - start
    if report.not_graded:
        raise RuntimeError(f"some copies of the solution could not be graded: {report.not_graded}")
    return {"jobs": jobs, "sandbox": sandbox, "students": students, "seconds": round(seconds, 2),
            "seconds_per_submission": round(seconds / students, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exercise", default="01_objectives")
    parser.add_argument("--students", type=int, default=4)
    parser.add_argument("--solutions", type=Path, default=REPO / "solutions")
    parser.add_argument("--exercises", type=Path, default=REPO / "exercises")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "grading.json"))
    args = parser.parse_args(argv)
    solution = args.solutions / f"{args.exercise}.ipynb"
    if not solution.exists() or not (args.exercises / solution.name).exists():
        raise SystemExit(f"need {solution} and {args.exercises / solution.name}; run `make exercises` first")
    problem = bwrap_problem()
    runs = []
    for sandbox in (False, True):
        if sandbox and problem:
            print(f"sandboxed runs skipped: {problem}")
            continue
        for jobs in (1, 2):
            r = time_class(solution, args.exercise, args.students, jobs, args.exercises, sandbox)
            runs.append(r)
            print(f"{'sandboxed  ' if sandbox else 'unsandboxed'} --jobs {jobs}: "
                  f"{r['seconds_per_submission']:6.2f} s per submission ({r['seconds']} s)", flush=True)
    base = runs[0]["seconds"]
    result = {"exercise": args.exercise, "baseline": runs[0], "runs": runs,
              "ratios_to_baseline": [round(r["seconds"] / base, 2) for r in runs], "cpus": os.cpu_count(),
              "load_average_1min": round(os.getloadavg()[0], 2), "platform": platform.platform(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1 (grader default)")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"exercise {args.exercise}, {args.students} submissions, {os.cpu_count()} CPUs, "
          f"load {result['load_average_1min']} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
