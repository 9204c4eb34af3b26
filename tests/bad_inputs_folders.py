"""Bad-input corpus, part 2: merge folders (spoiled copies of a good 3-expert merge); see ``bad_inputs.py``."""
import json
import os
import shutil
from pathlib import Path

from bad_inputs import CASES, Case, _write

# --- merge folders (spoiled copies of a good 3-expert merge) --------------------------------------

def _unet_cfg(folder: Path) -> dict:
    return json.loads((folder / "unet" / "config.json").read_text())


def _set_unet_cfg(folder: Path, cfg) -> None:
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))


def _edit_configs(fn):
    """Apply ``fn`` to both stored configs (segmoe's and segmoe-lab's)."""
    def spoil(folder):
        cfg = _unet_cfg(folder)
        for key in ("segmoe_config", "segmoe_lab_config"):
            fn(cfg[key])
        _set_unet_cfg(folder, cfg)
    return spoil


def _n_experts(n):
    def fn(c):
        c["experts"] = (c["experts"] * 2)[:n]
        c["num_experts"] = n
    return fn


def _rewrite_weights(fn):
    """Rewrite the merge's UNet safetensors with ``fn(tensors) -> tensors``."""
    def spoil(folder):
        from safetensors.torch import load_file, save_file

        f = folder / "unet" / "diffusion_pytorch_model.safetensors"
        tensors = {k: v.clone() for k, v in load_file(str(f)).items()}
        save_file(fn(tensors), str(f))
    return spoil


def _drop_site(tensors):
    site = sorted(k for k in tensors if k.endswith(".gate.weight"))[0][: -len(".gate.weight")]
    return {k: v for k, v in tensors.items() if not k.startswith(site + ".")}


def _reshape_one(tensors):
    key = sorted(k for k in tensors if k.endswith(".experts.0.weight"))[0]
    tensors[key] = tensors[key].reshape(-1)
    return tensors


def _renumber_expert(tensors):
    return {k.replace(".experts.2.", ".experts.7."): v for k, v in tensors.items()}


MERGE_SPOILS = {
    "config-2-weights-3": (_edit_configs(_n_experts(2)), ["diffusion_pytorch_model.safetensors", "2 experts"]),
    "config-4-weights-3": (_edit_configs(_n_experts(4)), ["diffusion_pytorch_model.safetensors", "4 experts"]),
    "no-unet-config": (lambda f: (f / "unet" / "config.json").unlink(), ["config.json", "missing"]),
    "unet-config-not-json": (lambda f: _write(f / "unet" / "config.json", "{oops"), ["config.json", "JSON"]),
    "unet-config-list": (lambda f: _write(f / "unet" / "config.json", "[1, 2]"), ["config.json", "list"]),
    "no-segmoe-config": (lambda f: _set_unet_cfg(f, {k: v for k, v in _unet_cfg(f).items() if "segmoe" not in k}),
                         ["not a SegMoE merge"]),
    "segmoe-config-bad-moe-layers": (_edit_configs(lambda c: c.update(moe_layers="everything")),
                                     ["config.json", "moe_layers", "everything"]),
    "segmoe-config-string": (lambda f: _set_unet_cfg(f, {**_unet_cfg(f), "segmoe_lab_config": "x", "segmoe_config": "x"}),
                             ["segmoe_config"]),
    "moe-layers-attn-to-ff": (_edit_configs(lambda c: c.update(moe_layers="ff")), ["moe_layers=ff", "missing"]),
    "include-mid-flipped": (_edit_configs(lambda c: c.update(include_mid=True)), ["include_mid=True", "missing"]),
    "top-k-above-experts": (_edit_configs(lambda c: c.update(num_experts_per_tok=5)), ["num_experts_per_tok"]),
    "unet-weights-missing": (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(),
                             ["diffusion_pytorch_model.safetensors", "missing"]),
    "unet-weights-truncated": (lambda f: _write(f / "unet" / "diffusion_pytorch_model.safetensors",
                                                (f / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()[:5000]),
                               ["diffusion_pytorch_model.safetensors", "truncated"]),
    "unet-weights-random": (lambda f: _write(f / "unet" / "diffusion_pytorch_model.safetensors", os.urandom(5000)),
                            ["diffusion_pytorch_model.safetensors", "safetensors"]),
    "site-dropped": (_rewrite_weights(_drop_site), ["missing", "down_blocks"]),
    "tensor-reshaped": (_rewrite_weights(_reshape_one), ["wrong shape", "experts.0.weight"]),
    "expert-renumbered": (_rewrite_weights(_renumber_expert), ["experts.7"]),
    "extra-tensor": (_rewrite_weights(lambda t: {**t, "extra.weight": t[next(iter(t))].clone()}), ["unexpected extra.weight"]),
    "no-vae": (lambda f: shutil.rmtree(f / "vae"), ["vae"]),
    "vae-truncated": (lambda f: _write(f / "vae" / "diffusion_pytorch_model.safetensors", b"\x08" + bytes(20)),
                      ["vae", "diffusion_pytorch_model.safetensors"]),
    "no-text-encoder": (lambda f: shutil.rmtree(f / "text_encoder"), ["text_encoder"]),
    "no-model-index": (lambda f: (f / "model_index.json").unlink(), ["model_index.json"]),
    "model-index-garbage": (lambda f: _write(f / "model_index.json", "\x00garbage"), ["model_index.json"]),
    "interrupted-overwrite": (lambda f: f.rename(f.parent / f".{f.name}.backup"), ["interrupted", ".merge.backup"]),
}


def _spoiled(tmp, world, spoil) -> Path:
    dst = tmp / "merge"
    shutil.copytree(world.merge, dst)
    spoil(dst)
    return dst


for _id, (_spoil, _frag) in MERGE_SPOILS.items():
    CASES.append(Case(f"generate-{_id}", "merge folder", lambda tmp, world, s=_spoil, f=_frag: (
        "cli", ["generate", str(_spoiled(tmp, world, s)), "a cat", "--steps", "1", "-o", str(tmp / "x.png"),
                "--device", "cpu"], f)))
for _id in ("config-2-weights-3", "tensor-reshaped", "unet-weights-truncated", "site-dropped"):
    CASES.append(Case(f"api-load-{_id}", "merge folder", lambda tmp, world, s=MERGE_SPOILS[_id][0], f=MERGE_SPOILS[_id][1]: (
        "api", lambda folder=_spoiled(tmp, world, s): __import__("segmoe_lab.merge.pipeline", fromlist=["x"])
        .SegMoEPipeline(folder, device="cpu"), f)))
for _id in ("unet-config-not-json", "segmoe-config-bad-moe-layers"):
    CASES.append(Case(f"estimate-{_id}", "merge folder", lambda tmp, world, s=MERGE_SPOILS[_id][0], f=MERGE_SPOILS[_id][1]: (
        "cli", ["estimate", str(_spoiled(tmp, world, s))], f)))


