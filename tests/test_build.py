"""Building merges on the tiny fixtures: parity with the base, segmoe's routing rule, bad input."""
import pytest
import torch

from segmoe_lab import sources
from segmoe_lab.merge.build import MergeError, build_merge
from segmoe_lab.merge.moe import ROUTINGS, iter_moe_layers, set_routing
from segmoe_lab.testing import LAYOUTS, unet_inputs


def _unet_out(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


@pytest.fixture(scope="module")
def base_unets(fixture_sets):
    out = {}
    for layout, fs in fixture_sets.items():
        pipe = sources.load_pipeline(sources.resolve_source(str(fs.base)), fs.model_type)
        out[layout] = pipe.unet
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("moe_layers", ["attn", "ff", "all"])
def test_merge_of_identical_experts_equals_the_base_for_every_routing(fixture_sets, base_unets, layout, moe_layers):
    fs = fixture_sets[layout]
    cfg = fs.config(experts=[{"source_model": str(fs.base), "positive_prompt": p} for p in ("a cat", "a dog", "a red car")],
                    moe_layers=moe_layers, num_experts_per_tok=2, init="random")
    merged = build_merge(cfg, progress=False).unet
    inputs = unet_inputs(base_unets[layout], batch=2, seed=0)
    expected = _unet_out(base_unets[layout], inputs)
    for routing in ROUTINGS:
        set_routing(merged, routing)
        torch.testing.assert_close(_unet_out(merged, inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_segmoe_routing_matches_a_plain_reimplementation_of_segmoes_rule(fixture_sets, base_unets, layout):
    fs = fixture_sets[layout]
    merged = build_merge(fs.config(moe_layers="all", num_experts_per_tok=1, gate={"method": "fast", "probe_steps": 2}),
                         progress=False).unet
    seen = []

    def check(layer, args, output):
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])  # segmoe: (batch * tokens, hidden)
        logits = flat @ layer.gate.weight.T
        chosen = torch.topk(logits.sum(0), layer.top_k).indices.tolist()
        w = torch.softmax(logits[:, chosen], dim=1)
        ref = sum(w[:, i:i + 1] * layer.experts[e](flat) for i, e in enumerate(chosen))
        torch.testing.assert_close(output.reshape(-1, output.shape[-1]), ref, rtol=1e-4, atol=1e-5)
        seen.append(chosen)

    handles = [layer.register_forward_hook(check) for _, layer in iter_moe_layers(merged)]
    _unet_out(merged, unet_inputs(base_unets[layout], batch=2, seed=1))
    for h in handles:
        h.remove()
    assert len(seen) == len(list(iter_moe_layers(merged)))
    assert len({tuple(c) for c in seen}) > 1, "hidden gates should not route every site to one expert"


def test_hidden_gate_rows_are_unit_vectors_one_per_expert(fixture_sets):
    fs = fixture_sets["sd15"]
    merged = build_merge(fs.config(gate={"method": "fast", "probe_steps": 1}), progress=False).unet
    for _, layer in iter_moe_layers(merged):
        w = layer.gate.weight
        assert w.shape[0] == len(fs.experts)
        torch.testing.assert_close(w.norm(dim=-1), torch.ones(w.shape[0]))


@pytest.mark.parametrize("gate", [{"reduce": "last"}, {"negative": "subtract"}, {"method": "exact", "steps": 2}])
def test_hidden_gate_options_change_the_gates(fixture_sets, gate):
    fs = fixture_sets["sd15"]
    base = {"method": "fast", "probe_steps": 2}
    a = build_merge(fs.config(gate=base), progress=False).unet
    b = build_merge(fs.config(gate={**base, **gate}), progress=False).unet
    wa = [l.gate.weight for _, l in iter_moe_layers(a)]
    wb = [l.gate.weight for _, l in iter_moe_layers(b)]
    assert any(not torch.allclose(x, y) for x, y in zip(wa, wb))


def test_experts_keep_their_own_site_weights(fixture_sets):
    fs = fixture_sets["sd15"]
    merged = build_merge(fs.config(init="uniform"), progress=False).unet
    path, layer = next(iter_moe_layers(merged))
    for i, expert_dir in enumerate(fs.experts):
        state = sources.read_unet_tensors(sources.resolve_source(str(expert_dir)), "sd", dict(merged.config),
                                          names=[f"{path}.weight"])
        torch.testing.assert_close(layer.experts[i].weight, state[f"{path}.weight"])


def test_mismatched_expert_architecture_fails_naming_the_first_tensor(fixture_sets):
    fs = fixture_sets["sd15"]
    cfg = fs.config(experts=[{"source_model": str(fs.experts[0]), "positive_prompt": "a"},
                             {"source_model": str(fixture_sets["sdxl"].experts[0]), "positive_prompt": "b"}], init="random")
    with pytest.raises(MergeError, match=r"tensor .*(weight|bias)"):
        build_merge(cfg, progress=False)


def test_mid_block_is_mixed_only_when_asked(fixture_sets):
    fs = fixture_sets["sd15"]
    merged = build_merge(fs.config(init="uniform", include_mid=True), progress=False).unet
    assert any(p.startswith("mid_block.") for p, _ in iter_moe_layers(merged))
    merged = build_merge(fs.config(init="uniform"), progress=False).unet
    assert not any(p.startswith("mid_block.") for p, _ in iter_moe_layers(merged))


def test_lora_only_config_splits_loras_across_copies_of_the_base():
    from segmoe_lab.merge.build import expert_specs
    from segmoe_lab.merge.config import parse_config

    cfg = parse_config({"base_model": "b", "num_experts": 2, "loras": [
        {"source_model": f"l{i}", "positive_prompt": f"p{i}"} for i in range(3)]})
    specs = expert_specs(cfg)
    assert [len(s.loras) for s in specs] == [2, 1]
    assert specs[0].positive == "p0 p1" and specs[0].source == "b"
