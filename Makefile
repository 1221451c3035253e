# The course's commands. Every target sets up .venv first (once: a stamp file records it).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
JOBS   ?= 2

.PHONY: setup run test slurm-check lab exercises grade site lint doctor clean

LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json

setup: $(STAMP) $(LAB_OVERRIDES)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[tensorboard,site,hf]'
	touch $(STAMP)

# JupyterLab 4.6 runs widget callbacks on a second kernel thread by default (comms over subshells,
# with ipykernel 7); pyplot is not thread-safe, and the explorers (4.4) then drew blank figures.
# This app-level setting, in the virtualenv only, keeps widget callbacks on the main thread.
$(LAB_OVERRIDES): | $(STAMP)
	mkdir -p $(dir $@)
	echo '{"@jupyterlab/apputils-extension:kernels-settings": {"commsOverSubshells": "disabled"}}' > $@

## make run: execute every chapter notebook headlessly into build/ and print a table
## (make run RECORD=1 also writes each notebook's seconds to chapters/run_seconds.json: longest start first)
run: setup
	$(PY) -m pretrain_lib.notebooks --jobs $(JOBS) $(if $(RECORD),--record-seconds)

## make test: the whole test suite (library, notebooks, exercises, grading, distributed).
## --dist loadgroup: tests marked xdist_group(name) share one worker; nbval runs in subprocesses.
test: setup
	$(PY) -m pytest -n $(JOBS) --dist loadgroup

## make slurm-check: run the capstone's sbatch script under a real one-node Slurm on this machine (munged,
## slurmctld and slurmd in a temporary folder, stopped afterwards), preempt it and check the requeued job
## resumes exactly. Needs root and `apt-get install -y slurm-wlm munge`; skips and says why otherwise.
slurm-check: setup
	$(PY) -m pytest -p no:xdist -rs -s tests/test_slurm.py

## make lab: start JupyterLab on the course.
## JupyterLab refuses to start as root; containers and Colab-like hosts often run everything as
## root, so there (uid 0) the refusal is lifted with --allow-root. Elsewhere nothing is added.
LAB_FLAGS := $(if $(filter 0,$(shell id -u)),--allow-root,)
lab: setup
	$(VENV)/bin/jupyter lab $(LAB_FLAGS)

## make exercises: regenerate exercises/ from solutions/
exercises: setup
	$(PY) -m pretrain_lib.grading build

## make grade SUBMISSIONS=folder OUT=folder: grade a class's submissions
grade: setup
	@test -n "$(SUBMISSIONS)" -a -n "$(OUT)" || { echo "usage: make grade SUBMISSIONS=folder OUT=folder" >&2; exit 2; }
	$(PY) -m pretrain_lib.grading grade "$(SUBMISSIONS)" --out "$(OUT)" --jobs $(JOBS)

## make site: the course as a static offline website in build/site/ (runs `make run` first if nothing is executed)
site: setup
	ls build/chapters/*/*.ipynb >/dev/null 2>&1 || $(MAKE) run
	$(PY) -m pretrain_lib.site

## make lint: the notebook conventions of CONTRIBUTING.md (standard library only: no setup needed)
lint:
	$(PYTHON) -m pretrain_lib.lint .

## make doctor: check this machine (python, torch, threads, memory, GPU, optional tools); exit 0 = the course runs
doctor: setup
	$(PY) -m pretrain_lib.doctor

clean:
	rm -rf build
