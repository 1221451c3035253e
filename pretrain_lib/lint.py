"""The course's notebook conventions, checked (``make lint``; ``tests/test_lint.py`` runs it too).

Each rule below has a short name that appears in its messages, so a failing line says which
convention of ``CONTRIBUTING.md`` a notebook breaks:

chapter notebooks (``chapters/NN_topic/NN_name.ipynb``)
  ``folder-name``     chapter folders are ``NN_topic`` (two digits, lower case)
  ``notebook-name``   notebooks are ``NN_name.ipynb``
  ``title``           the first cell is Markdown starting ``# C.N`` where C and N are the folder's
                      and the notebook's numbers (``03_distributed/04_*`` is 3.4)
  ``objectives``      the first cell states the learning objectives
  ``parameters``      the second cell is the code cell tagged ``parameters`` (papermill's), and it
                      assigns ``device`` and ``skip_claims``
  ``outputs``         chapters are committed without outputs (``make run`` writes executed copies)
  ``closing``         one of the last code cells calls ``claims.finish()``
  ``show-in-loop``    no ``plt.show()`` inside a loop (one figure per cell, saved with ``save_figure``)

exercises (``solutions/X.ipynb`` is the source of ``exercises/X.ipynb``)
  ``answer-markers``  each solution cell tagged ``answer`` has ``# BEGIN SOLUTION`` / ``# END SOLUTION``
  ``check-points``    each cell tagged ``check`` carries ``points`` in its metadata
  ``cell-ids``        every cell has an id, unique in its notebook (the grader finds cells by id)
  ``stub``            each exercise answer cell is a stub that raises ``NotImplementedError``
  ``reference-output`` each exercise check cell keeps its reference output
  ``in-sync``         an exercise has the same cells as its solution (else ``make exercises``)

every committed notebook
  ``readable``        valid JSON notebook
  ``size``            under 1 MB

documentation (every ``*.md``)
  ``broken-link``     a relative link points at a file or folder that exists
  ``outside-link``    no relative link leaves the repository (a clone has nothing beside it)
  ``readme-size``     ``README.md`` stays a front page: under 12,000 bytes (the rest lives in ``docs/``)

Standard library only, so it runs before the course's environment exists:
``python -m pretrain_lib.lint [ROOT]`` prints one line per problem and exits 1 if there is any.
"""
from __future__ import annotations

import ast
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

MAX_NOTEBOOK_BYTES = 1_000_000
MAX_README_BYTES = 12_000
_MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_NUMBERED = re.compile(r"^(\d\d)_[a-z0-9_]+$")
_SKIPPED_PARTS = {".venv", "build", ".ipynb_checkpoints", ".git", "node_modules"}


@dataclass(frozen=True)
class Problem:
    path: Path
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: [{self.rule}] {self.message}"


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def _tags(cell: dict) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _python(cell: dict) -> ast.Module | None:
    """The cell's code as a syntax tree, IPython magics and shell lines blanked; None if it does not parse."""
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in _source(cell).splitlines()]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


def _assigned_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _is_call_to(node: ast.AST, owner: str, attr: str) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
            and isinstance(node.func.value, ast.Name) and node.func.value.id == owner)


def _show_in_loop(tree: ast.Module) -> bool:
    for loop in ast.walk(tree):
        if isinstance(loop, (ast.For, ast.While, ast.AsyncFor)):
            if any(_is_call_to(n, "plt", "show") for stmt in loop.body + loop.orelse for n in ast.walk(stmt)):
                return True
    return False


def _load(path: Path, problems: list[Problem]) -> dict | None:
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problems.append(Problem(path, "readable", f"not a readable notebook ({exc})"))
        return None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        problems.append(Problem(path, "readable", "not a notebook: no list of cells"))
        return None
    return nb


def check_chapter_notebook(path: Path) -> list[Problem]:
    """The reading conventions of one chapter notebook (CONTRIBUTING.md, section 4)."""
    problems: list[Problem] = []
    name = _NUMBERED.match(path.stem)
    if path.suffix != ".ipynb" or not name:
        problems.append(Problem(path, "notebook-name", "chapter notebooks are named NN_name.ipynb"))
    nb = _load(path, problems)
    if nb is None:
        return problems
    cells = nb["cells"]
    first = cells[0] if cells else {}
    title = _source(first).lstrip()
    folder = _NUMBERED.match(path.parent.name)
    if first.get("cell_type") != "markdown" or not title.startswith("# "):
        problems.append(Problem(path, "title", "the first cell should be a Markdown title '# C.N ...'"))
    else:
        if folder and name:
            number = f"{int(folder.group(1))}.{int(name.group(1))}"
            if not re.match(rf"# {re.escape(number)}\b", title):
                problems.append(Problem(path, "title", f"the title should start '# {number}' (folder and notebook "
                                                       f"numbers), found {title.splitlines()[0][:60]!r}"))
        if "objective" not in title.lower():
            problems.append(Problem(path, "objectives", "the first cell should state the learning objectives"))
    second = cells[1] if len(cells) > 1 else {}
    if second.get("cell_type") != "code" or "parameters" not in _tags(second):
        problems.append(Problem(path, "parameters", "the second cell should be the code cell tagged 'parameters'"))
    else:
        tree = _python(second)
        missing = {"device", "skip_claims"} - (_assigned_names(tree) if tree else set())
        if missing:
            problems.append(Problem(path, "parameters", f"the parameters cell should assign {', '.join(sorted(missing))}"))
    with_outputs = [i for i, c in enumerate(cells) if c.get("cell_type") == "code" and c.get("outputs")]
    if with_outputs:
        problems.append(Problem(path, "outputs", f"stored outputs in cells {with_outputs[:5]}; commit chapters "
                                                 "without outputs"))
    code = [c for c in cells if c.get("cell_type") == "code"]
    trees = [(c, _python(c)) for c in code]
    if not any(t is not None and any(_is_call_to(n, "claims", "finish") for n in ast.walk(t))
               for _, t in trees[-3:]):
        problems.append(Problem(path, "closing", "one of the last three code cells should call claims.finish()"))
    shows = [cells.index(c) for c, t in trees if t is not None and _show_in_loop(t)]
    if shows:
        problems.append(Problem(path, "show-in-loop", f"plt.show() inside a loop in cells {shows[:5]}"))
    return problems + _check_ids(path, cells)


