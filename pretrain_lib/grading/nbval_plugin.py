"""A pytest plugin loaded into the nbval subprocess that grades one submission.

The grader starts ``python -m pytest --nbval -p pretrain_lib.grading.nbval_plugin ...`` on a
notebook it assembled (reference exercise + the student's answer cells). This plugin:

* records, for every cell, whether nbval passed it and what the cell printed, as one JSON
  line per cell in the file given by ``--grading-results`` (written as each cell ends, so a
  run killed half-way still tells which checks had passed);
* compares only what a cell printed to stdout: a library warning on stderr must not cost a
  check, and neither must the ``True`` an un-silenced ``check(...)`` leaves as the cell's value;
* enforces the per-cell limit and the whole-notebook limit by *killing* the kernel process
  (nbval only interrupts it, which a ``while True: try/except`` loop can swallow);
* notices a kernel that died (``os._exit``, ``os.kill``, out of memory) at once instead of
  waiting for the cell limit;
* caps what one cell may print, on the messages received from the kernel (so the kernel cannot
  switch it off): ``OUTPUT_CAP_CHARS`` per cell.

It holds no grading logic, and no hidden probe runs in this kernel: points are decided by the
grader, from the values of a separate probe process (``probe_runner.run_isolated``).
"""
from __future__ import annotations

import json
import time
from queue import Empty

import pytest
from nbval import kernel as nbval_kernel
from nbval import plugin as nbval_plugin

from ..process_tree import kill_tree

OUTPUT_CAP_CHARS = 200_000          # per cell: check cells print a few lines
_TRUNCATED = "\n[output truncated by the grader]\n"


class KernelDied(RuntimeError):
    """The kernel process exited while a cell was running."""


def pytest_addoption(parser) -> None:
    group = parser.getgroup("grading")
    group.addoption("--grading-results", default=None, help="JSON-lines file receiving one record per cell")
    group.addoption("--grading-notebook-timeout", type=float, default=300.0,
                    help="seconds for the whole notebook, kernel start included")


def _kill_kernel(item) -> None:
    """SIGKILL the kernel and everything it started (its own session: jupyter starts it so)."""
    kernel = getattr(item.parent, "kernel", None)
    km = getattr(kernel, "km", None)
    pid = getattr(getattr(km, "provisioner", None), "pid", None)
    if pid is not None:
        kill_tree(pid)


# --- nbval patches -------------------------------------------------------------------------

_original_get_message = nbval_kernel.RunningKernel.get_message
_original_compare = nbval_plugin.IPyNbCell.compare_outputs


class _Cap:
    limit = OUTPUT_CAP_CHARS
    used = 0
    truncated = False


def _cap(msg: dict) -> dict:
    """Cut what a cell prints at the cap; drop large display data once the cap is reached."""
    content = msg.get("content") if isinstance(msg, dict) else None
    kind = msg.get("msg_type") if isinstance(msg, dict) else None
    if not isinstance(content, dict):
        return msg
    if kind == "stream" and isinstance(content.get("text"), str):
        text = content["text"]
        room = _Cap.limit - _Cap.used
        _Cap.used += len(text)
        if len(text) > room:
            content["text"] = text[:max(0, room)] + ("" if _Cap.truncated else _TRUNCATED)
            _Cap.truncated = True
    elif kind in ("display_data", "execute_result", "update_display_data") and isinstance(content.get("data"), dict):
        size = sum(len(str(v)) for v in content["data"].values())
        _Cap.used += size
        if _Cap.used > _Cap.limit:
            content["data"] = {"text/plain": "" if _Cap.truncated else _TRUNCATED}
            _Cap.truncated = True
    elif kind == "error":
        content["traceback"] = [str(t)[:4000] for t in (content.get("traceback") or [])[:60]]
        content["evalue"] = str(content.get("evalue", ""))[:4000]
    return msg


