# make test: set up .venv (once) and run the whole test suite; what CI runs (.ci/run).
# make demo: set up .venv (once) and run the toy-world demo.
# The venv is (re)installed only when pyproject.toml or constraints.txt is newer than its stamp, so
# re-runs are quick. It gets the exact versions of constraints.txt and the `notebooks` extra (Jupyter,
# papermill: the notebook tests and `segmoe-lab run` need them) and the `dev` extra (pytest, playwright).

PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.segmoe-lab-installed
BROWSER ?= /usr/bin/chromium

.PHONY: test demo venv browser

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -c constraints.txt -e '.[dev,notebooks]'
	touch $@

# The JupyterLab browser test (tests/test_browser.py) drives Debian's chromium at $(BROWSER) through
# playwright (its own browser download cannot work offline). Installed once where apt-get runs as
# root; elsewhere the test is skipped, and `make test` says so before and after the run (-rs).
browser:
	@test -x $(BROWSER) || { if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "NOTE: no browser at $(BROWSER) and no root apt-get: the JupyterLab browser test will be skipped"; fi; }

# One thread per process: two pytest-xdist workers share the 2 cores.
test: $(STAMP) browser
	SEGMOE_LAB_BROWSER=$(BROWSER) OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -rs -n 2 tests

# One torch thread: the toy models are tiny, and on 2 cores the demo took 4:19 with one thread
# (the other core busy) against 4:46 with two. Override with `make demo OMP_NUM_THREADS=2`.
OMP_NUM_THREADS ?= 1
demo: $(STAMP)
	OMP_NUM_THREADS=$(OMP_NUM_THREADS) $(VENV)/bin/segmoe-lab demo
