"""Saving and loading merges in segmoe's folder format; nothing half-written on failure."""
import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from segmoe_lab.merge import io as merge_io
from segmoe_lab.merge.config import SEGMOE_DERIVED_KEYS
from segmoe_lab.merge.pipeline import SegMoEPipeline

SEGMOE_KEY = re.compile(r"^(down|up)_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.\d+\."
                        r"(ff|attn[12]\.to_[qkv])\.(gate\.weight|experts\.\d+\..+)$")


@pytest.fixture(scope="module")
def built(fixture_sets):
    fs = fixture_sets["sd15"]
    return SegMoEPipeline(fs.config(moe_layers="all", num_experts_per_tok=2, gate={"method": "fast", "probe_steps": 2}),
                          device="cpu", progress=False)


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    return built.save_pretrained(tmp_path_factory.mktemp("merge") / "out")


def _image(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a red circle", num_inference_steps=3, generator=g, output_type="np").images


def test_save_then_load_gives_identical_images(built, saved):
    loaded = SegMoEPipeline(saved, device="cpu")
    np.testing.assert_allclose(_image(loaded), _image(built), atol=1e-6)


def test_saved_folder_has_segmoes_layout(saved):
    for part in ("model_index.json", "scheduler", "text_encoder", "tokenizer", "vae", "unet/config.json",
                 "unet/diffusion_pytorch_model.safetensors"):
        assert (saved / part).exists(), part


def test_saved_moe_tensors_use_segmoes_key_names(saved):
    with safe_open(str(saved / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        moe_keys = [k for k in f.keys() if ".gate." in k or ".experts." in k]
    assert moe_keys and all(SEGMOE_KEY.match(k) for k in moe_keys)


def test_saved_segmoe_config_has_segmoes_keys(saved):
    seg = json.loads((saved / "unet" / "config.json").read_text())["segmoe_config"]
    expected = {"base_model", "num_experts", "moe_layers", "num_experts_per_tok", "type", "experts", *SEGMOE_DERIVED_KEYS}
    assert expected <= set(seg)
    assert (seg["down_idx_start"], seg["down_idx_end"], seg["up_idx_start"], seg["up_idx_end"]) == (0, 3, 1, 4)


def test_saving_into_an_existing_folder_fails_and_keeps_it(built, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(merge_io.MergeFolderError, match="exists already"):
        built.save_pretrained(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_failed_save_leaves_no_folder_behind(built, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(merge_io, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        built.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_loading_a_plain_diffusers_folder_says_it_is_not_a_merge(fixture_sets):
    with pytest.raises(merge_io.MergeFolderError, match="not a SegMoE merge"):
        merge_io.load_merge(fixture_sets["sd15"].base)


def test_streamed_safetensors_match_the_reference_writer(tmp_path):
    from safetensors.torch import load_file

    stacked = torch.randn(3, 4, 5)
    tensors = {"a": stacked[0], "b": stacked[2], "c": torch.arange(7, dtype=torch.int64), "d": torch.randn(2).bfloat16()}
    merge_io.write_safetensors(tmp_path / "x.safetensors", tensors)
    back = load_file(str(tmp_path / "x.safetensors"))
    for k, v in tensors.items():
        assert torch.equal(back[k], v)
