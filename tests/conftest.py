"""Shared test setup: headless notebooks, small-parameter notebook runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("COURSE_HEADLESS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker: pytest-xdist runs 2 at once


def notebook_test_parameters(notebook: Path) -> dict:
    """Small parameters for ``notebook`` from tests/notebook_params/<chapter>.json."""
    params_file = REPO / "tests" / "notebook_params" / f"{notebook.parent.name}.json"
    if not params_file.exists():
        return {}
    return json.loads(params_file.read_text()).get(notebook.stem, {})


@pytest.fixture
def repo() -> Path:
    return REPO
