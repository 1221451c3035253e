"""Run an exercise's hidden probes on a set of answers and return plain JSON values.

A probe module (``pretrain_lib/grading/probes/<exercise>.py``) is self-contained Python text:

* ``PROBES = {check_id: {"answer": name, "run": run, "judge": judge}}``; ``run(ns, seed, ctx)``
  calls the answers (``ns``: a fresh namespace holding the notebook's setup cells and the
  answers) on inputs drawn from ``seed`` and returns JSON-able values; ``judge(student,
  reference, seed)`` returns ``(ok, message)`` and runs only in the grading process;
* ``FORBIDDEN``: names and dotted paths of the library's own implementations.

The same :func:`run_probes` runs twice with the same secret seed: inside the sandboxed kernel
on the student's answers (:func:`kernel_probe`, the last thing each check cell's hidden
companion cell does) and in a separate trusted process on the solution's answers
(``python -m pretrain_lib.grading.probe_runner`` reading a JSON request on stdin). Values come
back as JSON, never pickle, and are compared in the grading process.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import sys

MARKER = "GRADING-PROBE"
_STATE: dict[str, dict] = {}


def load_probes(source: str, filename: str = "<probes>") -> dict:
    ns: dict = {"__name__": "grading_probes"}
    exec(compile(source, filename, "exec"), ns)
    return ns


def to_json(value, depth: int = 0):
    """Tensors, arrays, numbers, tuples -> JSON-able lists and numbers (NaN/inf as strings)."""
    if depth > 20:
        raise ValueError("value nested too deeply")
    if hasattr(value, "detach") and hasattr(value, "tolist"):
        value = value.detach().cpu()
        return {"dtype": str(value.dtype).replace("torch.", ""), "shape": list(value.shape),
                "values": to_json(value.tolist(), depth + 1)}
    if type(value).__module__ == "numpy":
        if hasattr(value, "shape") and value.shape != ():
            return {"dtype": str(value.dtype), "shape": list(value.shape), "values": to_json(value.tolist(), depth + 1)}
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): to_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v, depth + 1) for v in value]
    raise TypeError(f"a probe returned a {type(value).__name__}, which the grader cannot compare")


def _error(exc: BaseException) -> str:
    if isinstance(exc, NotImplementedError):
        return "not implemented yet"
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) and exc.args[0].isidentifier():
        return f"NameError: `{exc.args[0]}` is not defined"
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def as_program(cells: list[str]) -> str:
    """One Python file that runs ``cells`` in order, each in its own try (as a notebook would go on)."""
    return ("import json as _json\n"
            f"for _cell in _json.loads({json.dumps(cells)!r}):\n"
            "    try:\n        exec(compile(_cell, '<cell>', 'exec'), globals())\n"
            "    except Exception as _exc:\n        print(f'cell raised {type(_exc).__name__}')\n")


def run_probes(probe_source: str, check_ids: list[str], seed: int, cells: list[str], state: dict) -> dict:
    """``{check_id: {"value": …} or {"error": "…"}}``; ``state`` keeps the namespace between calls.

    ``cells``: the notebook's code cells without its checks (setup cells and answers), run in
    a fresh namespace one by one, so an answer left as a stub does not hide the others.
    """
    quiet = io.StringIO()
    if "ns" not in state:
        state["probes"] = load_probes(probe_source)["PROBES"]
        ns: dict = {"__name__": "__main__"}
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            for source in cells:
                try:
                    exec(compile(source, "<answer>", "exec"), ns)
                except BaseException:  # noqa: BLE001 - a cell that raises still lets the others be probed
                    pass
        state["ns"], state["ctx"] = ns, {"script": as_program(cells), "cache": {}}
    out = {}
    for cid in check_ids:
        probe = state["probes"].get(cid)
        if probe is None:
            out[cid] = {"error": f"no probe for check {cid}"}
            continue
        try:
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                value = probe["run"](state["ns"], seed, state["ctx"])
            out[cid] = {"value": to_json(value)}
        except BaseException as exc:  # the student's bug costs this check only
            out[cid] = {"error": _error(exc)}
        quiet.seek(0)
        quiet.truncate()
    return out


def kernel_probe(payload: str, check_ids: list[str]) -> None:
    """What a hidden probe cell calls inside the kernel: print one marker line with the values."""
    request = json.loads(payload)
    state = _STATE.setdefault(request["nonce"], {})
    result = run_probes(request["probes"], check_ids, int(request["seed"]), request["cells"], state)
    print(f"{MARKER} {request['nonce']} {json.dumps(result, allow_nan=False)}", flush=True)


def probe_cell_source(payload: str, check_ids: list[str]) -> str:
    return ("from pretrain_lib.grading.probe_runner import kernel_probe as _grading_probe\n"
            f"_grading_probe({payload!r}, {check_ids!r})\n"
            "del _grading_probe")


def parse_probe_output(text: str, nonce: str) -> dict:
    """The values in the marker lines of a probe cell's stdout (later lines win)."""
    found: dict = {}
    for line in text.splitlines():
        head = f"{MARKER} {nonce} "
        if line.startswith(head):
            try:
                data = json.loads(line[len(head):])
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):
                found.update(data)
    return found


def main() -> int:
    """Trusted side: ``{"probes", "cells", "seed", "check_ids"}`` on stdin -> results JSON on stdout."""
    request = json.loads(sys.stdin.read())
    result = run_probes(request["probes"], request["check_ids"], int(request["seed"]), request["cells"], {})
    sys.stdout.write(json.dumps(result, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
