"""The experiment runner: YAML validation, a grid with a failing point, and collecting the runs."""
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from segmoe_lab.cli import app
from segmoe_lab.runner import ExperimentError, collect_runs, load_experiment, run_experiment

PROBE = Path(__file__).parent / "data" / "notebooks" / "runner_probe.ipynb"  # raises when value == fail_on


def write_experiment(folder: Path, name: str = "probe", **fields) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"notebook": str(PROBE), **fields}))
    return path


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """`segmoe-lab run --grid` over value in [1, 2, 3] with value 2 failing."""
    root = tmp_path_factory.mktemp("grid")
    exp = write_experiment(root, parameters={"fail_on": 2}, grid={"value": [1, 2, 3]})
    result = CliRunner().invoke(app, ["run", str(exp), "--grid", "--out", str(root / "runs")])
    return root / "runs", result


def test_grid_records_the_failed_point_and_goes_on(grid_run):
    out, result = grid_run
    assert result.exit_code == 1, result.output  # a failed point fails the command, after the whole grid
    assert "2 ok, 1 failed" in result.output
    points = sorted((out / "probe").glob("*/point-*"))
    assert [p.name for p in points] == ["point-00", "point-01", "point-02"]
    status = [json.loads((p / "status.json").read_text()) for p in points]
    assert [s["status"] for s in status] == ["ok", "failed", "ok"]
    assert "ValueError: value=2 fails on purpose" in status[1]["error"]
    assert status[2]["point"] == {"value": 3}
    for p in points:  # every run keeps its notebook, parameters and environment
        assert (p / "runner_probe.ipynb").is_file()
        params = yaml.safe_load((p / "parameters.yaml").read_text())
        assert params["fail_on"] == 2 and params["output_dir"] == str(p.resolve())
        env = json.loads((p / "environment.json").read_text())
        assert env["packages"]["papermill"] and "commit" in env["git"] and "cuda" in env["device"]


def test_runs_collects_every_table(grid_run, tmp_path):
    out, _ = grid_run
    table = collect_runs(out)
    assert len(table) == 2 + 1 + 2  # two result rows per ok run, one row for the failed run
    assert table.groupby("value")["run_status"].first().to_dict() == {1: "ok", 2: "failed", 3: "ok"}
    assert set(table.loc[table.run_status == "ok", "square"]) == {1, 9}
    assert table.loc[table.run_status == "failed", "run_error"].str.contains("fails on purpose").all()
    csv = tmp_path / "all.csv"
    result = CliRunner().invoke(app, ["runs", "--out", str(out), "-o", str(csv)])
    assert result.exit_code == 0, result.output
    assert "failed" in result.output and csv.is_file()


def test_single_run_uses_parameters_only(tmp_path):
    exp = write_experiment(tmp_path, parameters={"value": 5})
    (result,) = run_experiment(exp, out=tmp_path / "runs")
    assert result.status == "ok" and result.path.parent.name == "probe"  # runs/probe/<timestamp>/
    assert (result.path / "results.csv").read_text().splitlines()[1].startswith("5,25")


@pytest.mark.parametrize("fields, message", [
    ({"notebok": "x.ipynb"}, "notebok: unknown key"),
    ({"parameters": {"valeu": 1}}, "'valeu' is not a parameter of runner_probe.ipynb; its parameters are: value, fail_on"),
    ({"parameters": {"value": 1}, "grid": {"value": [2]}}, "'value' is both in parameters and in grid"),
    ({"parameters": {"output_dir": "x"}}, "'output_dir' is set by the runner"),
    ({"grid": {"value": []}}, "grid.value: an empty list gives no runs"),
    ({"timeout": -1}, "timeout: Input should be greater than 0"),
])
def test_bad_experiments_fail_with_a_clear_message(tmp_path, fields, message):
    with pytest.raises(ExperimentError) as err:
        load_experiment(write_experiment(tmp_path, **fields))
    assert message in str(err.value)


def test_other_mistakes_are_named(tmp_path):
    merge = tmp_path / "merge.yaml"
    merge.write_text("base_model: x\nexperts: []\n")
    with pytest.raises(ExperimentError, match="is a merge config, not an experiment"):
        load_experiment(merge)
    missing = tmp_path / "m.yaml"
    missing.write_text("notebook: nowhere.ipynb\n")
    with pytest.raises(ExperimentError, match="does not exist"):
        load_experiment(missing)
    with pytest.raises(ExperimentError, match="--grid given but the experiment has no `grid:`"):
        run_experiment(write_experiment(tmp_path), grid=True, out=tmp_path / "runs")
    result = CliRunner().invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "no such experiment file" in result.output
