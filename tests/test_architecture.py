"""The package's shape: stages import only downwards, no import cycles, one registry per idea.

The stages, lowest first (``STAGES``): errors -> sources -> merge -> toy, observe -> judge -> the
entry points on top (cli, demo, notebook, runner, sweep, testing). A module may import its own
stage or a lower one, never a higher one; imports inside functions count too, since a cycle
hidden in a function is still a cycle a reader must untangle.
"""
import ast
import inspect
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "segmoe_lab"
TESTS = Path(__file__).resolve().parent
STAGES = {"errors": 0, "registry": 0, "atomic": 0, "safe_load": 0, "resample": 0, "_compat": 0, "sources": 1, "merge": 2, "toy": 3, "observe": 3, "judge": 4}
TOP = 5  # cli, demo, notebook, runner, sweep, testing, the package's __init__
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "weights" not in p.parts}


def stage(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # segmoe_lab itself
        return TOP
    return STAGES.get(parts[1], TOP)


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The segmoe_lab modules ``module`` imports, anywhere in the file (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known and n != module}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def test_no_module_imports_a_higher_stage():
    upward = [f"{m} (stage {stage(m)}) imports {d} (stage {stage(d)})"
              for m, deps in graph().items() for d in deps if stage(d) > stage(m)]
    assert not upward, "imports must point down the stages:\n" + "\n".join(sorted(upward))


def test_import_graph_has_no_cycles():
    g = graph()
    # a package's __init__ re-exporting its own modules is not a cycle a reader must untangle
    g = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in g.items()}
    state, cycles = {}, []

    def visit(m, trail):
        state[m] = "open"
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(trail[trail.index(d):] + [d]))
            elif d not in state:
                visit(d, trail + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by idea): {long}"


def test_deprecated_flat_paths_alias_the_moved_modules():
    import importlib

    from segmoe_lab import _compat

    for old, new in _compat.MOVED.items():
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            alias = importlib.import_module(f"segmoe_lab.{old}")
        assert alias is importlib.import_module(f"segmoe_lab.{new}"), old
        assert alias.__spec__.name == f"segmoe_lab.{new}"


def test_a_deprecated_path_warns_with_the_new_one():
    import importlib
    import sys

    sys.modules.pop("segmoe_lab.stats", None)
    with pytest.warns(DeprecationWarning, match="segmoe_lab.judge.stats"):
        importlib.import_module("segmoe_lab.stats")


# --- registries ---------------------------------------------------------------------------------

def registries() -> dict[str, dict]:
    from segmoe_lab.judge.scorers import SCORERS
    from segmoe_lab.judge.variants import VARIANTS
    from segmoe_lab.merge.gating import GATE_INITS
    from segmoe_lab.merge.routing import ROUTINGS
    from segmoe_lab.sources.resolve import SOURCE_KINDS

    return {"routing": ROUTINGS, "gate": GATE_INITS, "scorer": SCORERS, "source": SOURCE_KINDS, "variant": VARIANTS}


def _doc(entry) -> str:
    return getattr(entry, "doc", None) or inspect.getdoc(entry) or ""


@pytest.mark.parametrize("kind", ["routing", "gate", "scorer", "source", "variant"])
def test_every_registry_entry_has_a_docstring(kind):
    undocumented = [name for name, entry in registries()[kind].items() if len(_doc(entry).strip()) < 20]
    assert not undocumented, f"{kind} entries without a docstring a user can read: {undocumented}"


@pytest.mark.parametrize("kind", ["routing", "gate", "scorer", "source", "variant"])
def test_every_registry_entry_is_named_by_a_test(kind):
    text = "\n".join(p.read_text() for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name)
    untested = [name for name in registries()[kind] if f'"{name}"' not in text and f"'{name}'" not in text]
    assert not untested, f"{kind} entries no test names (add a test that uses each): {untested}"


def test_config_choices_are_the_registry_keys():
    from segmoe_lab.merge.config import ConfigError, MergeConfig

    base = {"base_model": "b", "type": "sd", "experts": [{"source_model": "e"}]}
    for field, registry in (("routing", registries()["routing"]), ("init", registries()["gate"])):
        for name in registry:
            assert getattr(MergeConfig.model_validate({**base, field: name}), field) == name
        with pytest.raises((ConfigError, ValueError), match=str(sorted(registry)).replace("[", r"\[").replace("]", r"\]")):
            MergeConfig.model_validate({**base, field: "no_such_entry"})


def test_no_policy_name_is_compared_outside_its_registry():
    import re

    names = list(registries()["routing"]) + list(registries()["gate"])
    pattern = re.compile(r"""(==|!=)\s*["'](%s)["']|["'](%s)["']\s*(==|!=)""" % ("|".join(names), "|".join(names)))
    offenders = [f"{m}: {line.strip()}" for m, p in modules().items() if not m.endswith(("routing", "gating"))
                 for line in p.read_text().splitlines() if pattern.search(line)]
    assert not offenders, "ask the registry entry, don't compare its name:\n" + "\n".join(offenders)
