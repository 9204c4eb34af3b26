"""Plan memory before building: parameter counts and weight bytes of a merge, without any weights.

:func:`estimate` instantiates the base UNet on the meta device (accelerate's
``init_empty_weights``) from its config, swaps in meta :class:`~segmoe_lab.merge.moe.MoELayer` s at
the sites the merge config names, and counts parameters of the base, the merge, and what an
expert-offloaded merge keeps on the accelerator (:mod:`segmoe_lab.merge.offload`). The UNet config
comes from the base model's folder when it is local, from a single file's tensor names, or from
the real configs in :mod:`segmoe_lab.sources.layouts` (SD 1.5 for ``type: sd``, SDXL base for
``type: sdxl``, or a ``layout`` chosen by the caller: ``vega``, ``ssd1b``); so this works offline.

Counts are of weights; :func:`runtime_bytes` adds what a run holds besides weights on this machine
(the interpreter and the imported libraries, measured in a fresh process), so
``estimate(cfg, runtime=True).resident_bytes("bfloat16")`` predicts the resident memory of a
loaded CPU merge. Activations, the CUDA context and allocator slack come on top.

Example::

    print(estimate(load_config("experiments/segmoe_4x2.yaml")).table())
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

from segmoe_lab.merge.config import MergeConfig, load_config
from segmoe_lab.sources import layouts

BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
_OUR_KEYS = ("segmoe_config", "segmoe_lab_config", "segmoe_lab_lowrank")


@dataclass
class ModelConfigs:
    """The configs an estimate is built from, and where they came from."""

    unet: dict
    text_encoders: dict[str, dict] = field(default_factory=dict)
    vae: Optional[dict] = None
    source: str = ""


@dataclass
class Estimate:
    """Parameter counts of a base model and its merge (weights only)."""

    title: str
    source: str
    sites: int
    num_experts: int
    top_k: int
    base_unet: int
    merge_unet: int
    active_unet: int  # parameters that run per step: the rest of the UNet + gates + top_k experts per site
    offload_unet: int  # parameters on the accelerator with expert offload (top_k slots per site)
    text_encoders: Optional[int]
    vae: Optional[int]
    runtime: Optional[int] = None  # bytes a loaded run holds besides weights (runtime_bytes), when measured

    @property
    def others(self) -> int:
        return (self.text_encoders or 0) + (self.vae or 0)

    def rows(self) -> list[tuple[str, int]]:
        """``(what, parameters)`` in display order."""
        rows = [("base UNet", self.base_unet),
                (f"merged UNet ({self.num_experts} experts at {self.sites} sites)", self.merge_unet),
                (f"  run per step (top-{self.top_k} of {self.num_experts})", self.active_unet),
                (f"  on the accelerator with expert offload (top-{self.top_k} slots per site)", self.offload_unet)]
        if self.text_encoders is not None:
            rows.append(("text encoder(s)", self.text_encoders))
        if self.vae is not None:
            rows.append(("VAE", self.vae))
        if self.text_encoders is not None or self.vae is not None:
            rows += [("base pipeline", self.base_unet + self.others),
                     ("merged pipeline", self.merge_unet + self.others),
                     ("merged pipeline, expert offload", self.offload_unet + self.others)]
        return rows

    def table(self) -> str:
        """A fixed-width table: parameters, float16 and float32 GiB (2^30 bytes)."""
        lines = [self.title, f"  configs: {self.source}",
                 f"  {'':<66}{'params':>12}{'float16':>12}{'float32':>12}"]
        for name, n in self.rows():
            lines.append(f"  {name:<66}{_count(n):>12}{_gib(n * BYTES['float16']):>12}{_gib(n * BYTES['float32']):>12}")
        if self.runtime is not None:
            for dtype in ("float16", "float32"):
                lines.append(f"  resident after loading ({dtype}): merged pipeline + {_gib(self.runtime)} runtime measured "
                             f"here = {_gib(self.resident_bytes(dtype))}")
            lines.append("  activations and the CUDA context come on top.")
        else:
            lines.append("  weights only; activations and the CUDA context come on top.")
        return "\n".join(lines)

    def resident_bytes(self, dtype: str = "float16") -> int:
        """Predicted resident memory of the loaded merged pipeline at ``dtype`` on a CPU: its weights
        plus :attr:`runtime` (measure it with ``estimate(..., runtime=True)``)."""
        if self.runtime is None:
            raise ValueError("resident_bytes needs the measured runtime: estimate(config, runtime=True)")
        return (self.merge_unet + self.others) * BYTES[dtype] + self.runtime

    def bytes(self, what: str, dtype: str = "float16") -> int:
        """Bytes of one row (by its name in :meth:`rows`) at ``dtype``."""
        return dict(self.rows())[what] * BYTES[dtype]


_RUNTIME: dict[str, int] = {}
_RUNTIME_PROBE = """
import diffusers, torch, transformers
import segmoe_lab.merge.pipeline
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")))
"""


def runtime_bytes() -> int:
    """Resident bytes of a fresh Python process that imported what running a merge needs (torch,
    diffusers, transformers, this kit): the part of a loaded merge's memory that is not weights,
    measured on this machine in a child process (a few seconds; once per session). Linux only."""
    import subprocess
    import sys

    from segmoe_lab.errors import SettingsError

    if "rss" not in _RUNTIME:
        fix = "it reads /proc (Linux); leave out --resident / runtime=True for weights only"
        try:
            out = subprocess.run([sys.executable, "-c", _RUNTIME_PROBE], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise SettingsError("measuring the runtime's memory in a child process took over 300 s", fix=fix) from None
        if out.returncode != 0 or not out.stdout.strip().isdigit():
            detail = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise SettingsError(f"measuring the runtime's memory in a child process failed ({detail})", fix=fix)
        _RUNTIME["rss"] = int(out.stdout.strip())
    return _RUNTIME["rss"]


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB"


# --- where the configs come from ------------------------------------------------------------
def _folder_configs(folder: Path, note: str) -> ModelConfigs:
    unet = {k: v for k, v in json.loads((folder / "unet" / "config.json").read_text()).items() if k not in _OUR_KEYS}
    encoders = {name: json.loads((folder / name / "config.json").read_text())
                for name in ("text_encoder", "text_encoder_2") if (folder / name / "config.json").is_file()}
    vae = json.loads((folder / "vae" / "config.json").read_text()) if (folder / "vae" / "config.json").is_file() else None
    return ModelConfigs(unet, encoders, vae, f"{note} {folder}")


def _layout_configs(layout: str, note: str) -> ModelConfigs:
    return ModelConfigs(layouts.unet_config(layout), layouts.text_encoder_configs(layout), layouts.vae_config(layout),
                        f"{note}: {layout} ({layouts.HUB_REPOS[layout]}), from segmoe_lab.sources.layouts")


def model_configs(cfg: MergeConfig, layout: Optional[str] = None) -> ModelConfigs:
    """The base model's configs: ``layout`` if given, else the local base folder or single file,
    else the layout named by the base's hub id, else SD 1.5 / SDXL base by ``cfg.type``."""
    if layout is not None:
        if layouts.model_type(layout) != cfg.type:
            raise ValueError(f"layout={layout!r} is a type: {layouts.model_type(layout)} model but the config says "
                             f"type: {cfg.type}; choose one of "
                             f"{[n for n in layouts.LAYOUTS if layouts.model_type(n) == cfg.type]}")
        return _layout_configs(layout, "chosen layout")
    base = Path(cfg.base_model).expanduser()
    if (base / "unet" / "config.json").is_file():
        return _folder_configs(base, "base model folder")
    if base.is_file():
        from segmoe_lab.sources.single_file import checkpoint_keys, detect_layout

        return _layout_configs(detect_layout(checkpoint_keys(base), cfg.type), f"layout of {base.name}'s tensors")
    for name, repo in layouts.HUB_REPOS.items():
        if cfg.base_model.rstrip("/") == repo and layouts.model_type(name) == cfg.type:
            return _layout_configs(name, "base model's layout")
    return _layout_configs("sd15" if cfg.type == "sd" else "sdxl", f"type: {cfg.type} implies")


