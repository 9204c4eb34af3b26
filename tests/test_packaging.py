"""The two install routes (pip + pyproject.toml, conda + environment.yml) ask for the same packages."""
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


def _conda_pip() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return [r for r in pip if not r.startswith("-")]  # drop "-e ." (the package itself)


def test_conda_environment_lists_the_same_dependencies_and_pins_as_pyproject():
    project = _pyproject()["project"]
    wanted = _parse(project["dependencies"] + project["optional-dependencies"]["dev"])
    assert _parse(_conda_pip()) == wanted


def test_torch_and_torchvision_are_pinned_exactly_in_both():
    deps = _parse(_pyproject()["project"]["dependencies"])
    conda = _parse(_conda_pip())
    for name in ("torch", "torchvision"):
        assert deps[name].startswith("==") and conda[name] == deps[name]


def test_conda_environment_installs_the_package_itself():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip


def test_console_script_points_at_the_cli_app():
    assert _pyproject()["project"]["scripts"]["segmoe-lab"] == "segmoe_lab.cli:app"
