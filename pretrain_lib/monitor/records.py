"""Reading a monitor's JSONL log: shared by the monitor (core.py) and its plots (plot.py), so neither
imports the other to get it."""
from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a monitor's JSONL log (a half-written last line of a running log is skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise
    return records