# --- counting on the meta device ---------------------------------------------------------------
def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_merge(unet_config: dict, cfg: MergeConfig, saved: Optional[Mapping[str, tuple]] = None):
    """``(base_params, merged UNet on the meta device, sites)`` for ``cfg`` over ``unet_config``.

    With ``cfg.compress``, experts are low-rank deltas of the ranks a fixed ``rank`` gives, or of the
    ranks a saved compressed merge holds (``saved``: its files' tensor name -> shape)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from segmoe_lab.merge import lowrank as _lowrank  # noqa: F401  (importing it registers the compressed layer kinds)
    from segmoe_lab.merge.deltas import compressible, planned_ranks, skeleton_experts
    from segmoe_lab.merge.discovery import find_sites, get_module, set_module
    from segmoe_lab.merge.io import _saved_ranks
    from segmoe_lab.merge.kinds import extra_layer, find_extra_sites
    from segmoe_lab.merge.moe import moe_layer

    def layer(factory, path):  # E copies of the site's module, or E low-rank experts over it
        site = get_module(unet, path)
        if cfg.compress is None or not compressible(site):
            return factory([copy.deepcopy(site) for _ in range(cfg.num_experts)], cfg)
        ranks = _saved_ranks(saved, path, site) if saved else planned_ranks(site, cfg.compress)
        return factory(skeleton_experts(site, cfg.num_experts, ranks), cfg, base=site)

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        base = _params(unet)
        sites = find_sites(unet, cfg.moe_layers, cfg.include_mid)
        for s in sites:
            set_module(unet, s.path, layer(moe_layer, s.path))
        extra = find_extra_sites(unet, cfg.moe_extra)  # moe_extra's kinds cost E copies of their layers too
        for s in extra:
            set_module(unet, s.path, layer(extra_layer, s.path))
    return base, unet, [*sites, *extra]


def _saved_shapes(folder: Path) -> Optional[dict[str, tuple]]:
    """Tensor name -> shape of a compressed merge folder's files (headers only), or None if not compressed."""
    from segmoe_lab.merge.io import EXTRAS_WEIGHTS, LOWRANK_WEIGHTS, _file_shapes, is_compressed

    if not is_compressed(folder):
        return None
    files = [folder / "unet" / name for name in (LOWRANK_WEIGHTS, EXTRAS_WEIGHTS)]  # segmoe's sites; extra kinds
    return {k: v for f in files if f.is_file() for k, v in _file_shapes(f).items()}


