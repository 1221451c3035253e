"""The reference side of grading: exercises, their checks and probes, the solution's values.

An :class:`Exercise` is read once per grading run from ``exercises/NN.ipynb`` (its checks, with
the reference outputs), the probe module (``probes/NN.py``) and the solution
(``solutions/NN.ipynb``). :func:`reference_values` runs the probes on the solution's answers in a
separate trusted process, once per exercise and secret seed, and checks that each judge
accepts the solution's own values.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from . import layout
from .probe_runner import load_probes, python_cells

PACKAGE_PROBES = Path(__file__).resolve().parent / "probes"
REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_TIMEOUT_S = 600


@dataclass
class Check:
    """One check cell: its stable id, its points, what the solution printed, the answer it tests."""
    cell_id: str
    check_id: str
    title: str
    max_points: float
    expected: str
    answer: str | None = None

    @property
    def name(self) -> str:
        return self.title


@dataclass
class Exercise:
    """A reference exercise; ``judges`` holds the checks that have a hidden probe."""
    name: str
    path: Path
    notebook: nbformat.NotebookNode
    checks: list[Check]
    answer_ids: list[str]
    defines: dict[str, list[str]]
    solution: Path | None = None
    probe_source: str | None = None
    probe_file: Path | None = None
    judges: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)     # check_id -> the kind of inputs its probe draws, in words
    forbidden: set[str] = field(default_factory=set)
    module_names: set[str] = field(default_factory=set)


def _title(cell, fallback: str) -> str:
    for line in layout.stream_text(cell.get("outputs", [])).splitlines():
        if line.startswith("PASS "):
            return line[5:].strip()
    return fallback


def exercise_checks(nb: nbformat.NotebookNode) -> list[Check]:
    """The checks of an exercise notebook in order; raises ValueError saying what to fix."""
    checks, seen = [], set()
    for cell in nb.cells:
        if not layout.is_code(cell, "check"):
            continue
        cid = layout.check_id(cell)
        if cid in seen:
            raise ValueError(f"two check cells have check_id {cid!r}")
        seen.add(cid)
        points = cell.metadata.get("points", 1)
        if not isinstance(points, (int, float)) or isinstance(points, bool) or points < 0:
            raise ValueError(f"check cell {cell.get('id')}: 'points' must be a non-negative number, got {points!r}")
        checks.append(Check(cell.get("id"), cid, _title(cell, cid), float(points), layout.stream_text(cell.outputs)))
    return checks


def find_probe_file(name: str, solutions_dir: Path | None) -> Path | None:
    for folder in ([Path(solutions_dir).parent / "probes"] if solutions_dir else []) + [PACKAGE_PROBES]:
        if (folder / f"{name}.py").is_file():
            return folder / f"{name}.py"
    return None


def default_solutions_dir(exercises_dir: Path) -> Path:
    sibling = Path(exercises_dir).resolve().parent / "solutions"
    return sibling if sibling.is_dir() else REPO_ROOT / "solutions"


def _imported_names(sources: list[str]) -> set[str]:
    names = set()
    for src in sources:
        tree = layout.parse(src)
        for node in ast.walk(tree) if tree else []:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def load_exercise(path: Path, solutions_dir: Path | None = None) -> Exercise:
    """Read a reference exercise with its probes and solution; raises ValueError saying what to fix."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    name = nb.metadata.get("course", {}).get("exercise_id") or path.stem
    checks = exercise_checks(nb)
    if not checks:
        raise ValueError(f"{path}: no cell tagged 'check'; rebuild it with `python -m pretrain_lib.grading build`")
    for cell in nb.cells:
        if layout.is_code(cell, "check") and not cell.outputs:
            raise ValueError(f"{path}: check cell {cell.get('id')} has no reference output; "
                             "rebuild it with `python -m pretrain_lib.grading build`")
    answers = [c for c in nb.cells if layout.is_code(c, "answer")]
    solutions_dir = Path(solutions_dir) if solutions_dir else default_solutions_dir(path.parent)
    solution = solutions_dir / path.name
    ex = Exercise(name, path, nb, checks, [c.get("id") for c in answers],
                  {c.get("id"): layout.answer_defines(c) for c in answers},
                  solution=solution if solution.is_file() else None,
                  module_names=_imported_names([c.source for c in nb.cells if c.cell_type == "code"
                                                and not layout.is_code(c, "answer")]))
    probe_file = find_probe_file(name, solutions_dir)
    if probe_file is not None:
        ex.probe_file = probe_file
        ex.probe_source = (PACKAGE_PROBES / "_common.py").read_text() + "\n\n" + probe_file.read_text()
        module = load_probes(ex.probe_source, str(probe_file))
        probes = module["PROBES"]
        ex.judges = {c.check_id: probes[c.check_id]["judge"] for c in checks if c.check_id in probes}
        ex.inputs = {c.check_id: str(probes[c.check_id].get("inputs", "")) for c in checks if c.check_id in probes}
        ex.forbidden = set(module.get("FORBIDDEN", set()))
        for c in checks:
            c.answer = probes.get(c.check_id, {}).get("answer")
    return ex


