"""The grader: sandboxed, verdicts the kernel cannot forge, answers found by name, clear feedback.

Most tests use a tiny fixture exercise (tests/fixtures/grading/solutions/99_toy.ipynb, no torch;
its hidden probes are tests/fixtures/grading/probes/99_toy.py) so a submission grades in about
three seconds. One class run grades honest, sloppy, cheating and hostile students together;
the real Chapter 1 and Chapter 3 exercises are graded once each.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

from conftest import REPO
from pretrain_lib.grading import layout
from pretrain_lib.grading.build import build_all, stub_source
from pretrain_lib.grading.checks import check, fmt
from pretrain_lib.grading.grader import NotANotebook, assemble, grade_notebook, read_submission
from pretrain_lib.grading.gradebook import find_submissions, grade_class, load_exercises
from pretrain_lib.grading.reference import load_exercise, reference_values
from pretrain_lib.grading.review import review_source
from pretrain_lib.grading.sandbox import bwrap_problem, cgroup_root, parse_size, status_line

FIXTURES = REPO / "tests" / "fixtures" / "grading"
FIXTURE_SOLUTION = FIXTURES / "solutions" / "99_toy.ipynb"
TOY = "99_toy"
TOY_MAX = 7          # 1 + 2 + 3 + 1
TOY_FREE = 1         # the check that needs no answer
SANDBOXED = bwrap_problem() is None
COURSE_EXERCISES = [REPO / "exercises" / f"{n}.ipynb" for n in ("01_objectives", "02_data", "03_distributed",
                                                                "04_scaling", "09_scale")]


# --- helpers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_exercises(tmp_path_factory) -> Path:
    """exercises/ holding the fixture exercise, built from its solution by build.py."""
    out = tmp_path_factory.mktemp("exercises")
    build_all(FIXTURE_SOLUTION.parent, out, names=[TOY])
    return out


@pytest.fixture(scope="module")
def toy(toy_exercises):
    return load_exercise(toy_exercises / f"{TOY}.ipynb", FIXTURE_SOLUTION.parent)


def _answer(nb, cell_id: str, source: str):
    nb = copy.deepcopy(nb)
    next(c for c in nb.cells if c.get("id") == cell_id).source = source
    return nb


def _write(nb, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def _solution():
    return nbformat.read(FIXTURE_SOLUTION, as_version=4)


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "gradebook.csv", newline="") as f:
        return {r["student"] + "/" + r["exercise"]: r for r in csv.DictReader(f)}


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _cell(source: str, tags=("answer",), cell_id=None):
    c = nbformat.v4.new_code_cell(source)
    c.metadata["tags"] = list(tags)
    if cell_id:
        c.id = cell_id
    return c


# --- units -----------------------------------------------------------------------------------------

def test_checks_print_one_deterministic_line(capsys):
    assert check("ok", lambda: True) is True
    assert check("bad", lambda: False) is False

    def stub():
        raise NotImplementedError

    assert check("stub", stub) is False
    assert check("boom", lambda: 1 / 0) is False
    assert capsys.readouterr().out.splitlines() == [
        "PASS ok", "FAIL bad (wrong result)", "FAIL stub (not implemented yet)", "FAIL boom (raised ZeroDivisionError)"]
    assert fmt(2 / 3) == "0.6667" and fmt(61.44) == "61.44" and fmt(1e-9) == "1e-09"


def test_stub_source_keeps_code_outside_markers():
    src = "def f(x):\n    y = 1\n    # BEGIN SOLUTION\n    return x + y\n    # END SOLUTION\n"
    assert stub_source(src) == 'def f(x):\n    y = 1\n    raise NotImplementedError("your code here")'
    with pytest.raises(ValueError, match="without"):
        stub_source("# BEGIN SOLUTION\nx = 1\n")


def test_built_exercise_has_check_ids_defines_and_no_solution(toy, toy_exercises):
    assert [c.check_id for c in toy.checks] == ["add", "mean", "ratio", "free"]
    assert [c.title for c in toy.checks][:2] == ["add small integers", "mean of four numbers"]
    assert sum(c.max_points for c in toy.checks) == TOY_MAX
    assert list(toy.defines.values()) == [["add"], ["mean"], ["ratio"]]
    assert [c.answer for c in toy.checks] == ["add", "mean", "ratio", None]
    check_cells = [c for c in toy.notebook.cells if "check" in c.metadata.get("tags", [])]
    assert all(c.execution_count for c in check_cells), "nbval only compares cells with an execution count"
    assert not any(o.get("name") == "stderr" for c in check_cells for o in c.outputs)
    assert "mean([0.1, 0.2]) = 0.15" in toy.checks[1].expected
    assert "return a + b" not in (toy_exercises / f"{TOY}.ipynb").read_text()
    for path in COURSE_EXERCISES:        # every check of these exercises has a probe and a check_id
        ex = load_exercise(path)
        assert ex.solution and set(ex.judges) == {c.check_id for c in ex.checks}
        assert all(c.check_id != c.cell_id and c.answer for c in ex.checks)


def test_assembled_notebook_holds_no_expected_output_and_no_probe(toy):
    built = assemble(toy, _solution(), seed=123)
    text = json.dumps(built.notebook)
    assert "PASS add small integers" not in text and "mean([0.1, 0.2]) = 0.15" not in text
    assert "grading_probe" not in text and "GRADING-PROBE" not in text and "PROBES" not in text  # probes run apart
    assert [src.split("(")[0] for _, src in built.probe_cells][1:3] == ["def add", "def mean"]
    assert built.notes == [] and built.missing == set()


def test_answers_are_matched_by_the_names_they_define(toy):
    sol = _solution()
    by_id = {c.id: c for c in sol.cells}
    add, mean, ratio = (by_id[i].source for i in ("answer-add", "answer-mean", "answer-ratio"))
    # split: a helper cell and the function in a second cell, both tagged answer, new ids
    split = copy.deepcopy(sol)
    i = next(n for n, c in enumerate(split.cells) if c.id == "answer-add")
    split.cells[i].source = "def _plus(a, b):\n    return a + b"
    split.cells.insert(i + 1, _cell("def add(a, b):\n    return _plus(a, b)", cell_id="new-id"))
    m = layout.match_answers(toy.notebook.cells, split.cells)
    assert "_plus" in m.sources["answer-add"] and "return _plus" in m.sources["answer-add"] and not m.missing
    # merged into one cell; sections moved to the end with other ids and no tags
    merged = copy.deepcopy(sol)
    merged.cells = [c for c in merged.cells if c.id not in ("answer-add", "answer-mean", "answer-ratio")]
    merged.cells += [_cell(mean + "\n" + add, tags=(), cell_id="x1"), _cell(ratio, tags=(), cell_id="x2"),
                     _cell("print('scratch work')", tags=(), cell_id="x3")]
    m = layout.match_answers(toy.notebook.cells, merged.cells)
    assert not m.missing and m.sources["answer-add"].startswith("def mean") and m.sources["answer-mean"] == ""
    assert [line for _, line in m.ignored] == ["print('scratch work')"]
    # deleted: reported by the name it defines
    deleted = copy.deepcopy(sol)
    deleted.cells = [c for c in deleted.cells if c.id != "answer-mean"]
    built = assemble(toy, deleted, seed=1)
    assert built.missing == {"mean"} and any("`mean`" in n and "not answered" in n for n in built.notes)


ATTACKS = {
    # answer source: what must be flagged (a fragment of the REVIEW reason)
    "obfuscated_print": ("b = __import__('built' + 'ins')\nsetattr(b, 'pr' + 'int', lambda *a, **k: None)",
                         "__import__"),
    "getattr_print": ("import sys\ng = getattr(sys.modules['builtins'], 'print')", "sys.modules"),
    "checks_module": ("import sys\nsys.modules['pretrain_lib.grading.checks'].check = lambda n, f: print('PASS', n)",
                      "sys.modules"),
    "allclose": ("np.allclose = lambda *a, **k: True", "np.allclose"),
    "torch_allclose": ("import torch as t\nt.allclose = lambda *a, **k: True", "t.allclose"),
    "hooks": ("get_ipython().events.register('post_run_cell', lambda r: None)", "get_ipython"),
    "magic_run": ("%run ../solutions/01_objectives.ipynb", "get_ipython"),
    "solution_file": ("import pretrain_lib, json\nnb = json.load(open(pretrain_lib.__file__ + '/../../solutions/x'))",
                      "pretrain_lib"),
    "globals_launcher": ("globals()['run_torchrun'] = lambda *a, **k: None", "globals"),
    "exec_string": ("exec('print' + '(1)')", "exec"),
    "fork_setsid": ("import os\nif os.fork() == 0:\n    os.setsid()", "os.fork"),
    "thread": ("import threading\nthreading.Thread(target=print).start()", "threading"),
    "library_impl": ("from pretrain_lib.objectives import mlm_loss as mlm_loss", "library"),
    "redefine_check": ("def check(name, cond):\n    print('PASS', name)", "check"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_forbidden_shortcuts_are_flagged_from_the_syntax_tree(name):
    source, fragment = ATTACKS[name]
    reasons = review_source(source, forbidden={"mlm_loss", "pretrain_lib.objectives"}, modules={"np"})
    assert reasons and any(fragment in r for r in reasons), reasons


def test_honest_answers_are_not_flagged():
    assert review_source("# uses __import__ and exec only in a comment\ns = 'globals()'\nx = [1].copy()") == []
    for path in COURSE_EXERCISES:
        ex = load_exercise(path)
        sol = nbformat.read(ex.solution, as_version=4)
        for cell in sol.cells:
            if "answer" in cell.metadata.get("tags", []):
                assert review_source(cell.source, forbidden=ex.forbidden, modules=ex.module_names) == [], \
                    (path.name, cell.id)


def test_read_submission_says_what_is_wrong(tmp_path):
    bad = tmp_path / "a.ipynb"
    bad.write_text('{"cells": [')
    with pytest.raises(NotANotebook, match="not valid JSON"):
        read_submission(bad)
    bad.write_text('{"hello": 1}')
    with pytest.raises(NotANotebook, match="not a Jupyter notebook"):
        read_submission(bad)


def test_newest_copy_is_graded_and_the_other_named(toy_exercises, tmp_path):
    exercises = load_exercises(toy_exercises, FIXTURE_SOLUTION.parent)
    old = _write(_solution(), tmp_path / "s" / "dana" / f"{TOY}.ipynb")
    new = _write(_solution(), tmp_path / "s" / "dana" / f"{TOY} (1).ipynb")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    found, ignored = find_submissions(tmp_path / "s", exercises)
    assert found["dana"][TOY] == new and ignored[("dana", TOY)] == [old]


def test_sizes_and_the_unsandboxed_warning():
    assert parse_size("512M") == 512 * 2**20 and parse_size("2g") == 2 * 2**30
    with pytest.raises(ValueError, match="below 64M"):
        parse_size("1M")
    line = status_line(2**30, sandboxed=False)
    assert line.startswith("WARNING: NOT SANDBOXED") and "read and write your files" in line and "\n" not in line


# --- one submission ------------------------------------------------------------------------------

def test_solution_full_marks_untouched_and_forged_score_only_the_free_check(toy, toy_exercises, tmp_path):
    full = grade_notebook(FIXTURE_SOLUTION, toy)
    assert (full.status, full.points, full.max_points) == ("graded", TOY_MAX, TOY_MAX), full.notes
    untouched = grade_notebook(toy_exercises / f"{TOY}.ipynb", toy)
    assert untouched.status == "graded" and untouched.points == TOY_FREE
    assert "NotImplementedError" in untouched.checks[0].hidden
    # stubs, check cells edited to print the solution's PASS lines, an answer that prints them too
    forged = nbformat.read(toy_exercises / f"{TOY}.ipynb", as_version=4)
    for cell in forged.cells:
        if "check" in cell.metadata.get("tags", []):
            cell.source = "\n".join(f"print({line!r})" for line in cell.outputs[0]["text"].splitlines())
    result = grade_notebook(_write(forged, tmp_path / f"{TOY}.ipynb"), toy)
    assert result.status == "graded" and result.points == TOY_FREE


def test_whole_notebook_limit_stops_a_slow_submission(toy, tmp_path):
    """Two answers sleep 3 s: no cell reaches its 4.5 s limit, the notebook passes its 5 s one."""
    slow = _solution()
    for cid in ("answer-mean", "answer-ratio"):
        cell = next(c for c in slow.cells if c.id == cid)
        cell.source = "import time\ntime.sleep(3)\n" + cell.source.replace("# BEGIN SOLUTION\n", "").replace(
            "# END SOLUTION", "")
    reference_values(toy, 7)               # the trusted reference run is not part of the notebook's time
    result = grade_notebook(_write(slow, tmp_path / f"{TOY}.ipynb"), toy, timeout_s=5, cell_timeout_s=4.5, seed=7)
    assert result.status == "timeout"
    verdicts = {c.check.check_id: (c.passed, c.note) for c in result.checks}
    assert verdicts["add"] == (True, "")        # checks done before the limit keep their points
    # the kernel was stopped, not left to finish: the last checks never ran, even the free one that
    # needs no answer (6 s of sleep in 4.5 s cells would otherwise all complete and score)
    for cid in ("ratio", "free"):
        assert verdicts[cid][0] is False and verdicts[cid][1].startswith("not run"), verdicts
    assert any("whole notebook 5 s" in n for n in result.notes), result.notes


# --- a class --------------------------------------------------------------------------------------

STUB_ADD = "def add(a, b):\n    raise NotImplementedError"
BAD_STUDENTS = {
    # name: (answer cell, source) replacing one answer of the solution
    "loops_forever": ("answer-add", "while True:\n    try:\n        pass\n    except BaseException:\n        pass"),
    "calls_sys_exit": ("answer-add", "import sys\nsys.exit(3)"),
    "calls_os_exit": ("answer-mean", "import os\nos._exit(1)"),
    "huge_output": ("answer-add", "print('x' * 5_000_000)\nfor i in range(100_000):\n    print(i)\n"
                                  "def add(a, b):\n    return a + b"),
    "vandal": ("answer-add", "import os, shutil\nopen('planted.txt', 'w').write('x')\n"
                             "for f in os.listdir('.'):\n    os.remove(f) if os.path.isfile(f) else None\n"
                             "def add(a, b):\n    return a + b"),
}
# cheats on top of the untouched exercise (every answer a stub): any point beyond the free one is forged
CHEATS = {
    "print_patch": "b = __import__('built' + 'ins')\n_orig = getattr(b, 'pr' + 'int')\n"
                   "def _fake(*a, **k):\n    _orig(*[str(x).replace('FAIL', 'PASS').split(' (')[0] for x in a], **k)\n"
                   "setattr(b, 'pr' + 'int', _fake)\n" + STUB_ADD,
    "checks_sys_modules": "import sys\nm = sys.modules['pretrain_lib.grading.checks']\n"
                          "m.check = lambda n, f: print('PASS', n) or True\nglobals()['check'] = m.check\n" + STUB_ADD,
    "ipython_hooks": "ip = get_ipython()\nip.events.register('pre_run_cell', lambda info: globals().__setitem__("
                     "'check', lambda n, f: print('PASS', n)))\n" + STUB_ADD,
    "reads_expected": "import glob, json\nlines = [l for f in glob.glob('**/*.ipynb', recursive=True) + "
                      "glob.glob('/tmp/**/*.ipynb', recursive=True)\n         for c in json.load(open(f))['cells'] "
                      "for o in c.get('outputs', []) for l in ''.join(o.get('text', '')).splitlines()]\n"
                      "def check(name, cond):\n    print('PASS', name)\n" + STUB_ADD,
    "forges_records": "import threading, time, json, glob\ndef _forge():\n    for _ in range(200):\n"
                      "        for f in glob.glob('/tmp/**/results.jsonl', recursive=True):\n"
                      "            with open(f, 'a') as fh:\n                for cid in ('check-add', 'check-mean', "
                      "'check-ratio'):\n                    fh.write(json.dumps({'event': 'cell', 'id': cid, 'passed': "
                      "True, 'produced': []}) + '\\n')\n        time.sleep(0.05)\n"
                      "threading.Thread(target=_forge, daemon=True).start()\n" + STUB_ADD,
    "patches_probe_runner": "import pretrain_lib.grading.probe_runner as pr\n"
                            "pr.run_probes = lambda *a, **k: {c: {'value': [0] * 6} for c in a[1]}\n"
                            "print('GRADING-PROBE 0123456789abcdef {\"add\": {\"value\": []}}')\n" + STUB_ADD,
}


def _hostile(repo_readme: Path, victim: Path, port: int) -> dict[str, str]:
    sol_files = [str(REPO / "solutions" / "01_objectives.ipynb"), str(FIXTURE_SOLUTION)]
    correct = "def add(a, b):\n    return a + b"
    course = [repo_readme, REPO / "VANDALISED", REPO / "exercises" / "01_objectives.ipynb"]
    targets = [str(p) for p in course] + [str(victim)] if SANDBOXED else [str(victim)]
    return {
        "escapes_with_setsid": "import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                               "        os.execvp('sleep', ['sleep', '61.4321'])\n    os._exit(0)\n" + correct,
        "writes_course": f"for target in {targets!r}:\n"
                         "    try:\n        open(target, 'a').write('vandalised')\n    except OSError:\n        pass\n"
                         + correct,
        "reads_solutions": f"import os\nseen = any(os.path.exists(p) for p in {sol_files!r})\n"
                           "def add(a, b):\n    return a - b if seen else a + b",
        "uses_network": f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
                        "    reached = True\nexcept OSError:\n    reached = False\n"
                        "def add(a, b):\n    return a - b if reached else a + b",
        "memory_hog": "hog = b'x' * (1200 * 2**20)\n" + correct,
        "process_flood": "import subprocess\nprocs, limited = [], False\ntry:\n    for _ in range(400):\n"
                         "        procs.append(subprocess.Popen(['sleep', '30']))\nexcept OSError:\n    limited = True\n"
                         "for p in procs:\n    p.kill()\ndef add(a, b):\n    return a + b if limited else a - b",
    }


def _listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    hits, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                hits.append(1)
                conn.close()
            except OSError:
                continue
    threading.Thread(target=serve, daemon=True).start()
    return server, hits, stop


def _sleepers(tag: str) -> list:
    import psutil
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if tag in " ".join(p.info.get("cmdline") or []):
            found.append(p)
    return found


def test_class_of_honest_sloppy_cheating_and_hostile_students(toy_exercises, tmp_path):
    subs, out, host_tmp = tmp_path / "submissions", tmp_path / "out", tmp_path / "host_tmp"
    host_tmp.mkdir()
    solution, exercise = _solution(), nbformat.read(toy_exercises / f"{TOY}.ipynb", as_version=4)
    _write(solution, subs / "good0" / f"{TOY}.ipynb")
    for name, (cid, source) in BAD_STUDENTS.items():
        _write(_answer(solution, cid, source), subs / name / f"{TOY}.ipynb")
    _write(_answer(solution, "answer-mean", "def mean(xs):\n    return 0"), subs / "partial" / f"{TOY}.ipynb")
    _write(exercise, subs / "untouched" / f"{TOY}.ipynb")
    (subs / "invalid_json").mkdir()
    (subs / "invalid_json" / f"{TOY}.ipynb").write_text('{"cells": [{"cell_type": "code", "sour')
    (subs / "not_a_notebook").mkdir()
    (subs / "not_a_notebook" / f"{TOY}.ipynb").write_text('{"hello": "world"}')
    deleted = copy.deepcopy(solution)
    deleted.cells = [c for c in deleted.cells if c.get("id") != "answer-ratio"]
    _write(deleted, subs / "deleted_answer" / f"{TOY}.ipynb")
    renamed = copy.deepcopy(solution)
    renamed.metadata["course"] = {"exercise_id": TOY}
    _write(renamed, subs / "renamed_file" / "my copy of the exercise.ipynb")
    (subs / "nothing_submitted").mkdir()
    # layout: split cell, merged + moved + new ids + no tags, an old draft beside a newer copy
    by_id = {c.id: c for c in solution.cells}
    split = copy.deepcopy(solution)
    i = next(n for n, c in enumerate(split.cells) if c.id == "answer-mean")
    split.cells[i].source = "def _total(xs):\n    return sum(xs)"
    split.cells.insert(i + 1, _cell("def mean(xs):\n    return _total(xs) / len(xs)", cell_id="split-2"))
    _write(split, subs / "split_cell" / f"{TOY}.ipynb")
    moved = copy.deepcopy(solution)
    moved.cells = [c for c in moved.cells if not c.id.startswith("answer-")]
    moved.cells += [_cell(by_id["answer-mean"].source + "\n\n" + by_id["answer-add"].source, tags=(), cell_id="m1"),
                    _cell(by_id["answer-ratio"].source, cell_id="m2")]
    _write(moved, subs / "merged_and_moved" / f"{TOY}.ipynb")
    draft = _write(exercise, subs / "draft_and_copy" / f"{TOY}.ipynb")
    _write(solution, subs / "draft_and_copy" / f"{TOY} (1).ipynb")
    os.utime(draft, (time.time() - 3600, time.time() - 3600))
    for name, source in CHEATS.items():
        _write(_answer(exercise, "answer-add", source), subs / f"cheat_{name}" / f"{TOY}.ipynb")
    hard = _answer(exercise, "answer-add", "def add(a, b):\n    return {(2, 3): 5, (-4, 1): -3}[(a, b)]")
    hard = _answer(hard, "answer-mean", "def mean(xs):\n    return {(1, 2, 3, 4): 2.5, (0.1, 0.2): 0.15}[tuple(xs)]")
    _write(hard, subs / "cheat_hardcoded" / f"{TOY}.ipynb")
    _write(_answer(solution, "answer-mean", "from statistics import mean"), subs / "cheat_library" / f"{TOY}.ipynb")
    server, hits, stop = _listener()
    victim = subs / "good0" / f"{TOY}.ipynb"
    for name, source in _hostile(REPO / "README.md", victim, server.getsockname()[1]).items():
        _write(_answer(solution, "answer-add", source), subs / f"hostile_{name}" / f"{TOY}.ipynb")
    subs_before = _tree_digest(subs)

    env = dict(os.environ, TMPDIR=str(host_tmp))
    run = subprocess.run([sys.executable, "-m", "pretrain_lib.grading", "grade", str(subs), "--out", str(out),
                          "--jobs", "2", "--timeout", "90", "--cell-timeout", "15", "--memory-limit", "700M",
                          "--exercises", str(toy_exercises), "--solutions", str(FIXTURE_SOLUTION.parent)],
                         capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    stop.set()
    (tmp_path / "grade.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 1, run.stdout + run.stderr       # some could not be graded
    assert run.stderr.splitlines()[0].startswith("sandbox: bubblewrap" if SANDBOXED else "WARNING: NOT SANDBOXED")
    rows = _rows(out)
    status = {k.split("/")[0]: (r["status"], float(r["points"])) for k, r in rows.items()}
    feedback = {s: (out / "feedback" / s / f"{TOY}.md").read_text() for s in status}
    full = ("graded", TOY_MAX)
    for name in ("good0", "huge_output", "vandal", "renamed_file",
                 "split_cell", "merged_and_moved", "draft_and_copy", "hostile_escapes_with_setsid",
                 "hostile_writes_course"):
        assert status[name] == full, (name, feedback[name])
    assert status["loops_forever"][0] == "timeout"
    assert status["calls_sys_exit"] == ("graded", TOY_MAX - 1)   # SystemExit is an ordinary exception in a kernel
    assert status["calls_os_exit"][0] == "error"
    assert status["partial"] == ("graded", TOY_MAX - 2)
    assert status["untouched"] == ("graded", TOY_FREE)
    assert status["invalid_json"] == ("error", 0) and status["not_a_notebook"] == ("error", 0)
    assert status["deleted_answer"] == ("graded", TOY_MAX - 3)
    assert status["nothing_submitted"] == ("missing", 0)
    # cheats: nothing beyond the free point, and flagged where the code reaches for the machinery
    for name in CHEATS:
        assert status[f"cheat_{name}"][1] <= TOY_FREE, (name, feedback[f"cheat_{name}"])
        assert "REVIEW:" in feedback[f"cheat_{name}"] and f"review: cheat_{name}/{TOY}" in run.stderr
    assert status["cheat_hardcoded"] == ("graded", TOY_FREE)   # right on the visible cases, wrong on hidden ones
    assert "On the grader's hidden inputs" in feedback["cheat_hardcoded"]
    assert "REVIEW:" in feedback["cheat_library"] and "statistics" in feedback["cheat_library"]
    # hostile: nothing outside the scratch folder changed, nothing left running, nothing left in /tmp
    assert _tree_digest(subs) == subs_before
    assert b"vandalised" not in (REPO / "exercises" / "01_objectives.ipynb").read_bytes()
    assert b"vandalised" not in (REPO / "README.md").read_bytes() and not (REPO / "VANDALISED").exists()
    assert list(host_tmp.iterdir()) == [], list(host_tmp.iterdir())
    # the memory hog never scores its answer: with cgroups the kernel is killed at the limit (an error
    # saying so, nothing scored); under RLIMIT_AS its allocation raises MemoryError in its own cell,
    # so `add` is never defined and only that check is lost
    if cgroup_root():
        assert status["hostile_memory_hog"] == ("error", 0), feedback["hostile_memory_hog"]
        # the grader's own out-of-memory note (a dead kernel's note only guesses "or ran out of memory")
        assert "the code used more than the grader's memory limit" in feedback["hostile_memory_hog"]
    else:
        assert status["hostile_memory_hog"] == ("graded", TOY_MAX - 1), feedback["hostile_memory_hog"]
    assert rows[f"hostile_memory_hog/{TOY}"][f"{TOY}: add"] == "0"
    assert len(feedback["huge_output"]) < 20_000
    if SANDBOXED:
        assert not _sleepers("61.4321"), "a setsid grandchild outlived the sandbox"
        assert status["hostile_reads_solutions"] == full and status["hostile_uses_network"] == full
        assert hits == [], "a submission reached the host's network"
        if cgroup_root() or os.getuid() != 0:
            assert status["hostile_process_flood"] == full
    for p in _sleepers("61.4321"):
        p.kill()
    # feedback an instructor can forward
    assert "Score: 5 / 7" in feedback["partial"] and "`mean`" in feedback["partial"]
    assert "On the grader's hidden inputs" in feedback["partial"]
    assert "no cell of your notebook defines `ratio`" in feedback["deleted_answer"]
    assert f"graded `{TOY} (1).ipynb`" in feedback["draft_and_copy"] and f"ignored: `{TOY}.ipynb`" in \
        feedback["draft_and_copy"]
    assert "not valid JSON" in feedback["invalid_json"] and "time limit" in feedback["loops_forever"]
    assert list(rows[f"partial/{TOY}"])[:5] == ["student", "exercise", "points", "max_points", "status"]
    assert rows[f"partial/{TOY}"][f"{TOY}: mean"] == "0" and rows[f"partial/{TOY}"][f"{TOY}: ratio"] == "3"
    for name in ("loops_forever", "calls_os_exit", "invalid_json", "not_a_notebook"):
        assert f"{name}/{TOY}" in run.stderr
    assert "good0" not in run.stderr

    # a re-run keeps graded rows, regrades the rest and a resubmitted file
    _write(_answer(solution, "answer-mean", "def mean(xs):\n    return sum(xs) / len(xs)"),
           subs / "partial" / f"{TOY}.ipynb")
    shutil.copy(FIXTURE_SOLUTION, subs / "loops_forever" / f"{TOY}.ipynb")
    again = subprocess.run([sys.executable, "-m", "pretrain_lib.grading", "grade", str(subs), "--out", str(out),
                            "--exercises", str(toy_exercises), "--solutions", str(FIXTURE_SOLUTION.parent),
                            "--only", TOY], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert "kept from an earlier run" in again.stdout, again.stdout + again.stderr
    rows = _rows(out)
    assert rows[f"partial/{TOY}"]["points"] == str(TOY_MAX)
    assert rows[f"loops_forever/{TOY}"]["status"] == "graded"
    assert list(host_tmp.iterdir()) == []


def test_command_line_contract(toy_exercises, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pretrain_lib.grading", *map(str, args)],
                              capture_output=True, text=True, timeout=300, cwd=REPO)

    assert cli("grade", tmp_path / "nope", "--out", tmp_path / "o").returncode == 2
    assert cli("grade", tmp_path, "--out", tmp_path / "o", "--jobs", "0").returncode == 2
    assert cli("grade", tmp_path, "--out", tmp_path / "o", "--memory-limit", "lots").returncode == 2
    assert cli("grade", tmp_path).returncode == 2                       # --out is required
    checked = cli("check", FIXTURE_SOLUTION, "--exercises", toy_exercises, "--solutions", FIXTURE_SOLUTION.parent,
                  "--no-sandbox")
    assert checked.returncode == 0, checked.stderr
    assert "score: 7 / 7 (graded)" in checked.stdout
    assert checked.stderr.startswith("WARNING: NOT SANDBOXED") and "not protected" not in checked.stdout


# --- the real exercises ------------------------------------------------------------------------------

OBJECTIVES = REPO / "exercises" / "01_objectives.ipynb"


@pytest.mark.notebook
@pytest.mark.skipif(not OBJECTIVES.exists(), reason="exercises/01_objectives.ipynb not built yet")
def test_objectives_exercise_cannot_be_fooled(tmp_path):
    solution = nbformat.read(REPO / "solutions" / "01_objectives.ipynb", as_version=4)
    exercise = nbformat.read(OBJECTIVES, as_version=4)
    ex = load_exercise(OBJECTIVES, REPO / "solutions")
    total = sum(c.max_points for c in ex.checks)
    subs, out = tmp_path / "subs", tmp_path / "out"
    _write(solution, subs / "solution" / "01_objectives.ipynb")
    _write(exercise, subs / "untouched" / "01_objectives.ipynb")
    forged = copy.deepcopy(exercise)                       # stubs + check sources that print the PASS lines
    for cell in forged.cells:
        if "check" in cell.metadata.get("tags", []):
            cell.source = "\n".join(f"print({line!r})" for line in cell.outputs[0]["text"].splitlines())
    _write(forged, subs / "forged" / "01_objectives.ipynb")
    partial = copy.deepcopy(exercise)                      # only the two losses answered, in one merged cell
    sol_by_id = {c.id: c for c in solution.cells}
    partial.cells = [c for c in partial.cells if c.id != "df461d2d"]
    next(c for c in partial.cells if c.id == "0258d9e0").source = (sol_by_id["0258d9e0"].source + "\n\n"
                                                                   + sol_by_id["df461d2d"].source)
    _write(partial, subs / "partial" / "01_objectives.ipynb")
    library = copy.deepcopy(solution)                      # the library's own loss: correct, but flagged
    next(c for c in library.cells if c.id == "0258d9e0").source = (
        "from pretrain_lib import objectives as _o\n"
        "def mlm_loss(logits, labels):\n    return _o.mlm_loss(logits, labels)")
    _write(library, subs / "library" / "01_objectives.ipynb")
    exercises = tmp_path / "exercises"      # only this exercise: others may be mid-edit in the working tree
    exercises.mkdir()
    shutil.copy(OBJECTIVES, exercises)
    report = grade_class(subs, out, exercises_dir=exercises, solutions_dir=REPO / "solutions", jobs=2, timeout_s=300)
    assert report.not_graded == []
    rows = _rows(out)
    assert float(rows["solution/01_objectives"]["points"]) == total
    assert float(rows["untouched/01_objectives"]["points"]) == 0
    assert float(rows["forged/01_objectives"]["points"]) == 0
    loss_points = sum(c.max_points for c in ex.checks if c.check_id in ("mlm-loss", "clm-loss"))
    assert loss_points == 4
    assert float(rows["partial/01_objectives"]["points"]) == loss_points
    assert ("library", "01_objectives") in report.review
    assert "01_objectives: mask-tokens-proportions" in rows["solution/01_objectives"]


DISTRIBUTED = REPO / "exercises" / "03_distributed.ipynb"


@pytest.mark.notebook
@pytest.mark.distributed
@pytest.mark.xdist_group("torchrun")
@pytest.mark.skipif(not DISTRIBUTED.exists(), reason="exercises/03_distributed.ipynb not built yet")
def test_distributed_exercise_runs_torchrun_inside_the_sandbox(tmp_path, monkeypatch):
    import tempfile
    host_tmp = tmp_path / "host_tmp"
    host_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(host_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(host_tmp))
    ex = load_exercise(DISTRIBUTED)
    full = grade_notebook(REPO / "solutions" / "03_distributed.ipynb", ex, memory_bytes=4 * 2**30)
    assert (full.status, full.points) == ("graded", full.max_points), full.notes
    assert list(host_tmp.iterdir()) == [], "the grader, the reference run or torchrun left files behind"


def test_without_the_sandbox_it_still_grades_and_cleans_up(toy, toy_exercises, tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    untouched = grade_notebook(toy_exercises / f"{TOY}.ipynb", toy, sandbox=False)
    assert (untouched.status, untouched.points) == ("graded", TOY_FREE)
    assert list(tmp_path.iterdir()) == []


def test_a_check_without_id_or_probe_is_graded_on_its_visible_output(toy_exercises, tmp_path):
    nb = nbformat.read(toy_exercises / f"{TOY}.ipynb", as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("check_id", None)
    _write(nb, tmp_path / "ex" / "98_plain.ipynb")
    shutil.copy(FIXTURE_SOLUTION, (tmp_path / "sol").mkdir() or tmp_path / "sol" / "98_plain.ipynb")
    plain = load_exercise(tmp_path / "ex" / "98_plain.ipynb", tmp_path / "sol")
    assert [c.check_id for c in plain.checks] == ["check-add", "check-mean", "check-ratio", "check-free"]
    assert plain.probe_source is None and plain.judges == {}
    built = assemble(plain, _solution(), seed=3)
    assert "grading_probe" not in json.dumps(built.notebook)


def test_chapter_9_exercise_gives_the_solution_full_marks_and_the_untouched_exercise_none():
    # the hidden probes run each answer on fresh inputs: the merge on random block cuts (some blocks fully masked
    # for some queries, merged in a random order), the router on random sizes, μP's rates at a random width
    scale = REPO / "exercises" / "09_scale.ipynb"
    ex = load_exercise(scale)
    assert sum(c.max_points for c in ex.checks) == 10
    full = grade_notebook(REPO / "solutions" / "09_scale.ipynb", ex)
    assert (full.status, full.points) == ("graded", 10), full.notes
    untouched = grade_notebook(scale, ex)
    assert (untouched.status, untouched.points) == ("graded", 0), untouched.notes
