"""The tiny fixtures mirror the real layouts, generate images, and load the same from every form."""
import numpy as np
import pytest
import torch

from segmoe_lab.sources import layouts
from segmoe_lab.testing import LAYOUTS, make_pipeline, perturb_unet, unet_inputs

SINGLE_FILE_LAYOUTS = ["sd15", "sdxl", "ssd1b"]


def _built_depths(unet) -> dict[str, list[int]]:
    """Transformer blocks per attention module, read from the built modules (not the config)."""
    out = {}
    for prefix, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        for i, block in enumerate(blocks):
            if hasattr(block, "attentions"):
                out[f"{prefix}.{i}"] = [len(a.transformer_blocks) for a in block.attentions]
    if hasattr(unet.mid_block, "attentions") and len(unet.mid_block.attentions):
        out["mid"] = [len(a.transformer_blocks) for a in unet.mid_block.attentions]
    return out


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_generates_a_64px_image_in_two_steps(layout):
    pipe = make_pipeline(layout)
    image = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fixture_unets_have_the_real_per_block_transformer_depths(layout):
    real = layouts.unet_config(layout)
    unet = make_pipeline(layout).unet
    assert _built_depths(unet) == layouts.transformer_depths(real)
    assert [type(b).__name__ for b in unet.down_blocks] == real["down_block_types"]
    assert [type(b).__name__ for b in unet.up_blocks] == real["up_block_types"]
    assert type(unet.mid_block).__name__ == real.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    assert [len(b.resnets) for b in unet.down_blocks] == [real["layers_per_block"]] * len(real["down_block_types"])


def test_real_depths_match_the_published_architectures():
    depths = {layout: layouts.transformer_depths(layouts.unet_config(layout)) for layout in LAYOUTS}
    assert depths["sdxl"] == {"down.1": [2, 2], "down.2": [10, 10], "mid": [10], "up.0": [10] * 3, "up.1": [2] * 3}
    assert depths["ssd1b"] == {"down.1": [2, 2], "down.2": [4, 4], "up.0": [4, 4, 10], "up.1": [2, 1, 1]}
    assert depths["vega"] == {"down.1": [1, 1], "down.2": [2, 2], "up.0": [2, 2, 2], "up.1": [1, 1, 1]}
    assert set(depths["sd15"]) == {"down.0", "down.1", "down.2", "mid", "up.1", "up.2", "up.3"}


def test_the_same_seed_builds_the_same_weights_and_another_seed_does_not():
    a, b, c = make_pipeline("vega", seed=3), make_pipeline("vega", seed=3), make_pipeline("vega", seed=4)
    _assert_same_weights(a.unet, b.unet)
    _assert_same_weights(a.text_encoder_2, b.text_encoder_2)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_different_prompts_give_different_token_ids():
    tok = make_pipeline("sd15").tokenizer
    ids = [tok(p).input_ids for p in ("a red cat", "a blue dog", "a red car")]
    assert len({tuple(i) for i in ids}) == 3


def test_offline_clip_tokenizer_gives_openai_clips_token_ids():
    tok = layouts.clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_perturbed_experts_differ_from_the_base_but_keep_every_shape(sd15_set):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(sd15_set.base / "unet").state_dict()
    expert = UNet2DConditionModel.from_pretrained(sd15_set.experts[0] / "unet").state_dict()
    assert {k: v.shape for k, v in base.items()} == {k: v.shape for k, v in expert.items()}
    changed = [k for k in base if not torch.equal(base[k], expert[k])]
    assert changed == [k for k in base if base[k].any()]  # all but all-zero tensors (e.g. fresh norm biases)
    rel = max(((expert[k] - base[k]).norm() / base[k].norm()).item() for k in changed)
    assert rel < 0.2, "an expert should stay close to its base, as a fine-tune does"


def test_perturbation_is_deterministic_per_seed():
    unet = make_pipeline("sd15").unet
    a, b, c = (perturb_unet(make_pipeline("sd15").unet, seed=s) for s in (1, 1, 2))
    _assert_same_weights(a, b)
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)
    assert not torch.equal(a.conv_in.weight, unet.conv_in.weight)


@pytest.mark.parametrize("layout", SINGLE_FILE_LAYOUTS)
def test_single_file_and_folder_load_identical_unet_weights(fixture_sets, layout):
    from diffusers import UNet2DConditionModel

    fs = fixture_sets[layout]
    folder = UNet2DConditionModel.from_pretrained(fs.experts[1] / "unet")
    single = UNet2DConditionModel.from_single_file(str(fs.single_files[1]), config=str(fs.base), subfolder="unet",
                                                   local_files_only=True)
    _assert_same_weights(single, folder)


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_single_file_loads_as_a_whole_pipeline_with_identical_weights(fixture_sets, layout):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    fs = fixture_sets[layout]
    cls = StableDiffusionPipeline if fs.model_type == "sd" else StableDiffusionXLPipeline
    extra = {"safety_checker": None, "requires_safety_checker": False} if fs.model_type == "sd" else {}
    single = cls.from_single_file(str(fs.single_files[0]), config=str(fs.base), local_files_only=True, **extra)
    folder = cls.from_pretrained(fs.experts[0], local_files_only=True, **extra)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(folder, name, None) is not None:
            _assert_same_weights(getattr(single, name), getattr(folder, name))


def test_fixture_set_config_is_a_valid_merge_over_its_experts(sd15_set):
    cfg = sd15_set.config(moe_layers="all", num_experts_per_tok=2)
    assert (cfg.type, cfg.moe_layers, cfg.num_experts, cfg.num_experts_per_tok) == ("sd", "all", 2, 2)
    assert [e.source_model for e in cfg.experts] == [str(p) for p in sd15_set.experts]
    assert len({e.positive_prompt for e in cfg.experts}) == 2
    single = sd15_set.config(single_file=True)
    assert all(e.source_model.endswith(".safetensors") for e in single.experts)


@pytest.mark.parametrize("layout", ["sd15", "ssd1b"])
def test_unet_inputs_fit_the_unet(layout):
    unet = make_pipeline(layout).unet
    with torch.no_grad():
        out = unet(**unet_inputs(unet, batch=2, seed=0)).sample
    assert out.shape == (2, 4, 32, 32)
