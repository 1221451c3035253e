"""Cells of exercise notebooks: tags, check numbering, check ids, what a cell printed, matching a student's cells.

Shared by the builder and the grader (one implementation of each rule):

* :func:`tags`, :func:`number_checks` (nbval compares only cells with an execution count);
* :func:`defined_names`: the top-level names a cell's code defines (``def``, ``class``,
  assignments), read from its syntax tree after IPython's own transforms (so ``%magic``
  lines parse);
* :func:`stream_text`: what a cell printed to stdout (and the error it raised), the text
  a check cell's output is compared by;
* :func:`match_answers`: which of a student's cells answer which answer cell, by the names
  the answer defines (``metadata.course.defines``, written by the builder), then by id.
  A split or merged cell, moved sections and changed ids therefore grade the same.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

CHECK_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def tags(cell) -> list[str]:
    value = cell.get("metadata", {}).get("tags", [])
    return [t for t in value if isinstance(t, str)] if isinstance(value, list) else []


def is_code(cell, tag: str | None = None) -> bool:
    return cell.get("cell_type") == "code" and (tag is None or tag in tags(cell))


def number_checks(cells) -> None:
    """Check cells get execution counts 1, 2, …; other code cells lose theirs (and their outputs)."""
    count = 0
    for cell in cells:
        if cell.get("cell_type") != "code":
            continue
        if "check" in tags(cell):
            count += 1
            cell["execution_count"] = count
        else:
            cell["outputs"], cell["execution_count"] = [], None


def check_id(cell) -> str:
    """The stable id of a check cell: ``metadata.check_id``, else the cell's own id.

    Raises ValueError saying how to fix a malformed one.
    """
    cid = cell.get("metadata", {}).get("check_id")
    if cid is None and isinstance(cell.get("id"), str) and cell.get("id"):
        return cell.get("id")
    if not isinstance(cid, str) or not CHECK_ID.match(cid):
        raise ValueError(f"check cell {cell.get('id')}: metadata 'check_id' must be a short lowercase id such as "
                         f"'mlm-loss' (got {cid!r}); add it to the solution and rebuild")
    return cid


def stream_text(outputs) -> str:
    """What a cell printed to stdout, and an error if it raised (stderr is never compared)."""
    parts = []
    for o in outputs or []:
        kind = o.get("output_type")
        if kind == "stream" and o.get("name") == "stdout":
            text = o.get("text", "")
            parts.append("".join(text) if isinstance(text, list) else str(text))
        elif kind == "error":
            parts.append(f"{o.get('ename')}: {o.get('evalue')}\n")
    return "".join(parts)


def python_source(source: str) -> str:
    """Cell source as plain Python (``%magic`` and ``!shell`` lines become function calls)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager
        return TransformerManager().transform_cell(source)
    except Exception:  # a cell IPython cannot transform is parsed as it is
        return source


def parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(python_source(source))
    except (SyntaxError, ValueError):
        return None


def defined_names(source: str) -> set[str]:
    """Top-level names the code defines: functions, classes, assigned variables (not imports)."""
    tree = parse(source)
    if tree is None:  # unparsable: a def line still says what the cell meant to define
        return set(re.findall(r"^(?:def|class)\s+([A-Za-z_]\w*)", source, re.MULTILINE)) | set(
            re.findall(r"^([A-Za-z_]\w*)\s*=", source, re.MULTILINE))
    names: set[str] = set()

    def targets(node):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                targets(elt)

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                targets(t)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets(node.target)
    return names


def answer_defines(cell) -> list[str]:
    value = cell.get("metadata", {}).get("course", {}).get("defines", [])
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


@dataclass
class Match:
    """The student's sources for each reference answer cell, and what to tell them."""
    sources: dict[str, str] = field(default_factory=dict)      # reference answer cell id -> source
    cells_used: dict[str, list[int]] = field(default_factory=dict)  # reference id -> student cell numbers
    missing: list[str] = field(default_factory=list)          # reference ids with no student cell
    ignored: list[tuple[int, str]] = field(default_factory=list)  # (student cell number, first line)
    notes: list[str] = field(default_factory=list)


