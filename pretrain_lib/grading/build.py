"""Build ``exercises/`` from ``solutions/``.

For each ``solutions/NN_topic.ipynb``: execute it; answer cells (tag ``answer``) keep
the code outside ``# BEGIN SOLUTION`` / ``# END SOLUTION`` and the part between becomes
``raise NotImplementedError``; check cells (tag ``check``) keep the outputs the solution
produced (stdout and results; stderr is dropped since grading ignores it) and an execution
count, which nbval needs to compare a cell; every other code cell loses its outputs and count
and is tagged ``nbval-ignore-output``. A check cell's ``metadata.check_id`` (the gradebook's
column; the cell id when absent) must be unique; each answer cell gets ``metadata.course.defines``,
the names its solution defines, by which the grader finds a student's answer wherever it is.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from .layout import check_id, defined_names, number_checks, tags

REPO_ROOT = Path(__file__).resolve().parents[2]  # not utils: that imports torch

SOLUTIONS_DIR = REPO_ROOT / "solutions"
EXERCISES_DIR = REPO_ROOT / "exercises"
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
STUB = 'raise NotImplementedError("your code here")'
_BEGIN_LINE = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION\s*$")


def stub_source(source: str) -> str:
    """Replace every BEGIN/END SOLUTION region by a stub at the marker's indentation."""
    out, inside = [], False
    for lineno, line in enumerate(source.splitlines(), 1):
        m = _BEGIN_LINE.match(line)
        if m:
            if inside:
                raise ValueError(f"line {lineno}: nested {BEGIN}")
            inside = True
            out.append(f"{m['indent']}{STUB}")
        elif line.strip() == END:
            if not inside:
                raise ValueError(f"line {lineno}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN} without {END}")
    return "\n".join(out)


def execute_solution(solution: Path, timeout_s: int = 600) -> nbformat.NotebookNode:
    """Run the solution in a scratch copy of its folder and return the executed notebook."""
    nb = nbformat.read(solution, as_version=4)
    with tempfile.TemporaryDirectory(prefix="solution-") as tmp:
        old_tmpdir = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = tmp  # what the notebook's code creates in its TMPDIR goes with the folder
        try:
            NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                           resources={"metadata": {"path": tmp}}).execute()
        finally:
            os.environ.pop("TMPDIR") if old_tmpdir is None else os.environ.__setitem__("TMPDIR", old_tmpdir)
    return nb


def _clean_outputs(outputs: list) -> list:
    cleaned = []
    for o in outputs:
        if o.get("output_type") == "stream" and o.get("name") == "stderr":
            continue  # library warnings differ between machines; the grader ignores stderr
        o = copy.deepcopy(o)
        if o.get("output_type") == "execute_result":
            o["execution_count"] = None
        o.get("metadata", {}).clear() if isinstance(o.get("metadata"), dict) else None
        if (o.get("output_type") == "stream" and cleaned and cleaned[-1].get("output_type") == "stream"
                and cleaned[-1].get("name") == o.get("name")):   # one block however the kernel chunked it
            text = lambda t: "".join(t) if isinstance(t, list) else str(t)
            cleaned[-1]["text"] = text(cleaned[-1].get("text", "")) + text(o.get("text", ""))
            continue
        cleaned.append(o)
    return cleaned


def exercise_from_solution(solution: Path, executed: nbformat.NotebookNode | None = None) -> nbformat.NotebookNode:
    """The exercise notebook for ``solution`` (executing it unless ``executed`` is given)."""
    source_nb = nbformat.read(solution, as_version=4)
    executed = executed if executed is not None else execute_solution(solution)
    by_id = {c.get("id"): c for c in executed.cells}
    seen_ids: set[str] = set()
    for cell in source_nb.cells:
        if cell.cell_type != "code":
            continue
        cell_tags = tags(cell)
        cell.execution_count = None
        if "check" in cell_tags:
            cid = check_id(cell)
            if cid in seen_ids:
                raise ValueError(f"{solution.name}: two check cells have check_id {cid!r}; ids must be unique")
            seen_ids.add(cid)
            run = by_id[cell.id]
            errors = [o for o in run.outputs if o.get("output_type") == "error"]
            if errors:
                raise RuntimeError(f"{solution.name}: check cell {cell.id} raised {errors[0].get('ename')} "
                                   "when the solution ran; fix the solution first")
            failing = [line for o in run.outputs for line in o.get("text", "").splitlines() if line.startswith("FAIL")]
            if failing:
                raise RuntimeError(f"{solution.name}: the solution fails its own check: {failing[0]}")
            cell.outputs = _clean_outputs(run.outputs)
        else:
            cell.outputs = []
            if "answer" in cell_tags:
                # the grader finds answers by these names (an answer that defines none is found by its id)
                cell.metadata.setdefault("course", {})["defines"] = sorted(defined_names(cell.source))
                cell.source = stub_source(cell.source)
            if "nbval-ignore-output" not in cell_tags:
                cell.metadata["tags"] = cell_tags + ["nbval-ignore-output"]
    number_checks(source_nb.cells)  # nbval skips comparing a cell whose count is None
    source_nb.metadata.setdefault("course", {})["exercise_id"] = solution.stem
    return source_nb


def build_all(solutions_dir: Path = SOLUTIONS_DIR, exercises_dir: Path = EXERCISES_DIR,
              names: list[str] | None = None) -> list[Path]:
    """Regenerate every exercise (or those whose stem is in ``names``); returns the written paths."""
    solutions = sorted(solutions_dir.glob("[0-9][0-9]_*.ipynb"))
    if names:
        unknown = set(names) - {s.stem for s in solutions}
        if unknown:
            raise FileNotFoundError(f"no solution notebook named {sorted(unknown)} in {solutions_dir}")
        solutions = [s for s in solutions if s.stem in names]
    if not solutions:
        raise FileNotFoundError(f"no solution notebooks (NN_topic.ipynb) in {solutions_dir}")
    exercises_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for sol in solutions:
        nb = exercise_from_solution(sol)
        target = exercises_dir / sol.name
        tmp = target.with_suffix(".ipynb.tmp")
        nbformat.write(nb, tmp)
        shutil.move(tmp, target)  # atomic: an interrupted build leaves the old exercise intact
        print(f"wrote {target.relative_to(REPO_ROOT) if target.is_relative_to(REPO_ROOT) else target}")
        written.append(target)
    return written
