"""Every notebook in notebooks/: runs top to bottom with its defaults, is clean, thin and in sync.

The execution tests are one test per notebook (parametrized), so pytest-xdist spreads them over
its workers; each runs in a fresh kernel through the same code path as ``segmoe-lab run``.
"""
import ast
import json
from pathlib import Path

import jupytext
import nbformat
import pytest

from segmoe_lab.runner import parameters_cells, run_notebook

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
IDS = [nb.stem for nb in NOTEBOOKS]
MAX_CELL_LINES = 15  # thin notebooks: logic lives in segmoe_lab/


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3, f"no notebooks found in {NOTEBOOK_DIR}"
    orphans = [p.name for p in NOTEBOOK_DIR.glob("*.py") if not p.with_suffix(".ipynb").is_file()]
    assert not orphans, f"{orphans}: generate the notebook with `jupytext --to ipynb`"


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_runs_with_default_parameters(notebook, tmp_path):
    result = run_notebook(notebook, tmp_path / "run", timeout=900)
    assert result.status == "ok", f"{notebook.name} failed: {result.error} (executed notebook: {result.path})"
    assert (result.path / "results.csv").is_file(), "a notebook writes its result table to output_dir/results.csv"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_committed_without_outputs(notebook):
    nb = nbformat.read(notebook, as_version=4)
    dirty = [i for i, c in enumerate(code_cells(nb)) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{notebook.name}: code cells {dirty} carry outputs; clear them (jupytext --to ipynb)"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_in_sync_with_its_py_pair(notebook):
    pair = notebook.with_suffix(".py")
    assert pair.is_file(), f"{notebook.name} has no jupytext pair {pair.name}"
    py, ipynb = jupytext.read(pair), nbformat.read(notebook, as_version=4)
    cells = lambda nb: [(c.cell_type, c.source.strip(), c.metadata.get("tags", [])) for c in nb.cells]  # noqa: E731
    assert cells(py) == cells(ipynb), f"{notebook.name} differs from {pair.name}: run `jupytext --to ipynb {pair}`"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_one_parameters_cell_of_plain_values(notebook):
    cells = parameters_cells(notebook)
    assert len(cells) == 1, f"{notebook.name}: {len(cells)} cells tagged `parameters`; tag exactly one"
    names = []
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.Assign), f"{notebook.name}: the parameters cell holds only assignments"
        ast.literal_eval(node.value)  # plain values only: papermill overrides them by name
        names += [t.id for t in node.targets]
    assert "output_dir" in names, f"{notebook.name}: add `output_dir = None` (where results.csv goes)"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_cells_are_short(notebook):
    nb = nbformat.read(notebook, as_version=4)
    long = [c.source.splitlines()[0] for c in code_cells(nb)
            if "parameters" not in c.metadata.get("tags", [])
            and len([l for l in c.source.splitlines() if l.strip() and not l.strip().startswith("#")]) > MAX_CELL_LINES]
    assert not long, f"{notebook.name}: cells longer than {MAX_CELL_LINES} lines (move logic to segmoe_lab/): {long}"


@pytest.mark.slow
def test_a_bad_parameter_fails_at_once(tmp_path):
    notebook = NOTEBOOK_DIR / "00_quickstart.ipynb"
    result = run_notebook(notebook, tmp_path / "run", {"device": "gpu"}, timeout=300)
    assert result.status == "failed" and "device: 'gpu' is not a valid choice" in result.error
    status = json.loads((result.path / "status.json").read_text())
    nb = nbformat.read(result.path / notebook.name, as_version=4)
    first_validation = next(c.execution_count for c in code_cells(nb) if "parameters" in c.metadata.get("tags", []))
    assert status["cell"] <= first_validation + 2  # the injected cell, then the validating cell
