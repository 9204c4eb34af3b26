"""``SegMoEPipeline``: segmoe 0.0.4's entry point, as a thin wrapper over a diffusers pipeline.

Example::

    from segmoe_lab import SegMoEPipeline
    pipe = SegMoEPipeline("experiments/toy.yaml")           # build from a config
    pipe.save_pretrained("merges/toy")
    pipe = SegMoEPipeline("merges/toy")                     # or load a folder (ours or segmoe's)
    image = pipe("two red circles, neon style", num_inference_steps=20).images[0]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from segmoe_lab.atomic import backup_path
from segmoe_lab.errors import ConfigError, SettingsError
from segmoe_lab.merge.build import DTYPES, build_merge, make_scheduler
from segmoe_lab.merge.config import MergeConfig, load_config, parse_config
from segmoe_lab.merge.gating import gate_report
from segmoe_lab.merge.io import (
    load_merge,
    read_merge_config,
    save_merge,
    segmoe_config_for,
)
from segmoe_lab.merge.moe import iter_moe_layers, set_routing
from segmoe_lab.merge.settings import check_pipeline_kwargs


def default_device() -> str:
    """``"cuda"`` when a GPU is present, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device(device: Optional[str]) -> str:
    if device is None:
        return default_device()
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise SettingsError(f"device={device!r} is not a device; use cpu, cuda or cuda:<index>") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"device={device!r} but no CUDA GPU is visible; use cpu (or leave device unset)")
    return str(device)


def _dtype(value) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise SettingsError(f"torch_dtype={value!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[value]


class SegMoEPipeline:
    """A SegMoE merge, built from a config or loaded from a folder or hub id.

    Args:
        config_or_path: a YAML config file, a :class:`MergeConfig` (or dict), a merge folder
            written by segmoe-lab or segmoe, or a Hugging Face repo id of such a folder.
        device (`str`, *optional*): defaults to ``"cuda"`` when available, else ``"cpu"``.
        torch_dtype (`torch.dtype` or `str`, *optional*): defaults to the config's ``dtype``
            when building, float32 when loading on CPU and float16 on CUDA.
        progress (`bool`, *optional*, defaults to `True`): progress bars while building.

    Attributes:
        pipe: the diffusers pipeline (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``).
        unet: ``pipe.unet``, whose MoE sites are :class:`~segmoe_lab.merge.moe.MoELayer` s.
        config (`MergeConfig`): the merge's config.
    """

    def __init__(self, config_or_path: Union[str, Path, MergeConfig, dict], device: Optional[str] = None,
                 torch_dtype=None, progress: bool = True):
        self.device = _device(device)
        dtype = _dtype(torch_dtype)
        if isinstance(config_or_path, (MergeConfig, dict)):
            self._build(parse_config(config_or_path), dtype, progress)
            return
        path = Path(config_or_path)
        if path.is_file() and path.suffix.lower() not in (".yaml", ".yml"):
            raise ConfigError(f"{path} is a {path.suffix or 'suffix-less'} file, not a merge: give a merge config "
                              "(.yaml), a merge folder or a hub id; to merge this model, name it as base_model or "
                              "source_model in a config and `segmoe-lab build` it")
        if path.is_file():
            self._build(load_config(path), dtype, progress)
            return
        if not path.exists() and backup_path(path).is_dir():
            read_merge_config(path)  # names the backup an interrupted `build --overwrite` left
        if not path.is_dir():
            from segmoe_lab.sources import resolve_source

            path = resolve_source(str(config_or_path)).path
        load_dtype = dtype or (torch.float16 if self.device.startswith("cuda") else torch.float32)
        self.pipe, self.config = load_merge(path, torch_dtype=load_dtype)
        self.pipe.to(self.device)

    def _build(self, cfg: MergeConfig, dtype, progress: bool) -> None:
        self.pipe = build_merge(cfg, device=self.device, torch_dtype=dtype, progress=progress)
        self.config = cfg

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def segmoe_config(self) -> dict:
        """The ``segmoe_config`` dict segmoe 0.0.4 would store for this merge."""
        return segmoe_config_for(self.config, self.unet)

    def __call__(self, *args: Any, **kwargs: Any):
        """Generate: forwards everything to the diffusers pipeline, after checking the sampling
        settings given (``num_inference_steps``, ``guidance_scale``, ``height``, ``width``,
        ``num_images_per_prompt``) with :class:`~segmoe_lab.merge.settings.GenerationSettings`."""
        check_pipeline_kwargs(kwargs)
        return self.pipe(*args, **kwargs)

    def save_pretrained(self, path: Union[str, Path], overwrite: bool = False) -> Path:
        """Write the merge in segmoe's folder format (atomically; see :func:`segmoe_lab.merge.io.save_merge`)."""
        return save_merge(self.pipe, path, self.config, overwrite=overwrite)

    def to(self, device=None, dtype=None) -> "SegMoEPipeline":
        """Move the whole pipeline, like diffusers' ``.to``."""
        if device is not None:
            self.device = str(device)
        self.pipe.to(*(a for a in (device, _dtype(dtype)) if a is not None))
        return self

    def set_routing(self, routing: Optional[str] = None, top_k: Optional[int] = None) -> "SegMoEPipeline":
        """Switch the routing policy and/or ``num_experts_per_tok`` of every MoE layer in place."""
        set_routing(self.unet, routing, top_k)
        updates = {k: v for k, v in (("routing", routing), ("num_experts_per_tok", top_k)) if v is not None}
        self.config = self.config.model_copy(update=updates)
        return self

    def set_scheduler(self, name: str) -> "SegMoEPipeline":
        """Use another scheduler (``ddpm``, ``euler_a``, ``dpm``, ...), built from the current one's config."""
        self.pipe.scheduler = make_scheduler(name, self.pipe.scheduler)
        self.config = self.config.model_copy(update={"scheduler": name})
        return self

    @property
    def moe_layers(self) -> list:
        """``[(site path, MoELayer)]`` in module order."""
        return list(iter_moe_layers(self.unet))

    def gate_report(self):
        """Per-site gate diagnostics (cosine similarity between expert rows, condition number)."""
        import pandas as pd

        return pd.DataFrame(gate_report(self.unet))

    def img2img(self):
        """An image-to-image pipeline sharing this merge's components (diffusers ``from_pipe``)."""
        from diffusers import AutoPipelineForImage2Image

        return AutoPipelineForImage2Image.from_pipe(self.pipe)

    def inpaint(self):
        """An inpainting pipeline sharing this merge's components (diffusers ``from_pipe``)."""
        from diffusers import AutoPipelineForInpainting

        return AutoPipelineForInpainting.from_pipe(self.pipe)

    def __repr__(self) -> str:
        c = self.config
        return f"SegMoEPipeline({c.num_experts}x{c.num_experts_per_tok} {c.type}, moe_layers={c.moe_layers}, routing={c.routing}, device={self.device})"
