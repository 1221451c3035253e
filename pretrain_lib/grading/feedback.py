"""The Markdown feedback a student receives for one graded notebook."""
from __future__ import annotations

OUTPUT_SHOWN_CHARS = 800        # expected / produced text kept in feedback, per check


def fmt_points(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def truncate(text: str, limit: int = OUTPUT_SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n... [{len(text) - limit} more characters]\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def feedback_markdown(result) -> str:
    """The score, notes, each check (with the function it tests) and, per failure, expected vs produced."""
    who = f" — {result.student}" if result.student else ""
    lines = [f"# {result.exercise}{who}", "",
             f"**Score: {fmt_points(result.points)} / {fmt_points(result.max_points)}** (status: {result.status})", "",
             "Graded by running your answer cells inside the reference exercise (outputs stored in your file, "
             "edited check cells and cells you added are not used), then by calling your functions on fresh "
             "inputs that the notebook does not show.", ""]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
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
            lines += [f"### {cr.check.check_id}: {cr.check.title}{what}", ""]
            if cr.hidden:
                lines += [f"On the grader's hidden inputs: {cr.hidden}", ""]
            lines += ["Expected:", "", "```", truncate(cr.check.expected).rstrip(), "```", "",
                      "Your notebook produced:", "", "```", truncate(cr.produced).rstrip() or "(nothing)", "```", ""]
    return "\n".join(lines)
