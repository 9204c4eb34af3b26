"""Compressed experts at the extra layer kinds (merge.lowrank.LowRankSampleMoE), and the whole-UNet
switch built, saved, loaded, estimated and exported with them."""
import copy

import pytest
import torch
from torch import nn

from segmoe_lab.merge import compressed_io
from segmoe_lab.merge.config import parse_config
from segmoe_lab.merge.kinds import SampleMoE, extra_layer, iter_extra_layers
from segmoe_lab.merge.lowrank import LowRankSampleMoE, compress_unet, lowrank_bytes
from segmoe_lab.merge.pipeline import SegMoEPipeline
from segmoe_lab.testing import full_and_compressed, perturbed_copies, unet_inputs

FULL = {"energy": 1.0}


def _config(routing="per_sample", top_k=1, **overrides):
    return parse_config({"base_model": "b", "type": "sd", "num_experts_per_tok": top_k, "routing": routing,
                         "experts": [{"source_model": str(i)} for i in range(3)], **overrides})


_experts = perturbed_copies


SITES = {
    "conv3x3": lambda: nn.Conv2d(8, 6, 3, padding=1),
    "conv3x3_stride2": lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1),
    "conv1x1_no_bias": lambda: nn.Conv2d(8, 6, 1, bias=False),
    "linear": lambda: nn.Linear(8, 6),
    "grouped_conv": lambda: nn.Conv2d(8, 6, 3, padding=1, groups=2),  # runs with materialised weights
}


def _input(kind):
    torch.manual_seed(1)
    return torch.randn(4, 8) if kind == "linear" else torch.randn(4, 8, 6, 6)


@pytest.mark.parametrize("routing", ["per_sample", "segmoe"])
@pytest.mark.parametrize("kind", sorted(SITES))
def test_full_rank_extra_layer_computes_what_its_full_experts_compute(kind, routing):
    torch.manual_seed(0)
    base = SITES[kind]()
    experts = _experts(base)
    gate = nn.Linear(8, 3, bias=False)
    nn.init.normal_(gate.weight, std=3.0)  # the four samples go to different experts
    full = SampleMoE(experts, copy.deepcopy(gate), top_k=1, routing=routing)
    compressed = extra_layer(experts, _config(routing, compress=FULL), copy.deepcopy(gate), base=base)
    assert isinstance(compressed, LowRankSampleMoE)
    x = _input(kind)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), full(x), atol=1e-5, rtol=1e-5)


def test_top_two_mixing_matches_the_full_experts():
    torch.manual_seed(0)
    base = SITES["conv3x3"]()
    experts, gate = _experts(base), nn.Linear(8, 3, bias=False)
    full = SampleMoE(experts, copy.deepcopy(gate), top_k=2)
    compressed = extra_layer(experts, _config(top_k=2, compress=FULL), copy.deepcopy(gate), base=base)
    x = _input("conv3x3")
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), full(x), atol=1e-5, rtol=1e-5)


def test_rank_one_conv_delta_is_kept_exactly_at_rank_one():
    torch.manual_seed(0)
    base = SITES["conv3x3"]()
    expert = copy.deepcopy(base)
    with torch.no_grad():  # a delta of rank 1 once the kernel is folded to (out, in*kh*kw)
        expert.weight.add_((torch.randn(6, 1) @ torch.randn(1, 8 * 9)).view_as(expert.weight))
    layer = extra_layer([expert, copy.deepcopy(base)], _config(compress={"rank": 1}), base=base)
    assert layer.experts[0].ranks() == {"weight": 1}
    x = _input("conv3x3")
    with torch.no_grad():
        torch.testing.assert_close(layer.run_expert(0, x), expert(x), atol=1e-4, rtol=1e-4)


def test_norm_sites_stay_full_experts_under_compression():
    base = nn.GroupNorm(2, 8)
    layer = extra_layer(_experts(base), _config(compress={"rank": 1}), base=base)
    assert type(layer) is SampleMoE  # a norm's scale and shift are vectors: nothing to factor


# --- the whole-UNet switch, compressed --------------------------------------------------------------
@pytest.fixture(scope="module")
def switches(sd15_set):
    cfg = sd15_set.config(init="random", moe_layers="all", include_mid=True, moe_extra=["all"],
                          router="prompt", routing="per_sample")
    return full_and_compressed(cfg, FULL)


def _out(pipe):
    unet = pipe.unet
    inputs = unet_inputs(unet, batch=2)
    with torch.no_grad():
        return unet(**inputs).sample


