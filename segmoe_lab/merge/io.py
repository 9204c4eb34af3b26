"""Save and load merges in the folder format segmoe 0.0.4 writes.

A merge folder is a diffusers pipeline folder (``model_index.json``, ``scheduler/``,
``text_encoder(_2)/``, ``tokenizer(_2)/``, ``vae/``, ``unet/``) whose ``unet/config.json`` also
carries ``segmoe_config`` (the keys segmoe reads back: its YAML config plus ``num_experts`` and
the block ranges ``down_idx_start`` ... ``up_idx_end``) and whose
``unet/diffusion_pytorch_model.safetensors`` uses segmoe's tensor names
(``<site>.gate.weight``, ``<site>.experts.<i>.<param>``). segmoe-lab adds
``segmoe_lab_config`` (our full config: routing, gate options, ...), which segmoe ignores.

This module is the one definition of that format. Writes go to a hidden temporary folder that
is renamed into place only when complete.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from safetensors import safe_open

from segmoe_lab.merge.config import SEGMOE_DERIVED_KEYS, ConfigError, MergeConfig, parse_config
from segmoe_lab.merge.discovery import block_name, get_module, set_module
from segmoe_lab.merge.lowrank import LowRankMoELayer, skeleton_experts
from segmoe_lab.merge.moe import MoELayer, iter_moe_layers, moe_layer

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
# Compressed merges (merge.lowrank) keep their UNet in this file instead of UNET_WEIGHTS, and say so
# under this key of unet/config.json; segmoe 0.0.4 cannot read them (`segmoe-lab export` writes its form).
LOWRANK_WEIGHTS = "segmoe_lab_lowrank.safetensors"
LOWRANK_KEY = "segmoe_lab_lowrank"
_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


class MergeFolderError(ValueError):
    """A folder that is not a loadable merge, or an output folder that cannot be written."""


# --- safetensors, streamed ----------------------------------------------------------------
def write_safetensors(path: Union[str, Path], tensors: Mapping[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """Write ``tensors`` as a safetensors file one tensor at a time.

    ``safetensors.torch.save_file`` refuses tensors that share storage (our stacked experts are
    views of one tensor) and would need a copy of everything; this writes the standard format
    (8-byte header length, JSON header, raw little-endian data) tensor by tensor.
    """
    names = sorted(tensors)
    header, offset = {}, 0
    for name in names:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            f.write(t.view(torch.uint8).numpy().data)


# --- the segmoe_config entry --------------------------------------------------------------
def block_ranges(unet) -> dict[str, int]:
    """segmoe's ``down_idx_start`` ... ``up_idx_end``: the down/up block indices holding MoE sites.

    segmoe rebuilds a merge by looping over these ranges, so they are derived from the sites
    actually present (for SD 1.5, SDXL, Vega and SSD-1B this equals segmoe's own rule).
    """
    idx: dict[str, list[int]] = {"down": [], "up": []}
    for path, _ in iter_moe_layers(unet):
        where = block_name(path)
        if where.startswith(("down.", "up.")):
            side, i = where.split(".")
            idx[side].append(int(i))
    out = {}
    for side in ("down", "up"):
        out[f"{side}_idx_start"] = min(idx[side]) if idx[side] else 0
        out[f"{side}_idx_end"] = max(idx[side]) + 1 if idx[side] else 0
    return {k: out[k] for k in SEGMOE_DERIVED_KEYS}


def segmoe_config_for(cfg: MergeConfig, unet) -> dict:
    """The ``segmoe_config`` dict segmoe 0.0.4 writes (and reads) for this merge."""
    d = cfg.to_segmoe_dict()
    d.update(block_ranges(unet))
    return d


# --- saving --------------------------------------------------------------------------------
def _unet_config(unet) -> dict:
    return json.loads(unet.to_json_string())


def save_merge(pipe, path: Union[str, Path], config: MergeConfig, overwrite: bool = False) -> Path:
    """Write a merged pipeline to ``path`` in segmoe's folder format, atomically.

    Args:
        pipe: the diffusers pipeline whose UNet holds :class:`MoELayer` s.
        path (`str` or `Path`): the output folder; must not exist unless ``overwrite``.
        config (`MergeConfig`): the merge's config, stored in ``unet/config.json``.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing folder.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise MergeFolderError(f"{path} exists already; choose a new output folder, remove it, or pass overwrite=True")
    if path.exists() and not path.is_dir():
        raise MergeFolderError(f"{path} is a file; the output must be a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        pipe.save_config(tmp)  # model_index.json
        for name, component in pipe.components.items():
            if component is None or name == "unet":
                continue
            component.save_pretrained(tmp / name)
        unet_dir = tmp / "unet"
        unet_dir.mkdir()
        ucfg = _unet_config(pipe.unet)
        ucfg["segmoe_config"] = segmoe_config_for(config, pipe.unet)
        ucfg["segmoe_lab_config"] = config.model_dump()
        weights = UNET_WEIGHTS
        if any(isinstance(layer, LowRankMoELayer) for _, layer in iter_moe_layers(pipe.unet)):
            weights = LOWRANK_WEIGHTS
            ucfg[LOWRANK_KEY] = {"weights": LOWRANK_WEIGHTS, "format": 1,
                                 "note": "experts as base + low-rank deltas; segmoe-lab export writes segmoe's form"}
        (unet_dir / "config.json").write_text(json.dumps(ucfg, indent=2))
        write_safetensors(unet_dir / weights, pipe.unet.state_dict(), metadata={"format": "pt"})
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, trash / "old")
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# --- loading -------------------------------------------------------------------------------
def _lenient_config(segmoe_cfg: dict, source: str) -> MergeConfig:
    """Our config from a folder's ``segmoe_config``; keys segmoe-lab does not know are dropped
    with a warning (segmoe copies whatever its YAML held)."""
    known = set(MergeConfig.model_fields)
    unknown = sorted(set(segmoe_cfg) - known - set(SEGMOE_DERIVED_KEYS))
    if unknown:
        warnings.warn(f"{source}: ignoring segmoe_config keys segmoe-lab does not know: {unknown}", stacklevel=3)
    return parse_config({k: v for k, v in segmoe_cfg.items() if k in known}, source=source)


def read_merge_config(folder: Union[str, Path]) -> tuple[dict, MergeConfig]:
    """The UNet config (without our keys) and the merge config stored in a merge folder."""
    folder = Path(folder)
    cfg_file = folder / "unet" / "config.json"
    if not cfg_file.is_file():
        raise MergeFolderError(f"{folder} is not a merge folder: {cfg_file} is missing")
    ucfg = json.loads(cfg_file.read_text())
    ucfg.pop(LOWRANK_KEY, None)
    seg = ucfg.pop("segmoe_config", None)
    lab = ucfg.pop("segmoe_lab_config", None)
    if seg is None:
        raise MergeFolderError(
            f"{folder} is a diffusers folder but not a SegMoE merge (unet/config.json has no segmoe_config); "
            "load it with diffusers, or use it as base_model/source_model in a merge config"
        )
    cfg = parse_config(lab, source=str(cfg_file)) if lab else _lenient_config(seg, str(cfg_file))
    return ucfg, cfg


def _moe_sites_from_keys(keys) -> dict[str, int]:
    """Site path -> number of experts, read from the tensor names of a merge."""
    sites: dict[str, set] = {}
    for k in keys:
        if k.endswith(".gate.weight"):
            sites.setdefault(k[: -len(".gate.weight")], set())
    for k in keys:
        head, sep, rest = k.partition(".experts.")
        if sep and head in sites:
            sites[head].add(int(rest.split(".")[0]))
    return {p: len(e) for p, e in sites.items()}


def load_merged_unet(folder: Union[str, Path], torch_dtype: torch.dtype = torch.float32):
    """The merged ``UNet2DConditionModel`` of a merge folder (ours or segmoe's), and its config."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    folder = Path(folder)
    ucfg, cfg = read_merge_config(folder)
    compressed = is_compressed(folder)
    weights = folder / "unet" / (LOWRANK_WEIGHTS if compressed else UNET_WEIGHTS)
    if not weights.is_file():
        raise MergeFolderError(f"{folder}: {weights} is missing; the merge was not saved completely")
    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
        shapes = {k: f.get_slice(k).get_shape() for k in keys if ".experts.0.A." in k} if compressed else {}
    sites = _moe_sites_from_keys(keys)
    if not sites:
        raise MergeFolderError(f"{weights} holds no MoE layers (no '<site>.gate.weight' tensors)")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(ucfg)
        for path, n in sites.items():
            base = get_module(unet, path)
            if compressed:  # ranks from the file's shapes: A is (rank, in)
                ranks = {name: shapes[f"{path}.experts.0.A.{name.replace('.', '__')}"][0]
                         for name, p in base.named_parameters() if p.dim() >= 2}
                set_module(unet, path, moe_layer(skeleton_experts(base, n, ranks), cfg, base=base))
            else:
                set_module(unet, path, moe_layer([copy.deepcopy(base) for _ in range(n)], cfg))
    state = load_file(str(weights))
    missing = sorted(set(unet.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(unet.state_dict()))
    if missing or unexpected:
        raise MergeFolderError(
            f"{weights} does not match its unet/config.json: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
        )
    unet.load_state_dict(state, assign=True)
    del state
    for _, layer in iter_moe_layers(unet):
        layer.restack()  # assign=True replaced the experts' stacked views with separate tensors
    if unet.dtype != torch_dtype:
        unet.to(torch_dtype)
    return unet.eval(), cfg


def is_compressed(folder: Union[str, Path]) -> bool:
    """Whether a merge folder holds compressed experts (:mod:`segmoe_lab.merge.lowrank`)."""
    cfg_file = Path(folder) / "unet" / "config.json"
    return cfg_file.is_file() and LOWRANK_KEY in json.loads(cfg_file.read_text())


def pipeline_class(model_type: str):
    """``StableDiffusionPipeline`` for ``sd``, ``StableDiffusionXLPipeline`` for ``sdxl``."""
    import diffusers

    classes = {"sd": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline}
    if model_type not in classes:
        raise ConfigError(f"type={model_type!r} is not supported; choose one of {sorted(classes)}")
    return classes[model_type]


def load_merge(folder: Union[str, Path], torch_dtype: torch.dtype = torch.float32):
    """Load a merge folder written by segmoe-lab or by segmoe 0.0.4.

    Returns:
        ``(pipe, config)``: the diffusers pipeline (UNet with MoE layers) and its ``MergeConfig``.
    """
    folder = Path(folder)
    unet, cfg = load_merged_unet(folder, torch_dtype)
    pipe = pipeline_class(cfg.type).from_pretrained(str(folder), unet=unet, dtype=torch_dtype)
    pipe.segmoe_config = cfg
    return pipe, cfg


# --- compressed <-> segmoe's form -------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _base_site_tensors(cfg: MergeConfig, unet) -> Optional[dict[str, torch.Tensor]]:
    """The base model's tensors at ``unet``'s MoE sites, or None when the base cannot be read offline."""
    from segmoe_lab import sources

    names = [f"{path}.{n}" for path, layer in iter_moe_layers(unet) for n, _ in layer.experts[0].named_parameters()]
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
