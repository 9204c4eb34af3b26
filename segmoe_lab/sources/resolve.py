"""Where model weights come from: a ``source_model`` string -> local files -> pipelines / UNet tensors.

A source is one of (tried in this order):

- a download link (``https://civitai.com/api/download/models/<id>``, or any http(s) URL):
  streamed once into ``$SEGMOE_LAB_CACHE/civitai`` (default ``~/.cache/segmoe_lab``), resumable;
- a local diffusers folder (``model_index.json`` or a ``unet/`` subfolder) or single file
  (``.safetensors``; pickled ``.ckpt``/``.pt`` only with ``allow_ckpt=True``);
- a Hugging Face repo id (``org/name``, or ``org/name/file.safetensors`` for one file of a repo):
  read from the Hugging Face cache when it is there, else downloaded (only what a diffusers
  pipeline needs, safetensors only). ``HF_HUB_OFFLINE=1`` and an unreachable Hub fail at once.

Every failure is a :class:`SourceError` saying what was tried and how to fix it.

Example::

    res = resolve_source("runwayml/stable-diffusion-v1-5")
    pipe = load_pipeline(res, "sd")
    shapes = unet_tensor_shapes(res, "sd", dict(pipe.unet.config))
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from segmoe_lab.sources.errors import SourceError, default_cache_dir
from segmoe_lab.sources.hub import _resolve_hub
from segmoe_lab.sources.local import _resolve_local
from segmoe_lab.sources.resolved import ResolvedSource

CIVITAI_BASE = "https://civitai.com"
CIVITAI_TOKEN_ENV = "CIVITAI_API_TOKEN"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/.+\.safetensors)?")

def resolve_source(source: str, *, cache_dir=None, allow_ckpt: bool = False, model_type: Optional[str] = None,
                   unet_only: bool = False, timeout: float = 10.0, civitai_base: str = CIVITAI_BASE,
                   progress: bool = True) -> ResolvedSource:
    """Turn a ``source_model`` string into local files, downloading them if needed.

    Args:
        source (`str`): a local folder or file, a Hugging Face repo id, or a download URL.
        cache_dir (`str` or `Path`, *optional*): where downloads go; the Hugging Face cache for repo ids
            (default: ``HF_HUB_CACHE``), the download cache for links (default: ``$SEGMOE_LAB_CACHE/civitai``).
        allow_ckpt (`bool`, *optional*, defaults to `False`): accept pickled weights (``.ckpt``, ``.pt``,
            ``.bin``). Unpickling runs code from the file: only for files you trust.
        model_type (`str`, *optional*): ``"sd"`` or ``"sdxl"``. Not used to resolve (an expert of the wrong
            type is reported by the builder, tensor by tensor); :func:`load_pipeline` checks it.
        unet_only (`bool`, *optional*, defaults to `False`): only the UNet is needed (an expert): a hub repo
            downloads just ``unet/``, and a folder without text encoders or VAE is accepted.
        timeout (`float`, *optional*, defaults to 10): seconds to wait for a server to answer.
        civitai_base (`str`, *optional*): links starting with it get the CivitAI API token.
        progress (`bool`, *optional*, defaults to `True`): show download progress bars.

    Returns:
        A :class:`ResolvedSource`.
    """
    source = source.strip()
    if re.match(r"https?://", source):
        from segmoe_lab.sources.downloads import download_url

        civitai = source.startswith(civitai_base.rstrip("/") + "/") or urlsplit(source).hostname == "civitai.com"
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "civitai"
        path = download_url(source, root, token=os.environ.get(CIVITAI_TOKEN_ENV) if civitai else None,
                            allow_pickle=allow_ckpt, timeout=timeout, progress=progress,
                            token_env=CIVITAI_TOKEN_ENV if civitai else None)
        return ResolvedSource(path, "single_file", "civitai" if civitai else "url", source, allow_ckpt)
    local = Path(source).expanduser()
    if not local.exists() and os.path.lexists(local):  # exists() is False for a dangling link or a loop
        raise SourceError(f"source_model {source!r} is a symbolic link that leads nowhere (dangling, or a loop); "
                          f"fix or remove the link {local}.")
    if local.exists():
        return _resolve_local(local, source, allow_ckpt, unet_only)
    if _HUB_ID.fullmatch(source):
        return _resolve_hub(source, cache_dir, allow_ckpt, timeout, unet_only)
    raise SourceError(
        f"source_model {source!r} is neither an existing path ({local.resolve()} does not exist), a Hugging Face "
        "repo id (org/name) nor an http(s) download link. Fix the spelling, or give the full path of a diffusers "
        "folder or a .safetensors file.")


# --- local files ---------------------------------------------------------------------------------
