"""The grader's host side against a class that fights back (issue 20, families 1, 2, 5, 6, 7, 8, 10).

One class run grades the real ``exercises/04_scaling.ipynb`` (NumPy only: the cheapest real
exercise) for honest students and hostile ones built here from its solution:

* the scratch folder turned against the grader (links to a root-only secret and to the
  solution where the grader used to read its records, a named pipe, 1 GB written to /tmp,
  /dev/shm filled, a 3,000-deep folder tree) - graded full marks, nothing leaked or left;
* a thief that returns the grader's environment, a root-only file and its user id through
  an exception message and its printed output;
* a submission that kills its own grading process, so its feedback shows the run's log;
* entries that used to stop the class (a folder named like a notebook, a dangling link, a
  named pipe, a link to /dev/zero, 1,200 nested folders, an ``exercise_id`` that is a list),
  a student folder that is a link, a notebook that is a link to the solution, a 20 MB answer
  cell, one student's extra exercise;
* honest layouts: a byte-order mark, CRLF line endings and nbformat 4.4 without cell ids;
* a student whose folder name is a spreadsheet formula and a Markdown heading with HTML;
* two students with the same (non-reference) answers.

Units cover the iterative cleanup, the file reader, the size caps (with the grading
process's peak memory for a 20 MB cell) and the escaping.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import resource
import secrets
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from conftest import REPO
from pretrain_lib.grading.build import build_all
from pretrain_lib.grading.feedback import feedback_markdown, md_text
from pretrain_lib.grading.grader import CheckResult, NotANotebook, SubmissionResult, read_submission
from pretrain_lib.grading.gradebook import csv_safe, csv_unsafe
from pretrain_lib.grading.sandbox import (FILE_SIZE_BYTES, SCRATCH_BYTES, SHM_BYTES, bwrap_problem, privilege_drop,
                                          read_regular_file, remove_tree)

SANDBOXED = bwrap_problem() is None
AS_NOBODY = SANDBOXED and privilege_drop() is not None
EX = "04_scaling"
EXERCISE = REPO / "exercises" / f"{EX}.ipynb"
SOLUTION = REPO / "solutions" / f"{EX}.ipynb"
FIXTURES = REPO / "tests" / "fixtures" / "grading"
FULL = 10


def _solution():
    return nbformat.read(SOLUTION, as_version=4)


def _answers(nb):
    return [c for c in nb.cells if c.cell_type == "code" and "answer" in c.metadata.get("tags", [])]


def _with_first_answer(prefix: str):
    """The solution with ``prefix`` run at the top of its first answer cell."""
    nb = _solution()
    first = _answers(nb)[0]
    first.source = prefix + "\n\n" + first.source
    return nb


def _write(nb, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def _bom_crlf_v44(nb) -> bytes:
    """nbformat 4.4 (no cell ids), sources as CRLF lines, a UTF-8 byte-order mark."""
    data = json.loads(nbformat.writes(nb))
    data["nbformat_minor"] = 4
    for cell in data["cells"]:
        cell.pop("id", None)
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        cell["source"] = [line + "\r\n" for line in src.split("\n")]
        cell["source"][-1] = cell["source"][-1][:-2]
    return b"\xef\xbb\xbf" + json.dumps(data, indent=1).replace("\n", "\r\n").encode()


def _outside_fences(md: str) -> str:
    kept, fence = [], None
    for line in md.splitlines():
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence = stripped
        elif fence is not None and stripped == fence:
            fence = None
        elif fence is None:
            kept.append(line)
    return "\n".join(kept)


# --- units -----------------------------------------------------------------------------------------

def test_cleanup_of_a_3000_deep_tree_is_iterative_and_never_follows_links(tmp_path):
    root, outside = tmp_path / "scratch", tmp_path / "outside.txt"
    outside.write_text("keep me")
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(3000):                       # deeper than PATH_MAX allows as one path, and than recursion
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
        if i % 1000 == 0:
            os.symlink(str(outside), "link", dir_fd=fd)
            os.symlink(str(tmp_path), "dirlink", dir_fd=fd)
    with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "w") as f:
        f.write("x")
    os.fchmod(fd, 0o500)                        # a folder the code made read-only
    os.close(fd)
    os.chmod(root, 0o500)
    start = time.process_time()
    assert remove_tree(root) is None
    assert not root.exists() and outside.read_text() == "keep me"
    assert time.process_time() - start < 30


def test_read_regular_file_refuses_links_pipes_devices_and_big_files(tmp_path):
    good = tmp_path / "a.ipynb"
    good.write_bytes(b"12345")
    assert read_regular_file(good, 5) == b"12345"
    with pytest.raises(ValueError):
        read_regular_file(good, 4)
    (tmp_path / "link").symlink_to(good)
    (tmp_path / "zero").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "dir").mkdir()
    for name in ("link", "zero"):
        with pytest.raises(OSError):
            read_regular_file(tmp_path / name, 10)
    start = time.monotonic()
    for name, kind in (("pipe", "named pipe"), ("dir", "folder")):
        with pytest.raises(OSError, match=kind):
            read_regular_file(tmp_path / name, 10)
    assert time.monotonic() - start < 5            # a pipe with no writer does not block


def test_read_submission_accepts_bom_crlf_and_v44_and_caps_sizes(tmp_path):
    honest = tmp_path / "honest.ipynb"
    honest.write_bytes(_bom_crlf_v44(_solution()))
    nb = read_submission(honest)
    ref = _solution()
    assert [c.source for c in nb.cells] == [c.source for c in ref.cells]   # CRLF gone, same text
    assert all(c.get("outputs", []) == [] for c in nb.cells)
    big = _solution()
    _answers(big)[0].source += "\n# " + "x" * (600 * 2**10)
    _write(big, tmp_path / "big_cell.ipynb")
    with pytest.raises(NotANotebook, match="over the limit of 524,288"):
        read_submission(tmp_path / "big_cell.ipynb")
    (tmp_path / "link.ipynb").symlink_to(SOLUTION)
    with pytest.raises(NotANotebook, match="symbolic link"):
        read_submission(tmp_path / "link.ipynb")
    os.mkfifo(tmp_path / "pipe.ipynb")
    with pytest.raises(NotANotebook, match="named pipe"):
        read_submission(tmp_path / "pipe.ipynb")
    (tmp_path / "deep.ipynb").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(NotANotebook):
        read_submission(tmp_path / "deep.ipynb")


def test_the_log_shown_to_a_student_masks_paths_and_seeds(tmp_path):
    from pretrain_lib.grading.runner import _env, _safe_log_tail
    log = (f"Traceback: {tmp_path}/private/x.py line 3\n{REPO}/pretrain_lib/grading/probe_runner.py\n"
           f"{sys.prefix}/lib/site.py\nseed 4611686018427387903 nonce 0123456789abcdef0123\n\x1b[31mred\n")
    shown = _safe_log_tail(log, tmp_path)
    assert str(tmp_path) not in shown and str(REPO) not in shown and sys.prefix not in shown
    assert "4611686018427387903" not in shown and "0123456789abcdef0123" not in shown and "\x1b" not in shown
    assert "<scratch>/private/x.py" in shown and "<course>/pretrain_lib" in shown
    env = _env(Path("/tmp"), True)                       # nothing inherited: only fixed names
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "PYTHONPATH", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "COURSE_HEADLESS",
                        "MPLBACKEND", "PYDEVD_DISABLE_FILE_VALIDATION", "PYTHONDONTWRITEBYTECODE",
                        "JUPYTER_PLATFORM_DIRS", "OMP_NUM_THREADS", "TMPDIR", "TMP", "TEMP", "HOME",
                        "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "JUPYTER_CONFIG_DIR", "IPYTHONDIR", "MPLCONFIGDIR",
                        "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR"}


@pytest.mark.skipif(not AS_NOBODY, reason="only a root grader drops to nobody")
def test_the_sandbox_runs_as_nobody_with_sized_tmpfs_and_reachable_python(tmp_path):
    from pretrain_lib.grading.sandbox import Scratch, bwrap_command
    (tmp_path / "work").mkdir()
    cmd = bwrap_command(["true"], Scratch(tmp_path, Path("/tmp")), hide=[], workdir=Path("/tmp/work"))
    text = " ".join(cmd)
    assert f"--size {SCRATCH_BYTES} --tmpfs /tmp" in text and f"--size {SHM_BYTES} --tmpfs /dev/shm" in text
    assert "--unshare-user-try" not in cmd and "setpriv" in cmd and "--reuid=65534" in cmd
    assert "--perms 0777 --dir /tmp/work" in text
    probe = ("import os, sys, pathlib; print(os.getuid(), os.getgid(), os.getgroups(), "
             "pathlib.Path('/proc/self/status').read_text().count('CapEff:\\t0000000000000000'))")
    cmd = bwrap_command([sys.executable, "-c", probe], Scratch(tmp_path, Path("/tmp")), hide=[],
                        workdir=Path("/tmp/work"))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert run.stdout.split() == ["65534", "65534", "[]", "1"], run.stdout + run.stderr


def _peak_kb(cmd: list[str]) -> tuple[int, subprocess.CompletedProcess]:
    """Run ``cmd`` under a fresh wrapper and return the peak resident memory (KB) of its process tree."""
    wrapper = ("import resource, subprocess, sys\n"
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "sys.stdout.write(r.stdout)\nsys.stderr.write(r.stderr)\n"
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\nsys.exit(r.returncode)")
    run = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, timeout=600, cwd=REPO)
    peak = int(run.stdout.rsplit("PEAK_KB", 1)[1].split()[0])
    return peak, run


def test_a_20mb_answer_cell_is_refused_before_parsing_with_bounded_memory(tmp_path):
    exercises = tmp_path / "exercises"
    exercises.mkdir()
    shutil.copy(EXERCISE, exercises)
    cmd = [sys.executable, "-m", "pretrain_lib.grading", "check", "--exercises", str(exercises),
           "--solutions", str(REPO / "solutions")]
    huge = _with_first_answer("# " + "x" * (20 * 2**20))
    peak20, run = _peak_kb(cmd + [str(_write(huge, tmp_path / "20mb" / f"{EX}.ipynb"))])
    assert run.returncode == 1 and "larger than 16 MB" in run.stdout, run.stdout + run.stderr
    assert "score: 0 / 10 (error)" in run.stdout
    big = _with_first_answer("# " + "x" * (12 * 2**20))             # under the file cap: the cell cap refuses it
    peak12, run = _peak_kb(cmd + [str(_write(big, tmp_path / "12mb" / f"{EX}.ipynb"))])
    assert "over the limit of 524,288" in run.stdout, run.stdout + run.stderr
    print(f"grading process peak memory: 20 MB cell {peak20 / 1024:.0f} MB, 12 MB cell {peak12 / 1024:.0f} MB")
    assert peak20 < 600 * 1024 and peak12 < 600 * 1024


def test_names_are_escaped_in_markdown_and_neutralised_in_the_gradebook():
    evil = '=HYPERLINK("x")\n# Score: 10 / 10 <img src=x onerror=alert(1)>'
    for value in (evil, "+1+1", "-2-2", "@SUM(A1)", "'=quoted", "\tx", "alice"):
        assert csv_unsafe(csv_safe(value)) == value
        assert not csv_safe(value).startswith(("=", "+", "-", "@", "\t"))
    assert csv_safe("-1") == "-1" and csv_safe("2.5") == "2.5"
    text = md_text(evil)
    assert "\n" not in text and "<img" not in text and not text.startswith("#")
    check = type("Check", (), {"check_id": "c", "title": "t", "answer": "f", "max_points": 1.0,
                               "expected": "PASS t"})()
    result = SubmissionResult(evil, EX, "graded", [CheckResult(check, False, produced="```\n# Score 99\n<script>",
                                                               note="wrong", hidden="x\n# Score 99 <b>")],
                              notes=["same note"] * 500 + [f"note {i} <b>" for i in range(100)])
    md = feedback_markdown(result)
    assert md.splitlines()[0].startswith("# 04\\_scaling — \\=HYPERLINK")
    outside = _outside_fences(md)                     # what Markdown renders as text, not as code
    assert "<img" not in outside and "<script>" not in outside and "<b>" not in outside
    assert not any(line.startswith("# Score") for line in outside.splitlines())
    assert "<script>" in md                           # shown, inside a code block
    assert md.count("same note") == 1 and "more notes" in md and len(md) < 20_000
    fence = next(line for line in md.splitlines() if line.startswith("````"))
    assert fence == "````"                            # longer than the ``` the student printed


# --- the class ----------------------------------------------------------------------------------------

ENTRIES_THAT_STOPPED_THE_CLASS = ("dir_named_like_notebook", "dangling_link", "named_pipe", "link_to_dev_zero",
                                  "link_to_solution", "linked_folder", "huge_cell")


def _scratch_attack(secret: str) -> str:
    """Answer-cell code: turn the scratch folder against the grader, fill the disks; the answers stay right."""
    return f"""import os
