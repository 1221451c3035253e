"""Compatibility names for code written before the split of this module (``grading/rank_probe.py``).

New code imports from the modules that hold each concept: ``process_group`` (setup,
teardown), ``arguments``, ``errors``, ``metrics``, ``reference``. Delete this file once
nothing imports it.
"""
from .arguments import base_parser, check_args  # noqa: F401
from .errors import run_main  # noqa: F401
from .metrics import METRICS_FILE, write_metrics  # noqa: F401
from .process_group import DistContext, setup, teardown  # noqa: F401
