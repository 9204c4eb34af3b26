"""Oracles and baselines in a comparison: labels, variants, the site oracle, % of the model oracle, routing.

Comparisons run on the SD 1.5 fixture set (2 experts, 2 steps) with the tiny random CLIP of
``test_scoring``; the statistics on hand-made tables.
"""
import numpy as np
import pandas as pd
import pytest
import torch

from segmoe_lab.judge import compare
from segmoe_lab.judge.compare import CompareConfig, run_comparison
from segmoe_lab.judge.oracle import oracle_gains, share_of_oracle
from segmoe_lab.judge.variants import DEFAULT_VARIANTS, VARIANTS, plan_variants, prompt_labels
from test_scoring import make_tiny_clip

PROMPTS = pd.DataFrame({"prompt": ["a red cat", "a blue dog", "a green car", "a grey tree"],
                        "category": ["animal", "animal", "thing", "thing"], "expert": ["0", "expert_1", "1", ""]})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sd15_set):
    root = tmp_path_factory.mktemp("oracle")
    PROMPTS.to_csv(root / "labelled.csv", index=False)
    PROMPTS.drop(columns="expert").to_csv(root / "unlabelled.csv", index=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEGMOE_LAB_CACHE", str(root / "segmoe_cache"))
        yield {"merge": sd15_set.config(init="random", moe_layers="all"), "root": root,
               "clip": str(make_tiny_clip(root / "clip"))}


def cfg(setup, prompts="labelled", **overrides) -> CompareConfig:
    values = dict(merge=setup["merge"], prompts=str(setup["root"] / f"{prompts}.csv"), seeds=[0], sampling={"steps": 2},
                  scorers={"clip": {"model": setup["clip"]}}, cache_dir=str(setup["root"] / "images"), device="cpu",
                  progress=False)
    return CompareConfig.of(**{**values, **overrides})


@pytest.fixture(scope="module")
def labelled(setup):
    return run_comparison(cfg(setup))


# --- labels and plans ------------------------------------------------------------------------------

def test_expert_column_takes_indices_and_names_and_blank_means_unlabelled(setup):
    labels = prompt_labels(PROMPTS, setup["merge"])
    assert labels.tolist()[:3] == [0.0, 1.0, 1.0] and np.isnan(labels[3])


def test_category_naming_one_expert_is_a_label(setup):
    from segmoe_lab import toy

    table = pd.DataFrame({"prompt": ["x", "y"], "category": ["neon", "animal"]})
    labels = prompt_labels(table, toy.merge_config())
    assert labels[0] == 1.0 and np.isnan(labels[1])


def test_expert_label_naming_no_expert_is_an_error(setup):
    with pytest.raises(ValueError, match="names no single expert"):
        prompt_labels(PROMPTS.assign(expert="nobody"), setup["merge"])


def test_unlabelled_prompts_skip_the_oracles_with_a_note(setup):
    plan = plan_variants(["model_oracle", "uniform"], setup["merge"], PROMPTS.drop(columns="expert"))
    assert plan.names == ["uniform"] and any("model_oracle skipped" in n for n in plan.notes)


def test_default_variants_need_labels(setup):
    assert plan_variants(None, setup["merge"], PROMPTS.drop(columns="expert")).names == []
    assert plan_variants(None, setup["merge"], PROMPTS).names == list(DEFAULT_VARIANTS)


def test_site_oracle_is_a_one_expert_merge_with_the_merges_settings(setup):
    merges = VARIANTS["site_oracle"].configs(setup["merge"])
    one = merges["site_oracle_1"]
    assert len(merges) == 2 and one.num_experts == 1 and one.moe_layers == "all"
    assert one.experts[0] == setup["merge"].experts[1] and one.base_model == setup["merge"].base_model


def test_site_oracle_equals_the_base_with_the_experts_weights_at_the_moe_sites(setup, sd15_set):
    from diffusers import UNet2DConditionModel

    from segmoe_lab.merge.build import build_merge
    from segmoe_lab.merge.discovery import find_sites
    from segmoe_lab.testing import unet_inputs

    one = VARIANTS["site_oracle"].configs(setup["merge"])["site_oracle_1"]
    merged = build_merge(one, device="cpu", torch_dtype=torch.float32, progress=False).unet
    base = UNet2DConditionModel.from_pretrained(sd15_set.base / "unet")
    expert = UNet2DConditionModel.from_pretrained(sd15_set.experts[1] / "unet").state_dict()
    sites = find_sites(base, "all", include_mid=one.include_mid)
    state = base.state_dict()
    state.update({k: expert[k] for k in state if any(k.startswith(s.path + ".") for s in sites)})
    base.load_state_dict(state)
    inputs = unet_inputs(base)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).sample, base(**inputs).sample)


