"""The README's main job (`segmoe-lab demo`) end to end on the toy world, shortened to 3 prompts."""
import pandas as pd
import pytest
from typer.testing import CliRunner

from segmoe_lab.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--n-prompts", "3", "--gate-prompts", "6", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def test_demo_writes_the_merge_tables_grid_and_gate_heatmap(report):
    for name in ("merge/unet/config.json", "results.csv", "summary.csv", "paired.csv", "grids/seed_0.png",
                 "gates.png", "gate_routing.csv", "oracle_table.csv", "gate_health.txt", "README.md"):
        assert (report / name).is_file(), name


def test_demo_scores_every_model_on_every_prompt_with_both_scorers(report):
    table = pd.read_csv(report / "results.csv")
    assert set(table.model) == {"merge", "base", "expert_0", "expert_1", "expert_2",
                                "model_oracle", "site_oracle", "uniform", "random"}
    assert set(table.scorer) == {"clip", "toy_truth"}
    assert len(table) == 9 * 3 * 2


def test_demo_readme_opens_with_the_oracle_table_and_gate_health(report):
    text = (report / "README.md").read_text()
    assert text.index("% of model oracle") < text.index("## Mean score per model")
    assert "Gate health on 6 prompts (toy_heldout)" in text


def test_demo_readme_reports_the_measured_means(report):
    summary = pd.read_csv(report / "summary.csv")
    merge_truth = summary[(summary.scorer == "toy_truth") & (summary.model == "merge")]["mean"].item()
    assert f"{merge_truth:.3f}" in (report / "README.md").read_text()


def test_demo_rerun_regenerates_nothing(report):
    result = CliRunner().invoke(app, ["demo", "--out", str(report), "--n-prompts", "3", "--gate-prompts", "6", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "images generated this run: 0" in (report / "README.md").read_text()
