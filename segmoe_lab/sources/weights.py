"""Loading resolved sources: whole pipelines, or only the UNet tensors a merge needs.

Example::

    res = resolve_source("runwayml/stable-diffusion-v1-5")
    pipe = load_pipeline(res, "sd")
    shapes = unet_tensor_shapes(res, "sd", dict(pipe.unet.config))
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from segmoe_lab.sources.errors import SourceError
from segmoe_lab.sources.hub import _VARIANT, PREFERRED_VARIANTS
from segmoe_lab.sources.resolved import ResolvedSource


def pipeline_class(model_type: str):
    """``StableDiffusionPipeline`` for ``"sd"``, ``StableDiffusionXLPipeline`` for ``"sdxl"``."""
    import diffusers

    classes = {"sd": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline}
    if model_type not in classes:
        raise ValueError(f"model_type={model_type!r} is not known; choose one of {sorted(classes)}")
    return classes[model_type]


def folder_variant(folder: Path) -> Optional[str]:
    """The weights variant a diffusers folder's UNet is read in: ``"fp16"`` when present (as segmoe), else None."""
    unet = Path(folder) / "unet"
    files = [p.name for p in unet.glob("*.safetensors")] or [p.name for p in unet.glob("*.bin")]
    variants = {m.group(1) if (m := _VARIANT.search(n)) else None for n in files}
    return next((v for v in (*PREFERRED_VARIANTS, *sorted(v for v in variants if v)) if v in variants), None)


def _check_folder_type(folder: Path, model_type: str) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        return
    from segmoe_lab.safe_load import load_json

    parts = load_json(index, SourceError, "pipeline index (model_index.json)")
    name = str(parts.get("_class_name", "")) if isinstance(parts, dict) else ""
    is_xl = "XL" in name
    if (model_type == "sdxl") != is_xl and name:
        want = "sdxl" if is_xl else "sd"
        raise SourceError(f"{folder} is a {name} (model_index.json) but the config says type: {model_type}; "
                          f"set type: {want}, or use a {model_type} model.")


def load_pipeline(resolved: ResolvedSource, model_type: str, torch_dtype=None, *, config=None):
    """Load a diffusers pipeline from local files, without any network access.

    Args:
        resolved (`ResolvedSource`): from :func:`resolve_source`.
        model_type (`str`): ``"sd"`` or ``"sdxl"``.
        torch_dtype (`torch.dtype`, *optional*, defaults to float32).
        config (`str` or `Path`, *optional*): for single files, a diffusers folder whose configs and
            tokenizers describe the model. Default: written from :mod:`segmoe_lab.sources.layouts` for the
            layout the file's tensors show (SD 1.5, SDXL, Segmind Vega, SSD-1B).

    Returns:
        ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.
    """
    import torch

    cls = pipeline_class(model_type)
    dtype = torch_dtype or torch.float32
    extra = {"safety_checker": None, "requires_safety_checker": False} if model_type == "sd" else {}
    if resolved.form == "folder":
        _check_folder_type(resolved.path, model_type)
        return cls.from_pretrained(resolved.path, dtype=dtype, local_files_only=True,
                                   use_safetensors=None if resolved.allow_pickle else True,
                                   variant=folder_variant(resolved.path), **extra)
    from segmoe_lab.sources.single_file import config_folder_for

    config = Path(config) if config else config_folder_for(resolved.path, model_type)
    try:
        return cls.from_single_file(str(resolved.path), config=str(config), dtype=dtype, local_files_only=True,
                                    **extra)
    except (KeyError, RuntimeError, ValueError) as err:
        raise SourceError(f"{resolved.path} could not be loaded as a {model_type} single-file checkpoint with the "
                          f"configs in {config} ({type(err).__name__}: {err}). Check that the file is a full "
                          f"{model_type} model (not a LoRA or a VAE) and that type: matches it.") from None


# --- UNet tensors ---------------------------------------------------------------------------------