def names_label(names: list[str]) -> str:
    """An answer named by what it defines, for notes to the student: ```f`, `g``` or "this answer"."""
    return ", ".join(f"`{n}`" for n in names) if names else "this answer"


def match_answers(reference_cells, student_cells) -> Match:
    """Assign each student code cell to the reference answer whose names it defines.

    ``reference_cells``: the exercise's cells. A student cell defining a name of answer A goes
    to A (the first such answer if it defines names of several: a merged cell). An
    ``answer``-tagged cell defining none goes to the answer with its id, else joins the next
    (or previous) cell that was matched (a split cell). Other cells are ignored unless their
    source is the reference's own (setup and check cells, not reported).
    """
    refs = [c for c in reference_cells if is_code(c, "answer")]
    ref_ids = [c.get("id") for c in refs]
    owner = {name: c.get("id") for c in reversed(refs) for name in answer_defines(c)}
    known_sources = {c.get("source", "").strip() for c in reference_cells if not is_code(c, "answer")}
    code = [(n, c) for n, c in enumerate(student_cells, 1) if c.get("cell_type") == "code"]
    slot_of: dict[int, str | None] = {}
    for n, cell in code:
        src = cell.get("source", "")
        if src.strip() in known_sources:
            continue                      # the reference's own setup or check cell
        hits = [owner[x] for x in defined_names(src) if x in owner]
        if hits:
            slot_of[n] = min(hits, key=ref_ids.index)
        elif "answer" in tags(cell) and src.strip() not in known_sources:
            slot_of[n] = cell.get("id") if cell.get("id") in ref_ids else None   # None: attach to a neighbour
    match = Match()
    ordered = [n for n, _ in code if n in slot_of]
    for i, n in enumerate(ordered):
        if slot_of[n] is None:
            after = [slot_of[m] for m in ordered[i + 1:] if slot_of[m] is not None]
            before = [slot_of[m] for m in ordered[:i] if slot_of[m] is not None]
            slot_of[n] = after[0] if after else (before[-1] if before else None)
    by_number = dict(code)
    for n in ordered:
        slot = slot_of[n]
        if slot is None:
            match.ignored.append((n, _first_line(by_number[n].get("source", ""))))
            continue
        match.cells_used.setdefault(slot, []).append(n)
    covered = {x for numbers in match.cells_used.values() for n in numbers
               for x in defined_names(by_number[n].get("source", ""))}
    for ref in refs:
        rid = ref.get("id")
        numbers = match.cells_used.get(rid)
        if not numbers:
            if answer_defines(ref) and set(answer_defines(ref)) <= covered:
                match.sources[rid] = ""     # defined by a merged cell placed earlier
            else:
                match.missing.append(rid)
            continue
        match.sources[rid] = "\n\n".join(by_number[n].get("source", "") for n in numbers)
        names = answer_defines(ref)
        if len(numbers) > 1:
            match.notes.append(f"the answer defining {names_label(names)} was taken from your cells "
                               f"{', '.join(map(str, numbers))} (run in that order)")
    merged = {}
    for rid, numbers in match.cells_used.items():
        for n in numbers:
            defs = [x for x in defined_names(by_number[n].get("source", "")) if x in owner and owner[x] != rid]
            if defs:
                merged.setdefault(n, set()).update(defs)
    for n, defs in sorted(merged.items()):
        match.notes.append(f"your cell {n} also defines {names_label(sorted(defs))}; it was used for those answers too")
    for n, _ in code:
        if n in slot_of:
            continue
        src = by_number[n].get("source", "")
        if src.strip() and src.strip() not in known_sources:
            match.ignored.append((n, _first_line(src)))
    match.ignored.sort()
    return match


def _first_line(source: str) -> str:
    lines = [line for line in source.strip().splitlines() if line.strip()]
    text = lines[0].strip() if lines else ""
    return text if len(text) <= 60 else text[:57] + "..."
