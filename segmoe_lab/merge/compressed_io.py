"""Compressed merges on disk: ``segmoe-lab compress`` (a saved merge -> experts as base + low-rank deltas) and ``segmoe-lab export`` (any merge -> segmoe 0.0.4's own folder form, full experts)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from segmoe_lab.merge.config import MergeConfig
from segmoe_lab.merge.folder_checks import MergeFolderError
from segmoe_lab.merge.io import _DTYPES, load_merge, read_merge_config, save_merge


def _base_site_tensors(cfg: MergeConfig, unet) -> Optional[dict[str, torch.Tensor]]:
    """The base model's tensors at ``unet``'s MoE sites, or None when the base cannot be read offline."""
    from segmoe_lab import sources

    from segmoe_lab.merge.lowrank import routed_layers

    names = [f"{path}.{n}" for path, layer in routed_layers(unet) for n, _ in layer.experts[0].named_parameters()]
    try:
        res = sources.resolve_source(cfg.base_model, model_type=cfg.type)
        return sources.read_unet_tensors(res, cfg.type, dict(unet.config), names=names)
    except (OSError, ValueError):
        return None


def compress_merge(folder: Union[str, Path], out: Union[str, Path], compress, reference: str = "auto",
                   overwrite: bool = False) -> dict:
    """Write the compressed form of a saved merge (:mod:`segmoe_lab.merge.lowrank`) to ``out``.

    Args:
        compress: a :class:`~segmoe_lab.merge.config.CompressOptions` or a dict (``{"rank": 16}``).
        reference (`str`): ``W_0`` of each site: ``"base"`` (the config's base model; an error if it
            cannot be read), ``"mean"`` (the experts' mean) or ``"auto"`` (base if readable, else mean).

    Returns:
        ``{"base": sites compressed against the base, "mean": against the experts' mean}``.
    """
    if reference not in ("auto", "base", "mean"):
        raise ValueError(f"reference={reference!r}: choose auto, base or mean")
    from segmoe_lab.merge.lowrank import compress_unet

    _, cfg = read_merge_config(folder)
    pipe, cfg = load_merge(folder, torch_dtype=_DTYPES[cfg.dtype])
    cfg = cfg.updated(compress=compress)
    base = None if reference == "mean" else _base_site_tensors(cfg, pipe.unet)
    if base is None and reference == "base":
        raise MergeFolderError(f"base_model {cfg.base_model!r} cannot be read here; use reference='mean' or 'auto'")
    used = compress_unet(pipe.unet, cfg, base)
    save_merge(pipe, out, cfg, overwrite=overwrite)
    return used


def export_merge(folder: Union[str, Path], out: Union[str, Path], overwrite: bool = False) -> Path:
    """Write a merge (compressed or not) in segmoe 0.0.4's own form: full experts in ``unet/`` ."""
    from segmoe_lab.merge.lowrank import decompress_unet

    _, cfg = read_merge_config(folder)
    pipe, cfg = load_merge(folder, torch_dtype=_DTYPES[cfg.dtype])
    decompress_unet(pipe.unet, cfg)
    return save_merge(pipe, out, cfg.updated(compress=None), overwrite=overwrite)
