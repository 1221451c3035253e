"""make doctor: exits 0 where the course runs, one line per check, and each gap is named with its cost."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from pretrain_lib import doctor

REPO = doctor.Path(doctor.__file__).resolve().parent.parent


def test_version_ranges_worked_by_hand():
    assert doctor.satisfies("3.11.7", ">=3.10,<3.14")
    assert not doctor.satisfies("3.9.18", ">=3.10,<3.14")
    assert not doctor.satisfies("3.14.0", ">=3.10,<3.14")
    assert doctor.satisfies("2.13.0+cpu", ">=2.9,<2.14")      # a local build tag is not part of the release
    assert not doctor.satisfies("2.8.1+cu128", ">=2.9,<2.14")
    assert doctor.satisfies("2.9.0", "==2.9")
    with pytest.raises(ValueError, match="cannot read"):
        doctor.satisfies("1.0", "~1.0")


def test_the_course_runs_on_this_machine_one_line_per_check():
    """The test suite itself runs here, so the doctor must agree (what `make doctor` exits with)."""
    out = subprocess.run([sys.executable, "-m", "pretrain_lib.doctor"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(lines) == len(doctor.all_checks()) + 1 and lines[-1].startswith("doctor: the course runs here")
    names = [line.split()[1] for line in lines[:-1]]
    assert names[:2] == ["python", "torch"] and {"memory", "gpu", "bubblewrap", "chromium", "threads"} <= set(names)
    assert all(line.split()[0] in ("ok", "warn") for line in lines[:-1])


def test_an_unsupported_python_fails_with_what_to_do(monkeypatch):
    monkeypatch.setattr(doctor.platform, "python_version", lambda: "3.9.18")
    result = doctor.check_python()
    assert result.level == doctor.FAIL and "3.9.18" in result.detail and "PYTHON=" in result.detail


def test_torch_that_does_not_import_fails(monkeypatch):
    real = doctor.importlib.import_module

    def broken(name, *args):
        if name == "torch":
            raise ImportError("libtorch_cpu.so: cannot open shared object file")
        return real(name, *args)
    monkeypatch.setattr(doctor.importlib, "import_module", broken)
    result = doctor.check_torch()
    assert result.level == doctor.FAIL and "libtorch_cpu.so" in result.detail and "make setup" in result.detail


def test_torch_without_muon_names_the_notebooks_that_need_it(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    result = doctor.check_torch()
    assert result.level == doctor.FAIL and "5.4" in result.detail and "8.2" in result.detail


def test_a_missing_package_fails(monkeypatch):
    monkeypatch.setattr(doctor, "CORE_PACKAGES", doctor.CORE_PACKAGES + ("no-such-course-package",))
    result = doctor.check_packages()
    assert result.level == doctor.FAIL and "missing: no-such-course-package" in result.detail


@pytest.mark.parametrize("omp, cores, level", [("1", 2, doctor.OK), ("8", 2, doctor.WARN), (None, 1, doctor.WARN)])
def test_threads(monkeypatch, omp, cores, level):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(doctor.os, "cpu_count", lambda: cores)
    assert doctor.check_threads().level == level


def test_little_memory_or_disk_is_a_warning_with_its_cost(monkeypatch, tmp_path):
    monkeypatch.setattr(doctor, "_total_memory_bytes", lambda: 2 * 2**30)
    memory = doctor.check_memory()
    assert memory.level == doctor.WARN and "2.0 GiB" in memory.detail and "JOBS=1" in memory.detail
    monkeypatch.setattr(doctor, "MIN_DISK_GIB", 1e9)
    assert doctor.check_disk(tmp_path).level == doctor.WARN


def test_optional_pieces_are_warnings_that_say_what_is_lost(monkeypatch):
    import pretrain_lib.grading.sandbox as sandbox
    import pretrain_lib.site.browser as browser
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda: "bubblewrap (bwrap) is not installed")
    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    bwrap, chromium = doctor.check_bubblewrap(), doctor.check_chromium()
    hf = doctor.check_hf_extra(["transformers", "no_such_hf_package"])
    assert bwrap.level == doctor.WARN and "unsandboxed" in bwrap.detail
    assert chromium.level == doctor.WARN and "browser tests" in chromium.detail and "skip" in chromium.detail
    assert hf.level == doctor.WARN and "missing no-such-hf-package:" in hf.detail and "lm-eval" in hf.detail


def test_the_hf_extra_is_read_from_the_installed_metadata(monkeypatch):
    requires = ["torch<2.14,>=2.9", 'transformers<6,>=5.0; extra == "hf"', "lm-eval<0.5,>=0.4.13; extra == 'hf'",
                'tensorboard<3,>=2.14; extra == "tensorboard"']
    monkeypatch.setattr(doctor.metadata, "requires", lambda dist: requires)
    assert doctor._extra_packages("hf") == ["transformers", "lm-eval"]
    assert doctor._extra_packages("site") == []


def test_the_accelerator_line_follows_device_auto(monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert "Apple MPS" in doctor.check_accelerator().detail
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert "device='auto' is cpu" in doctor.check_accelerator().detail


def test_exit_code_and_a_check_that_breaks():
    def broken():
        raise OSError("no /proc here")

    out = io.StringIO()
    assert doctor.run_checks([lambda: doctor.Check("python", doctor.OK, "3.12"), broken], file=out) == 0
    assert "the check itself failed (OSError: no /proc here)" in out.getvalue()
    out = io.StringIO()
    assert doctor.run_checks([lambda: doctor.Check("torch", doctor.FAIL, "cannot import")], file=out) == 1
    assert out.getvalue().splitlines()[-1].startswith("doctor: the course cannot run here until torch")
