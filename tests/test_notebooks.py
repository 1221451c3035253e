"""Every chapter notebook executes headlessly with small parameters and its own assertions hold."""
from __future__ import annotations

import pytest

from conftest import REPO, notebook_test_parameters
from pretrain_lib.notebooks import chapter_notebooks, execute_notebook

NOTEBOOKS = chapter_notebooks(REPO / "chapters")


def launches_torchrun(notebook) -> bool:
    """Notebooks that start 2-rank jobs share one xdist worker: never two such jobs on 2 cores at once."""
    text = notebook.read_text(encoding="utf-8")
    return notebook.parent.name == "03_distributed" or "run_torchrun" in text or "distributed.launch" in text


def test_there_are_chapter_notebooks():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", [
    pytest.param(p, id=f"{p.parent.name}/{p.name}",
                 marks=[pytest.mark.xdist_group("torchrun")] if launches_torchrun(p) else [])
    for p in NOTEBOOKS])
def test_notebook_executes(notebook, tmp_path):
    run = execute_notebook(notebook, build_dir=tmp_path, parameters=notebook_test_parameters(notebook),
                           timeout_s=600)
    assert run.ok, run.error
