"""Experiments: a notebook, its parameters and an optional grid, run headless with papermill.

An experiment is a YAML file::

    notebook: ../notebooks/00_quickstart.ipynb   # relative to this file
    description: the toy merge, end to end
    parameters: {steps: 4}                       # override the notebook's `parameters` cell
    grid:                                        # optional: one run per point (--grid)
      routing: [segmoe, per_token]
      num_experts_per_tok: [1, 2]

Each run goes to ``runs/NAME/<timestamp>/`` (a grid's points to ``point-NN/`` below it) and
holds the executed notebook, ``parameters.yaml``, ``environment.json`` (package versions, git
commit, device), ``status.json`` (``ok`` or ``failed`` with the error) and whatever tables the
notebook wrote to its ``output_dir`` (``results.csv``). A failed point is recorded and the grid
goes on. Notebooks run with their own folder as the working directory, as in JupyterLab, so a
path parameter is relative to the notebook (``../experiments/segmoe_2x1.yaml``).

Example::

    results = run_experiment("experiments/toy_grid.yaml", grid=True)
    table = collect_runs("runs")       # every run's results.csv, with run, status and point
"""
from __future__ import annotations

import itertools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segmoe_lab.errors import ConfigError, format_problems, validation_problems
from segmoe_lab.safe_load import load_yaml

RESULTS_FILE = "results.csv"
STATUS_FILE = "status.json"
RESERVED = ("output_dir",)  # set by the runner for every run
PACKAGES = ("segmoe-lab", "torch", "diffusers", "transformers", "accelerate", "safetensors", "open_clip_torch",
            "numpy", "pandas", "papermill", "ipykernel")


class ExperimentError(ConfigError):
    """An experiment file that cannot be run; the message names the field and how to fix it."""


class Experiment(BaseModel):
    """One experiment file: which notebook, with which parameters, over which grid."""

    model_config = ConfigDict(extra="forbid")

    notebook: str = Field(min_length=1)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    timeout: Optional[float] = Field(None, gt=0)  # seconds per cell; None: no limit

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict) -> dict:
        empty = [k for k, v in grid.items() if not v]
        if empty:
            raise ValueError(f"grid.{empty[0]}: an empty list gives no runs; list at least one value")
        return grid

    @model_validator(mode="after")
    def _disjoint(self) -> "Experiment":
        both = sorted(set(self.parameters) & set(self.grid))
        if both:
            raise ValueError(f"{both[0]!r} is both in parameters and in grid; give it in one place")
        reserved = [k for k in (*self.parameters, *self.grid) if k in RESERVED]
        if reserved:
            raise ValueError(f"{reserved[0]!r} is set by the runner (each run's own folder); remove it")
        return self

    def points(self) -> list[dict[str, Any]]:
        """The grid's points (cartesian product, in the file's key order); ``[{}]`` without a grid."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())]


def _format(err: ValidationError, source: str) -> str:
    return format_problems(f"{source}: {{n}} problem(s) in the experiment", validation_problems(err, Experiment))


def load_experiment(path: Union[str, Path]) -> Experiment:
    """Read and validate an experiment YAML, and check its parameters against the notebook's."""
    path = Path(path)
    if not path.exists():
        raise ExperimentError(f"{path}: no such experiment file; pass the path of an experiment YAML")
    data = load_yaml(path, ExperimentError, "experiment (YAML)")
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: an experiment is a mapping with at least `notebook:`")
    if "base_model" in data:
        raise ExperimentError(f"{path} is a merge config, not an experiment; point an experiment's "
                              "`parameters: {config: ...}` at it, or build it with `segmoe-lab build`")
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as err:
        raise ExperimentError(_format(err, str(path))) from None
    check_parameters(exp, notebook_path(exp, path), str(path))
    return exp


def notebook_path(exp: Experiment, experiment_file: Union[str, Path]) -> Path:
    """The experiment's notebook, resolved relative to the experiment file's folder."""
    nb = Path(exp.notebook)
    nb = nb if nb.is_absolute() else Path(experiment_file).resolve().parent / nb
    if nb.suffix != ".ipynb":
        raise ExperimentError(f"notebook: {exp.notebook!r} is not a .ipynb file; point at the notebook "
                              "(make it from a .py pair with `jupytext --to ipynb`)")
    if not nb.is_file():
        raise ExperimentError(f"notebook: {nb} does not exist (paths are relative to the experiment file)")
    return nb


