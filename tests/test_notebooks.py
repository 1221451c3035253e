"""Every chapter notebook executes headlessly with small parameters and its own assertions hold."""
from __future__ import annotations

import pytest

from conftest import REPO, notebook_test_parameters
from pretrain_lib.notebooks import chapter_notebooks, execute_notebook

NOTEBOOKS = chapter_notebooks(REPO / "chapters")


def test_there_are_chapter_notebooks():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", [
    # notebooks that launch torchrun share the "torchrun" worker: never two 2-rank jobs on 2 cores at once
    pytest.param(p, id=f"{p.parent.name}/{p.name}",
                 marks=[pytest.mark.xdist_group("torchrun")] if p.parent.name == "03_distributed" else [])
    for p in NOTEBOOKS])
def test_notebook_executes(notebook, tmp_path):
    run = execute_notebook(notebook, build_dir=tmp_path, parameters=notebook_test_parameters(notebook),
                           timeout_s=600)
    assert run.ok, run.error
