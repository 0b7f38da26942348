# Two commands do all set-up on a fresh machine: `make demo` (the main job on built-in generated
# data) and `make test`.  Both create .venv and install from constraints.txt on first use.
# `make test-fast` is the edit loop: the suite less the tests marked `slow` (README "Tests").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,eval,bench,adv,examples,s3]'
	@# Graphviz renders `dali-ipmix graph` (a Debian package; without it the command writes DOT only)
	@command -v dot >/dev/null || (apt-get update -qq && apt-get install -y -qq graphviz) >/dev/null 2>&1 \
		|| echo "note: graphviz not installed (needs root); dali-ipmix graph will write DOT only"
	touch $(STAMP)

.PHONY: setup demo test test-fast test-gpu clean
setup: $(STAMP)

demo: $(STAMP)
	$(PY) train.py

# -n auto: one pytest worker per core (pytest-xdist); --dist loadfile hands each worker whole
# test files, so a module fixture (generated data sets, an S3 server) is built once
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile -m "not gpu" tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile -m "not gpu and not slow" tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) build *.egg-info
