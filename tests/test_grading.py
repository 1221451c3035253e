"""The nbval grader: cannot be fooled by stored outputs, survives bad submissions, writes a gradebook.

Most tests use a tiny fixture exercise (tests/fixtures/grading/solutions/99_toy.ipynb, no torch)
so a submission grades in about two seconds; the tests on the real Chapter 1 exercise run
four students in one class run.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import REPO
from pretrain_lib.grading.build import build_all, stub_source
from pretrain_lib.grading.checks import check, fmt
from pretrain_lib.grading.grader import (NotANotebook, assemble, exercise_checks, grade_notebook, load_exercise,
                                         read_submission)
from pretrain_lib.grading.gradebook import grade_class

FIXTURE_SOLUTION = REPO / "tests" / "fixtures" / "grading" / "solutions" / "99_toy.ipynb"
TOY = "99_toy"
TOY_MAX = 7          # 1 + 2 + 3 + 1
TOY_FREE = 1         # the check that needs no answer


# --- helpers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_exercises(tmp_path_factory) -> Path:
    """exercises/ holding the fixture exercise, built from its solution by build.py."""
    out = tmp_path_factory.mktemp("exercises")
    build_all(FIXTURE_SOLUTION.parent, out, names=[TOY])
    return out


def _answer(nb, cell_id: str, source: str):
    nb = copy.deepcopy(nb)
    next(c for c in nb.cells if c.get("id") == cell_id).source = source
    return nb


def _write(nb, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def _solution():
    return nbformat.read(FIXTURE_SOLUTION, as_version=4)


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "gradebook.csv", newline="") as f:
        return {r["student"] + "/" + r["exercise"]: r for r in csv.DictReader(f)}


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# --- units -----------------------------------------------------------------------------------------

def test_checks_print_one_deterministic_line(capsys):
    assert check("ok", lambda: True) is True
    assert check("bad", lambda: False) is False

    def stub():
        raise NotImplementedError

    assert check("stub", stub) is False
    assert check("boom", lambda: 1 / 0) is False
    assert capsys.readouterr().out.splitlines() == [
        "PASS ok", "FAIL bad (wrong result)", "FAIL stub (not implemented yet)", "FAIL boom (raised ZeroDivisionError)"]
    assert fmt(2 / 3) == "0.6667" and fmt(61.44) == "61.44" and fmt(1e-9) == "1e-09"


def test_stub_source_keeps_code_outside_markers():
    src = "def f(x):\n    y = 1\n    # BEGIN SOLUTION\n    return x + y\n    # END SOLUTION\n"
    assert stub_source(src) == 'def f(x):\n    y = 1\n    raise NotImplementedError("your code here")'
    with pytest.raises(ValueError, match="without"):
        stub_source("# BEGIN SOLUTION\nx = 1\n")


def test_built_exercise_keeps_reference_outputs_without_stderr(toy_exercises):
    ex = load_exercise(toy_exercises / f"{TOY}.ipynb")
    assert ex.metadata["course"]["exercise_id"] == TOY
    checks = exercise_checks(ex)
    assert [c.name for c in checks] == ["add small integers", "mean of four numbers",
                                        "expected masks in 512 tokens", "needs no answer"]
    assert sum(c.max_points for c in checks) == TOY_MAX
    check_cells = [c for c in ex.cells if "check" in c.metadata.get("tags", [])]
    assert all(c.execution_count for c in check_cells), "nbval only compares cells with an execution count"
    assert not any(o.get("name") == "stderr" for c in check_cells for o in c.outputs)
    assert "mean([0.1, 0.2]) = 0.15" in checks[1].expected
    assert "return a + b" not in json.dumps(ex)          # the solution does not leak into the exercise


def test_assemble_uses_only_answer_cells(toy_exercises):
    ex = load_exercise(toy_exercises / f"{TOY}.ipynb")
    student = _answer(ex, "answer-add", "def add(a, b):\n    return a - b")
    student = _answer(student, "check-add", 'print("PASS add small integers")')   # edited check: ignored
    next(c for c in student.cells if c.id == "check-add").outputs = []
    graded, notes = assemble(ex, student)
    by_id = {c.id: c for c in graded.cells}
    assert by_id["answer-add"].source == "def add(a, b):\n    return a - b"
    assert by_id["check-add"].source == next(c for c in ex.cells if c.id == "check-add").source
    assert by_id["check-add"].outputs == next(c for c in ex.cells if c.id == "check-add").outputs
    assert notes == []
    # ids lost: answers are matched by order; a deleted answer is reported
    renamed = copy.deepcopy(_solution())
    answers = [c for c in renamed.cells if "answer" in c.metadata.get("tags", [])]
    for i, c in enumerate(answers):
        c.id = f"renamed-{i}"
    renamed.cells.remove(answers[1])
    graded, notes = assemble(ex, renamed)
    assert {c.id: c.source for c in graded.cells}["answer-add"] == answers[0].source
    assert any("missing" in n for n in notes) and any("not found by id" in n for n in notes)
    # patching the checker from an answer cannot be stopped in the kernel; it is flagged for review
    cheat = _answer(ex, "answer-add", "import pretrain_lib.grading.checks as c\nc.check = lambda n, f: print('PASS', n)")
    assert any(n.startswith("REVIEW: answer cell 1") for n in assemble(ex, cheat)[1])
    assert not any(n.startswith("REVIEW") for n in assemble(ex, _solution())[1])


def test_read_submission_says_what_is_wrong(tmp_path):
    bad = tmp_path / "a.ipynb"
    bad.write_text('{"cells": [')
    with pytest.raises(NotANotebook, match="not valid JSON"):
        read_submission(bad)
    bad.write_text('{"hello": 1}')
    with pytest.raises(NotANotebook, match="not a Jupyter notebook"):
        read_submission(bad)


# --- one submission ------------------------------------------------------------------------------

def test_solution_full_marks_untouched_and_forged_score_only_the_free_check(toy_exercises, tmp_path):
    exercise = toy_exercises / f"{TOY}.ipynb"
    full = grade_notebook(FIXTURE_SOLUTION, exercise)
    assert (full.status, full.points, full.max_points) == ("graded", TOY_MAX, TOY_MAX)
    assert all(c.passed for c in full.checks)      # incl. the check that writes a warning to stderr

    untouched = grade_notebook(exercise, exercise)
    assert untouched.status == "graded" and untouched.points == TOY_FREE
    assert [c.passed for c in untouched.checks] == [False, False, False, True]

    # stubs, every check cell's stored output copied from the solution, check sources edited to print PASS
    forged = nbformat.read(exercise, as_version=4)
    for cell in forged.cells:
        if "check" in cell.metadata.get("tags", []):
            cell.source = "\n".join(f"print({line!r})" for line in cell.outputs[0]["text"].splitlines())
    forged.metadata["course"]["exercise_id"] = TOY
    result = grade_notebook(_write(forged, tmp_path / f"{TOY}.ipynb"), exercise)
    assert result.status == "graded" and result.points == TOY_FREE


def test_partial_answer_gets_exactly_its_points(toy_exercises, tmp_path):
    exercise = toy_exercises / f"{TOY}.ipynb"
    partial = _answer(_solution(), "answer-mean", "def mean(xs):\n    return 0.0")
    result = grade_notebook(_write(partial, tmp_path / f"{TOY}.ipynb"), exercise, student="p")
    assert result.status == "graded"
    assert result.points == 1 + 3 + 1
    failed = [c for c in result.checks if not c.passed]
    assert [c.check.name for c in failed] == ["mean of four numbers"]
    assert "FAIL mean of four numbers (wrong result)" in failed[0].produced


def test_whole_notebook_limit_stops_a_slow_submission(toy_exercises, tmp_path):
    """Two answers sleep 3 s: no cell reaches its 4.5 s limit, the notebook passes its 5 s one."""
    slow = _solution()
    for cid in ("answer-mean", "answer-ratio"):
        cell = next(c for c in slow.cells if c.id == cid)
        cell.source = "import time\ntime.sleep(3)\n" + cell.source.replace("# BEGIN SOLUTION\n", "").replace(
            "# END SOLUTION", "")
    result = grade_notebook(_write(slow, tmp_path / f"{TOY}.ipynb"), toy_exercises / f"{TOY}.ipynb",
                            timeout_s=5, cell_timeout_s=4.5)
    assert result.status == "timeout"
    assert result.seconds < 5 + 15
    assert result.checks[0].passed and not result.checks[-1].passed   # checks done before the limit keep their points
    assert any("time limit" in n for n in result.notes)


# --- a class --------------------------------------------------------------------------------------

BAD_STUDENTS = {
    # name: (answer cell, source) replacing one answer of the solution
    "loops_forever": ("answer-add", "while True:\n    try:\n        pass\n    except BaseException:\n        pass"),
    "calls_sys_exit": ("answer-add", "import sys\nsys.exit(3)"),
    "calls_os_exit": ("answer-mean", "import os\nos._exit(1)"),
    "huge_output": ("answer-add", "print('x' * 20_000_000)\nfor i in range(200_000):\n    print(i)\n"
                                  "def add(a, b):\n    return a + b"),
    "vandal": ("answer-add", "import os, shutil\nopen('planted.txt', 'w').write('x')\n"
                             "shutil.rmtree('exercises', ignore_errors=True)\n"
                             "for f in os.listdir('.'):\n    os.remove(f) if os.path.isfile(f) else None\n"
                             "def add(a, b):\n    return a + b"),
}


def test_class_of_30_with_bad_submissions(toy_exercises, tmp_path):
    subs, out = tmp_path / "submissions", tmp_path / "out"
    solution = _solution()
    for i in range(18):
        shutil.copy(FIXTURE_SOLUTION, (subs / f"good{i:02d}").mkdir(parents=True) or subs / f"good{i:02d}" / f"{TOY}.ipynb")
    for name, (cid, source) in BAD_STUDENTS.items():
        _write(_answer(solution, cid, source), subs / name / f"{TOY}.ipynb")
    _write(_answer(solution, "answer-mean", "def mean(xs):\n    return 0"), subs / "partial" / f"{TOY}.ipynb")
    _write(nbformat.read(toy_exercises / f"{TOY}.ipynb", as_version=4), subs / "untouched" / f"{TOY}.ipynb")
    (subs / "invalid_json").mkdir()
    (subs / "invalid_json" / f"{TOY}.ipynb").write_text('{"cells": [{"cell_type": "code", "sour')
    (subs / "not_a_notebook").mkdir()
    (subs / "not_a_notebook" / f"{TOY}.ipynb").write_text('{"hello": "world"}')
    deleted = copy.deepcopy(solution)
    deleted.cells = [c for c in deleted.cells if c.get("id") != "answer-ratio"]
    _write(deleted, subs / "deleted_answer" / f"{TOY}.ipynb")
    renamed = copy.deepcopy(solution)
    renamed.metadata["course"] = {"exercise_id": TOY}
    _write(renamed, subs / "renamed_file" / "my copy of the exercise.ipynb")
    (subs / "nothing_submitted").mkdir()
    assert len(list(subs.iterdir())) == 30
    repo_before, subs_before = _tree_digest(REPO / "exercises"), _tree_digest(subs)

    run = subprocess.run([sys.executable, "-m", "pretrain_lib.grading", "grade", str(subs), "--out", str(out),
                          "--jobs", "2", "--timeout", "60", "--cell-timeout", "8", "--exercises", str(toy_exercises)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 1, run.stdout + run.stderr       # some could not be graded
    rows = _rows(out)
    assert len(rows) == 30
    status = {k.split("/")[0]: (r["status"], float(r["points"])) for k, r in rows.items()}
    for i in range(18):
        assert status[f"good{i:02d}"] == ("graded", TOY_MAX)
    assert status["loops_forever"][0] == "timeout"
    assert status["calls_sys_exit"] == ("graded", TOY_MAX - 1)   # SystemExit is an ordinary exception in a kernel
    assert status["calls_os_exit"][0] == "error"
    assert status["huge_output"] == ("graded", TOY_MAX)
    assert status["vandal"] == ("graded", TOY_MAX)
    assert status["partial"] == ("graded", TOY_MAX - 2)
    assert status["untouched"] == ("graded", TOY_FREE)
    assert status["invalid_json"] == ("error", 0)
    assert status["not_a_notebook"] == ("error", 0)
    assert status["deleted_answer"] == ("graded", TOY_MAX - 3)
    assert status["renamed_file"] == ("graded", TOY_MAX)
    assert status["nothing_submitted"] == ("missing", 0)
    assert rows[f"partial/{TOY}"][f"{TOY}: mean of four numbers"] == "0"
    assert rows[f"partial/{TOY}"][f"{TOY}: expected masks in 512 tokens"] == "3"
    assert list(rows[f"partial/{TOY}"])[:5] == ["student", "exercise", "points", "max_points", "status"]
    for name in ("loops_forever", "calls_os_exit", "invalid_json", "not_a_notebook"):
        assert f"{name}/{TOY}" in run.stderr
    assert "good00" not in run.stderr
    assert _tree_digest(REPO / "exercises") == repo_before and _tree_digest(subs) == subs_before

    partial_md = (out / "feedback" / "partial" / f"{TOY}.md").read_text()
    assert "Score: 5 / 7" in partial_md and "Expected:" in partial_md
    assert "FAIL mean of four numbers (wrong result)" in partial_md
    assert "not valid JSON" in (out / "feedback" / "invalid_json" / f"{TOY}.md").read_text()
    assert "time limit" in (out / "feedback" / "loops_forever" / f"{TOY}.md").read_text()
    assert "missing" in (out / "feedback" / "deleted_answer" / f"{TOY}.md").read_text()
    assert len((out / "feedback" / "huge_output" / f"{TOY}.md").read_text()) < 20_000

    # a re-run keeps graded rows, regrades the rest and a resubmitted file
    _write(_answer(solution, "answer-mean", "def mean(xs):\n    return sum(xs) / len(xs)"),
           subs / "partial" / f"{TOY}.ipynb")
    (subs / "loops_forever" / f"{TOY}.ipynb").unlink()
    shutil.copy(FIXTURE_SOLUTION, subs / "loops_forever" / f"{TOY}.ipynb")
    (subs / "calls_os_exit" / f"{TOY}.ipynb").unlink()
    (subs / "invalid_json" / f"{TOY}.ipynb").unlink()
    (subs / "not_a_notebook" / f"{TOY}.ipynb").unlink()
    again = subprocess.run([sys.executable, "-m", "pretrain_lib.grading", "grade", str(subs), "--out", str(out),
                            "--exercises", str(toy_exercises)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "kept from an earlier run" in again.stdout
    rows = _rows(out)
    assert len(rows) == 30
    assert rows[f"partial/{TOY}"]["points"] == str(TOY_MAX)
    assert rows[f"loops_forever/{TOY}"]["status"] == "graded"
    assert rows[f"calls_os_exit/{TOY}"]["status"] == "missing"
    graded_lines = [line for line in again.stdout.splitlines() if f" {TOY} " in line and "graded" in line]
    assert len(graded_lines) == 2, again.stdout     # only the two changed submissions ran


def test_command_line_contract(toy_exercises, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pretrain_lib.grading", *map(str, args)],
                              capture_output=True, text=True, timeout=300, cwd=REPO)

    assert cli("grade", tmp_path / "nope", "--out", tmp_path / "o").returncode == 2
    assert cli("grade", tmp_path, "--out", tmp_path / "o", "--jobs", "0").returncode == 2
    assert cli("grade", tmp_path).returncode == 2                       # --out is required
    checked = cli("check", FIXTURE_SOLUTION, "--exercises", toy_exercises)
    assert checked.returncode == 0, checked.stderr
    assert "score: 7 / 7 (graded)" in checked.stdout


# --- the real Chapter 1 exercise ----------------------------------------------------------------------

OBJECTIVES = REPO / "exercises" / "01_objectives.ipynb"


@pytest.mark.notebook
@pytest.mark.skipif(not OBJECTIVES.exists(), reason="exercises/01_objectives.ipynb not built yet")
def test_objectives_exercise_cannot_be_fooled(tmp_path):
    solution = nbformat.read(REPO / "solutions" / "01_objectives.ipynb", as_version=4)
    exercise = nbformat.read(OBJECTIVES, as_version=4)
    checks = exercise_checks(exercise)
    total = sum(c.max_points for c in checks)
    subs, out = tmp_path / "subs", tmp_path / "out"
    _write(solution, subs / "solution" / "01_objectives.ipynb")
    _write(exercise, subs / "untouched" / "01_objectives.ipynb")
    forged = copy.deepcopy(exercise)                       # stubs + outputs (and check sources) that say PASS
    for cell in forged.cells:
        if "check" in cell.metadata.get("tags", []):
            cell.source = "\n".join(f"print({line!r})" for line in cell.outputs[0]["text"].splitlines())
    _write(forged, subs / "forged" / "01_objectives.ipynb")
    partial = copy.deepcopy(exercise)                      # only the two losses answered
    sol_by_id = {c.id: c for c in solution.cells}
    for cell in partial.cells:
        if cell.id in ("0258d9e0", "df461d2d"):
            cell.source = sol_by_id[cell.id].source
    _write(partial, subs / "partial" / "01_objectives.ipynb")
    report = grade_class(subs, out, jobs=2, timeout_s=300)
    assert report.not_graded == []
    rows = _rows(out)
    assert float(rows["solution/01_objectives"]["points"]) == total
    assert float(rows["untouched/01_objectives"]["points"]) == 0
    assert float(rows["forged/01_objectives"]["points"]) == 0
    loss_points = sum(c.max_points for c in checks if c.cell_id in ("7ff5d2d9", "958540b9"))
    assert loss_points == 4
    assert float(rows["partial/01_objectives"]["points"]) == loss_points
