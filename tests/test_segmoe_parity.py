"""Merge folders written by segmoe 0.0.4 itself load here and compute what segmoe computes.

The folders and segmoe's outputs were made by ``tests/data/make_segmoe_reference.py`` in a
throwaway venv (see ``tests/data/segmoe_ref/README.md``); segmoe is not installed here.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from segmoe_lab import SegMoEPipeline
from segmoe_lab.merge.moe import iter_moe_layers

REF = Path(__file__).parent / "data" / "segmoe_ref"
CASES = ["sd15_all_top2", "sdxl_attn_top1"]


def reference(case: str) -> tuple[dict, dict]:
    with safe_open(str(REF / f"{case}_io.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def unet_inputs(ref: dict) -> dict:
    inputs = {k.removeprefix("inputs."): v for k, v in ref.items() if k.startswith("inputs.") and "added_cond" not in k}
    added = {k.rsplit(".", 1)[1]: v for k, v in ref.items() if k.startswith("inputs.added_cond_kwargs.")}
    return {**inputs, **({"added_cond_kwargs": added} if added else {})}


@pytest.fixture(scope="module", params=CASES)
def case(request):
    ref, meta = reference(request.param)
    pipe = SegMoEPipeline(REF / request.param, device="cpu", torch_dtype=torch.float32, progress=False)
    return request.param, pipe, ref, meta


def test_segmoe_folder_gives_segmoes_unet_output(case):
    _, pipe, ref, _ = case
    with torch.no_grad():
        out = pipe.unet(**unet_inputs(ref)).sample
    torch.testing.assert_close(out, ref["output.sample"], atol=1e-5, rtol=1e-5)


def test_segmoe_folder_routes_to_the_experts_segmoe_ran(case):
    _, pipe, ref, _ = case
    seen, hooks = {}, []
    for path, layer in iter_moe_layers(pipe.unet):
        hooks.append(layer.gate.register_forward_hook(lambda m, a, o, path=path: seen.setdefault(path, o.detach())))
    try:
        with torch.no_grad():
            pipe.unet(**unet_inputs(ref))
    finally:
        for h in hooks:
            h.remove()
    sites = [k.removeprefix("selected.") for k in ref if k.startswith("selected.")]
    assert sorted(sites) == sorted(seen)
    for site in sites:
        k = ref[f"selected.{site}"].numel()
        ours = seen[site].reshape(-1, seen[site].shape[-1]).sum(0).topk(k).indices
        assert sorted(ours.tolist()) == sorted(ref[f"selected.{site}"].tolist()), site


def test_segmoe_folder_generates_segmoes_latents(case):
    _, pipe, ref, meta = case
    g = json.loads(meta["generation"])
    out = pipe(g["prompt"], negative_prompt=g["negative_prompt"], num_inference_steps=g["num_inference_steps"],
               guidance_scale=g["guidance_scale"], generator=torch.Generator().manual_seed(g["seed"]),
               output_type="latent").images
    # segmoe runs its UNet channels_last; that alone moves 3-step latents by ~4e-5 (README there).
    torch.testing.assert_close(out, ref["latents"], atol=5e-4, rtol=1e-4)


def test_segmoe_folder_config_reads_back_as_segmoe_wrote_it(case):
    _, pipe, _, meta = case
    assert pipe.segmoe_config == json.loads(meta["segmoe_config"])
