"""Every chapter notebook executes headlessly with small parameters and its own assertions hold.

A notebook that `make run` passed at its defaults on this very tree (build/defaults_passed.json,
fingerprint matching) is skipped, saying so: its defaults run executed every cell and checked every
claim, a superset of this run. CI runs `make run` first for that reason. COURSE_RERUN_NOTEBOOKS=1
runs them all regardless.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import REPO, notebook_test_parameters
from pretrain_lib.notebooks import chapter_notebooks, display_path, execute_notebook, passed_at_defaults

NOTEBOOKS = chapter_notebooks(REPO / "chapters")
# read at collection, before any test writes a file
PASSED_AT_DEFAULTS = set() if os.environ.get("COURSE_RERUN_NOTEBOOKS") else passed_at_defaults(REPO / "build")


def launches_torchrun(notebook) -> bool:
    """Notebooks that start 2-rank jobs share one xdist worker: never two such jobs on 2 cores at once."""
    text = notebook.read_text(encoding="utf-8")
    return notebook.parent.name == "03_distributed" or "run_torchrun" in text or "distributed.launch" in text


def test_every_chapter_notebook_is_found_in_course_order():
    """Against a plain walk of the folder: every notebook of every chapter folder, nothing else."""
    on_disk = []
    for folder, subfolders, files in os.walk(REPO / "chapters"):
        subfolders[:] = [s for s in subfolders if s != ".ipynb_checkpoints"]
        on_disk += [Path(folder) / f for f in files if f.endswith(".ipynb")]
    chapters = sorted(p.name for p in (REPO / "chapters").iterdir() if p.is_dir() and p.name[:2].isdigit())
    assert chapters == [f"{n:02d}_{p.split('_', 1)[1]}" for n, p in enumerate(chapters)]   # 00, 01, ... no gap
    assert len(chapters) >= 9 and len(on_disk) >= 34
    assert {p.parent.name for p in NOTEBOOKS} == set(chapters)
    assert sorted(NOTEBOOKS) == NOTEBOOKS and sorted(NOTEBOOKS) == sorted(on_disk)


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", [
    pytest.param(p, id=f"{p.parent.name}/{p.name}",
                 marks=[pytest.mark.xdist_group("torchrun")] if launches_torchrun(p) else [])
    for p in NOTEBOOKS])
def test_notebook_executes(notebook, tmp_path):
    if display_path(notebook) in PASSED_AT_DEFAULTS:
        pytest.skip(f"{display_path(notebook)} passed at its defaults, every claim checked, in `make run` on this tree "
                    "(build/defaults_passed.json); COURSE_RERUN_NOTEBOOKS=1 runs it at test sizes anyway")
    run = execute_notebook(notebook, build_dir=tmp_path, parameters=notebook_test_parameters(notebook),
                           timeout_s=600)
    assert run.ok, run.error
