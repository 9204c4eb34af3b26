"""The merge config: segmoe's examples load; every malformed config fails naming the bad field."""
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from segmoe_lab.cli import app
from segmoe_lab.merge.config import ConfigError, MergeConfig, load_config, parse_config, summarize

EXAMPLES = Path(__file__).parent / "data" / "segmoe_examples"
SEGMOE_EXAMPLES = sorted(EXAMPLES.glob("segmoe_config_*.yaml"))
EXPERIMENTS = Path(__file__).parent.parent / "experiments"

GOOD = """\
base_model: base/model
type: sd
experts:
  - source_model: expert/one
    positive_prompt: red
  - source_model: expert/two
    positive_prompt: blue
"""


def _with(extra: str) -> str:
    return GOOD + extra


def _expert(extra: str) -> str:
    return GOOD.replace("    positive_prompt: red\n", "    positive_prompt: red\n" + extra)


# (id, YAML text, substrings the error message must contain)
BAD_CONFIGS = [
    ("unknown-top-key", _with("num_expert: 2\n"), ["num_expert", "unknown key", "num_experts_per_tok"]),
    ("unknown-expert-key", _expert("    prompt: x\n"), ["experts.0.prompt", "unknown key", "positive_prompt"]),
    ("unknown-lora-key", _with("loras:\n  - source_model: l\n    weight: 0.5\n"), ["loras.0.weight", "scale"]),
    ("unknown-expert-lora-key", _expert("    loras:\n      - source_model: l\n        strength: 1\n"),
     ["experts.0.loras.0.strength", "unknown key", "scale"]),
    ("unknown-gate-key", _with("gate:\n  methd: fast\n"), ["gate.methd", "unknown key", "method"]),
    ("num-experts-not-int", _with("num_experts: two\n"), ["num_experts", "integer", "'two'"]),
    ("num-experts-zero", _with("num_experts: 0\n"), ["num_experts", "greater than or equal to 1"]),
    ("num-experts-disagrees", _with("num_experts: 3\n"), ["num_experts", "is 3", "experts lists 2"]),
    ("top-k-above-experts", _with("num_experts_per_tok: 3\n"), ["num_experts_per_tok", "is 3", "only 2 experts"]),
    ("moe-layers-unknown", _with("moe_layers: attention\n"), ["moe_layers", "'attention'", "'ff', 'attn' or 'all'"]),
    ("type-unknown", GOOD.replace("type: sd", "type: sd3"), ["type", "'sd3'", "'sd' or 'sdxl'"]),
    ("init-unknown", _with("init: zeros\n"), ["init", "'zeros'", "['discriminant', 'hidden', 'random', 'uniform']"]),
    ("routing-unknown", _with("routing: topk\n"), ["routing", "'topk'", "'per_token'"]),
    ("scheduler-unknown", _with("scheduler: dpm++\n"), ["scheduler", "'dpm++'", "'euler_a'"]),
    ("dtype-unknown", _with("dtype: fp16\n"), ["dtype", "'fp16'", "'float16'"]),
    ("gate-method-unknown", _with("gate:\n  method: slow\n"), ["gate.method", "'slow'", "'exact' or 'fast'"]),
    ("gate-steps-zero", _with("gate:\n  steps: 0\n"), ["gate.steps", "greater than or equal to 1"]),
    ("gate-not-mapping", _with("gate: fast\n"), ["gate", "dictionary", "'fast'"]),
    ("experts-not-list", "base_model: b\nexperts: expert/one\n", ["experts", "valid list", "'expert/one'"]),
    ("expert-not-mapping", "base_model: b\nexperts:\n  - expert/one\n", ["experts.0", "dictionary", "'expert/one'"]),
    ("expert-missing-source", "base_model: b\nexperts:\n  - positive_prompt: x\n",
     ["experts.0.source_model", "required"]),
    ("expert-empty-source", "base_model: b\nexperts:\n  - source_model: ''\n", ["experts.0.source_model", "at least 1"]),
    ("prompt-not-string", _expert("    negative_prompt: [a, b]\n"), ["experts.0.negative_prompt", "valid string"]),
    ("include-mid-not-bool", _with("include_mid: maybe\n"), ["include_mid", "boolean", "'maybe'"]),
    ("no-experts", "base_model: b\ntype: sd\n", ["experts", "at least one expert"]),
    ("missing-base-model", GOOD.replace("base_model: base/model\n", ""), ["base_model", "required"]),
    ("base-model-null", GOOD.replace("base_model: base/model", "base_model:"), ["base_model", "valid string"]),
    ("several-errors", _with("dtype: fp16\nrouting: topk\nfoo: 1\n"), ["3 problem(s)", "dtype", "routing", "foo"]),
    ("several-count-errors", _with("num_experts: 3\nnum_experts_per_tok: 4\n"),
     ["2 problem(s)", "num_experts: is 3", "num_experts_per_tok: is 4"]),
    ("empty-file", "", ["empty"]),
    ("comments-only", "# nothing here\n", ["empty"]),
    ("yaml-list", "- base_model: b\n", ["mapping", "list"]),
    ("yaml-scalar", "just a string\n", ["mapping", "str"]),
    ("invalid-yaml", "base_model: b\nexperts: [unclosed\n", ["not valid YAML", "line"]),
    ("tab-indent", "base_model: b\nexperts:\n\t- source_model: x\n", ["not valid YAML"]),
    ("duplicate-key", GOOD + "base_model: other\n", ["not valid YAML", "'base_model' is given twice"]),
]