def _check_ids(path: Path, cells: list[dict]) -> list[Problem]:
    ids = [c.get("id") for c in cells]
    if None in ids or len(set(ids)) != len(ids):
        return [Problem(path, "cell-ids", "every cell needs an id, unique in the notebook (nbformat 4.5)")]
    return []


def check_solution(path: Path) -> list[Problem]:
    problems: list[Problem] = []
    nb = _load(path, problems)
    if nb is None:
        return problems
    cells = nb["cells"]
    answers = [c for c in cells if "answer" in _tags(c)]
    if not answers:
        problems.append(Problem(path, "answer-markers", "no cell tagged 'answer'"))
    for c in answers:
        if "# BEGIN SOLUTION" not in _source(c) or "# END SOLUTION" not in _source(c):
            problems.append(Problem(path, "answer-markers", f"answer cell {c.get('id')} lacks the "
                                                            "BEGIN/END SOLUTION markers"))
    checks = [c for c in cells if "check" in _tags(c)]
    if not checks:
        problems.append(Problem(path, "check-points", "no cell tagged 'check'"))
    for c in checks:
        if "points" not in c.get("metadata", {}):
            problems.append(Problem(path, "check-points", f"check cell {c.get('id')} has no 'points' in its metadata"))
    return problems + _check_ids(path, cells)


def check_exercise(path: Path, solution: Path) -> list[Problem]:
    problems: list[Problem] = []
    nb, ref = _load(path, problems), _load(solution, problems)
    if nb is None or ref is None:
        return problems
    for c in nb["cells"]:
        if "answer" in _tags(c) and ("# BEGIN SOLUTION" in _source(c) or "NotImplementedError" not in _source(c)):
            problems.append(Problem(path, "stub", f"answer cell {c.get('id')} should be a stub raising "
                                                  "NotImplementedError"))
        if "check" in _tags(c) and not c.get("outputs"):
            problems.append(Problem(path, "reference-output", f"check cell {c.get('id')} has no stored reference output"))
    if [c.get("id") for c in nb["cells"]] != [c.get("id") for c in ref["cells"]]:
        problems.append(Problem(path, "in-sync", f"cells differ from {solution.name}: run `make exercises`"))
    return problems + _check_ids(path, nb["cells"])


def _committed_files(root: Path, suffix: str) -> list[Path]:
    """Files ending in ``suffix`` under ``root``, not descending into environments, build output or checkpoints."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in _SKIPPED_PARTS and not d.endswith(".egg-info"))
        found += [Path(folder) / f for f in sorted(files) if f.endswith(suffix)]
    return found


def check_markdown(path: Path, root: Path) -> list[Problem]:
    """Relative links resolve inside the repository; the README stays short."""
    problems = []
    text = path.read_text(encoding="utf-8", errors="replace")
    in_code = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        for target in _MARKDOWN_LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor in this page
            resolved = (path.parent / target.split("#")[0]).resolve()
            if not resolved.is_relative_to(root.resolve()):
                problems.append(Problem(path, "outside-link", f"{target} leaves the repository; a clone has nothing "
                                                              "beside it: move what it needs inside"))
            elif not resolved.exists():
                problems.append(Problem(path, "broken-link", f"{target} does not exist"))
    if path.resolve() == (root / "README.md").resolve() and len(text.encode("utf-8")) > MAX_README_BYTES:
        problems.append(Problem(path, "readme-size", f"{len(text.encode('utf-8')):,} bytes, over {MAX_README_BYTES:,}: "
                                                     "keep the README a front page and move reference material "
                                                     "to docs/"))
    return problems


def lint_repository(root: Path) -> list[Problem]:
    """Every problem in the course at ``root``, in a stable order."""
    root = Path(root)
    problems: list[Problem] = []
    chapters = root / "chapters"
    if chapters.is_dir():
        for folder in sorted(p for p in chapters.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            if not _NUMBERED.match(folder.name):
                problems.append(Problem(folder, "folder-name", "chapter folders are named NN_topic"))
            for nb in sorted(folder.glob("*.ipynb")):
                problems += check_chapter_notebook(nb)
    solutions, exercises = root / "solutions", root / "exercises"
    if solutions.is_dir():
        for sol in sorted(solutions.glob("*.ipynb")):
            problems += check_solution(sol)
            ex = exercises / sol.name
            if ex.exists():
                problems += check_exercise(ex, sol)
            else:
                problems.append(Problem(ex, "in-sync", "missing: run `make exercises`"))
    for nb in _committed_files(root, ".ipynb"):
        if nb.stat().st_size > MAX_NOTEBOOK_BYTES:
            problems.append(Problem(nb, "size", f"{nb.stat().st_size:,} bytes; keep committed notebooks under 1 MB"))
    for page in _committed_files(root, ".md"):
        problems += check_markdown(page, root)
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path.cwd()
    problems = lint_repository(root)
    for p in problems:
        print(Problem(p.path.relative_to(root) if p.path.is_relative_to(root) else p.path, p.rule, p.message))
    print(f"lint: {len(problems)} problem(s) in {root.resolve().name}/")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
