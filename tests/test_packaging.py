"""The install routes ask for the same packages: pyproject.toml's ranges (what Colab and `pip install`
see), constraints.txt's exact pins (what `make` and conda install) and environment.yml's pip list."""
import re
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*$")


def _parse(reqs) -> dict[str, str]:
    """name -> version spec, names normalised as pip does (``PyYAML`` == ``pyyaml``, ``_`` == ``-``)."""
    out = {}
    for req in reqs:
        name, _, spec = _REQ.match(req).groups()
        out[re.sub(r"[-_.]+", "-", name).lower()] = spec.replace(" ", "")
    return out


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _conda_pip_lines() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))


def _conda_pip() -> list[str]:
    return [r for r in _conda_pip_lines() if not r.startswith("-")]  # drop "-e ." and "-c constraints.txt"


def _all_dependencies() -> list[str]:
    project = _pyproject()["project"]
    return project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]


def _constraints() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return _parse([line for line in lines if line.strip() and not line.lstrip().startswith("#")])


def test_conda_environment_lists_the_same_dependencies_and_ranges_as_pyproject():
    assert _parse(_conda_pip()) == _parse(_all_dependencies())


def test_conda_environment_installs_the_constrained_versions():
    assert "-c constraints.txt" in _conda_pip_lines()


def test_pyproject_pins_nothing_exactly_so_colab_keeps_its_torch():
    exact = {name: spec for name, spec in _parse(_all_dependencies()).items() if "==" in spec}
    assert not exact, f"exact pins belong in constraints.txt, not pyproject.toml: {exact}"


def test_every_dependency_is_pinned_in_constraints_within_its_range():
    from packaging.specifiers import SpecifierSet

    pins = _constraints()
    for name, spec in _parse(_all_dependencies()).items():
        assert pins.get(name, "").startswith("=="), f"{name} has no exact pin in constraints.txt"
        assert SpecifierSet(spec).contains(pins[name][2:]), f"constraints.txt pins {name}{pins[name]} outside {spec}"


def test_torch_and_torchvision_are_pinned_exactly_in_constraints():
    assert _constraints()["torch"] == "==2.14.1" and _constraints()["torchvision"] == "==0.29.1"


def test_notebook_tools_are_an_extra_not_core_dependencies():
    project = _pyproject()["project"]
    core, notebooks = _parse(project["dependencies"]), _parse(project["optional-dependencies"]["notebooks"])
    for name in ("jupyter", "papermill", "jupytext", "nbformat"):
        assert name in notebooks and name not in core


def test_make_installs_the_constraints_and_the_notebooks_extra():
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -c constraints.txt -e '.[dev,notebooks]'" in makefile


def test_conda_environment_installs_the_package_itself():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip


def test_console_script_points_at_the_cli_app():
    assert _pyproject()["project"]["scripts"]["segmoe-lab"] == "segmoe_lab.cli:app"