_sols = [{str(SOLUTION)!r}, '/tmp/work/submission.ipynb']
for _d in ('/tmp', '/tmp/private', '/tmp/work', os.getcwd()):
    for _name in ('pytest.log', 'results.jsonl', 'log.txt', 'stdout'):
        _p = os.path.join(_d, _name)
        try:
            os.remove(_p)
        except OSError:
            pass
        try:
            os.symlink({secret!r} if _name != 'results.jsonl' else _sols[0], _p)
        except OSError:
            pass
try:
    os.mkfifo('/tmp/private/records.jsonl')
except OSError:
    pass
def _fill(path, mb):
    n = 0
    try:
        with open(path, 'wb') as f:
            for _ in range(mb):
                f.write(b'\\0' * 2**20)
                f.flush()
                n += 1
    except OSError:
        pass
    return n
_one = _fill('/tmp/one_big_file', 1024)           # RLIMIT_FSIZE stops it
_more = _fill('/tmp/second_file', 1024)           # the tmpfs quota stops it
_shm = _fill('/dev/shm/fill', 1024)
for _p in ('/tmp/one_big_file', '/tmp/second_file', '/dev/shm/fill'):
    os.remove(_p)
_here = os.getcwd()
import tempfile
os.chdir(tempfile.mkdtemp(dir='/tmp'))             # a fresh tree each time the answers are run
for _ in range(3000):
    os.mkdir('d')
    os.chdir('d')