@pytest.mark.parametrize("path", SEGMOE_EXAMPLES, ids=lambda p: p.stem)
def test_segmoe_example_configs_validate(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.num_experts == raw["num_experts"] == len(cfg.experts)
    assert (cfg.moe_layers, cfg.num_experts_per_tok, cfg.type) == (raw["moe_layers"], raw["num_experts_per_tok"], raw["type"])
    # segmoe-lab's additions take segmoe's behaviour by default
    assert (cfg.routing, cfg.init, cfg.scheduler) == ("segmoe", "hidden", "ddpm")
    assert cfg.to_segmoe_dict()["experts"] == raw["experts"]


def test_readme_template_keys_are_all_known_and_each_placeholder_is_named():
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLES / "readme_template.yaml")
    msg = str(info.value)
    assert "unknown key" not in msg
    assert "4 problem(s)" in msg
    for field in ("num_experts:", "moe_layers:", "num_experts_per_tok:", "type:"):
        assert f"  - {field}" in msg


@pytest.mark.parametrize("name", ["segmoe_2x1", "segmoe_4x2", "segmoe_sd_4x2", "segmoe_turbo"])
def test_experiment_copies_validate_and_match_segmoe(name):
    cfg = load_config(EXPERIMENTS / f"{name}.yaml")
    upstream = {"segmoe_2x1": "2x1", "segmoe_4x2": "4x2", "segmoe_sd_4x2": "sd", "segmoe_turbo": "turbo"}[name]
    original = load_config(EXAMPLES / f"segmoe_config_{upstream}.yaml")
    expected = original.model_copy(update={"scheduler": "euler_a"}) if name == "segmoe_turbo" else original
    assert cfg == expected


@pytest.mark.parametrize("case_id, text, expected", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_malformed_config_fails_naming_the_field(tmp_path, case_id, text, expected):
    path = tmp_path / f"{case_id}.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    for part in expected:
        assert part in msg, f"{part!r} missing from:\n{msg}"


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="no-such.yaml: no such config file"):
        load_config(tmp_path / "no-such.yaml")


def test_parse_config_rejects_non_mapping():
    with pytest.raises(ConfigError, match="mapping.*got list"):
        parse_config([{"base_model": "b"}])


def test_to_yaml_round_trips():
    cfg = parse_config({
        "base_model": "b", "type": "sdxl", "routing": "per_token", "scheduler": "euler_a", "init": "random",
        "gate": {"method": "fast", "reduce": "last", "guidance_scale": 5.0},
        "experts": [{"source_model": "e1", "positive_prompt": "ünïcode: 'quotes', #hash",
                     "loras": [{"source_model": "l1", "scale": 0.5}]},
                    {"source_model": "e2", "negative_prompt": "multi\nline"}],
        "loras": [{"source_model": "l0"}],
    })
    again = parse_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.to_yaml() == cfg.to_yaml()


@pytest.mark.parametrize("path", SEGMOE_EXAMPLES, ids=lambda p: p.stem)
def test_examples_round_trip_through_to_yaml(tmp_path, path):
    cfg = load_config(path)
    out = tmp_path / "again.yaml"
    out.write_text(cfg.to_yaml())
    assert load_config(out) == cfg


def test_segmoe_stored_config_parses():
    # what segmoe writes into unet/config.json["segmoe_config"]: derived block ranges included
    stored = {"base_model": "b", "num_experts": 2, "moe_layers": "attn", "num_experts_per_tok": 1, "type": "sd",
              "experts": [{"source_model": "x"}, {"source_model": "y"}],
              "up_idx_start": 1, "up_idx_end": 4, "down_idx_start": 0, "down_idx_end": 3}
    assert isinstance(parse_config(stored), MergeConfig)


# --- CLI ------------------------------------------------------------------------------------------

def test_cli_validate_prints_summary():
    result = CliRunner().invoke(app, ["validate", str(EXAMPLES / "segmoe_config_4x2.yaml")])
    assert result.exit_code == 0, result.output
    assert result.output == summarize(load_config(EXAMPLES / "segmoe_config_4x2.yaml")) + "\n"
    assert "4x2 sdxl merge of SG161222/RealVisXL_V3.0" in result.output


def test_cli_validate_reports_errors_without_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(_with("dtype: fp16\nfoo: 1\n"))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "error:" in result.output and "dtype" in result.output and "foo" in result.output


def test_cli_validate_missing_file(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "no such config file" in result.output


def test_updated_changes_coupled_fields_together():
    cfg = parse_config({"base_model": "b", "num_experts_per_tok": 2,
                        "experts": [{"source_model": "x"}, {"source_model": "y"}]})
    one = cfg.updated(experts=[cfg.experts[1]], num_experts=1, num_experts_per_tok=1)
    assert (one.num_experts, one.num_experts_per_tok, one.experts[0].source_model) == (1, 1, "y")
    assert cfg.num_experts == 2  # a copy: the original is unchanged


def test_updated_names_the_bad_value():
    cfg = parse_config({"base_model": "b", "experts": [{"source_model": "x"}]})
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        cfg.updated(num_experts_per_tok=5)
    with pytest.raises(ConfigError, match="unknown config field"):
        cfg.updated(top_k=1)