def test_compressed_switch_build_factors_every_extra_kind_with_a_matrix(switches):
    _, compressed = switches
    layers = dict(iter_extra_layers(compressed.unet))
    plain = {p for p, layer in layers.items() if not isinstance(layer, LowRankSampleMoE)}
    assert any(isinstance(layer, LowRankSampleMoE) for layer in layers.values())
    assert plain and all(isinstance(layers[p].experts[0], (nn.GroupNorm, nn.LayerNorm)) for p in plain)


def test_full_rank_compressed_switch_equals_the_uncompressed_switch(switches):
    full, compressed = switches
    torch.testing.assert_close(_out(compressed), _out(full), atol=1e-5, rtol=1e-5)


def test_compressing_a_built_switch_at_full_rank_keeps_its_outputs(switches):
    full, _ = switches
    twin = copy.deepcopy(full.unet)
    compress_unet(twin, full.config.updated(compress=FULL))
    assert any(isinstance(layer, LowRankSampleMoE) for _, layer in iter_extra_layers(twin))
    with torch.no_grad():
        inputs = unet_inputs(twin, batch=2)
        torch.testing.assert_close(twin(**inputs).sample, full.unet(**inputs).sample, atol=1e-5, rtol=1e-5)


def test_low_rank_switch_is_smaller_than_the_full_switch(sd15_set, switches):
    full, _ = switches
    small = copy.deepcopy(full.unet)
    compress_unet(small, full.config.updated(compress={"rank": 1}))
    assert lowrank_bytes(small)["experts"] < lowrank_bytes(full.unet)["experts"]


@pytest.fixture(scope="module")
def saved_switch(switches, tmp_path_factory):
    return switches[1].save_pretrained(tmp_path_factory.mktemp("lowrank_switch") / "compressed")


def test_compressed_switch_folder_round_trips(switches, saved_switch):
    loaded = SegMoEPipeline(saved_switch, device="cpu")
    assert any(isinstance(layer, LowRankSampleMoE) for _, layer in iter_extra_layers(loaded.unet))
    torch.testing.assert_close(_out(loaded), _out(switches[1]), atol=0, rtol=0)


def test_estimate_of_a_compressed_switch_folder_counts_its_saved_ranks(switches, saved_switch):
    from segmoe_lab.merge.estimate import estimate

    assert estimate(saved_switch).merge_unet == sum(p.numel() for p in switches[1].unet.parameters())


def test_estimate_of_a_rank_config_counts_what_the_build_holds(sd15_set, switches):
    from segmoe_lab.merge.estimate import estimate

    cfg = switches[0].config.updated(compress={"rank": 2})
    torch.manual_seed(0)
    built = SegMoEPipeline(cfg, device="cpu", progress=False)
    assert estimate(cfg).merge_unet == sum(p.numel() for p in built.unet.parameters())


def test_export_of_a_compressed_switch_loads_with_the_same_outputs(switches, saved_switch, tmp_path):
    out = compressed_io.export_merge(saved_switch, tmp_path / "exported")
    loaded = SegMoEPipeline(out, device="cpu")
    assert not any(isinstance(layer, LowRankSampleMoE) for _, layer in iter_extra_layers(loaded.unet))
    torch.testing.assert_close(_out(loaded), _out(switches[1]), atol=1e-5, rtol=1e-5)


def test_a_switch_copied_with_copy_unet_routes_like_the_original(switches):
    import numpy as np

    from segmoe_lab.merge.prompt_router import copy_unet

    pipe = switches[0].pipe
    twin = copy.copy(pipe)
    twin.register_modules(unet=copy_unet(pipe.unet))
    assert twin.unet is not pipe.unet
    prompts = [switches[0].config.experts[0].positive_prompt, switches[0].config.experts[1].positive_prompt]

    def images(p):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return np.stack([np.asarray(im) for im in p(prompts, num_inference_steps=2, generator=gens, height=32, width=32).images])

    assert np.array_equal(images(twin), images(pipe))


@pytest.mark.parametrize("which", [0, 1], ids=["full", "compressed"])
def test_the_routers_one_choice_for_a_batch_gives_what_every_gate_computes(switches, which):
    import numpy as np

    from segmoe_lab.merge.prompt_router import iter_gates

    pipe = switches[which].pipe
    prompts = [switches[which].config.experts[0].positive_prompt] * 2

    def images():
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return np.stack([np.asarray(im) for im in pipe(prompts, num_inference_steps=2, generator=gens, height=32, width=32).images])

    fast = images()
    hooks = [layer.gate.register_forward_hook(lambda *a: None) for _, layer in iter_gates(pipe.unet)]  # every gate runs
    try:
        slow = images()
    finally:
        for h in hooks:
            h.remove()
    assert np.array_equal(fast, slow)
