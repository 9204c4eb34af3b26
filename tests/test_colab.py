"""Colab: every notebook carries its own badge and install cell, generated from segmoe_lab/colab.py,
and the install cell does the right thing in a simulated Colab and nothing elsewhere."""
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

from segmoe_lab import colab

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
IDS = [nb.stem for nb in NOTEBOOKS]


def _first_code_cell(notebook: Path) -> str:
    return next(c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code")


def _run_install_cell(notebook: Path, monkeypatch, on_colab: bool) -> dict:
    """Execute the notebook's first code cell with subprocess.run, os.chdir and the checkout faked."""
    calls = {"run": [], "chdir": []}
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls["run"].append(list(cmd)))
    monkeypatch.setattr("os.chdir", lambda path: calls["chdir"].append(str(path)))
    monkeypatch.setattr("os.path.isdir", lambda path: False)  # a fresh Colab runtime: nothing cloned yet
    if on_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(compile(_first_code_cell(notebook), notebook.name, "exec"), {})
    return calls


def test_generated_badges_and_install_cells_are_up_to_date():
    assert colab.stale() == [], "run `python -m segmoe_lab.colab` and commit the result"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_notebook_opens_with_its_own_colab_badge(notebook):
    first = nbformat.read(notebook, as_version=4).cells[0]
    assert first.cell_type == "markdown" and first.source.startswith(colab.badge(notebook.stem))
    assert colab.badge_url(notebook.stem).endswith(f"/blob/{colab.REF}/notebooks/{notebook.name}")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_install_cell_on_colab_clones_and_installs_the_kit(notebook, monkeypatch):
    calls = _run_install_cell(notebook, monkeypatch, on_colab=True)
    assert calls["run"] == colab.install_commands(sys.executable)
    assert calls["chdir"] == [f"{colab.CHECKOUT}/notebooks"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_install_cell_elsewhere_does_nothing(notebook, monkeypatch):
    assert _run_install_cell(notebook, monkeypatch, on_colab=False) == {"run": [], "chdir": []}


def test_colab_install_keeps_colabs_torch_and_skips_the_notebook_extra():
    pip = colab.install_commands("python")[1]
    assert pip == ["python", "-m", "pip", "install", "-q", colab.CHECKOUT]  # no extras, no -c constraints.txt


def test_readme_badges_point_at_the_configured_repository():
    readme = (colab.ROOT / "README.md").read_text()
    for notebook in NOTEBOOKS:
        assert colab.badge(notebook.stem) in readme, f"README has no badge for {notebook.name}"


def test_on_colab_detects_the_google_colab_module():
    assert colab.on_colab({"google.colab": object()}) and not colab.on_colab({})
