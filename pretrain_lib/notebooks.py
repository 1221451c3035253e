"""Execute the course's notebooks headlessly with papermill (what ``make run`` does).

Each chapter notebook runs in its own folder (so relative paths behave as in Jupyter),
its executed copy goes to ``build/chapters/<chapter>/<name>.ipynb`` and its figures to
``build/figures/<chapter>/<name>/``. A table of notebook, seconds and status is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .utils import REPO_ROOT


@dataclass
class NotebookRun:
    notebook: str
    seconds: float
    ok: bool
    error: str = ""


def chapter_notebooks(chapters_dir: Path = REPO_ROOT / "chapters") -> list[Path]:
    """Every chapter notebook in course order."""
    return sorted(p for p in chapters_dir.glob("[0-9][0-9]_*/[0-9][0-9]_*.ipynb")
                  if ".ipynb_checkpoints" not in p.parts)


def execute_notebook(path: Path, *, build_dir: Path = REPO_ROOT / "build", parameters: dict | None = None,
                     timeout_s: int = 1800, kernel_name: str = "python3") -> NotebookRun:
    """Run one notebook with papermill; never raises for a failing notebook, reports it."""
    import papermill as pm

    path = Path(path).resolve()
    chapter = path.parent.name
    out = build_dir / "chapters" / chapter / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = build_dir / "figures" / chapter / path.stem
    saved = {k: os.environ.get(k) for k in ("COURSE_HEADLESS", "COURSE_FIGURE_DIR", "PYDEVD_DISABLE_FILE_VALIDATION")}
    os.environ.update(COURSE_HEADLESS="1", COURSE_FIGURE_DIR=str(figures), PYDEVD_DISABLE_FILE_VALIDATION="1")
    start = time.perf_counter()
    try:
        pm.execute_notebook(str(path), str(out), parameters=parameters or {}, cwd=str(path.parent),
                            kernel_name=kernel_name, execution_timeout=timeout_s, progress_bar=False,
                            log_output=False)
        return NotebookRun(str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path),
                           time.perf_counter() - start, True)
    except Exception as exc:  # papermill wraps the cell's error; keep its message for the table
        message = "\n".join(str(exc).strip().splitlines()[-15:])
        if out.exists():  # papermill writes the copy as it goes; a notebook it cannot read has none
            message += f"\n(executed copy with the failing cell: {out})"
        return NotebookRun(str(path), time.perf_counter() - start, False, message)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def print_table(runs: list[NotebookRun], file=sys.stdout) -> None:
    width = max([len(r.notebook) for r in runs] + [8])
    print(f"\n{'notebook':<{width}}  {'seconds':>8}  status", file=file)
    print("-" * (width + 20), file=file)
    for r in runs:
        print(f"{r.notebook:<{width}}  {r.seconds:8.1f}  {'ok' if r.ok else 'FAILED'}", file=file)
    total = sum(r.seconds for r in runs)
    failed = sum(not r.ok for r in runs)
    print("-" * (width + 20), file=file)
    print(f"{len(runs)} notebook(s), {total:.0f} s, {failed} failed", file=file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain_lib.notebooks",
                                     description="Execute the chapter notebooks headlessly with papermill.")
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: every chapter notebook)")
    parser.add_argument("--build-dir", default=str(REPO_ROOT / "build"))
    parser.add_argument("--params", help="JSON file {notebook_stem: {param: value}} of parameter overrides")
    parser.add_argument("--timeout", type=int, default=1800, help="per-cell time limit in seconds")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.notebooks] or chapter_notebooks()
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"no such notebook(s): {', '.join(missing)}")
    overrides = json.loads(Path(args.params).read_text()) if args.params else {}
    runs = []
    for p in paths:
        print(f"running {p} ...", flush=True)
        run = execute_notebook(p, build_dir=Path(args.build_dir), parameters=overrides.get(p.stem),
                               timeout_s=args.timeout)
        if not run.ok:
            print(run.error, file=sys.stderr)
        runs.append(run)
    print_table(runs)
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