def _get_message(self, stream, timeout=None):
    """nbval's blocking read, in half-second slices so a dead kernel is noticed at once."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
        try:
            msg = _original_get_message(self, stream, timeout=step)
            return _cap(msg) if stream == "iopub" else msg
        except Empty:
            if not self.is_alive():
                raise KernelDied("the kernel process died while running this cell "
                                 "(the code called os._exit, killed its own process or ran out of memory)")
            if deadline is not None and time.monotonic() >= deadline:
                raise


def _printed(outputs):
    """Only what a cell printed to stdout. Not stderr: library warnings differ between machines.
    Not the value of the last expression: nbval runs cells with ``store_history=False``, which
    makes IPython ignore a trailing ``;``, so ``check(...);`` shows ``True`` here but not in the
    reference. A check's verdict is in its PASS/FAIL line; an exception fails the cell anyway."""
    return [o for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stdout"]


def _compare_outputs(self, test, ref, skip_compare=None):
    return _original_compare(self, _printed(test), _printed(ref), skip_compare)


nbval_kernel.RunningKernel.get_message = _get_message
nbval_plugin.IPyNbCell.compare_outputs = _compare_outputs


# --- recording ---------------------------------------------------------------------------

class _Recorder:
    def __init__(self, path: str | None, notebook_timeout: float):
        self.file = open(path, "a", encoding="utf-8") if path else None
        self.deadline = time.monotonic() + notebook_timeout
        self.notebook_timed_out = False

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record, default=str) + "\n")
            self.file.flush()


_recorder: _Recorder | None = None


def pytest_configure(config) -> None:
    global _recorder
    _recorder = _Recorder(config.getoption("grading_results"), config.getoption("grading_notebook_timeout"))


def _is_cell(item) -> bool:
    return isinstance(item, nbval_plugin.IPyNbCell)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Give the cell what is left of the notebook's time when that is less than its own limit."""
    if not _is_cell(item) or _recorder is None:
        return
    left = _recorder.deadline - time.monotonic()
    if left <= 0:
        _recorder.notebook_timed_out = True
        _kill_kernel(item)
    _Cap.limit, _Cap.used, _Cap.truncated = OUTPUT_CAP_CHARS, 0, False
    cell_limit = float(item.config.getoption("nbval_cell_timeout"))
    item._grading_cell_limit = cell_limit
    item.config.option.nbval_cell_timeout = max(0.1, min(cell_limit, left))


def _output_record(output) -> dict:
    kind = output.get("output_type")
    if kind == "stream":
        return {"output_type": kind, "name": output.get("name"), "text": output.get("text", "")}
    if kind == "error":
        return {"output_type": kind, "ename": output.get("ename"), "evalue": output.get("evalue")}
    data = output.get("data", {}) or {}
    return {"output_type": kind, "data": {"text/plain": data.get("text/plain", "")}}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if not _is_cell(item) or _recorder is None:
        return
    report = outcome.get_result()
    if call.when == "setup" and report.passed:
        if item.cell_num == 0 or not getattr(_recorder, "started", False):
            pid = getattr(getattr(getattr(item.parent, "kernel", None), "km", None), "provisioner", None)
            _recorder.write({"event": "start", "kernel_pid": getattr(pid, "pid", None)})
            _recorder.started = True
        return
    if call.when == "teardown" or (call.when == "setup" and report.passed):
        return
    limit = getattr(item, "_grading_cell_limit", None)
    if limit is not None:
        item.config.option.nbval_cell_timeout = limit
    timed_out = bool(getattr(item.parent, "timed_out", False)) and not getattr(item.parent, "_grading_timeout_seen", False)
    if timed_out:
        item.parent._grading_timeout_seen = True
        _kill_kernel(item)
        if _recorder.deadline - time.monotonic() <= 1.0:
            _recorder.notebook_timed_out = True
    message = ""
    kernel_died = False
    if call.excinfo is not None:
        exc = call.excinfo.value
        kernel_died = isinstance(exc, KernelDied) or "Kernel dead" in str(exc)
        message = exc.args[1] if isinstance(exc, nbval_plugin.NbCellError) and len(exc.args) > 1 else str(exc)
    _recorder.write({
        "event": "cell",
        "index": item.cell_num,
        "id": item.cell.get("id"),
        "phase": call.when,
        "passed": bool(report.passed),
        "timed_out": timed_out,
        "notebook_timed_out": _recorder.notebook_timed_out,
        "kernel_died": kernel_died,
        "message": str(message)[:4000],
        "produced": [_output_record(o) for o in getattr(item, "test_outputs", None) or []],
    })


def pytest_sessionfinish(session, exitstatus) -> None:
    if _recorder is not None:
        _recorder.write({"event": "end", "exitstatus": int(exitstatus)})
        if _recorder.file is not None:
            _recorder.file.close()
