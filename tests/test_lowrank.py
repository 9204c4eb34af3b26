"""Compressed experts (merge.lowrank): base + low-rank deltas, saved, loaded and exported."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

from segmoe_lab.merge import compressed_io
from segmoe_lab.merge import io as merge_io
from segmoe_lab.merge.config import ConfigError, CompressOptions, parse_config
from segmoe_lab.merge.deltas import choose_rank, delta_factors
from segmoe_lab.merge.lowrank import LowRankMoELayer, lowrank_bytes
from segmoe_lab.merge.moe import ROUTINGS, MoELayer, moe_layer
from segmoe_lab.merge.pipeline import SegMoEPipeline
from segmoe_lab.testing import full_and_compressed, perturbed_copies, unet_inputs

FULL = {"energy": 1.0}


def _config(routing="segmoe", top_k=2, **overrides):
    return parse_config({"base_model": "b", "type": "sd", "num_experts_per_tok": top_k, "routing": routing,
                         "experts": [{"source_model": str(i)} for i in range(3)], **overrides})


_experts = perturbed_copies


def _site(kind):
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    return {"linear": nn.Linear(8, 6), "geglu": FeedForward(8, activation_fn="geglu"),
            "module": nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))}[kind]


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("kind", ["linear", "geglu", "module"])
def test_full_rank_layer_computes_what_the_full_experts_compute(routing, kind):
    base = _site(kind)
    experts = _experts(base)
    gate = nn.Linear(8, 3, bias=False)
    full = MoELayer(experts, copy.deepcopy(gate), top_k=2, routing=routing)
    compressed = moe_layer(experts, _config(routing, compress=FULL), copy.deepcopy(gate), base=base)
    assert isinstance(compressed, LowRankMoELayer) and compressed.kind == kind
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), full(x), atol=1e-5, rtol=1e-5)


def test_energy_target_keeps_the_rank_of_an_exactly_low_rank_delta():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(12, 10, generator=g)
    delta = torch.randn(12, 3, generator=g) @ torch.randn(3, 10, generator=g)
    a, b = delta_factors(w0, w0 + delta, CompressOptions(energy=0.999999))
    assert a.shape == (3, 10) and b.shape == (12, 3)
    torch.testing.assert_close(b @ a, delta, atol=1e-4, rtol=1e-4)


def test_energy_target_picks_the_smallest_rank_reaching_the_share():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert [choose_rank(s, CompressOptions(energy=e)) for e in (0.5, 0.9, 0.95, 1.0)] == [1, 2, 3, 3]


def test_compress_options_need_exactly_one_target():
    with pytest.raises(ConfigError, match="exactly one of rank"):
        _config().updated(compress={"rank": 4, "energy": 0.9})


def test_gate_is_kept_as_given():
    base = _site("linear")
    gate = nn.Linear(8, 3, bias=False)
    layer = moe_layer(_experts(base), _config(compress={"rank": 1}), gate, base=base)
    assert layer.gate is gate


# --- whole merges ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merges(sd15_set):
    cfg = sd15_set.config(init="random", moe_layers="all", num_experts_per_tok=2)
    return full_and_compressed(cfg, FULL)


def _out(unet):
    with torch.no_grad():
        return unet(**unet_inputs(unet, batch=2)).sample


def test_full_rank_compressed_build_equals_the_uncompressed_merge(merges):
    full, compressed = merges
    assert all(isinstance(layer, LowRankMoELayer) for _, layer in compressed.moe_layers)
    torch.testing.assert_close(_out(compressed.unet), _out(full.unet), atol=1e-5, rtol=1e-5)


def test_low_rank_build_is_smaller_than_the_full_merge(sd15_set, merges):
    full, _ = merges
    cfg = sd15_set.config(init="random", moe_layers="all", compress={"rank": 1})
    small = SegMoEPipeline(cfg, device="cpu", progress=False)
    assert lowrank_bytes(small.unet)["total"] < lowrank_bytes(full.unet)["total"]


@pytest.fixture(scope="module")
def saved(merges, tmp_path_factory):
    return merges[1].save_pretrained(tmp_path_factory.mktemp("lowrank") / "compressed")


def test_compressed_folder_round_trips(merges, saved):
    assert merge_io.is_compressed(saved) and (saved / "unet" / merge_io.LOWRANK_WEIGHTS).is_file()
    loaded = SegMoEPipeline(saved, device="cpu")
    assert loaded.config.compress == CompressOptions(**FULL)
    torch.testing.assert_close(_out(loaded.unet), _out(merges[1].unet), atol=0, rtol=0)


def test_export_writes_segmoes_form_with_the_compressed_merges_outputs(merges, saved, tmp_path):
    out = compressed_io.export_merge(saved, tmp_path / "exported")
    ucfg = json.loads((out / "unet" / "config.json").read_text())
    assert merge_io.LOWRANK_KEY not in ucfg and ucfg["segmoe_config"] == merges[0].segmoe_config
    with safe_open(str(out / "unet" / merge_io.UNET_WEIGHTS), "pt") as f:
        assert set(f.keys()) == set(merges[0].unet.state_dict())  # segmoe's tensor names, full experts
    loaded = SegMoEPipeline(out, device="cpu")
    torch.testing.assert_close(_out(loaded.unet), _out(merges[1].unet), atol=1e-5, rtol=1e-5)


def test_compress_command_on_a_saved_merge_at_full_rank_keeps_its_outputs(merges, tmp_path):
    from segmoe_lab.cli import app

    plain = merges[0].save_pretrained(tmp_path / "plain")
    result = CliRunner().invoke(app, ["compress", str(plain), str(tmp_path / "c"), "--energy", "1.0"])
    assert result.exit_code == 0, result.output
    assert "against the base model" in result.output
    torch.testing.assert_close(_out(SegMoEPipeline(tmp_path / "c", device="cpu").unet), _out(merges[0].unet),
                               atol=1e-5, rtol=1e-5)


def test_estimate_of_a_compressed_folder_counts_its_saved_ranks(saved, merges):
    from segmoe_lab.merge.estimate import estimate

    assert estimate(saved).merge_unet == sum(p.numel() for p in merges[1].unet.parameters())


def test_expert_offload_serves_compressed_experts_with_the_same_outputs(merges):
    from segmoe_lab.merge.offload import enable_expert_offload

    twin = copy.deepcopy(merges[1].unet)
    with enable_expert_offload(twin, "cpu") as off:
        out = _out(twin)
        moved = off.stats().transferred_bytes
    assert moved > 0
    torch.testing.assert_close(out, _out(merges[1].unet), atol=0, rtol=0)