# --- statistics -------------------------------------------------------------------------------------

def test_share_of_oracle_is_the_ratio_of_mean_gains():
    pct, lo, hi = share_of_oracle(np.array([0.1, 0.0, 0.2, 0.1]), np.array([0.2, 0.2, 0.2, 0.2]))
    assert pct == pytest.approx(0.5) and lo <= 0.5 <= hi


def test_share_of_oracle_is_undefined_without_an_oracle_gain():
    assert np.isnan(share_of_oracle(np.array([0.1, 0.2]), np.array([0.0, 0.0]))[0])


def test_oracle_gains_put_the_oracle_at_100_and_the_base_at_0():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 0.5, 30)
    rows = [{"model": m, "prompt_id": i, "seed": 0, "scorer": "s", "score": s}
            for m, scores in (("base", base), ("model_oracle", base + 0.3), ("half", base + 0.15))
            for i, s in enumerate(scores)]
    table = oracle_gains(pd.DataFrame(rows), "s").set_index("model")
    assert table.pct_oracle["model_oracle"] == pytest.approx(1.0) and table.pct_oracle["base"] == 0
    assert table.pct_oracle["half"] == pytest.approx(0.5) and table.p_vs_base["half"] < 0.01


# --- comparisons -----------------------------------------------------------------------------------

def test_labelled_comparison_reports_every_default_variant(labelled):
    assert set(labelled.table.model) == {"merge", "base", "expert_0", "expert_1", *DEFAULT_VARIANTS}
    assert not labelled.table.model.str.startswith("site_oracle_").any()


def test_model_oracle_rows_are_the_labelled_experts_images(labelled):
    t = labelled.table.set_index(["model", "prompt_id"])
    assert t.loc[("model_oracle", 0), "image"] == t.loc[("expert_0", 0), "image"]
    assert t.loc[("model_oracle", 1), "image"] == t.loc[("expert_1", 1), "image"]
    assert 3 not in labelled.table[labelled.table.model == "model_oracle"].prompt_id.tolist()


def test_site_oracle_generates_only_each_experts_labelled_prompts(labelled):
    assert labelled.generated["site_oracle_0"] == 1 and labelled.generated["site_oracle_1"] == 2


def test_merge_images_come_with_their_routing(labelled):
    routing = labelled.routing()
    assert set(routing.model) == {"merge", "random", "uniform"}  # not the one-expert site oracles
    assert set(labelled.routes) == {"merge", "random"}  # uniform's zero gates tie: no routing accuracy to judge
    assert routing.groupby(["model", "prompt_id", "label"]).top1.sum().round(6).eq(1).all()


def test_oracle_table_has_percent_of_oracle_and_routing_accuracy(labelled):
    table = labelled.oracle_table(n_boot=200).set_index("model")
    assert table.pct_oracle["model_oracle"] == pytest.approx(1.0) or np.isnan(table.pct_oracle["model_oracle"])
    assert 0 <= table.routing_acc["merge"] <= 1 and np.isnan(table.routing_acc["uniform"])
    assert {"acc_self-attn", "acc_cross-kv", "acc_ff", "collapsed_sites"} <= set(table.columns)


def test_rerun_with_variants_regenerates_nothing(setup, labelled, monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "generate_image", lambda *a, **k: calls.append(a) or None)
    again = run_comparison(cfg(setup))
    assert calls == [] and sum(again.generated.values()) == 0


def test_unlabelled_comparison_has_no_oracle_rows_and_says_why(setup):
    result = run_comparison(cfg(setup, "unlabelled", models=["merge", "base"]))
    assert set(result.table.model) == {"merge", "base"} and any("no expert labels" in n for n in result.notes)


def test_unknown_variant_is_refused_with_the_choices(setup):
    with pytest.raises(ValueError, match="not known; choose any of"):
        cfg(setup, variants=["oracle"])


def test_report_grid_shows_oracle_columns(labelled, tmp_path):
    image = labelled.grid()
    assert image.width == 220 + 128 * labelled.table.model.nunique()


def test_routing_accuracy_per_site_covers_every_site_of_the_routed_models(labelled):
    per_site = labelled.routing_accuracy(by=["label"], n_boot=100)
    sites = labelled.routing().label.nunique()
    assert per_site.groupby("model").size().to_dict() == {"merge": sites, "random": sites}


def test_report_writes_the_oracle_table_and_routing_tables(labelled, tmp_path):
    labelled.report(tmp_path, n_boot=100)
    for name in ("oracle_table.csv", "routing_accuracy.csv", "routing_accuracy_by_site.csv", "utilisation.csv"):
        assert (tmp_path / name).is_file(), name
    assert "model_oracle" in pd.read_csv(tmp_path / "oracle_table.csv").model.tolist()