def _text_encoder_params(configs: dict[str, dict]) -> int:
    import transformers
    from accelerate import init_empty_weights

    total = 0
    for cfg in configs.values():
        cls = getattr(transformers, (cfg.get("architectures") or ["CLIPTextModel"])[0])
        with init_empty_weights():
            total += _params(cls(transformers.CLIPTextConfig(**cfg)))
    return total


def _vae_params(config: dict) -> int:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights():
        return _params(AutoencoderKL.from_config(config))


def estimate(config: Union[MergeConfig, str, Path], layout: Optional[str] = None, runtime: bool = False) -> Estimate:
    """Parameter counts of a merge and its base, without loading weights.

    Args:
        config (`MergeConfig`, or the path of a YAML config or of a merge folder).
        layout (`str`, *optional*): one of :data:`segmoe_lab.sources.layouts.LAYOUTS`, overriding the
            layout found from the config (e.g. ``"vega"`` or ``"ssd1b"`` for a hub id not known here).
        runtime (`bool`): also measure :func:`runtime_bytes`, for :meth:`Estimate.resident_bytes`.
    """
    from segmoe_lab.merge.offload import resident_bytes_plan

    configs = saved = None
    if isinstance(config, (str, Path)) and Path(config).is_dir():
        from segmoe_lab.merge.io import read_merge_config

        folder = Path(config)
        _, cfg = read_merge_config(folder)
        saved = _saved_shapes(folder)
        configs = _folder_configs(folder, "merge folder") if layout is None else None
    else:
        cfg = config if isinstance(config, MergeConfig) else load_config(config)
    configs = configs or model_configs(cfg, layout)
    base, unet, sites = meta_merge(configs.unet, cfg, saved)
    merged = _params(unet)
    import torch

    offload = resident_bytes_plan(unet, dtype=torch.float32)["total"] // 4  # bytes at 4 per parameter
    from segmoe_lab.merge.kinds import iter_extra_layers
    from segmoe_lab.merge.lowrank import routed_layers

    layers = routed_layers(unet)
    active = merged - sum((layer.num_experts - layer.top_k) * _params(layer.experts[0]) for _, layer in layers)
    extra_params = sum(_params(layer) for _, layer in iter_extra_layers(unet))
    # (expert offload streams only segmoe's sites: extra kinds are counted resident in offload_unet)
    title = (f"{cfg.num_experts}x{cfg.num_experts_per_tok} {cfg.type} merge of {cfg.base_model}, "
             f"moe_layers={cfg.moe_layers}{', include_mid' if cfg.include_mid else ''}"
             f"{f', moe_extra={cfg.moe_extra} ({extra_params / 1e6:.2f} M params in extra kinds)' if cfg.moe_extra else ''}"
             + (f", experts as base + rank-{cfg.compress.rank if saved is None else 'saved'} deltas" if cfg.compress else ""))
    return Estimate(title, configs.source, len(sites), cfg.num_experts, min(cfg.num_experts_per_tok, cfg.num_experts),
                    base, merged, active, offload,
                    _text_encoder_params(configs.text_encoders) if configs.text_encoders else None,
                    _vae_params(configs.vae) if configs.vae else None, runtime_bytes() if runtime else None)
