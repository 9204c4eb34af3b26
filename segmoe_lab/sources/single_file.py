"""Single-file checkpoints (original Stable Diffusion / LDM key names), offline.

diffusers' ``from_single_file`` needs a diffusers folder of configs and tokenizers next to the
weights and normally fetches it from the Hub. Here it is written from :mod:`segmoe_lab.sources.layouts`
instead, for the layout the checkpoint's tensors show (SD 1.5, SDXL, Segmind Vega or SSD-1B),
once per layout into ``$SEGMOE_LAB_CACHE/configs``. UNet tensor names are mapped with diffusers'
own converter, run on key names only, so single tensors can be read without loading the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from segmoe_lab.sources import layouts
from segmoe_lab.sources.errors import SourceError, default_cache_dir

LDM_UNET_PREFIX = "model.diffusion_model."
_NOT_UNET = ("first_stage_model.", "cond_stage_model.", "conditioner.", "model_ema.")


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a single-file checkpoint (a safetensors header read; pickles are loaded)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from segmoe_lab.sources.weightfile import check_weights

        return check_weights(path)
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable pickle is the same user-facing problem
        from segmoe_lab.errors import WeightsError, clip

        raise WeightsError(f"could not be read as plain tensors ({type(err).__name__}: {clip(err, 160)})", file=path,
                           fix="convert it to .safetensors with the tool that made it") from None
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return list(state)


def ldm_unet_key_map(keys: list[str], unet_config: dict) -> dict[str, str]:
    """diffusers UNet tensor name -> the checkpoint's key for it.

    diffusers' ``convert_ldm_unet_checkpoint`` only renames for SD 1.5 / SDXL UNets, so running it
    on ``{key: key}`` yields the name map without reading a tensor. Files that already use
    diffusers names (a bare UNet) map to themselves.
    """
    if not any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        return {k: k for k in keys if not k.startswith(_NOT_UNET)}
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    mapping = convert_ldm_unet_checkpoint({k: k for k in keys}, dict(unet_config))
    bad = [n for n, k in mapping.items() if not isinstance(k, str)]
    if bad:  # a converter that computes tensors instead of renaming them (not SD 1.5 / SDXL)
        raise ValueError(f"cannot map UNet tensor {bad[0]!r} by name; this checkpoint type is not supported")
    return mapping


def model_type_of(keys: list[str]) -> str:
    """``"sd"`` or ``"sdxl"`` from a full checkpoint's text-encoder keys."""

    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise SourceError("this is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); segmoe-lab merges "
                          "SD 1.5 (type: sd) and SDXL-family (type: sdxl) models only.")
    raise SourceError("no text encoder tensors found: not a full SD 1.5 / SDXL checkpoint (a LoRA, a VAE, or a "
                      "bare UNet?). Use the model's full checkpoint or its diffusers folder.")


def _depths(names) -> dict[str, list[int]]:
    """Transformer blocks per attention module, per UNet block, counted from diffusers tensor names."""
    counts: dict[str, dict[int, int]] = {}
    for n in names:
        m = re.match(r"(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.", n)
        if m:
            block = "mid" if m.group(1) == "mid_block" else f"{'down' if m.group(2) else 'up'}.{m.group(2) or m.group(3)}"
            j, k = int(m.group(4)), int(m.group(5))
            counts.setdefault(block, {})[j] = max(counts.get(block, {}).get(j, 0), k + 1)
    return {b: [d[j] for j in sorted(d)] for b, d in counts.items()}


def detect_layout(keys: list[str], model_type: Optional[str] = None) -> str:
    """Which of :data:`segmoe_lab.sources.layouts.LAYOUTS` a checkpoint is, from its tensor names."""

    found_type = model_type_of(keys)
    if model_type and model_type != found_type:
        raise SourceError(f"this checkpoint is a type: {found_type} model but the config says type: {model_type}; "
                          f"set type: {found_type}, or use a {model_type} model.")
    candidates = [name for name in layouts.LAYOUTS if layouts.model_type(name) == found_type]
    for name in candidates:
        cfg = layouts.unet_config(name)
        if _depths(ldm_unet_key_map(keys, cfg)) == layouts.transformer_depths(cfg):
            return name
    raise SourceError(f"the checkpoint's UNet matches none of the known {found_type} layouts ({', '.join(candidates)}); "
                      "load it with config=<a diffusers folder of the same architecture>.")


def write_config_folder(folder: Path, model_type: str, *, unet: dict, vae: dict, scheduler: dict,
                        text_encoders: dict[str, dict], pad_tokens: dict[str, str],
                        num_merges: Optional[int] = None) -> Path:
    """Write a weightless diffusers pipeline folder (configs + tokenizers) for ``from_single_file(config=)``."""
    import diffusers

    folder = Path(folder)
    pipe = "StableDiffusionPipeline" if model_type == "sd" else "StableDiffusionXLPipeline"
    index = {"_class_name": pipe, "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", scheduler["_class_name"]]}
    for name, cfg in text_encoders.items():
        index[name] = ["transformers", cfg["architectures"][0]]
        _write_json(folder / name / "config.json", cfg)
    for name, pad in pad_tokens.items():
        index[name] = ["transformers", "CLIPTokenizer"]
        layouts.write_clip_tokenizer(folder / name, pad_token=pad, num_merges=num_merges)
    if model_type == "sd":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index.update(force_zeros_for_empty_prompt=True)
    _write_json(folder / "model_index.json", index)
    _write_json(folder / "unet" / "config.json", unet)
    _write_json(folder / "vae" / "config.json", vae)
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    return folder


def write_layout_config(layout: str, folder: Path) -> Path:
    """The real configs and CLIP tokenizers of ``layout`` as a diffusers folder (no weights)."""
    return write_config_folder(
        folder, layouts.model_type(layout), unet=layouts.unet_config(layout), vae=layouts.vae_config(layout),
        scheduler=layouts.scheduler_config(layout), text_encoders=layouts.text_encoder_configs(layout),
        pad_tokens=layouts.tokenizer_pad_tokens(layout))


def layout_config_folder(layout: str, cache_dir: Optional[Path] = None) -> Path:
    """:func:`write_layout_config` once into the cache (keyed by a hash of the configs), then reused."""

    configs = [layouts.unet_config(layout), layouts.vae_config(layout), layouts.scheduler_config(layout),
               layouts.text_encoder_configs(layout), layouts.tokenizer_pad_tokens(layout)]
    digest = hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "configs"
    folder = root / f"{layout}-{digest}"
    if (folder / "model_index.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{layout}-", dir=root))
    try:
        write_layout_config(layout, tmp)
        os.replace(tmp, folder)  # atomic: a folder under its final name is complete
    except OSError:
        if not (folder / "model_index.json").is_file():  # not just a concurrent writer winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def config_folder_for(path: Path, model_type: Optional[str] = None) -> Path:
    """The offline config folder for a single-file checkpoint, chosen by its tensors."""
    return layout_config_folder(detect_layout(checkpoint_keys(path), model_type))


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
