"""Save and load merges in the folder format segmoe 0.0.4 writes.

A merge folder is a diffusers pipeline folder (``model_index.json``, ``scheduler/``,
``text_encoder(_2)/``, ``tokenizer(_2)/``, ``vae/``, ``unet/``) whose ``unet/config.json`` also
carries ``segmoe_config`` (the keys segmoe reads back: its YAML config plus ``num_experts`` and
the block ranges ``down_idx_start`` ... ``up_idx_end``) and whose
``unet/diffusion_pytorch_model.safetensors`` uses segmoe's tensor names
(``<site>.gate.weight``, ``<site>.experts.<i>.<param>``). segmoe-lab adds
``segmoe_lab_config`` (our full config: routing, gate options, ...), which segmoe ignores.

What segmoe's format cannot hold is saved beside it in ``unet/segmoe_lab_extras.safetensors``
(:data:`EXTRAS_WEIGHTS`): the layers of extra kinds (``moe_extra``; segmoe's file gets the
experts' *average* there under the plain layer names, so segmoe 0.0.4 still loads the folder and
runs that average), gate biases (``<site>.gate.offset``) and the prompt router
(``segmoe_router.*``). segmoe ignores that file; segmoe-lab refuses a folder whose config and
extras file disagree.

This module is the one definition of that format. Writes go to a hidden temporary folder that
is renamed into place only when complete (:mod:`segmoe_lab.atomic`). A folder is checked
against its own config before it loads: expert count, site list, tensor names and shapes.
"""
from __future__ import annotations

import copy
import json
import shutil
import struct
import warnings
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from segmoe_lab.atomic import (
    backup_path,
    disk_full,
    recover,
    replace_folder,
    temp_folder,
)
from segmoe_lab.merge.config import (
    SEGMOE_DERIVED_KEYS,
    ConfigError,
    MergeConfig,
    parse_config,
)
from segmoe_lab.merge.discovery import block_name, find_sites, get_module, set_module
from segmoe_lab.merge.folder_checks import (
    MergeFolderError,
    _check_experts,
    _check_shapes,
    _check_sites,
    _moe_sites_from_keys,
)
from segmoe_lab.merge.kinds import extra_layer, find_extra_sites, iter_extra_layers
from segmoe_lab.merge.deltas import skeleton_experts
from segmoe_lab.merge.lowrank import LowRankMoELayer, LowRankSampleMoE
from segmoe_lab.merge.moe import iter_moe_layers, moe_layer
from segmoe_lab.merge.streaming import _read_safetensors_into
from segmoe_lab.merge.prompt_router import (
    ROUTER_NAME,
    Gate,
    PromptRouter,
    attach_router,
)
from segmoe_lab.safe_load import load_json
from segmoe_lab.sources.weightfile import open_weights

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
EXTRAS_WEIGHTS = "segmoe_lab_extras.safetensors"
# Compressed merges (merge.lowrank) keep their UNet in this file instead of UNET_WEIGHTS, and say so
# under this key of unet/config.json; segmoe 0.0.4 cannot read them (`segmoe-lab export` writes its form).
LOWRANK_WEIGHTS = "segmoe_lab_lowrank.safetensors"
LOWRANK_KEY = "segmoe_lab_lowrank"
_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


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

    The merge is written to a temporary folder beside ``path``; with ``overwrite`` the old folder
    is kept as ``.NAME.backup`` until the new one is in place (see :mod:`segmoe_lab.atomic`), so
    a kill at any moment leaves the old or the new merge, never neither.

    Args:
        pipe: the diffusers pipeline whose UNet holds :class:`MoELayer` s.
        path (`str` or `Path`): the output folder; must not exist unless ``overwrite``.
        config (`MergeConfig`): the merge's config, stored in ``unet/config.json``.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing folder.
    """
    path = Path(path)
    recover(path)  # first: a merge restored from an interrupted overwrite counts as existing
    if path.exists() and not overwrite:
        raise MergeFolderError(f"{path} exists already; choose a new output folder, remove it, or pass overwrite=True")
    if path.exists() and not path.is_dir():
        raise MergeFolderError(f"{path} is a file; the output must be a folder")
    tmp = temp_folder(path)
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
        segmoe_state, extras = split_extras(pipe.unet)
        write_safetensors(unet_dir / weights, segmoe_state, metadata={"format": "pt"})
        if extras:
            write_safetensors(unet_dir / EXTRAS_WEIGHTS, extras, metadata={"format": "pt"})
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        friendly = disk_full(err, path)
        if friendly is err:
            raise
        raise friendly from None
    return replace_folder(tmp, path)


def split_extras(unet) -> tuple[dict, dict]:
    """``(segmoe's tensors, the extras file's)`` of a merged UNet.

    Extra-kind layers, gate offsets and the router go to the extras; segmoe's file gets each extra
    layer's experts averaged under its plain names, so segmoe 0.0.4 can still build its UNet."""
    state = unet.state_dict()
    extra_paths = tuple(p + "." for p, _ in iter_extra_layers(unet))
    main, extras = {}, {}
    for k, v in state.items():
        if k.startswith(extra_paths) or k.endswith(".gate.offset") or k.startswith(ROUTER_NAME + "."):
            extras[k] = v
        else:
            main[k] = v
    for path, layer in iter_extra_layers(unet):
        if isinstance(layer, LowRankSampleMoE):
            continue  # a compressed merge's UNet file is segmoe-lab's own: no averaged copy for segmoe
        for name, _ in layer.experts[0].named_parameters():
            main[f"{path}.{name}"] = torch.stack([e.get_parameter(name).detach() for e in layer.experts]).mean(0)
    return main, extras


