"""Run an exercise's hidden probes on a set of answers and return plain JSON values.

A probe module (``pretrain_lib/grading/probes/<exercise>.py``) is self-contained Python text:

* ``PROBES = {check_id: {"answer": name, "run": run, "judge": judge, "inputs": text}}``;
  ``run(ns, seed, ctx)`` calls the answers (``ns``: a fresh namespace holding the notebook's
  setup cells and the answers) on inputs drawn from ``seed`` and returns JSON-able values;
  ``judge(student, reference, seed)`` returns ``(ok, message)`` and runs only in the grading
  process; ``inputs`` says in words what kind of inputs ``run`` draws (feedback shows it, never
  the inputs themselves);
* ``FORBIDDEN``: names and dotted paths of the library's own implementations.

Where the probes run:

* **the student's answers** run in a *probe process* of their own (:func:`run_isolated`), in a
  fresh sandbox started after the notebook's kernel has ended, so the kernel never sees the
  probe code, the secret seed or the channel, and shares nothing with this process. The
  grading process sends the answer cells on the process's stdin; only once they are loaded
  does it send the probe code, the seed and a nonce (:func:`isolated_main`). Before any
  answer runs, the process keeps a private duplicate of its stdout pipe and points file
  descriptors 0, 1 and 2 at ``/dev/null``: what the answers print goes nowhere, and the
  values come back on that pipe only (never through a file in the scratch folder);
* **the solution's answers** run in a separate trusted process (:func:`main`, reading one JSON
  request on stdin), once per exercise and seed.

Values are JSON, never pickle, and are judged in the grading process.
"""
from __future__ import annotations

import io
import json
import math
import os
import signal
import sys
import threading
import time

_SHIM = '''
class _GradingIPython:
    """What answer cells may ask of IPython when the grader runs them outside a kernel: the
    cell magics that run their body as Python (%%time, %%capture...) run it once; other
    magics (%matplotlib inline, %config...) and shell lines do nothing."""
    _RUN = ("time", "timeit", "capture", "prun")

    def __init__(self, ns):
        self.user_ns = ns

    def run_line_magic(self, name, line, *args, **kwargs):
        if name in self._RUN and str(line).strip():
            exec(compile(str(line), "<magic>", "exec"), self.user_ns)

    def run_cell_magic(self, name, line, cell, *args, **kwargs):
        if name in self._RUN:
            exec(compile(str(cell), "<magic>", "exec"), self.user_ns)

    def system(self, *args, **kwargs):
        return None

    def getoutput(self, *args, **kwargs):
        return []


def get_ipython():
    return _GradingIPython(globals())


def display(*args, **kwargs):
    return None
'''

LINE_CAP_BYTES = 64 * 2**20        # one message from the probe process
TOTAL_CAP_BYTES = 128 * 2**20      # everything it may send


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
    if isinstance(exc, _ProbeTimeout):
        return "the time limit of one check was reached"
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) and exc.args[0].isidentifier():
        return f"NameError: `{exc.args[0]}` is not defined"
    try:
        text = str(exc).strip()
    except Exception:  # noqa: BLE001 - a hostile __str__
        text = ""
    text = text.splitlines()[0][:200] if text else ""
    name = type(exc).__name__[:60]
    return f"{name}: {text}" if text else name


def as_program(cells: list[str]) -> str:
    """One Python file that runs ``cells`` in order, each in its own try (as a notebook would go on)."""
    return (_SHIM + "\nimport json as _json\n"
            f"for _cell in _json.loads({json.dumps(cells)!r}):\n"
            "    try:\n        exec(compile(_cell, '<cell>', 'exec'), globals())\n"
            "    except Exception as _exc:\n        print(f'cell raised {type(_exc).__name__}')\n")