def parameters_cells(notebook) -> list:
    """The cells tagged ``parameters`` of a notebook (a path or an ``nbformat`` node)."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4) if isinstance(notebook, (str, Path)) else notebook
    return [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]


def notebook_parameters(notebook) -> dict[str, Any]:
    """The names and default values (``None`` where not a literal) of a notebook's ``parameters`` cell."""
    import ast

    cells = parameters_cells(notebook)
    if not cells:
        return {}
    params = {}
    for node in ast.parse(cells[0].source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in (t for t in targets if isinstance(t, ast.Name)):
            try:
                params[target.id] = ast.literal_eval(node.value)
            except (ValueError, SyntaxError):
                params[target.id] = None
    return params


def check_parameters(exp: Experiment, notebook: Path, source: str = "experiment") -> None:
    """Fail on a parameter the notebook does not have (papermill would only warn)."""
    known = notebook_parameters(notebook)
    if not known:
        raise ExperimentError(f"{notebook.name} has no cell tagged `parameters`; tag one so it can be run")
    unknown = [k for k in (*exp.parameters, *exp.grid) if k not in known]
    if unknown:
        raise ExperimentError(f"{source}: {unknown[0]!r} is not a parameter of {notebook.name}; "
                              f"its parameters are: {', '.join(known)}")
    if "output_dir" not in known:
        raise ExperimentError(f"{notebook.name} has no `output_dir` parameter, so its results cannot be "
                              "collected; add `output_dir = None` to its parameters cell")


# --- environment --------------------------------------------------------------------------------

def _version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git(args: list[str], cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@lru_cache(maxsize=None)
def _device() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_count": torch.cuda.device_count(), "cpu_count": os.cpu_count()}


def environment(repo: Union[str, Path] = ".") -> dict:
    """What a run ran on: Python, package versions, git commit (and whether the tree was dirty), device."""
    repo = Path(repo)
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo)
    return {
        "python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git": {"commit": _git(["rev-parse", "HEAD"], repo), "dirty": bool(status) if status is not None else None},
        "device": _device(),
    }


# --- kernel -------------------------------------------------------------------------------------

def kernel_name() -> str:
    """A Jupyter kernel that runs this very interpreter.

    ``python3`` (ipykernel's own spec, whose ``python`` jupyter_client replaces by
    ``sys.executable``) when it resolves here; otherwise a private ``segmoe-lab`` spec written to
    ``~/.cache/segmoe-lab/jupyter`` and put first on ``JUPYTER_PATH``.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    except NoSuchKernel:
        argv0 = None
    if argv0 in ("python", "python3", f"python3.{sys.version_info[1]}") or argv0 == sys.executable:
        return "python3"
    root = Path.home() / ".cache" / "segmoe-lab" / "jupyter"
    spec = root / "kernels" / "segmoe-lab"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "segmoe-lab (Python 3)", "language": "python"}))
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("JUPYTER_PATH")]))
    return "segmoe-lab"


# --- running ------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """One executed notebook: its folder, ``ok`` / ``failed``, the error and its wall time."""

    path: Path
    status: str
    point: dict = field(default_factory=dict)
    error: Optional[str] = None
    seconds: float = 0.0


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _describe(err: Exception) -> tuple[str, Optional[int]]:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(err, PapermillExecutionError):
        return f"{err.ename}: {err.evalue}", err.exec_count
    return f"{type(err).__name__}: {err}", None


def run_notebook(notebook: Union[str, Path], run_dir: Union[str, Path], parameters: Optional[dict] = None, *,
                 point: Optional[dict] = None, env: Optional[dict] = None, timeout: Optional[float] = None,
                 kernel: Optional[str] = None) -> RunResult:
    """Execute ``notebook`` into ``run_dir`` with ``parameters`` (+ ``output_dir=run_dir``); never raises
    for the notebook's own errors: they are recorded in ``status.json`` and returned."""
    import papermill

    notebook, run_dir = Path(notebook).resolve(), Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    params = {**(parameters or {}), "output_dir": str(run_dir)}
    (run_dir / "parameters.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    _write_json(run_dir / "environment.json", env or environment(notebook.parent))
    status = {"status": "running", "notebook": str(notebook), "point": point or {}, "started": datetime.now().isoformat()}
    _write_json(run_dir / STATUS_FILE, status)
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(notebook), str(run_dir / notebook.name), parameters=params,
                                   kernel_name=kernel or kernel_name(), language="python", cwd=str(notebook.parent),
                                   progress_bar=False, execution_timeout=timeout,
                                   extra_arguments=["--IPKernelApp.log_level=CRITICAL"])  # no kernel chatter on the terminal
        status.update(status="ok")
    except Exception as err:  # noqa: BLE001 - any failure of a run is recorded, the grid goes on
        message, cell = _describe(err)
        status.update(status="failed", error=message, cell=cell)
    status.update(finished=datetime.now().isoformat(), seconds=round(time.perf_counter() - start, 2))
    _write_json(run_dir / STATUS_FILE, status)
    return RunResult(run_dir, status["status"], point or {}, status.get("error"), status["seconds"])


def _new_dir(parent: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in itertools.count():
        path = parent / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue


def run_experiment(path: Union[str, Path], *, grid: bool = False, out: Union[str, Path] = "runs",
                   on_run: Optional[Callable[[int, int, dict], None]] = None,
                   on_done: Optional[Callable[[RunResult], None]] = None) -> list[RunResult]:
    """Run an experiment file once (its ``parameters``), or once per grid point with ``grid=True``.

    Runs go to ``out/NAME/<timestamp>/`` (grid points to ``point-NN/`` inside), NAME being the
    file's stem. ``on_run(i, n, point)`` and ``on_done(result)`` report progress.
    """
    path = Path(path)
    exp = load_experiment(path)
    if grid and not exp.grid:
        raise ExperimentError(f"{path}: --grid given but the experiment has no `grid:`; run it without --grid")
    notebook = notebook_path(exp, path)
    points = exp.points() if grid else [{}]
    root = _new_dir(Path(out) / path.stem)
    env, kernel = environment(path.resolve().parent), kernel_name()
    results = []
    for i, point in enumerate(points):
        if on_run:
            on_run(i, len(points), point)
        run_dir = root / f"point-{i:02d}" if grid else root
        result = run_notebook(notebook, run_dir, {**exp.parameters, **point}, point=point, env=env,
                              timeout=exp.timeout, kernel=kernel)
        if on_done:
            on_done(result)
        results.append(result)
    return results


# --- collecting ---------------------------------------------------------------------------------

def list_runs(out: Union[str, Path] = "runs") -> list[Path]:
    """Every run folder under ``out`` (a folder holding ``status.json``), oldest first."""
    return sorted((p.parent for p in Path(out).rglob(STATUS_FILE)), key=lambda p: p.relative_to(out).parts)


def collect_runs(out: Union[str, Path] = "runs"):
    """One DataFrame of every run's ``results.csv``: columns ``experiment``, ``run``, ``run_status``,
    ``run_error``, ``run_seconds``, the grid point's parameters, then the results' own columns (a run without results,
    e.g. a failed one, gives one row)."""
    import pandas as pd

    out = Path(out)
    if not out.is_dir():
        raise ExperimentError(f"{out}: no runs folder; run an experiment first (`segmoe-lab run EXPERIMENT.yaml`)")
    frames = []
    for run in list_runs(out):
        status = json.loads((run / STATUS_FILE).read_text())
        rel = run.relative_to(out)
        meta = {"experiment": rel.parts[0], "run": str(rel), "run_status": status["status"],
                "run_error": status.get("error"), "run_seconds": status.get("seconds")}
        results = run / RESULTS_FILE
        table = pd.read_csv(results) if results.is_file() and results.stat().st_size else pd.DataFrame([{}])
        point = {k: (str(v) if isinstance(v, (list, dict)) else v)
                 for k, v in status.get("point", {}).items() if k not in table.columns}
        front = pd.DataFrame([{**meta, **point}] * len(table), index=table.index)
        frames.append(pd.concat([front, table], axis=1))
    columns = ["experiment", "run", "run_status", "run_error", "run_seconds"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
