# The course's commands. Every target sets up .venv first (once: a stamp file records it).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
JOBS   ?= 2

.PHONY: setup run test lab exercises grade site lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[tensorboard,site]'
	touch $(STAMP)

## make run: execute every chapter notebook headlessly into build/ and print a table
run: setup
	$(PY) -m pretrain_lib.notebooks

## make test: the whole test suite (library, notebooks, exercises, grading, distributed).
## --dist loadgroup: tests marked xdist_group(name) share one worker; nbval runs in subprocesses.
test: setup
	$(PY) -m pytest -n $(JOBS) --dist loadgroup

## make lab: start JupyterLab on the course
lab: setup
	$(VENV)/bin/jupyter lab

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

lint:
	$(PYTHON) ../shared/tools/course_lint.py .

clean:
	rm -rf build
