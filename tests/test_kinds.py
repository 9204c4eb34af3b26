"""MoE beyond attention and feed-forward: extra layer kinds, the whole-UNet switch, their save/load and cost."""
import typing

import pytest
import torch
from diffusers import UNet2DConditionModel

from segmoe_lab.merge import io as merge_io
from segmoe_lab.merge.build import build_merge
from segmoe_lab.merge.config import ConfigError, ExtraKind
from segmoe_lab.merge.estimate import estimate
from segmoe_lab.merge.kinds import EXTRA_KINDS, SampleMoE, find_extra_sites, iter_extra_layers
from segmoe_lab.testing import unet_inputs


def _out(unet, batch=2):
    with torch.no_grad():
        return unet(**unet_inputs(unet, batch=batch, seq_len=8)).sample


def _identical(fs, **overrides):
    """A merge of two copies of the base (every expert equals the base)."""
    cfg = fs.config(init="random", routing="per_sample", **overrides)
    return cfg.updated(experts=[e.model_copy(update={"source_model": str(fs.base)}) for e in cfg.experts])


def test_config_kinds_are_the_kinds_module_kinds():
    assert set(typing.get_args(ExtraKind)) == set(EXTRA_KINDS) | {"all"}


def test_an_unknown_extra_kind_names_the_choices(sd15_set):
    with pytest.raises(ConfigError, match="moe_extra.*resnets.*'resnet'"):
        sd15_set.config(moe_extra=["resnets"])


def test_resnet_sites_are_found_by_walking_modules(sd15_set):
    unet = UNet2DConditionModel.from_pretrained(sd15_set.base / "unet")
    sites = find_extra_sites(unet, ["resnet"])
    assert sites and all(".resnets." in s.path for s in sites)
    assert {s.path.rsplit(".", 1)[-1] for s in sites} >= {"conv1", "conv2", "time_emb_proj"}


def test_all_kinds_and_segmoe_sites_cover_every_parameter(sd15_set):
    pipe = build_merge(_identical(sd15_set, moe_layers="all", include_mid=True, moe_extra=["all"]), progress=False)
    plain = [n for n, _ in pipe.unet.named_parameters() if ".experts." not in n and ".gate." not in n]
    assert plain == []


@pytest.mark.parametrize("kind", sorted(EXTRA_KINDS))
def test_each_extra_kind_equals_the_base_when_experts_are_identical(sd15_set, kind):
    base = UNet2DConditionModel.from_pretrained(sd15_set.base / "unet")
    pipe = build_merge(_identical(sd15_set, moe_extra=[kind]), progress=False)
    assert any(True for _ in iter_extra_layers(pipe.unet))
    torch.testing.assert_close(_out(pipe.unet), _out(base), rtol=1e-5, atol=1e-5)


def test_whole_unet_switch_runs_each_samples_own_expert(sd15_set):
    cfg = sd15_set.config(init="uniform", routing="per_sample", router="prompt", moe_layers="all",
                          include_mid=True, moe_extra=["all"])
    unet = build_merge(cfg, progress=False).unet
    unet._forward_pre_hooks.clear()
    unet._forward_hooks.clear()  # decide by hand instead of from the text
    unet.segmoe_router.logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    merged = _out(unet)
    for i, folder in enumerate(sd15_set.experts):
        expert = UNet2DConditionModel.from_pretrained(folder / "unet")
        torch.testing.assert_close(merged[i], _out(expert)[i], rtol=1e-5, atol=1e-5)


def test_sample_moe_mixes_per_sample_choices():
    experts = [torch.nn.Conv2d(3, 4, 1) for _ in range(2)]
    layer = SampleMoE(experts, routing="per_sample")
    with torch.no_grad():
        layer.gate.weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]))
        x = torch.randn(2, 3, 5, 5)
        x[0, 0] += 10  # sample 0 -> expert 0
        x[1, 0] -= 10  # sample 1 -> expert 1
        out = layer(x)
        torch.testing.assert_close(out[0], experts[0](x[:1])[0])
        torch.testing.assert_close(out[1], experts[1](x[1:])[0])


@pytest.fixture(scope="module")
def extra_merge(fixture_sets, tmp_path_factory):
    fs = fixture_sets["sd15"]
    cfg = fs.config(moe_layers="all", init="discriminant", routing="per_sample", router="prompt",
                    moe_extra=["resnet", "norm", "time"], gate={"method": "fast", "probe_steps": 2})
    pipe = build_merge(cfg, progress=False)
    return pipe, cfg, merge_io.save_merge(pipe, tmp_path_factory.mktemp("extra") / "m", cfg)


def _image(pipe):
    return pipe(["a red circle", "a blue square"], num_inference_steps=2, output_type="np",
                generator=[torch.Generator().manual_seed(i) for i in range(2)]).images


def test_extra_kinds_router_and_biases_round_trip_save_load(extra_merge):
    pipe, _, folder = extra_merge
    loaded, cfg = merge_io.load_merge(folder)
    assert cfg.moe_extra == ["resnet", "norm", "time"]
    assert (_image(pipe) == _image(loaded)).all()


def test_segmoes_file_holds_no_extras_and_the_extras_file_does(extra_merge):
    from safetensors import safe_open

    _, _, folder = extra_merge
    with safe_open(str(folder / "unet" / merge_io.UNET_WEIGHTS), "pt") as f:
        main = list(f.keys())
    with safe_open(str(folder / "unet" / merge_io.EXTRAS_WEIGHTS), "pt") as f:
        extras = list(f.keys())
    assert "conv_in.weight" in main and not any(k.endswith(".gate.offset") or k.startswith("segmoe_router") for k in main)
    assert any(".resnets." in k and ".experts.1." in k for k in extras)
    assert "segmoe_router.weight" in extras and any(k.endswith(".gate.offset") for k in extras)


def test_loading_refuses_extras_that_do_not_match_the_config(extra_merge, tmp_path):
    import shutil

    _, _, folder = extra_merge
    copy_ = tmp_path / "m"
    shutil.copytree(folder, copy_)
    (copy_ / "unet" / merge_io.EXTRAS_WEIGHTS).unlink()
    with pytest.raises(merge_io.MergeFolderError, match="segmoe_lab_extras.safetensors is missing"):
        merge_io.load_merge(copy_)


def test_estimate_reports_the_cost_of_extra_kinds(sd15_set):
    plain = estimate(sd15_set.config())
    extra = estimate(sd15_set.config(moe_extra=["resnet"]))
    assert extra.merge_unet > plain.merge_unet and "moe_extra=['resnet']" in extra.title
    assert extra.sites > plain.sites


def test_whole_unet_switch_costs_every_expert_in_memory_but_one_per_step(sd15_set):
    cfg = sd15_set.config(moe_layers="all", include_mid=True, moe_extra=["all"], router="prompt", routing="per_sample")
    e = estimate(cfg)
    assert e.merge_unet >= 2 * e.base_unet  # every expert's whole UNet is held
    assert e.active_unet < 1.05 * e.base_unet  # one UNet (plus the small gates) runs per step