os.chdir(_here)
LIMITED = _one <= {FILE_SIZE_BYTES // 2**20} and _one + _more <= {SCRATCH_BYTES // 2**20} and _shm <= {SHM_BYTES // 2**20}
print('written MB:', _one, _more, _shm)"""


def _thief(secret: str) -> str:
    return f"""import os
try:
    _secret = open({secret!r}).read()
except OSError as exc:
    _secret = 'unreadable ' + type(exc).__name__
_loot = f"uid={{os.getuid()}} secret={{_secret}} token={{os.environ.get('GRADER_SECRET_TOKEN', 'absent')}}"


def my_chinchilla_loss(N, D, E, A, B, alpha, beta):
    print(_loot, sorted(os.environ))
    raise RuntimeError(_loot)"""


KILLER = """import os, signal
for _d in ('/tmp', '/tmp/private'):
    for _name in ('pytest.log', 'results.jsonl'):
        try:
            os.remove(os.path.join(_d, _name))
        except OSError:
            pass
        try:
            os.symlink(%r, os.path.join(_d, _name))
        except OSError:
            pass
print('killing the grading process')
os.kill(os.getppid(), signal.SIGKILL)"""


@pytest.mark.notebook
@pytest.mark.skipif(not SANDBOXED, reason="the hostile class writes 1 GB and links to secrets: needs bubblewrap")
@pytest.mark.skipif(not EXERCISE.exists(), reason="exercises/04_scaling.ipynb not built yet")
def test_a_class_that_fights_back_is_graded_student_by_student(tmp_path):
    course, subs, out, host_tmp = tmp_path / "course", tmp_path / "subs", tmp_path / "out", tmp_path / "host_tmp"
    for d in (course / "exercises", course / "solutions", course / "probes", host_tmp):
        d.mkdir(parents=True)
    shutil.copy(EXERCISE, course / "exercises")
    shutil.copy(SOLUTION, course / "solutions")
    shutil.copy(FIXTURES / "solutions" / "99_toy.ipynb", course / "solutions")          # the extra exercise
    shutil.copy(FIXTURES / "probes" / "99_toy.py", course / "probes")
    build_all(FIXTURES / "solutions", course / "exercises", names=["99_toy"])
    shutil.copy(REPO / "pretrain_lib" / "grading" / "probes" / f"{EX}.py", course / "probes")
    # a root-only secret outside every hidden folder, and a token in the grader's environment
    secret_value, token = f"TOPSECRET-{secrets.token_hex(6)}", f"tok-{secrets.token_hex(8)}"
    secret = Path("/var/tmp") / f"grading-secret-{secrets.token_hex(4)}"
    secret.write_text(secret_value)
    secret.chmod(0o600)
    try:
        _run_class(course, subs, out, host_tmp, secret, secret_value, token, tmp_path)
    finally:
        if (subs / "deep_folders").exists():    # pytest's recursive cleanup of old tmp dirs overflows on it
            remove_tree(subs / "deep_folders")
        secret.unlink()


def _run_class(course, subs, out, host_tmp, secret, secret_value, token, tmp_path):
    sol = _solution()
    evil = '=1+1\n# Score 10 of 10 <img src=x onerror=alert(1)>'
    _write(sol, subs / "honest" / f"{EX}.ipynb")
    _write(sol, subs / evil / f"{EX}.ipynb")
    (subs / "bom_crlf_v44").mkdir(parents=True)
    (subs / "bom_crlf_v44" / f"{EX}.ipynb").write_bytes(_bom_crlf_v44(sol))
    attack = _with_first_answer(_scratch_attack(str(secret)))
    first = _answers(attack)[0]
    first.source = first.source.replace("return E + ", "return (E if LIMITED else -E) + ", 1)
    assert "LIMITED else" in first.source
    _write(attack, subs / "scratch_attacker" / f"{EX}.ipynb")
    _write(attack, subs / "scratch_attacker_twin" / f"{EX}.ipynb")
    thief = _solution()
    _answers(thief)[0].source = _thief(str(secret))
    _write(thief, subs / "env_thief" / f"{EX}.ipynb")
    _write(_with_first_answer(KILLER % str(secret)), subs / "kills_its_grader" / f"{EX}.ipynb")
    # entries that used to stop the class
    (subs / "dir_named_like_notebook" / f"{EX}.ipynb").mkdir(parents=True)
    (subs / "dangling_link").mkdir()
    (subs / "dangling_link" / f"{EX}.ipynb").symlink_to(tmp_path / "nowhere.ipynb")
    (subs / "named_pipe").mkdir()
    os.mkfifo(subs / "named_pipe" / f"{EX}.ipynb")
    (subs / "link_to_dev_zero").mkdir()
    (subs / "link_to_dev_zero" / f"{EX}.ipynb").symlink_to("/dev/zero")
    (subs / "link_to_solution").mkdir()
    (subs / "link_to_solution" / f"{EX}.ipynb").symlink_to(SOLUTION)
    (subs / "linked_folder").symlink_to(subs / "honest")
    _write(_with_first_answer("# " + "x" * (20 * 2**20)), subs / "huge_cell" / f"{EX}.ipynb")
    deep = subs / "deep_folders"
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1200):
        os.mkdir("n", dir_fd=fd)
        nxt = os.open("n", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    listed = _solution()
    listed.metadata["course"] = {"exercise_id": [EX]}
    _write(listed, subs / "list_exercise_id" / "my copy.ipynb")
    (subs / "extra_exercise").mkdir()
    (subs / "extra_exercise" / "99_toy.ipynb").write_text('{"cells": [')     # only this student has it
    secret_stat = os.stat(secret)

    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
    env.update(TMPDIR=str(host_tmp), GRADER_SECRET_TOKEN=token)
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pretrain_lib.grading", "grade", str(subs), "--out", str(out),
                          "--jobs", "2", "--timeout", "240", "--cell-timeout", "120", "--memory-limit", "2G",
                          "--exercises", str(course / "exercises"), "--solutions", str(course / "solutions")],
                         capture_output=True, text=True, timeout=1200, cwd=REPO, env=env)
    seconds = time.monotonic() - start
    (tmp_path / "grade.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 1, run.stdout + run.stderr          # some could not be graded, and it said so
    with open(out / "gradebook.csv", newline="", encoding="utf-8") as f:
        raw_rows = list(csv.DictReader(f))
    rows = {(csv_unsafe(r["student"]), r["exercise"]): r for r in raw_rows}
    status = {k: (r["status"], float(r["points"])) for k, r in rows.items()}
    feedback = {k: (out / "feedback" / k[0] / f"{k[1]}.md").read_text(encoding="utf-8") for k in rows}
    print(f"class graded in {seconds:.0f} s wall")

    # honest layouts: full marks, no false notes
    for student in ("honest", evil, "bom_crlf_v44", "scratch_attacker", "scratch_attacker_twin"):
        assert status[(student, EX)] == ("graded", FULL), (student, feedback[(student, EX)])
    bom = feedback[("bom_crlf_v44", EX)]
    assert "not run" not in bom and "is not an answer cell" not in bom, bom
    # family 1, 2: nothing of the host in any feedback; the thief ran as nobody with a minimal environment
    solution_lines = {line.strip() for c in _answers(sol) for line in c.source.splitlines()
                      if len(line.strip()) > 25 and "def " not in line}
    for key, text in feedback.items():
        assert secret_value not in text and token not in text, key
        assert str(tmp_path) not in text and str(REPO) not in text and str(host_tmp) not in text, key
        if key[0] not in ("honest", evil, "bom_crlf_v44", "scratch_attacker", "scratch_attacker_twin"):
            assert not any(line in text for line in solution_lines), key
    thief = feedback[("env_thief", EX)]
    assert status[("env_thief", EX)][0] == "graded" and status[("env_thief", EX)][1] < FULL
    assert "token=absent" in thief and "GRADER_SECRET_TOKEN" not in thief, thief
    if AS_NOBODY:
        assert "uid=65534" in thief and "secret=unreadable PermissionError" in thief, thief
    assert os.stat(secret).st_mtime == secret_stat.st_mtime and secret.read_text() == secret_value
    killed = feedback[("kills_its_grader", EX)]
    assert status[("kills_its_grader", EX)][0] == "error" and "did not finish" in killed, killed
    # family 5, 7: each odd entry is that student's error with a clear message; classmates graded
    messages = {"dir_named_like_notebook": "is a folder", "dangling_link": "is a symbolic link",
                "named_pipe": "is a named pipe", "link_to_dev_zero": "is a symbolic link",
                "link_to_solution": "is a symbolic link", "linked_folder": "folder is a symbolic link",
                "huge_cell": "larger than 16 MB"}
    for student, message in messages.items():
        assert status[(student, EX)] == ("error", 0), (student, feedback[(student, EX)])
        assert message in feedback[(student, EX)], (student, feedback[(student, EX)])
        assert f"{student}/{EX}: error" in run.stderr
    assert status[("deep_folders", EX)] == ("missing", 0)
    assert "nested more than 16 levels" in feedback[("deep_folders", EX)]
    assert status[("list_exercise_id", EX)] == ("missing", 0)
    # instructor-side gaps: one student's extra exercise, totals, identical answers
    assert status[("extra_exercise", "99_toy")][0] == "error"
    assert [k for k in rows if k[1] == "99_toy"] == [("extra_exercise", "99_toy")]
    assert "extra: 99_toy was submitted by 1 of" in run.stderr
    with open(out / "totals.csv", newline="", encoding="utf-8") as f:
        totals = {csv_unsafe(r["student"]): r for r in csv.DictReader(f)}
    assert (totals["honest"]["points"], totals["honest"]["max_points"]) == ("10", "10")
    assert (totals["extra_exercise"]["points"], totals["extra_exercise"]["max_points"]) == ("0", "17")
    assert "same answers: honest/04_scaling = the reference solution" in run.stdout
    assert "same answers: scratch_attacker/04_scaling = scratch_attacker_twin/04_scaling" in run.stdout
    assert "the course's reference solution" in feedback[("honest", EX)]
    assert "another submission in this class" in feedback[("scratch_attacker_twin", EX)]
    assert "scratch_attacker" not in feedback[("scratch_attacker_twin", EX)].split("## Checks")[0].replace(
        "scratch_attacker_twin", "")
    # family 10: the formula is text in the gradebook, the name is text in the feedback
    evil_raw = next(r["student"] for r in raw_rows if r["student"].startswith("'"))
    assert evil_raw == "'" + evil
    assert all(not r["student"].startswith(("=", "+", "-", "@")) for r in raw_rows)
    md = _outside_fences(feedback[(evil, EX)])
    assert "<img" not in md and not any(line.startswith("# Score") for line in md.splitlines())
    # family 6: nothing left on the host, nothing big ever written there
    assert list(host_tmp.iterdir()) == [], list(host_tmp.iterdir())