def python_cells(sources: list[str]) -> list[str]:
    """Cell sources as plain Python, transformed as IPython does (``%magic`` lines, ``%%time`` cells)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager
    except ImportError:  # pragma: no cover - IPython comes with the kernel
        return list(sources)
    out = []
    for source in sources:
        try:
            out.append(TransformerManager().transform_cell(source))
        except Exception:  # noqa: BLE001 - a cell IPython cannot transform runs (and fails) as it is
            out.append(source)
    return out


class _ProbeTimeout(Exception):
    """Raised in the probe process when one cell or one check runs past its limit."""


def _alarm(_signum, _frame):
    raise _ProbeTimeout()


def _limited(seconds: float | None):
    if seconds and hasattr(signal, "setitimer"):
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, float(seconds))


def _unlimited():
    if hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, 0)


def load_cells(cells: list[str], cell_timeout_s: float | None = None) -> dict:
    """A fresh ``__main__`` namespace with ``cells`` run in order; a cell that raises lets the others run."""
    ns: dict = {"__name__": "__main__"}
    exec(compile(_SHIM, "<grading>", "exec"), ns)
    for source in cells:
        try:
            _limited(cell_timeout_s)
            exec(compile(source, "<answer>", "exec"), ns)
        except BaseException:  # noqa: BLE001 - a cell that raises still lets the others be probed
            pass
        finally:
            _unlimited()
    return ns


def run_probes(probe_source: str, check_ids: list[str], seed: int, cells: list[str], state: dict,
               emit=None, check_timeout_s: float | None = None) -> dict:
    """``{check_id: {"value": …} or {"error": "…"}}``; ``state`` keeps the namespace between calls.

    ``cells``: the notebook's code cells without its checks (setup cells and answers), as
    plain Python (:func:`python_cells`), run in a fresh namespace one by one, so an answer left
    as a stub does not hide the others. ``emit(check_id, result)`` is called after each check.
    """
    import contextlib
    quiet = io.StringIO()
    if "ns" not in state:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            state["ns"] = load_cells(cells)
        state["ctx"] = {"script": as_program(cells), "cache": {}}
    if "probes" not in state:
        state["probes"] = load_probes(probe_source)["PROBES"]
    out = {}
    for cid in check_ids:
        probe = state["probes"].get(cid)
        if probe is None:
            out[cid] = {"error": f"no probe for check {cid}"}
        else:
            try:
                with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                    _limited(check_timeout_s)
                    try:
                        value = probe["run"](state["ns"], seed, state["ctx"])
                    finally:
                        _unlimited()
                    out[cid] = {"value": to_json(value)}
            except BaseException as exc:  # noqa: BLE001 - the student's bug costs this check only
                out[cid] = {"error": _error(exc)}
        quiet.seek(0)
        quiet.truncate()
        if emit is not None:
            emit(cid, out[cid])
    return out


# --- the student's side: an isolated probe process ----------------------------------------------

def isolated_main() -> int:
    """The probe process (``python -m pretrain_lib.grading.probe_runner --isolated``).

    stdin line 1: ``{"cells": [...], "cell_timeout": s}``; then it answers ``{"loaded": true}``.
    stdin line 2: ``{"probes", "seed", "nonce", "check_ids", "check_timeout"}``; then it sends one
    ``{"nonce", "check", "result"}`` line per check and ``{"nonce", "done": true}``.
    """
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")      # private (not inherited) copies
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    sink = io.StringIO()
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(), sink, sink

    def send(message: dict) -> None:
        channel.write(json.dumps(message, allow_nan=False) + "\n")
        channel.flush()

    first = json.loads(requests.readline())
    ns = load_cells(first["cells"], first.get("cell_timeout"))
    sink.seek(0)
    sink.truncate()
    send({"loaded": True})
    second = json.loads(requests.readline())
    requests.close()
    nonce = second["nonce"]
    state = {"ns": ns, "ctx": {"script": as_program(first["cells"]), "cache": {}}}

    def emit(cid, result):
        try:
            send({"nonce": nonce, "check": cid, "result": result})
        except (TypeError, ValueError) as exc:
            send({"nonce": nonce, "check": cid, "result": {"error": _error(exc)}})
        sink.seek(0)
        sink.truncate()

    run_probes(second["probes"], second["check_ids"], int(second["seed"]), [], state, emit=emit,
               check_timeout_s=second.get("check_timeout"))
    send({"nonce": nonce, "done": True})
    channel.close()
    os._exit(0)   # no atexit hooks or finalisers of the answers' objects run after the values are sent


class _Lines:
    """Lines read from a pipe on a thread, each bounded, the whole bounded."""

    def __init__(self, pipe):
        self.pipe, self.lines, self.cond = pipe, [], threading.Condition()
        self.eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        total = 0
        try:
            while total < TOTAL_CAP_BYTES:
                line = self.pipe.readline(LINE_CAP_BYTES)
                if not line:
                    break
                total += len(line)
                if not line.endswith(b"\n"):      # over the line cap: drop the rest of it
                    while True:
                        more = self.pipe.readline(LINE_CAP_BYTES)
                        total += len(more)
                        if not more or more.endswith(b"\n") or total >= TOTAL_CAP_BYTES:
                            break
                    continue
                with self.cond:
                    self.lines.append(line)
                    self.cond.notify_all()
        except (OSError, ValueError):
            pass
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def next(self, deadline: float) -> bytes | None:
        with self.cond:
            while not self.lines and not self.eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))
            return self.lines.pop(0) if self.lines else None


def _message(raw: bytes | None) -> dict | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode("utf-8", errors="replace"))
    except (json.JSONDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def run_isolated(cells: list[str], probe_source: str, check_ids: list[str], seed: int, *, timeout_s: float,
                 cell_timeout_s: float, memory_bytes: int, hide: list, sandbox: bool = True) -> tuple[dict, str]:
    """Run the probes on the student's ``cells`` in a fresh, sandboxed probe process.

    Returns ``({check_id: {"value"…} or {"error"…}}, note)``; ``note`` says why values are
    missing ("" when every check reported). Never raises for what the answers do.
    """
    import secrets
    import subprocess

    from ..process_tree import kill_process_group, kill_tree
    from .sandbox import Limits, bwrap_command, bwrap_problem, new_scratch, remove_scratch

    sandboxed = sandbox and bwrap_problem() is None
    scratch = new_scratch(sandboxed)
    limits = Limits(f"probe-{os.getpid()}-{secrets.token_hex(4)}", memory_bytes)
    nonce = secrets.token_hex(16)
    results: dict = {}
    note = ""
    proc = None
    try:
        inside = scratch.inside
        work, home = scratch.root / "work", scratch.root / "home"
        work.mkdir()
        home.mkdir()
        cmd = [sys.executable, "-I", "-m", "pretrain_lib.grading.probe_runner", "--isolated"]
        if sandboxed:
            cmd = bwrap_command(cmd, scratch, hide=hide, workdir=inside / "work")
        h = inside / "home"
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(h), "TMPDIR": str(inside), "TMP": str(inside),
               "TEMP": str(inside), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "MPLBACKEND": "Agg",
               "COURSE_HEADLESS": "1", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
               "MPLCONFIGDIR": str(h / ".matplotlib"), "XDG_CACHE_HOME": str(h / ".cache"),
               "TORCHINDUCTOR_CACHE_DIR": str(h / ".cache" / "inductor"), "PYTHONPATH": _package_root()}
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=limits.preexec)
        deadline = time.monotonic() + timeout_s
        lines = _Lines(proc.stdout)
        try:
            proc.stdin.write((json.dumps({"cells": cells, "cell_timeout": cell_timeout_s}) + "\n").encode())
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        loaded = None
        while loaded is None:
            raw = lines.next(deadline)
            if raw is None:
                break
            msg = _message(raw)
            if msg is not None and msg.get("loaded") is True:
                loaded = True
        if loaded is None:
            note = _why_missing(proc, deadline, limits, "while running your cells")
            return results, note
        try:
            proc.stdin.write((json.dumps({"probes": probe_source, "seed": int(seed), "nonce": nonce,
                                          "check_ids": list(check_ids), "check_timeout": cell_timeout_s}) + "\n")
                             .encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        done = False
        while not done:
            msg = _message(lines.next(deadline))
            if msg is None:
                if lines.eof or time.monotonic() >= deadline:
                    break
                continue
            if msg.get("nonce") != nonce:
                continue
            if msg.get("done") is True:
                done = True
            elif msg.get("check") in check_ids and msg["check"] not in results and isinstance(msg.get("result"), dict):
                results[msg["check"]] = msg["result"]
        if not done:
            note = _why_missing(proc, deadline, limits, "while probing your functions")
        return results, note
    finally:
        if proc is not None:
            kill_tree(proc.pid)
            kill_process_group(proc.pid, grace_s=0)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass
        limits.close()
        remove_scratch(scratch)


def _why_missing(proc, deadline: float, limits, when: str) -> str:
    if limits.out_of_memory():
        return f"the hidden checks' process ran out of memory {when}"
    if time.monotonic() >= deadline:
        return f"the hidden checks' process reached its time limit {when}"
    code = proc.poll()
    return f"the hidden checks' process stopped {when}" + (f" (exit status {code})" if code is not None else "")


def _package_root() -> str:
    from pathlib import Path
    return str(Path(__file__).resolve().parents[2])


# --- the solution's side: a trusted process --------------------------------------------------------

def main() -> int:
    """Trusted side: ``{"probes", "cells", "seed", "check_ids"}`` on stdin -> results JSON on stdout."""
    request = json.loads(sys.stdin.read())
    result = run_probes(request["probes"], request["check_ids"], int(request["seed"]),
                        python_cells(request["cells"]), {})
    sys.stdout.write(json.dumps(result, allow_nan=False))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--isolated"]:
        isolated_main()
    raise SystemExit(main())