class UnetTensors:
    """Read a source's UNet tensors one at a time by diffusers name (see :func:`open_unet_tensors`)."""

    def __init__(self, name_to_key: dict[str, tuple[str, str]], handles: dict, loaded: Optional[dict] = None):
        self._where = name_to_key  # diffusers name -> (file, key in that file)
        self._handles = handles  # file -> safe_open handle
        self._loaded = loaded  # diffusers name -> tensor, for pickled checkpoints read whole

    def names(self) -> list[str]:
        """All UNet tensor names (diffusers naming)."""
        return list(self._loaded if self._loaded is not None else self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, read from the file header only."""
        if self._loaded is not None:
            return tuple(self._loaded[name].shape)
        file, key = self._where[name]
        return self._handles[file].shape(key)

    def get(self, name: str):
        """One tensor, read from disk."""
        if self._loaded is not None:
            return self._loaded[name]
        if name not in self._where:
            raise KeyError(f"the UNet has no tensor {name!r}")
        file, key = self._where[name]
        return self._handles[file].get_tensor(key)


@contextmanager
def open_unet_tensors(resolved: ResolvedSource, model_type: str, unet_config: dict) -> Iterator[UnetTensors]:
    """Open a source's UNet weights for reading single tensors by diffusers name.

    Folders read ``unet/diffusion_pytorch_model*.safetensors`` (fp16 variant and shards included);
    single files map their original (LDM) key names to diffusers names with diffusers' converter.
    Only the tensors asked for are read from disk.

    Example::

        with open_unet_tensors(res, "sd", dict(pipe.unet.config)) as t:
            w = t.get("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight")
    """
    from segmoe_lab.sources.weightfile import open_weights_handle

    if resolved.form == "folder":
        files = _unet_files(resolved.path)
    else:
        files = [resolved.path]
    if any(f.suffix != ".safetensors" for f in files):
        yield UnetTensors({}, {}, loaded=_load_pickled_unet(files, unet_config, resolved.form))
        return
    handles = {f: open_weights_handle(f) for f in files}
    keys = {k: (f, k) for f, h in handles.items() for k in h.keys()}
    if resolved.form == "single_file":
        from segmoe_lab.sources.single_file import ldm_unet_key_map

        mapping = ldm_unet_key_map(list(keys), unet_config)
        keys = {name: keys[ldm] for name, ldm in mapping.items()}
    yield UnetTensors(keys, handles)


def _unet_files(folder: Path) -> list[Path]:
    unet = Path(folder) / "unet"
    variant = folder_variant(folder)
    for index in sorted(unet.glob("*.index*.json"), key=lambda p: ".bin" in p.name):  # safetensors first
        is_variant = bool(_VARIANT.search(index.name.replace(".index", "")))
        if is_variant == bool(variant) and index.name.split(".index")[0].endswith((".safetensors", ".bin")):
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [unet / s for s in shards]
    pick = [p for p in unet.iterdir() if p.suffix in (".safetensors", ".bin")
            and (_VARIANT.search(p.name) is not None) == bool(variant)]
    pick = [p for p in pick if p.suffix == ".safetensors"] or pick
    if len(pick) != 1:
        raise SourceError(f"{unet}: expected one UNet weights file or a shard index, found {[p.name for p in pick]}")
    return pick


def _load_pickled_unet(files: list[Path], unet_config: dict, form: str) -> dict:
    import torch

    state = {}
    for f in files:
        try:  # weights_only: tensors and plain containers, no arbitrary objects
            part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise SourceError(f"{f} could not be read as plain tensors ({type(err).__name__}: {err}); convert it "
                              "to .safetensors with the tool that made it.") from None
        while isinstance(part, dict) and "state_dict" in part:
            part = part["state_dict"]
        state.update(part)
    if form == "single_file":
        from segmoe_lab.sources.single_file import ldm_unet_key_map

        state = {name: state[ldm] for name, ldm in ldm_unet_key_map(list(state), unet_config).items()}
    return state


def unet_tensor_shapes(resolved: ResolvedSource, model_type: str, unet_config: dict) -> dict[str, tuple]:
    """Every UNet tensor's shape, from file headers (no tensor is read)."""
    with open_unet_tensors(resolved, model_type, unet_config) as t:
        return {n: t.shape(n) for n in t.names()}


def read_unet_tensors(resolved: ResolvedSource, model_type: str, unet_config: dict, names=None) -> dict:
    """The UNet tensors ``names`` (all when None), diffusers-named, as stored (dtype unchanged)."""
    with open_unet_tensors(resolved, model_type, unet_config) as t:
        present = set(t.names())
        missing = [n for n in (names or []) if n not in present]
        if missing:
            raise SourceError(f"{resolved.path}: the UNet has no tensor {missing[0]!r} ({len(missing)} missing); "
                              "its architecture differs from the base model's.")
        return {n: t.get(n) for n in (names if names is not None else t.names())}


def load_unet_state_dict(resolved: ResolvedSource, model_type: str, unet_config: dict) -> dict:
    """The whole UNet state dict of a source, diffusers-named (see :func:`read_unet_tensors`)."""
    return read_unet_tensors(resolved, model_type, unet_config)