# --- the solution's values -------------------------------------------------------------------------

_CACHE: dict[tuple[str, int], dict] = {}
_LOCKS: dict[tuple[str, int], threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def solution_cells(solution: Path) -> list[str]:
    nb = nbformat.read(solution, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and not layout.is_code(c, "check") and c.source.strip()]


def reference_values(ex: Exercise, seed: int) -> tuple[dict | None, str]:
    """``({check_id: {"value": …}}, note)``; ``(None, note)`` when points can only come from the visible output."""
    if ex.probe_source is None or not ex.judges:
        return None, (f"this exercise has no hidden probes (no probes/{ex.name}.py): points come from the visible "
                      "output only, which the student's code can forge")
    if ex.solution is None:
        return None, (f"no solution notebook for {ex.name} was found, so the hidden probes were skipped: points come "
                      "from the visible output only (pass --solutions DIR)")
    key = (str(ex.path), int(seed))
    with _LOCKS_LOCK:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        if key not in _CACHE:
            _CACHE[key] = _run_reference(ex, seed)
    return _CACHE[key], ""


def _run_reference(ex: Exercise, seed: int) -> dict:
    request = {"probes": ex.probe_source, "cells": python_cells(solution_cells(ex.solution)), "seed": seed,
               "check_ids": [c.check_id for c in ex.checks if c.check_id in ex.judges]}
    with tempfile.TemporaryDirectory(prefix="grading-reference-") as tmp:
        env = dict(os.environ, TMPDIR=tmp, MPLBACKEND="Agg", COURSE_HEADLESS="1", PYTHONDONTWRITEBYTECODE="1")
        env.setdefault("OMP_NUM_THREADS", "1")
        run = subprocess.run([sys.executable, "-m", "pretrain_lib.grading.probe_runner"], input=json.dumps(request),
                             capture_output=True, text=True, env=env, cwd=tmp, timeout=REFERENCE_TIMEOUT_S)
    if run.returncode != 0:
        raise RuntimeError(f"the reference run of {ex.name}'s probes failed (exit {run.returncode}): "
                           f"{run.stderr.strip()[-1500:]}")
    values = json.loads(run.stdout)
    for check in ex.checks:
        if check.check_id not in ex.judges:
            continue
        ref = values.get(check.check_id, {})
        if "value" not in ref:
            raise RuntimeError(f"the solution of {ex.name} fails the hidden probe {check.check_id!r}: "
                               f"{ref.get('error')}; fix the solution or {ex.probe_file}")
        ok, why = ex.judges[check.check_id](ref["value"], ref["value"], seed)
        if ok is not True:
            raise RuntimeError(f"the probe {check.check_id!r} in {ex.probe_file} rejects the solution's own values "
                               f"(seed {seed}): {why}")
        for empty in degenerate_values(ref["value"]):
            if accepts(ex.judges[check.check_id], empty, ref["value"], seed):
                raise RuntimeError(f"the probe {check.check_id!r} in {ex.probe_file} accepts the degenerate value "
                                   f"{json.dumps(empty)[:80]}: a judge must check the whole contract")
    return values


def accepts(judge, student, reference, seed: int) -> bool:
    """Whether ``judge`` accepts ``student`` (a judge that raises rejects)."""
    try:
        ok, _ = judge(student, reference, seed)
    except Exception:  # noqa: BLE001 - what the grader does with a judge that raises: the check fails
        return False
    return ok is True


def degenerate_values(reference) -> list:
    """Values no judge may accept (unless the solution's own value is one): nothing, empty, zero, truncated."""
    out = [None, [], {}, 0, 0.0, "", True, False, "nan"]
    if isinstance(reference, list) and len(reference) > 1:
        out += [reference[:-1], reference[:1], reference + reference[-1:]]
    if isinstance(reference, dict):
        out += [{k: [] if isinstance(v, list) else None for k, v in reference.items()}]
        for key in reference:
            part = dict(reference)
            part.pop(key)
            out.append(part)
    return [v for v in out if v != reference or type(v) is not type(reference)]
