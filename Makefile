# make test: set up .venv (once) and run the whole test suite; what CI runs (.ci/run).
# make demo: set up .venv (once) and run the toy-world demo.
# The venv is (re)installed only when pyproject.toml is newer than its stamp, so re-runs are quick.

PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.segmoe-lab-installed

.PHONY: test demo venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -e '.[dev]'
	touch $@

# One thread per process: two pytest-xdist workers share the 2 cores.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -n 2 tests

# One torch thread: the toy models are tiny, and on 2 cores the demo took 4:19 with one thread
# (the other core busy) against 4:46 with two. Override with `make demo OMP_NUM_THREADS=2`.
OMP_NUM_THREADS ?= 1
demo: $(STAMP)
	OMP_NUM_THREADS=$(OMP_NUM_THREADS) $(VENV)/bin/segmoe-lab demo
