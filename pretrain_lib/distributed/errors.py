"""Hand a rank's traceback to the launcher: ``error_rank<R>.txt`` in the run directory."""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Callable


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a strategy's ``main``; if it raises, save the traceback as ``error_rank<R>.txt`` in
    the run directory (the launcher turns it into an exception naming that rank) and exit 1."""
    try:
        main(argv)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the launcher
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        rank = os.environ.get("RANK", "?")
        text = traceback.format_exc()
        out = out_dir(sys.argv[1:] if argv is None else argv)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"error_rank{rank}.txt").write_text(text)
        print(f"[rank {rank}] failed:\n{text}", file=sys.stderr, flush=True)
        sys.exit(1)


def out_dir(argv: list[str]) -> Path | None:
    """The ``--out`` folder named on a command line, read without the module's parser (which may be what failed)."""
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--out="):
            return Path(a.split("=", 1)[1])
    return None
