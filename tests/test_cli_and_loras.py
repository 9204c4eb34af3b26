"""The CLI's build and generate, LoRA fusing into experts, and bad input that must leave nothing behind.

Uses the shipped toy models: the mosaic LoRA fits the SD 1.5-layout base and not the SDXL one.
"""
import pytest
import torch
from typer.testing import CliRunner

from segmoe_lab import toy
from segmoe_lab.merge.build import MergeError, build_merge
from segmoe_lab.cli import app
from segmoe_lab.merge.config import parse_config
from segmoe_lab.merge.moe import iter_moe_layers

P = toy.paths()


def lora_config(base: str, other_expert: str, model_type: str):
    return parse_config({"base_model": str(P[base]), "type": model_type, "num_experts": 2, "init": "random",
                         "moe_layers": "attn", "experts": [
                             {"source_model": str(P[base]), "positive_prompt": "three green squares, mosaic style",
                              "loras": [{"source_model": str(P["mosaic_lora"])}]},
                             {"source_model": str(P[other_expert]), "positive_prompt": "two blue triangles, flat style"}]})


def test_an_experts_lora_is_fused_into_that_expert_only():
    pipe = build_merge(lora_config("base", "flat", "sd"), device="cpu", progress=False)
    fused = toy.load_base()
    fused.load_lora_weights(str(P["mosaic_lora"]))
    fused.fuse_lora(components=["unet"])
    plain = toy.load_base().unet
    path, layer = next(iter_moe_layers(pipe.unet))
    torch.testing.assert_close(layer.experts[0].weight, fused.unet.get_submodule(path).weight)
    assert not torch.equal(layer.experts[0].weight, plain.get_submodule(path).weight)


def test_a_lora_for_another_architecture_fails_naming_it():
    with pytest.raises(MergeError, match="does not fit this model"):
        build_merge(lora_config("sdxl_base", "sdxl_flat", "sdxl"), device="cpu", progress=False)


def test_cli_build_with_a_misfit_lora_exits_2_and_writes_nothing(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(lora_config("sdxl_base", "sdxl_flat", "sdxl").to_yaml())
    result = CliRunner().invoke(app, ["build", str(config), str(tmp_path / "out")])
    assert result.exit_code == 2 and "does not fit" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = root / "toy.yaml"
    config.write_text(toy.merge_config(init="random").to_yaml())
    result = CliRunner().invoke(app, ["build", str(config), str(root / "merge"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root


def test_cli_build_writes_a_segmoe_folder(built):
    assert (built / "merge" / "unet" / "config.json").is_file()
    assert (built / "merge" / "model_index.json").is_file()


def test_cli_build_refuses_an_existing_output_folder_and_keeps_it(built):
    before = sorted(p.name for p in (built / "merge").rglob("*"))
    result = CliRunner().invoke(app, ["build", str(built / "toy.yaml"), str(built / "merge")])
    assert result.exit_code == 2 and "exists" in result.output
    assert sorted(p.name for p in (built / "merge").rglob("*")) == before


def test_cli_generate_writes_the_same_image_for_the_same_seed(built):
    from PIL import Image

    runner = CliRunner()
    for name in ("a.png", "b.png"):
        result = runner.invoke(app, ["generate", str(built / "merge"), "two pink circles, neon style", "--seed", "3",
                                     "--steps", "4", "-o", str(built / name)])
        assert result.exit_code == 0, result.output
    a, b = (Image.open(built / n) for n in ("a.png", "b.png"))
    assert a.tobytes() == b.tobytes()
