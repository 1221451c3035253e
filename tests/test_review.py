"""The review questions (solutions/00_review.ipynb): coverage, sections that exist, and grading end to end."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import nbformat
import pytest

from conftest import REPO
from pretrain_lib.grading.grader import feedback_markdown, grade_notebook, load_exercise
from pretrain_lib.grading.layout import check_id, tags

SOLUTION = REPO / "solutions" / "00_review.ipynb"
EXERCISE = REPO / "exercises" / "00_review.ipynb"
WHERE = re.compile(r"(chapters/(\d\d)_\w+/\w+\.ipynb), sections? '((?:[^'\\]|\\.)+)'")


def _checks():
    nb = nbformat.read(SOLUTION, as_version=4)
    return [c for c in nb.cells if c.cell_type == "code" and "check" in tags(c)]


def _headings(notebook):
    nb = nbformat.read(REPO / notebook, as_version=4)
    plain = lambda h: h.replace("$", "").replace("\\approx", "≈")  # headings may hold LaTeX; feedback is plain text
    return {plain(line.lstrip("#").strip()) for c in nb.cells if c.cell_type == "markdown"
            for line in c.source.splitlines() if line.startswith("#")}


def test_at_least_24_questions_covering_chapters_1_to_7():
    checks = _checks()
    assert len(checks) >= 24, f"only {len(checks)} review questions"
    chapters = {WHERE.search(c.source).group(2) for c in checks}
    assert {f"{n:02d}" for n in range(1, 8)} <= chapters, f"chapters covered: {sorted(chapters)}"
    assert len({check_id(c) for c in checks}) == len(checks)
    assert all(c.metadata.get("points", 0) > 0 for c in checks)


def test_every_feedback_names_a_section_that_exists():
    for cell in _checks():
        found = WHERE.search(cell.source)
        assert found, f"check {check_id(cell)} does not name the section that explains it"
        notebook, section = found.group(1), found.group(3).replace('\\"', '"')
        assert (REPO / notebook).exists(), f"check {check_id(cell)} points to a missing notebook {notebook}"
        assert section in _headings(notebook), f"check {check_id(cell)}: {notebook} has no section {section!r}"


def test_probe_module_covers_every_check():
    ex = load_exercise(EXERCISE)
    assert ex.probe_source is not None and {c.check_id for c in ex.checks} <= set(ex.judges)


def _wrong_answers(tmp_path):
    """The exercise with three wrong answers (a number, a letter, an expression) and the rest correct."""
    solution = nbformat.read(SOLUTION, as_version=4)
    nb = nbformat.read(EXERCISE, as_version=4)
    right = {c.id: c.source for c in solution.cells}
    wrong = {"q01_mask_tokens": "q01_mask_tokens = 512 * 0.15",          # forgot the 80%
             "q05_padding": 'q05_padding = "A"',
             "q14_bubble": "def q14_bubble(p, m):\n    return (p - 1) / m"}  # a common slip: m instead of m + p - 1
    for cell in nb.cells:
        if "answer" in tags(cell):
            names = cell.metadata["course"]["defines"]
            cell.source = next((wrong[n] for n in names if n in wrong), right[cell.id])
    path = tmp_path / "00_review.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.notebook
def test_solution_full_marks_untouched_zero_and_wrong_answers_told_where_to_look(tmp_path):
    exercise = load_exercise(EXERCISE)
    submissions = [SOLUTION, EXERCISE, _wrong_answers(tmp_path)]
    with ThreadPoolExecutor(3) as pool:  # each grading is its own sandboxed kernel
        full, untouched, wrong = pool.map(lambda s: grade_notebook(s, exercise, seed=1234), submissions)
    assert (full.status, full.points) == ("graded", full.max_points), feedback_markdown(full)
    assert full.max_points >= 24
    assert untouched.status == "graded" and untouched.points == 0, feedback_markdown(untouched)
    failed = {cr.check.check_id for cr in wrong.checks if not cr.passed}
    assert failed == {"q01-mask-tokens", "q05-padding", "q14-bubble"}, feedback_markdown(wrong)
    text = feedback_markdown(wrong)
    assert "review: chapters/01_objectives/01_masked_lm.ipynb, section 'The 80/10/10 rule'" in text
    assert "review: chapters/03_distributed/04_pipeline_parallel.ipynb, section 'Micro-batches and the bubble'" in text
    assert "reread 3.4 Pipeline parallelism" in text  # the hidden probe's message names the section too
    assert wrong.points == full.max_points - sum(cr.check.max_points for cr in wrong.checks if not cr.passed)
