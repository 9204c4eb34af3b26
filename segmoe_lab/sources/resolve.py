"""Where model weights come from: a ``source_model`` string -> local files (:func:`resolve_source`).

A source is one of the kinds in :data:`SOURCE_KINDS` (tried in this order; a new kind is one
function registered with :func:`source_kind`):

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
    pipe = load_pipeline(res, "sd")          # segmoe_lab.sources.weights
"""
from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

from segmoe_lab.registry import Registry
from segmoe_lab.sources.errors import SourceError, default_cache_dir
from segmoe_lab.sources.hub import _resolve_hub
from segmoe_lab.sources.local import _resolve_local
from segmoe_lab.sources.resolved import ResolvedSource

CIVITAI_BASE = "https://civitai.com"
CIVITAI_TOKEN_ENV = "CIVITAI_API_TOKEN"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/.+\.safetensors)?")


@dataclass(frozen=True)
class SourceRequest:
    """A ``source_model`` string and the options it is resolved with (see :func:`resolve_source`)."""

    source: str
    cache_dir: Optional[str] = None
    allow_ckpt: bool = False
    unet_only: bool = False
    timeout: float = 10.0
    civitai_base: str = CIVITAI_BASE
    progress: bool = True


@dataclass(frozen=True)
class SourceKind:
    """A registered kind of model source: when a string is one, and how it becomes local files."""

    name: str
    matches: Callable[[SourceRequest], bool]
    resolve: Callable[[SourceRequest], ResolvedSource]

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.resolve) or ""


# Tried in order: a link is never a path, and an existing path wins over a hub id of the same spelling.
SOURCE_KINDS: Registry[SourceKind] = Registry("source_model", "a kind of model source")


def source_kind(name: str, matches: Callable[[SourceRequest], bool]) -> Callable:
    """Register ``resolve`` as the source kind ``name``, tried after those registered before it."""

    def register(resolve: Callable[[SourceRequest], ResolvedSource]) -> Callable:
        SOURCE_KINDS.add(name, SourceKind(name, matches, resolve))
        return resolve

    return register


@source_kind("url", lambda r: re.match(r"https?://", r.source) is not None)
def resolve_url(r: SourceRequest) -> ResolvedSource:
    """A download link (CivitAI's ``/api/download/models/<id>`` or any http(s) URL): streamed once into
    ``$SEGMOE_LAB_CACHE/civitai``, resumably; CivitAI links get ``$CIVITAI_API_TOKEN``."""
    from segmoe_lab.sources.downloads import download_url

    civitai = r.source.startswith(r.civitai_base.rstrip("/") + "/") or urlsplit(r.source).hostname == "civitai.com"
    root = Path(r.cache_dir).expanduser() if r.cache_dir else default_cache_dir() / "civitai"
    path = download_url(r.source, root, token=os.environ.get(CIVITAI_TOKEN_ENV) if civitai else None,
                        allow_pickle=r.allow_ckpt, timeout=r.timeout, progress=r.progress,
                        token_env=CIVITAI_TOKEN_ENV if civitai else None)
    return ResolvedSource(path, "single_file", "civitai" if civitai else "url", r.source, r.allow_ckpt)


# lexists: a dangling link or a link loop is a local path too (exists() says False for both), and
# must be reported as such rather than tried as a hub id
@source_kind("local", lambda r: os.path.lexists(Path(r.source).expanduser()))
def resolve_local(r: SourceRequest) -> ResolvedSource:
    """A local diffusers folder (``model_index.json`` or ``unet/``) or single weights file
    (``.safetensors``; pickled ``.ckpt``/``.pt`` only with ``allow_ckpt``)."""
    local = Path(r.source).expanduser()
    if not local.exists():
        raise SourceError(f"source_model {r.source!r} is a symbolic link that leads nowhere (dangling, or a loop); "
                          f"fix or remove the link {local}.")
    return _resolve_local(local, r.source, r.allow_ckpt, r.unet_only)


@source_kind("hub", lambda r: _HUB_ID.fullmatch(r.source) is not None)
def resolve_hub(r: SourceRequest) -> ResolvedSource:
    """A Hugging Face repo id (``org/name``, or ``org/name/file.safetensors``): the local cache when it
    has it, else only the files a pipeline needs; offline or unreachable fails at once."""
    return _resolve_hub(r.source, r.cache_dir, r.allow_ckpt, r.timeout, r.unet_only)


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
    request = SourceRequest(source.strip(), cache_dir, allow_ckpt, unet_only, timeout, civitai_base, progress)
    for kind in SOURCE_KINDS.values():
        if kind.matches(request):
            return kind.resolve(request)
    source = request.source
    local = Path(source).expanduser()
    raise SourceError(
        f"source_model {source!r} is neither an existing path ({local.resolve()} does not exist), a Hugging Face "
        "repo id (org/name) nor an http(s) download link. Fix the spelling, or give the full path of a diffusers "
        "folder or a .safetensors file.")


# --- local files ---------------------------------------------------------------------------------
