"""What check cells call: each check prints one deterministic line, PASS or FAIL.

The printed text is what nbval compares against the reference output, so it must be
identical on every machine for the same correct answer: no timings, no raw floats
(round them with :func:`fmt`), no memory addresses.
"""
from __future__ import annotations

from typing import Callable


def fmt(x: float, digits: int = 4) -> str:
    """A float rounded to ``digits`` significant digits, the same text on any machine."""
    return f"{float(x):.{digits}g}"


def check(name: str, condition: Callable[[], bool]) -> bool:
    """Run ``condition()`` and print ``PASS name`` or ``FAIL name``; never raises.

    A failing check prints the exception's type (not its message, which can hold
    machine-specific details) so a student sees what went wrong.
    """
    try:
        ok = bool(condition())
        reason = "" if ok else " (wrong result)"
    except NotImplementedError:
        ok, reason = False, " (not implemented yet)"
    except Exception as exc:  # a student's bug must cost this check only
        ok, reason = False, f" (raised {type(exc).__name__})"
    print(f"{'PASS' if ok else 'FAIL'} {name}{reason}")
    return ok
