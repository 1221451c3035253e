"""The notebook lint (``make lint``): clean on the course, and each rule fires on a notebook crafted to break it."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pretrain_lib import lint

REPO = Path(__file__).resolve().parent.parent


def _cell(kind: str, source: str, *, tags=(), cell_id: str, outputs=None, **metadata) -> dict:
    cell = {"cell_type": kind, "id": cell_id, "metadata": {"tags": list(tags), **metadata}, "source": source}
    if kind == "code":
        cell.update(execution_count=None, outputs=outputs or [])
    return cell


def _notebook(cells: list[dict]) -> dict:
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


GOOD_CHAPTER = _notebook([
    _cell("markdown", "# 3.4 Pipelines\n\n**Objectives:** split a model into stages.", cell_id="t"),
    _cell("code", 'steps = 10\ndevice = "auto"\nskip_claims = []', tags=["parameters"], cell_id="p"),
    _cell("code", "%matplotlib inline\nfor i in range(3):\n    fig = plot(i)\nplt.show()", cell_id="c"),
    _cell("code", "claims.finish()", cell_id="f"),
])
GOOD_SOLUTION = _notebook([
    _cell("code", "def f(x):\n    # BEGIN SOLUTION\n    return x\n    # END SOLUTION", tags=["answer"], cell_id="a"),
    _cell("code", "check(f)", tags=["check"], cell_id="k", points=2),
])
GOOD_EXERCISE = _notebook([
    _cell("code", "def f(x):\n    raise NotImplementedError", tags=["answer"], cell_id="a"),
    _cell("code", "check(f)", tags=["check"], cell_id="k", points=2,
          outputs=[{"output_type": "stream", "name": "stdout", "text": "PASS\n"}]),
])


def _write_course(root: Path, chapter=GOOD_CHAPTER, solution=GOOD_SOLUTION, exercise=GOOD_EXERCISE,
                  chapter_path="chapters/03_distributed/04_pipelines.ipynb") -> Path:
    for rel, nb in ((chapter_path, chapter), ("solutions/03_distributed.ipynb", solution),
                    ("exercises/03_distributed.ipynb", exercise)):
        if nb is not None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(json.dumps(nb) if isinstance(nb, dict) else nb, encoding="utf-8")
    return root


def _rules(root: Path) -> set[str]:
    return {p.rule for p in lint.lint_repository(root)}


def test_the_course_passes_its_own_lint():
    problems = lint.lint_repository(REPO)
    assert problems == [], "\n".join(map(str, problems))


def test_a_course_that_follows_every_convention_passes(tmp_path):
    assert lint.lint_repository(_write_course(tmp_path)) == []


def _break_chapter(change):
    nb = copy.deepcopy(GOOD_CHAPTER)
    change(nb["cells"])
    return nb


def _set(cells, index, **fields):
    cells[index].update(fields)


CHAPTER_BREAKS = {
    "title": lambda c: _set(c, 0, source="# 3.5 Pipelines\n\nObjectives: stages."),  # wrong number for 04 in 03_
    "objectives": lambda c: _set(c, 0, source="# 3.4 Pipelines\n\nWe split a model."),
    "parameters": lambda c: _set(c, 1, source="steps = 10\nskip_claims = []"),  # no device
    "outputs": lambda c: _set(c, 2, outputs=[{"output_type": "stream", "name": "stdout", "text": "1\n"}]),
    "closing": lambda c: _set(c, 3, source="print('done')"),
    "show-in-loop": lambda c: _set(c, 2, source="for i in range(3):\n    plot(i)\n    plt.show()"),
    "cell-ids": lambda c: c[2].pop("id"),  # a cell added by a script that forgot nbformat 4.5's id
}


@pytest.mark.parametrize("rule", sorted(CHAPTER_BREAKS))
def test_each_chapter_rule_fires_on_a_notebook_that_breaks_it(tmp_path, rule):
    root = _write_course(tmp_path, chapter=_break_chapter(CHAPTER_BREAKS[rule]))
    assert _rules(root) == {rule}


def test_parameters_must_be_the_tagged_second_cell(tmp_path):
    untagged = _break_chapter(lambda c: _set(c, 1, metadata={"tags": []}))
    assert _rules(_write_course(tmp_path, chapter=untagged)) == {"parameters"}


def test_names_of_folders_and_notebooks(tmp_path):
    root = _write_course(tmp_path, chapter_path="chapters/Distributed/pipelines.ipynb")
    assert {"folder-name", "notebook-name"} <= _rules(root)


def test_an_unreadable_notebook_is_reported_not_raised(tmp_path):
    root = _write_course(tmp_path, chapter="{not json")
    assert _rules(root) == {"readable"}


def test_a_notebook_over_one_megabyte(tmp_path):
    big = _break_chapter(lambda c: _set(c, 0, source="# 3.4 Pipelines\n\nObjectives: " + "x" * 1_000_001))
    assert _rules(_write_course(tmp_path, chapter=big)) == {"size"}


SOLUTION_BREAKS = {
    "answer-markers": (lambda c: _set(c, 0, source="def f(x):\n    return x"), "solution"),
    "check-points": (lambda c: _set(c, 1, metadata={"tags": ["check"]}), "solution"),
    "cell-ids": (lambda c: _set(c, 1, id="a"), "both"),
    "stub": (lambda c: _set(c, 0, source="def f(x):\n    return x"), "exercise"),
    "reference-output": (lambda c: _set(c, 1, outputs=[]), "exercise"),
    "in-sync": (lambda c: _set(c, 1, id="renamed"), "exercise"),
}


@pytest.mark.parametrize("rule", sorted(SOLUTION_BREAKS))
def test_each_exercise_rule_fires_on_a_notebook_that_breaks_it(tmp_path, rule):
    change, which = SOLUTION_BREAKS[rule]
    solution, exercise = copy.deepcopy(GOOD_SOLUTION), copy.deepcopy(GOOD_EXERCISE)
    for name, nb in (("solution", solution), ("exercise", exercise)):
        if which in (name, "both"):
            change(nb["cells"])
    assert _rules(_write_course(tmp_path, solution=solution, exercise=exercise)) == {rule}


def test_a_solution_without_its_exercise(tmp_path):
    root = _write_course(tmp_path, exercise=None)
    assert _rules(root) == {"in-sync"}


def test_command_line_prints_one_line_per_problem_and_exits_1(tmp_path, capsys):
    root = _write_course(tmp_path, chapter=_break_chapter(CHAPTER_BREAKS["closing"]))
    assert lint.main([str(root)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("chapters/03_distributed/04_pipelines.ipynb: [closing] one of the last three code cells "
                        "should call claims.finish()")
    assert lines[-1].startswith("lint: 1 problem(s)")
    assert lint.main([str(_write_course(tmp_path / "clean"))]) == 0


def test_links_must_resolve_inside_the_repository(tmp_path):
    root = _write_course(tmp_path)
    (root / "docs").mkdir()
    (root / "docs" / "guide.md").write_text("See [the README](../README.md#two-commands) and [home](https://x.org).\n")
    (root / "README.md").write_text("Read [the guide](docs/guide.md).\n\n```\n[not a link](nowhere.md)\n```\n")
    assert lint.lint_repository(root) == []
    (root / "README.md").write_text("Read [the notes](../outside/notes.md) and [this](docs/missing.md).\n")
    problems = lint.lint_repository(root)
    assert [(p.rule, p.message.split()[0]) for p in problems] == [
        ("outside-link", "../outside/notes.md"), ("broken-link", "docs/missing.md")]


def test_the_readme_stays_a_front_page(tmp_path):
    root = _write_course(tmp_path)
    (root / "README.md").write_text("# Course\n" + "word " * 2_400)  # 12,009 bytes
    assert _rules(root) == {"readme-size"}
    (root / "README.md").write_text("# Course\n" + "word " * 2_398)  # 11,999 bytes
    assert _rules(root) == set()
