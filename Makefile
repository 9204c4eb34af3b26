# make test: set up .venv (once) and run the whole test suite; what CI runs (.ci/run).
# make demo: set up .venv (once) and run the toy-world demo.
# The venv is (re)installed only when pyproject.toml or constraints.txt is newer than its stamp, so
# re-runs are quick. It gets the exact versions of constraints.txt and the `notebooks` extra (Jupyter,
# papermill: the notebook tests and `segmoe-lab run` need them) and the `dev` extra (pytest, playwright).

PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.segmoe-lab-installed
BROWSER ?= /usr/bin/chromium

.PHONY: test demo venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -c constraints.txt -e '.[dev,notebooks]'
	touch $@

# One thread per process: two pytest-xdist workers share the 2 cores. The JupyterLab browser test
# (tests/test_browser.py) needs Debian's chromium at $(BROWSER) (.ci/run installs it); without it
# that test is skipped, and this says so before and after the run (-rs lists skip reasons).
test: $(STAMP)
	@test -x $(BROWSER) || echo "NOTE: no browser at $(BROWSER): the JupyterLab browser test will be skipped (apt-get install chromium)"
	SEGMOE_LAB_BROWSER=$(BROWSER) OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -rs -n 2 tests

# One torch thread: the toy models are tiny, and on 2 cores the demo took 4:19 with one thread
# (the other core busy) against 4:46 with two. Override with `make demo OMP_NUM_THREADS=2`.
OMP_NUM_THREADS ?= 1
demo: $(STAMP)
	OMP_NUM_THREADS=$(OMP_NUM_THREADS) $(VENV)/bin/segmoe-lab demo
