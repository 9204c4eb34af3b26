"""Gate diagnostics: collapse, routing accuracy against chance and self-routing, each on a case built to
trigger it and on a healthy one; identical expert prompts on a real (fixture) merge collapse."""
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest

from segmoe_lab.observe.gate_health import (
    collapsed_sites,
    gate_health,
    health_from_shares,
    routing_accuracy,
    self_routing,
    utilisation_entropy,
)


def shares(top1_of_prompt, n_experts=3, site="s0", kind="self-q"):
    """A top1_shares-like frame: prompt i at ``site`` puts all its decisions on ``top1_of_prompt[i]``."""
    rows = [{"prompt_index": i, "prompt": f"p{i}", "label": site, "kind": kind, "expert": e,
             "top1": float(e == top), "chosen": float(e == top)}
            for i, top in enumerate(top1_of_prompt) for e in range(n_experts)]
    return pd.DataFrame(rows)


BALANCED = [0, 1, 2] * 10  # a router that follows 30 labels perfectly
LABELS = [0, 1, 2] * 10


def test_site_sending_everything_to_one_expert_is_collapsed():
    found = collapsed_sites(shares([1] * 30, site="down0.a0.t0 cross-k"))
    assert found.label.tolist() == ["down0.a0.t0 cross-k"] and found.top_expert.item() == 1


def test_balanced_site_is_not_collapsed():
    assert collapsed_sites(shares(BALANCED)).empty


def test_low_entropy_below_the_share_threshold_is_collapsed():
    split = [0] * 24 + [1] * 6  # 80/20/0: under 90 % to one expert, entropy 0.46 of the maximum
    found = collapsed_sites(shares(split))
    assert len(found) == 1 and "entropy" in found.why.item() and "top share" not in found.why.item()


def test_utilisation_entropy_is_one_when_even_and_zero_on_one_expert():
    assert utilisation_entropy(np.ones(3)) == pytest.approx(1.0) and utilisation_entropy(np.array([1.0, 0, 0])) == 0


def test_routing_accuracy_per_kind_has_a_ci_over_prompts():
    frame = pd.concat([shares(BALANCED, kind="ff", site="a"), shares([0] * 30, kind="cross-k", site="b")])
    table = routing_accuracy(frame, LABELS, by="group").set_index("group")
    assert table.accuracy["ff"] == 1 and table.accuracy["cross-kv"] == pytest.approx(1 / 3)
    assert table.ci_low["cross-kv"] < 1 / 3 < table.ci_high["cross-kv"] and table.n_prompts["ff"] == 30


def test_kind_routing_at_chance_warns():
    health = health_from_shares(shares(list(np.random.default_rng(0).integers(0, 3, 30))), LABELS, n_boot=200)
    assert any(w.startswith("chance: self-attn") for w in health.warnings)


def test_routing_that_follows_labels_warns_nothing():
    health = health_from_shares(shares(BALANCED), LABELS, n_boot=200)
    assert health.warnings == [] and health.collapsed.empty and "no warnings" in str(health)


def test_collapse_warning_names_the_site():
    health = health_from_shares(shares([2] * 30, site="up1.a2.t0 ff"), n_boot=200)
    assert len(health.warnings) == 1 and "up1.a2.t0 ff (expert 2, 100%)" in health.warnings[0]


def test_expert_whose_own_prompt_routes_elsewhere_warns():
    rows = pd.DataFrame({"expert": [0, 0, 1, 1], "prompt": ["a", "a", "b", "b"], "label": ["s0", "s1"] * 2,
                         "kind": ["ff"] * 4, "self": [1.0, 1.0, 0.0, 0.0], "loo": False})
    health = health_from_shares(shares(BALANCED), LABELS, rows, n_boot=200)
    assert [w for w in health.warnings if w.startswith("self-routing")] == [
        "self-routing: expert 1's own prompts route to it at only 0% of the sites"]


def test_self_routing_leaves_each_prompt_out_when_an_expert_has_several():
    refits = []

    @contextmanager
    def refit(expert, j):
        refits.append((expert, j))
        yield

    record = lambda prompts: shares([0])  # noqa: E731  (every prompt routes to expert 0)
    rows = self_routing(record, [["a", "b"], ["c"]], refit)
    assert refits == [(0, 0), (0, 1)]  # expert 1 has one prompt: judged in-sample, no refit
    assert rows.groupby("expert").loo.first().tolist() == [True, False]
    assert rows.groupby("expert")["self"].mean().tolist() == [1.0, 0.0]


@pytest.fixture(scope="module")
def identical_prompt_merge(sd15_set):
    import torch

    from segmoe_lab.merge.pipeline import SegMoEPipeline

    cfg = sd15_set.config(moe_layers="all", experts=[{"source_model": str(e), "positive_prompt": "a photo of a cat"}
                                                     for e in sd15_set.experts])
    torch.manual_seed(0)
    return SegMoEPipeline(cfg, device="cpu", torch_dtype="float32", progress=False)


def test_identical_expert_prompts_are_flagged_as_collapsed(identical_prompt_merge):
    prompts = ["a red cat", "a blue dog", "a green car", "a grey tree", "a big house", "a small boat"]
    health = gate_health(identical_prompt_merge, prompts, labels=[0, 1] * 3, steps=2, guidance_scale=3.0)
    n_sites = len(identical_prompt_merge.moe_layers)
    # Perturbed experts make the rows nearly, not exactly, equal: most sites collapse, the rest flip on noise.
    assert len(health.collapsed) > n_sites / 2 and any(w.startswith("collapse:") for w in health.warnings)
