"""The Markdown feedback a student receives for one graded notebook.

Everything that did not come from the course (the student's folder name, what their code
printed, exception messages, notes quoting their cells) is escaped: names and notes as
Markdown text (no heading, link, image or raw HTML can be formed), printed output inside a
fence longer than any run of backticks in it. Notes are de-duplicated and capped.
"""
from __future__ import annotations

import re

OUTPUT_SHOWN_CHARS = 800        # expected / produced text kept in feedback, per check
MAX_NOTES = 40                  # notes listed; the rest are counted
NOTE_CHARS = 2000               # one note's text kept

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>=:])")


def fmt_points(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def truncate(text: str, limit: int = OUTPUT_SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n... [{len(text) - limit} more characters]\n"


def md_text(text: str) -> str:
    """Plain text safe inside a Markdown line: one line, HTML and Markdown syntax escaped."""
    text = _CONTROL.sub(" ", str(text).replace("\r\n", " ").replace("\n", " ").replace("\r", " "))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def _html_safe(text: str) -> str:
    """Text whose Markdown stays (code spans written by the grader) but that can open no HTML tag."""
    return _CONTROL.sub(" ", str(text)).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fenced(text: str) -> list[str]:
    """``text`` in a code fence no line of it can close."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    longest = max((len(m) for m in re.findall(r"`+|~+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, text, fence]


def _cell(text: str) -> str:
    return _html_safe(text).replace("|", "\\|").replace("\n", " ")


def _notes(notes: list[str]) -> list[str]:
    """De-duplicated, capped notes; a note of several lines keeps its first as text and the rest fenced."""
    seen, unique = set(), []
    for note in notes:
        key = str(note)
        if key not in seen:
            seen.add(key)
            unique.append(key)
    lines = []
    for note in unique[:MAX_NOTES]:
        note = truncate(note, NOTE_CHARS)
        first, _, rest = note.partition("\n")
        lines.append(f"- {_html_safe(first)}")
        if rest.strip():
            lines += ["", *["  " + x for x in fenced(rest.rstrip())], ""]
    if len(unique) > MAX_NOTES:
        lines.append(f"- ... and {len(unique) - MAX_NOTES} more notes")
    if len(notes) > len(unique):
        lines.append(f"- ({len(notes) - len(unique)} repeated notes not shown)")
    return lines


def feedback_markdown(result) -> str:
    """The score, notes, each check (with the function it tests) and, per failure, expected vs produced."""
    who = f" — {md_text(result.student)}" if result.student else ""
    lines = [f"# {md_text(result.exercise)}{who}", "",
             f"**Score: {fmt_points(result.points)} / {fmt_points(result.max_points)}** (status: {result.status})", "",
             "Graded by running your answer cells inside the reference exercise (outputs stored in your file, "
             "edited check cells and cells you added are not used), then by calling your functions on fresh "
             "inputs that the notebook does not show.", ""]
    if result.notes:
        lines += ["## Notes", ""] + _notes(result.notes) + [""]
    if result.checks:
        lines += ["## Checks", "", "| check | tests | points | result |", "|---|---|---|---|"]
        for cr in result.checks:
            verdict = "pass" if cr.passed else "FAIL" + (f" ({cr.note})" if cr.note else "")
            tests = f"`{cr.check.answer}`" if cr.check.answer else "—"
            lines.append(f"| {_cell(cr.check.check_id)}: {_cell(cr.check.title)} | {tests} | "
                         f"{fmt_points(cr.points)} / {fmt_points(cr.check.max_points)} | {_cell(verdict)} |")
        lines.append("")
    failed = [cr for cr in result.checks if not cr.passed and not cr.note.startswith("not run")]
    if failed:
        lines += ["## Failures", ""]
        for cr in failed:
            what = f" (`{cr.check.answer}`)" if cr.check.answer else ""
            lines += [f"### {cr.check.check_id}: {_html_safe(cr.check.title)}{what}", ""]
            if cr.hidden:
                lines += [f"On the grader's hidden inputs: {_html_safe(cr.hidden).replace(chr(10), chr(32))}", ""]
            lines += ["Expected:", "", *fenced(truncate(cr.check.expected).rstrip()), "",
                      "Your notebook produced:", "", *fenced(truncate(cr.produced).rstrip() or "(nothing)"), ""]
    return "\n".join(lines)
