"""The runner behind `make run`: one line per notebook, a reason for a failure, kernels over IPC (no TCP warning)."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from pretrain_lib import notebooks
from pretrain_lib.notebooks import NotebookRun, display_path, execute_notebook, progress_line


def _notebook(folder: Path, name: str, *cells: str, parameters: str = "x = 1") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    path = folder / "09_test" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_kernels_talk_over_unix_sockets_and_print_no_transport_warning(tmp_path, capfd):
    nb = _notebook(tmp_path, "01_ipc.ipynb", "from ipykernel.kernelapp import IPKernelApp\n"
                                            "print(IPKernelApp.instance().transport)")
    run = execute_notebook(nb, build_dir=tmp_path / "build")
    assert run.ok, run.error
    executed = nbformat.read(tmp_path / "build" / "chapters" / "09_test" / nb.name, as_version=4)
    assert executed.cells[1].outputs[0]["text"].strip() == "ipc"
    out, err = capfd.readouterr()
    assert "eavesdropping" not in out + err and "without encryption" not in out + err


def test_a_failure_gives_a_one_line_reason_and_keeps_the_traceback(tmp_path):
    nb = _notebook(tmp_path, "02_fails.ipynb", "assert x == 2, f'claim x_is_two failed: x = {x}\\nsecond line'")
    run = execute_notebook(nb, build_dir=tmp_path / "build", parameters={"x": 3})
    assert not run.ok
    assert run.reason == "AssertionError: claim x_is_two failed: x = 3 second line"
    assert "Traceback" in run.error or "AssertionError" in run.error
    assert progress_line(run).endswith("  FAILED: AssertionError: claim x_is_two failed: x = 3 second line")


def test_names_are_relative_to_the_repository():
    inside = notebooks.REPO_ROOT / "chapters" / "00_overview" / "01_course_map.ipynb"
    assert display_path(inside) == "chapters/00_overview/01_course_map.ipynb"
    assert display_path(Path("/elsewhere/01_x.ipynb")) == "/elsewhere/01_x.ipynb"
    # 16 characters padded to 20, two spaces, the seconds right-aligned in 7 ("   12.3"), " s", two spaces
    assert progress_line(NotebookRun("chapters/a.ipynb", 12.34, True), width=20) == "chapters/a.ipynb" + " " * 9 + "12.3 s  ok"


def test_command_line_prints_one_line_per_notebook_then_the_table(tmp_path, capsys):
    ok = _notebook(tmp_path, "03_ok.ipynb", "print(x)")
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"03_ok": {"x": 5}}))
    assert notebooks.main([str(ok), "--build-dir", str(tmp_path / "build"), "--params", str(params)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(str(ok)) and lines[0].endswith(" s  ok")
    assert lines[2].split() == ["notebook", "seconds", "status"] and lines[-1].endswith("0 failed")
    executed = nbformat.read(tmp_path / "build" / "chapters" / "09_test" / ok.name, as_version=4)
    assert executed.cells[-1].outputs[0]["text"].strip() == "5"


@pytest.mark.parametrize("content, message", [(None, "cannot read it as JSON"), ("[1, 2]", "expected {notebook_stem")])
def test_a_bad_params_file_is_one_sentence(tmp_path, capsys, content, message):
    params = tmp_path / "params.json"
    if content is not None:
        params.write_text(content)
    nb = _notebook(tmp_path, "04_never_run.ipynb")
    with pytest.raises(SystemExit) as exit_info:
        notebooks.main([str(nb), "--params", str(params)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_two_jobs_give_one_thread_kernels_and_a_runs_alone_notebook_the_machine_to_itself(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    log = tmp_path / "log"
    log.mkdir()
    record = ("import json, os, pathlib, time\n"
              "start = time.time(); time.sleep(1)\n"
              "pathlib.Path(log, name).write_text(json.dumps([start, time.time(), os.environ.get('OMP_NUM_THREADS')]))")
    names = ["a", "alone", "b"]
    paths = [_notebook(tmp_path, f"0{i}_{n}.ipynb", record, parameters=f"log = {str(log)!r}\nname = {n!r}")
             for i, n in enumerate(names, 1)]
    marked = nbformat.read(paths[1], as_version=4)
    marked.metadata["course"] = {"runs_alone": "it times something"}
    nbformat.write(marked, paths[1])
    assert notebooks.runs_alone(paths[1]) == "it times something" and notebooks.runs_alone(paths[0]) == ""

    finished = []
    runs = notebooks.run_all(paths, jobs=2, build_dir=tmp_path / "build", on_done=lambda r: finished.append(r.notebook))
    assert [r.ok for r in runs] == [True] * 3, [r.error for r in runs]
    assert [r.notebook for r in runs] == [display_path(p) for p in paths]     # course order, whatever finished first
    assert finished[0] == display_path(paths[1])
    seen = {n: json.loads((log / n).read_text()) for n in names}
    assert seen["a"][2] == seen["b"][2] == "1" and seen["alone"][2] is None   # alone: the default threads
    assert seen["alone"][1] <= min(seen["a"][0], seen["b"][0])                  # nothing ran beside it


def test_jobs_below_one_is_refused(tmp_path, capsys):
    nb = _notebook(tmp_path, "05_never_run.ipynb")
    with pytest.raises(SystemExit) as exit_info:
        notebooks.main([str(nb), "--jobs", "0"])
    assert exit_info.value.code == 2 and "--jobs must be at least 1" in capsys.readouterr().err


def test_longest_recorded_notebooks_start_first_and_unrecorded_ones_before_them():
    chapters = notebooks.REPO_ROOT / "chapters"
    a, b, c = (chapters / "01_x" / f"0{i}_{n}.ipynb" for i, n in enumerate("abc", 1))
    new = chapters / "09_y" / "01_new.ipynb"
    seconds = {"chapters/01_x/01_a.ipynb": 20.0, "chapters/01_x/02_b.ipynb": 300.0, "chapters/01_x/03_c.ipynb": 45.0}
    assert notebooks.longest_first([a, b, c, new], seconds) == [new, b, c, a]
    assert notebooks.longest_first([a, b, c], {}) == [a, b, c]          # no record: course order


def test_recorded_seconds_merge_only_notebooks_that_ran_ok_and_a_bad_record_is_ignored(tmp_path):
    record = tmp_path / "run_seconds.json"
    record.write_text('{"chapters/01_x/01_a.ipynb": 50, "chapters/01_x/02_b.ipynb": 7}')
    notebooks.record_seconds([notebooks.NotebookRun("chapters/01_x/01_a.ipynb", 12.4, True),
                              notebooks.NotebookRun("chapters/01_x/02_b.ipynb", 99.0, False, "boom")], record)
    assert notebooks.recorded_seconds(record) == {"chapters/01_x/01_a.ipynb": 12.0, "chapters/01_x/02_b.ipynb": 7.0}
    assert '"chapters/01_x/02_b.ipynb": 7\n' in record.read_text()   # whole seconds stay whole after a merge
    record.write_text("not json")
    assert notebooks.recorded_seconds(record) == {}
    assert notebooks.recorded_seconds(tmp_path / "absent.json") == {}


def test_the_shipped_record_names_every_chapter_notebook():
    missing = {display_path(p) for p in notebooks.chapter_notebooks()} ^ set(notebooks.recorded_seconds())
    assert not missing, f"record the seconds with `make run RECORD=1` (or fix chapters/run_seconds.json): {missing}"


def _git_tree(root: Path) -> Path:
    import subprocess
    for name, text in {"pretrain_lib/lib.py": "A = 1\n", "tests/test_lib.py": "def test(): pass\n",
                       "tests/notebook_params/09_test.json": "{}\n", ".gitignore": "build/\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    return root


def test_the_fingerprint_follows_what_a_notebook_can_read_and_ignores_build_output_and_other_tests(tmp_path):
    root = _git_tree(tmp_path / "repo")
    first = notebooks.tree_fingerprint(root)
    assert first is not None and len(first) == 64
    (root / "build").mkdir()
    (root / "build" / "executed.ipynb").write_text("{}")                 # ignored output
    (root / "tests" / "test_lib.py").write_text("def test(): assert 1\n")  # a test a notebook never reads
    assert notebooks.tree_fingerprint(root) == first
    (root / "tests" / "notebook_params" / "09_test.json").write_text('{"x": 2}\n')
    second = notebooks.tree_fingerprint(root)
    assert second != first
    (root / "pretrain_lib" / "new_module.py").write_text("B = 2\n")      # untracked, not ignored: counts
    third = notebooks.tree_fingerprint(root)
    assert third not in (first, second)
    (root / "pretrain_lib" / "new_module.py").unlink()
    (root / "pretrain_lib" / "lib.py").write_text("A = 2\n")
    assert notebooks.tree_fingerprint(root) not in (first, second, third)
    assert notebooks.tree_fingerprint(tmp_path / "not_a_checkout") is None


def test_a_defaults_run_records_what_passed_and_only_the_same_tree_reuses_it(tmp_path, monkeypatch, capsys):
    ok = _notebook(tmp_path, "04_ok.ipynb", "print(x)")
    bad = _notebook(tmp_path, "05_bad.ipynb", "assert x == 2, 'claim x_is_two failed'")
    build = tmp_path / "build"
    tree = {"fingerprint": "a" * 64}
    monkeypatch.setattr(notebooks, "tree_fingerprint", lambda root=None: tree["fingerprint"])
    assert notebooks.main([str(ok), str(bad), "--build-dir", str(build)]) == 1
    assert notebooks.passed_at_defaults(build, "a" * 64) == {display_path(ok)}
    assert notebooks.passed_at_defaults(build, "b" * 64) == set()        # any edit: nothing is reused
    params = tmp_path / "params.json"                                      # a run at other sizes proves nothing
    params.write_text(json.dumps({"05_bad": {"x": 2}}))
    assert notebooks.main([str(bad), "--build-dir", str(build), "--params", str(params)]) == 0
    assert notebooks.passed_at_defaults(build, "a" * 64) == {display_path(ok)}
    tree["fingerprint"] = "c" * 64                                         # a new tree replaces the record
    assert notebooks.main([str(ok), "--build-dir", str(build)]) == 0
    assert notebooks.passed_at_defaults(build, "c" * 64) == {display_path(ok)}
    assert notebooks.passed_at_defaults(build, "a" * 64) == set()
    (build / notebooks.DEFAULTS_RECORD).write_text("not json")
    assert notebooks.passed_at_defaults(build, "c" * 64) == set()


def test_a_file_edited_during_the_run_leaves_no_record(tmp_path, monkeypatch):
    ok = _notebook(tmp_path, "06_ok.ipynb", "print(x)")
    prints = iter(["a" * 64, "d" * 64])
    monkeypatch.setattr(notebooks, "tree_fingerprint", lambda root=None: next(prints))
    assert notebooks.main([str(ok), "--build-dir", str(tmp_path / "build")]) == 0
    assert not (tmp_path / "build" / notebooks.DEFAULTS_RECORD).exists()