def _install_extras(unet, cfg: MergeConfig, extras: dict) -> None:
    """Meta layers for what the extras file holds (name -> shape; called inside ``init_empty_weights``)."""
    for s in find_extra_sites(unet, cfg.moe_extra):
        base = get_module(unet, s.path)
        ranks = _saved_ranks(extras, s.path, base)
        experts = (skeleton_experts(base, cfg.num_experts, ranks) if ranks
                   else [copy.deepcopy(base) for _ in range(cfg.num_experts)])
        set_module(unet, s.path, extra_layer(experts, cfg, base=base))
    for k in extras:
        if k.endswith(".gate.offset"):
            layer = get_module(unet, k[: -len(".gate.offset")])
            layer.gate = Gate.like(layer.gate, torch.zeros(layer.gate.out_features))
    if f"{ROUTER_NAME}.weight" in extras:
        setattr(unet, ROUTER_NAME, PromptRouter(torch.zeros(extras[f"{ROUTER_NAME}.weight"]),
                                                torch.zeros(extras[f"{ROUTER_NAME}.bias"]), cfg.gate.router_pool))


def _saved_ranks(tensors: Mapping, path: str, base) -> Optional[dict[str, int]]:
    """Weight name -> rank of the compressed experts saved at ``path`` (``A`` is ``(rank, in)``), or
    None where the site's experts are saved full. ``tensors`` maps names to tensors or shapes."""
    names = [n for n, p in base.named_parameters() if p.dim() >= 2]
    keys = {n: f"{path}.experts.0.A.{n.replace('.', '__')}" for n in names}
    if not names or not all(k in tensors for k in keys.values()):
        return None
    return {n: tuple(tensors[k].shape if hasattr(tensors[k], "shape") else tensors[k])[0] for n, k in keys.items()}


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
    if not folder.exists() and backup_path(folder).is_dir():
        raise MergeFolderError(f"{folder} is missing, but {backup_path(folder)} holds the merge that an interrupted "
                               "`build --overwrite` was replacing; rename it back, or build again (which restores it)")
    if not folder.is_dir():
        raise MergeFolderError(f"{folder}: no such merge folder")
    if not cfg_file.is_file():
        raise MergeFolderError(f"{folder} is not a merge folder: {cfg_file} is missing")
    ucfg = load_json(cfg_file, MergeFolderError, "UNet config (config.json)")
    if not isinstance(ucfg, dict):
        raise MergeFolderError(f"{cfg_file}: a UNet config is a JSON object, not {type(ucfg).__name__}")
    ucfg.pop(LOWRANK_KEY, None)
    seg = ucfg.pop("segmoe_config", None)
    lab = ucfg.pop("segmoe_lab_config", None)
    if seg is None:
        raise MergeFolderError(
            f"{folder} is a diffusers folder but not a SegMoE merge (unet/config.json has no segmoe_config); "
            "load it with diffusers, or use it as base_model/source_model in a merge config"
        )
    if not isinstance(lab or seg, dict):
        raise MergeFolderError(f"{cfg_file}: segmoe_config is not a mapping (got {type(lab or seg).__name__})")
    cfg = parse_config(lab, source=str(cfg_file)) if lab else _lenient_config(seg, str(cfg_file))
    return ucfg, cfg


