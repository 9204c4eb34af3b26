"""Local sources: a diffusers folder or one weights file, checked before anything loads it."""
from __future__ import annotations

import os
from pathlib import Path

from segmoe_lab.sources.errors import SourceError
from segmoe_lab.sources.resolved import PICKLE_SUFFIXES, ResolvedSource
from segmoe_lab.sources.weightfile import check_weights

WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _resolve_local(path: Path, source: str, allow_ckpt: bool, unet_only: bool = False,
                   origin: str = "local") -> ResolvedSource:
    path = Path(os.path.abspath(path))  # not resolve(): HF cache files are symlinks to nameless blobs
    if path.is_file():
        _check_weights_file(path, allow_ckpt)
        return ResolvedSource(path, "single_file", origin, source, allow_ckpt)
    if (path / "model_index.json").is_file() or (path / "unet").is_dir():
        _check_unet_weights(path, allow_ckpt)
        if not unet_only:
            _check_components(path)
        _check_headers(path, ("unet",) if unet_only else WEIGHT_COMPONENTS)
        return ResolvedSource(path, "folder", origin, source, allow_ckpt)
    files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
    if len(files) == 1:  # a folder holding one file, e.g. a LoRA
        return ResolvedSource(files[0], "single_file", origin, source, allow_ckpt)
    found = ", ".join(p.name for p in sorted(path.iterdir())[:8]) or "nothing"
    raise SourceError(
        f"{path} is not a diffusers folder (no model_index.json, no unet/ subfolder) and does not hold exactly one "
        f".safetensors file (found: {found}). Point source_model at the diffusers folder or at the weights file.")


def _check_weights_file(path: Path, allow_ckpt: bool) -> None:
    if path.suffix in PICKLE_SUFFIXES and not allow_ckpt:
        raise SourceError(
            f"{path} is a pickled checkpoint ({path.suffix}): loading it can run arbitrary code, so it is refused. "
            "Use a .safetensors version of the model, or opt in for files you trust with allow_ckpt=True "
            "(resolve_source(..., allow_ckpt=True)).")
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise SourceError(f"{path}: not a weights file (expected .safetensors, or .ckpt with allow_ckpt=True)")
    if path.suffix == ".safetensors":
        check_weights(path)


def _check_headers(folder: Path, components) -> None:
    """Every safetensors file of these components opens (a header read each): a truncated or
    corrupt file is named now, not deep inside diffusers' loader."""
    for name in components:
        for file in sorted((folder / name).glob("*.safetensors")):
            check_weights(file)


def _check_unet_weights(folder: Path, allow_ckpt: bool) -> None:
    unet = folder / "unet"
    if any(unet.glob("*.safetensors")):
        return
    if any(unet.glob("*.bin")):
        if allow_ckpt:
            return
        raise SourceError(
            f"{unet} has only pickled weights (.bin): loading them can run arbitrary code, so they are refused. "
            "Convert the folder to safetensors (pipe.save_pretrained(folder, safe_serialization=True)), "
            "or opt in for files you trust with allow_ckpt=True.")
    raise SourceError(f"{folder} has no UNet weights (unet/*.safetensors is missing); the folder is incomplete. "
                      "Download or copy the model again.")


def _check_components(folder: Path) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        return
    from segmoe_lab.safe_load import load_json

    parts = load_json(index, SourceError, "pipeline index (model_index.json)")
    if not isinstance(parts, dict):
        raise SourceError(f"{index}: a pipeline index is a JSON object, not {type(parts).__name__}; the folder is damaged")
    optional = {"safety_checker", "feature_extractor", "image_encoder"}  # loaded as None when absent
    missing = [name for name, value in parts.items()
               if isinstance(value, list) and value and value[0] and name not in optional and not (folder / name).is_dir()]
    if missing:
        raise SourceError(f"{folder} lacks the pipeline parts {', '.join(missing)} that its model_index.json lists; "
                          "the folder is incomplete. Download or copy the whole model again.")
