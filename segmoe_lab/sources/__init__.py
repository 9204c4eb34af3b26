"""Stage 1, sources: a ``source_model`` string -> local files -> pipelines or UNet tensors.

A source is a download link (CivitAI or any http(s) URL, :mod:`.downloads`), a local diffusers
folder or single weights file (:mod:`.local`, :mod:`.single_file`), or a Hugging Face repo id
(:mod:`.hub`). :func:`resolve_source` tries them in that order; :mod:`.weights` loads the result.
:mod:`.layouts` holds the real SD 1.5 / SDXL / Vega / SSD-1B configs that single files and
estimates need. Every failure is a :class:`SourceError` that says what was tried and how to fix it.

Example::

    from segmoe_lab import sources
    res = sources.resolve_source("runwayml/stable-diffusion-v1-5")
    pipe = sources.load_pipeline(res, "sd")
"""
from segmoe_lab.sources.errors import CACHE_ENV, SourceError, default_cache_dir
from segmoe_lab.sources.resolve import CIVITAI_TOKEN_ENV, resolve_source
from segmoe_lab.sources.resolved import ResolvedSource
from segmoe_lab.sources.weights import (
    UnetTensors,
    folder_variant,
    load_pipeline,
    load_unet_state_dict,
    open_unet_tensors,
    pipeline_class,
    read_unet_tensors,
    unet_tensor_shapes,
)

__all__ = [
    "CACHE_ENV", "CIVITAI_TOKEN_ENV", "ResolvedSource", "SourceError", "UnetTensors", "default_cache_dir",
    "folder_variant", "load_pipeline", "load_unet_state_dict", "open_unet_tensors", "pipeline_class",
    "read_unet_tensors", "resolve_source", "unet_tensor_shapes",
]
