"""Build reference merges with segmoe 0.0.4 itself, for parity tests (issue 4).

For each case in ``CASES`` this writes, under ``tests/data/segmoe_ref/``:

* ``<name>/``: the merge folder exactly as ``segmoe.SegMoEPipeline.save_pretrained`` writes it,
  built from ``segmoe_lab.testing.write_fixture_set(root, layout, n_experts=2, seed=0)`` with the
  UNet widths halved once more (``WIDTH_DIVISOR``) to keep the folders small;
* ``<name>.yaml``: the segmoe config it was built from (paths relative to the fixture root);
* ``<name>_io.safetensors``: fixed UNet inputs and the output of segmoe's own *loaded*
  pipeline (``SegMoEPipeline(folder).pipe.unet(...)``), the experts each MoE layer picked, the
  summed router logits, the gate weights, and one short generation (latents, image, routing).
  The header metadata holds the segmoe_config, versions, seeds and generation settings as JSON.
  ``tests/data/segmoe_ref/README.md`` lists every key.

segmoe must not go into the project venv. Run this in a throwaway venv that shares the
project's torch/diffusers/transformers through a ``.pth`` file::

    python3 -m venv /tmp/segref
    echo /work/main/.venv/lib/python3.11/site-packages \\
        > /tmp/segref/lib/python3.11/site-packages/_shared_venv.pth
    /tmp/segref/bin/pip install --no-deps segmoe==0.0.4
    /tmp/segref/bin/python tests/data/make_segmoe_reference.py      # from the repo root

It takes about 20 s per case on one CPU core. Re-running overwrites the outputs; on the same
versions the tensors come out bit-identical (the safetensors headers may order metadata differently).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from segmoe_lab import testing  # noqa: E402
from segmoe_lab.testing import unet_inputs, write_fixture_set  # noqa: E402

OUT = REPO / "tests" / "data" / "segmoe_ref"
FIXTURE_SEED = 0  # write_fixture_set(seed=...): base weights and expert perturbations
GLOBAL_SEED = 0  # torch.manual_seed before building: segmoe's gate Linear init and its 25-step generations
INPUT_SEED = 0  # unet_inputs(seed=...)
INPUT_BATCH = 2  # segmoe routes on logits summed over batch and tokens, so two samples matter
# testing.py's UNet widths halved once more: at its own widths the two float16 folders take 7.9 MB
# (SDXL's 10-deep transformer blocks dominate); halved they take 3.2 MB.
WIDTH_DIVISOR = 2
NEGATIVE = "blurry, low quality"
GENERATION = dict(prompt="a photo of a red cat", negative_prompt=NEGATIVE, num_inference_steps=3,
                  guidance_scale=7.5, seed=0)
# segmoe defaults to variant="fp16", torch_dtype=float16, device="cuda". The fixtures have no fp16
# variant; with the default variant, diffusers raises and segmoe's bare ``except`` retries without
# variant/use_safetensors, which also works. We pass variant=None to take the straight path, and
# keep segmoe's default float16 (as its published merges are): the folders are written in float16.
BUILD_KWARGS = dict(device="cpu", torch_dtype=torch.float16, variant=None)
# References are computed in float32 from the float16 folder (segmoe ignores variant when loading one).
LOAD_KWARGS = dict(device="cpu", torch_dtype=torch.float32)
CASES = {
    "sd15_all_top2": dict(layout="sd15", moe_layers="all", num_experts_per_tok=2),
    "sdxl_attn_top1": dict(layout="sdxl", moe_layers="attn", num_experts_per_tok=1),
}


def write_reference_fixtures(root: Path, layout: str):
    """``write_fixture_set(root, layout, 2, FIXTURE_SEED)`` with UNet ``block_out_channels // WIDTH_DIVISOR``."""
    tiny = testing.tiny_unet_config

    def narrow(name: str) -> dict:
        cfg = tiny(name)
        cfg["block_out_channels"] = [c // WIDTH_DIVISOR for c in cfg["block_out_channels"]]
        return cfg

    testing.tiny_unet_config = narrow  # make_pipeline looks it up at call time
    try:
        return write_fixture_set(root, layout, n_experts=2, seed=FIXTURE_SEED)
    finally:
        testing.tiny_unet_config = tiny


def segmoe_yaml(fs, moe_layers: str, num_experts_per_tok: int) -> dict:
    """segmoe's YAML config over a fixture set, with paths relative to its root."""
    rel = lambda p: os.path.relpath(p, fs.root)  # noqa: E731
    return {
        "base_model": rel(fs.base), "num_experts": len(fs.experts), "moe_layers": moe_layers,
        "num_experts_per_tok": num_experts_per_tok, "type": fs.model_type,
        "experts": [{"source_model": rel(e), "positive_prompt": p, "negative_prompt": NEGATIVE}
                    for e, p in zip(fs.experts, fs.prompts)],
    }


def moe_blocks(unet) -> list[tuple[str, torch.nn.Module]]:
    """segmoe's ``SparseMoeBlock`` modules of ``unet``, keyed by dotted path."""
    return [(name, m) for name, m in unet.named_modules() if type(m).__name__ == "SparseMoeBlock"]


@contextlib.contextmanager
def record_routing(unet):
    """Yield ``{path: {"selected": [expert idx, ...], "logits_sum": Tensor[E]}}`` filled by forward hooks.

    ``selected`` lists the experts segmoe actually ran, in call order (hooks on each expert);
    ``logits_sum`` is the gate output summed over batch and tokens (what segmoe's top-k reads).
    """
    seen, handles = {}, []
    for path, block in moe_blocks(unet):
        rec = seen.setdefault(path, {"selected": [], "logits_sum": None})
        for i, expert in enumerate(block.experts):
            handles.append(expert.register_forward_hook(lambda m, a, o, rec=rec, i=i: rec["selected"].append(i)))
        handles.append(block.gate.register_forward_hook(
            lambda m, a, o, rec=rec: rec.update(logits_sum=o.detach().float().sum(0))))  # (B*T, E) -> (E,)
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def flatten(prefix: str, value) -> dict[str, torch.Tensor]:
    if isinstance(value, dict):
        return {k2: v2 for k, v in value.items() for k2, v2 in flatten(f"{prefix}.{k}", v).items()}
    return {prefix: value.detach().cpu().contiguous()}


@torch.no_grad()
def unet_reference(unet) -> tuple[dict[str, torch.Tensor], dict]:
    """Run ``unet`` on seeded inputs; return the tensors to save and the routing record."""
    inputs = unet_inputs(unet, batch=INPUT_BATCH, seed=INPUT_SEED)
    with record_routing(unet) as routing:
        out = unet(**inputs, return_dict=False)[0]  # (B, C, H, W)
    tensors = {**flatten("inputs", inputs), "output.sample": out.contiguous()}
    for path, rec in routing.items():
        tensors[f"selected.{path}"] = torch.tensor(rec["selected"], dtype=torch.int64)
        tensors[f"router_logits_sum.{path}"] = rec["logits_sum"]
    for path, block in moe_blocks(unet):
        tensors[f"gate.{path}"] = block.gate.weight.detach().contiguous().clone()
    return tensors, routing


@torch.no_grad()
def generate(seg) -> dict[str, torch.Tensor]:
    """One short seeded generation through segmoe's pipeline: final latents, decoded image, routing.

    ``generation_selected.<path>`` is (UNet calls, top_k): the experts picked at each denoising
    step (one call per step; the CFG batch of 2 is routed together).
    """
    g = {k: v for k, v in GENERATION.items() if k != "seed"}
    out = {}
    with record_routing(seg.pipe.unet) as routing:
        gen = torch.Generator().manual_seed(GENERATION["seed"])
        out["latents"] = torch.as_tensor(seg(**g, generator=gen, output_type="latent").images).contiguous()
    gen = torch.Generator().manual_seed(GENERATION["seed"])
    out["image"] = torch.as_tensor(seg(**g, generator=gen, output_type="np").images).contiguous()  # (1, H, W, 3)
    k = seg.config["num_experts_per_tok"]
    for path, rec in routing.items():
        out[f"generation_selected.{path}"] = torch.tensor(rec["selected"], dtype=torch.int64).view(-1, k)
    return out


def versions() -> dict[str, str]:
    pkgs = ("segmoe", "diffusers", "transformers", "torch", "safetensors", "accelerate", "huggingface_hub")
    return {"python": platform.python_version(), **{p: importlib.metadata.version(p) for p in pkgs}}


def build_case(name: str, layout: str, moe_layers: str, num_experts_per_tok: int) -> dict:
    """Build, save, reload and record one reference merge; return a summary."""
    from segmoe import SegMoEPipeline

    folder = OUT / name
    with tempfile.TemporaryDirectory() as tmp:
        fs = write_reference_fixtures(Path(tmp), layout)
        cfg = segmoe_yaml(fs, moe_layers, num_experts_per_tok)
        (OUT / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        shutil.copy(OUT / f"{name}.yaml", Path(tmp) / "segmoe.yaml")
        cwd = os.getcwd()
        os.chdir(tmp)  # segmoe resolves the relative paths of the config against the cwd
        try:
            torch.manual_seed(GLOBAL_SEED)
            built = SegMoEPipeline("segmoe.yaml", **BUILD_KWARGS)
        finally:
            os.chdir(cwd)
    shutil.rmtree(folder, ignore_errors=True)
    built.save_pretrained(str(folder))
    built.pipe.unet.to(LOAD_KWARGS["torch_dtype"])  # built in float16; compare in the loaded dtype
    built_tensors, _ = unet_reference(built.pipe.unet)
    built_state = {k: v.clone() for k, v in built.pipe.unet.state_dict().items()}
    del built

    seg = SegMoEPipeline(str(folder), **LOAD_KWARGS)
    seg.pipe.set_progress_bar_config(disable=True)
    tensors, routing = unet_reference(seg.pipe.unet)
    tensors.update(generate(seg))
    check_roundtrip(built_state, seg.pipe.unet.state_dict(), built_tensors, tensors)

    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    meta = {
        "case": json.dumps({"name": name, "layout": layout, "n_experts": 2, "fixture_seed": FIXTURE_SEED,
                            "unet_width_divisor": WIDTH_DIVISOR, "moe_layers": moe_layers,
                            "num_experts_per_tok": num_experts_per_tok}),
        "segmoe_config": json.dumps(unet_cfg["segmoe_config"]),
        "versions": json.dumps(versions()),
        "seeds": json.dumps({"global": GLOBAL_SEED, "inputs": INPUT_SEED, "input_batch": INPUT_BATCH}),
        "build_kwargs": json.dumps({k: str(v) for k, v in BUILD_KWARGS.items()}),
        "load_kwargs": json.dumps({k: str(v) for k, v in LOAD_KWARGS.items()}),
        "generation": json.dumps(GENERATION),
    }
    save_file(tensors, str(OUT / f"{name}_io.safetensors"), metadata=meta)
    patterns = Counter(tuple(r["selected"]) for r in routing.values())
    return {"name": name, "sites": len(routing), "folder_bytes": folder_bytes(folder),
            "selected": {str(k): n for k, n in patterns.items()}}


def check_roundtrip(built_state, loaded_state, built_tensors, loaded_tensors) -> None:
    """segmoe's save-then-load must give back the same weights and the same UNet output."""
    assert built_state.keys() == loaded_state.keys()
    for k, v in built_state.items():
        assert torch.equal(v, loaded_state[k]), f"weight {k} changed on save/load"
    diff = (built_tensors["output.sample"] - loaded_tensors["output.sample"]).abs().max().item()
    print(f"max |built - loaded| UNet output: {diff:.3g}")
    assert diff < 1e-5, f"built and loaded UNet outputs differ by {diff}"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    import diffusers
    import transformers

    torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()  # e.g. "float16 cannot run on cpu" for every expert load
    transformers.utils.logging.set_verbosity_error()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, case in CASES.items():
        summary = build_case(name, **case)
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