def load_merged_unet(folder: Union[str, Path], torch_dtype: torch.dtype = torch.float32):
    """The merged ``UNet2DConditionModel`` of a merge folder (ours or segmoe's), and its config."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    ucfg, cfg = read_merge_config(folder)
    compressed = is_compressed(folder)
    weights = folder / "unet" / (LOWRANK_WEIGHTS if compressed else UNET_WEIGHTS)
    if not weights.is_file():
        raise MergeFolderError(f"{folder}: {weights} is missing; the merge was not saved completely")
    shapes = _file_shapes(weights)
    sites = _moe_sites_from_keys(shapes)
    if not sites:
        raise MergeFolderError(f"{weights} holds no MoE layers (no '<site>.gate.weight' tensors)")
    _check_experts(sites, cfg, weights)
    extras_file = folder / "unet" / EXTRAS_WEIGHTS
    extras = _file_shapes(extras_file) if extras_file.is_file() else {}  # name -> shape; read below
    if (cfg.moe_extra or cfg.router != "none") and not extras:
        raise MergeFolderError(f"{folder}: its config routes moe_extra={cfg.moe_extra} router={cfg.router} but "
                               f"{extras_file} is missing; the merge was not saved completely")
    with init_empty_weights():
        try:
            unet = UNet2DConditionModel.from_config(ucfg)
        except Exception as err:  # noqa: BLE001 - any diffusers complaint means the same: a bad config.json
            raise MergeFolderError(f"{weights.parent / 'config.json'}: not a UNet config diffusers can build "
                                   f"({type(err).__name__}: {str(err)[:160]})") from None
        _check_sites(sites, {s.path for s in find_sites(unet, cfg.moe_layers, cfg.include_mid)}, cfg, weights)
        for path, n in sites.items():
            base = get_module(unet, path)
            if compressed:
                set_module(unet, path, moe_layer(skeleton_experts(base, n, _saved_ranks(shapes, path, base)), cfg, base=base))
            else:
                set_module(unet, path, moe_layer([copy.deepcopy(base) for _ in range(n)], cfg))
        _install_extras(unet, cfg, extras)
    plain = tuple(p + "." for p, _ in iter_extra_layers(unet))  # segmoe's averaged copies: only for segmoe
    main = {k: s for k, s in shapes.items() if not (extras and k.startswith(plain))}
    _check_shapes({k: tuple(v.shape) for k, v in unet.state_dict().items()}, {**main, **extras}, weights)
    # Allocate the merged UNet once (experts as views of their stacks) and read every tensor straight
    # into it with plain file reads: never a state dict beside the model, and no mapped file pages.
    unet.to(torch_dtype)  # still on the meta device: free
    unet.to_empty(device="cpu")
    state = unet.state_dict()
    _read_safetensors_into(weights, [(k, state[k]) for k in main])
    if extras:
        _read_safetensors_into(extras_file, [(k, state[k]) for k in extras])
    del state
    for _, layer in iter_moe_layers(unet):
        layer.restack()  # adopts the views it already has (no copy)
    return unet.eval(), cfg


def _file_shapes(path: Path) -> dict[str, tuple]:
    """Tensor name -> shape of a safetensors file (its header, checked; no tensor is read)."""
    with open_weights(path) as f:
        return {k: tuple(f.shape(k)) for k in f.keys()}


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
    from segmoe_lab.sources.local import (
        WEIGHT_COMPONENTS,
        _check_components,
        _check_headers,
    )

    folder = Path(folder)
    unet, cfg = load_merged_unet(folder, torch_dtype)
    if not (folder / "model_index.json").is_file():
        raise MergeFolderError(f"{folder / 'model_index.json'} is missing; the merge folder is incomplete, rebuild it")
    load_json(folder / "model_index.json", MergeFolderError, "pipeline index (model_index.json)")
    _check_components(folder)
    _check_headers(folder, [c for c in WEIGHT_COMPONENTS if c != "unet"])
    try:
        pipe = pipeline_class(cfg.type).from_pretrained(str(folder), unet=unet, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise MergeFolderError(f"{folder}: diffusers could not load the pipeline parts around the merged UNet "
                               f"({type(err).__name__}: {str(err)[:200]}); the folder is damaged, rebuild it") from None
    router = getattr(unet, ROUTER_NAME, None)
    if router is not None:
        attach_router(pipe, router)
    pipe.segmoe_config = cfg
    return pipe, cfg


# --- compressed <-> segmoe's form -------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


