"""Exercises are generated from solutions and stay in sync; nbval passes on solutions, fails on untouched exercises."""
from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest

from conftest import REPO
from pretrain_lib.grading.build import exercise_from_solution

SOLUTIONS = sorted((REPO / "solutions").glob("[0-9][0-9]_*.ipynb"))
# exercises whose checks launch torchrun run on the same worker as the other torchrun jobs
SOLUTION_PARAMS = [pytest.param(p, id=p.stem, marks=[pytest.mark.xdist_group("torchrun")] if "distributed" in p.stem else [])
                   for p in SOLUTIONS]


def _nbval(notebook) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
                           "--nbval", str(notebook)], cwd=notebook.parent, capture_output=True, text=True,
                          timeout=900)


def _comparable(nb):
    """What must match between a committed exercise and a fresh build: sources, tags, check outputs."""
    cells = []
    for c in nb.cells:
        # the kernel may split one print's lines over several stream messages: compare the joined text
        streams: dict[str, str] = {}
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream":
                streams[o.get("name", "stdout")] = streams.get(o.get("name", "stdout"), "") + o.get("text", "")
        outputs = sorted(streams.items())
        cells.append((c.id, c.cell_type, c.source, c.metadata.get("tags", []), c.metadata.get("points"), outputs))
    return cells


def test_every_solution_has_an_exercise():
    assert SOLUTIONS, "no solution notebooks"
    for sol in SOLUTIONS:
        assert (REPO / "exercises" / sol.name).exists(), f"run `make exercises`: {sol.name} has no exercise"


@pytest.mark.notebook
@pytest.mark.parametrize("solution", SOLUTION_PARAMS)
def test_exercise_is_up_to_date(solution):
    fresh = exercise_from_solution(solution)
    committed = nbformat.read(REPO / "exercises" / solution.name, as_version=4)
    assert _comparable(committed) == _comparable(fresh), "exercises/ is stale: run `make exercises`"


@pytest.mark.notebook
@pytest.mark.parametrize("solution", SOLUTION_PARAMS)
def test_nbval_passes_on_solution_and_fails_on_untouched_exercise(solution):
    ok = _nbval(solution)
    assert ok.returncode == 0, ok.stdout[-3000:]
    untouched = _nbval(REPO / "exercises" / solution.name)
    assert untouched.returncode != 0, "an exercise with stubbed answers must not pass nbval"
    assert "failed" in untouched.stdout.splitlines()[-1], untouched.stdout[-2000:]
