"""Hugging Face Hub sources: read from the local cache when there, else download only what a pipeline needs.

``HF_HUB_OFFLINE=1`` and an unreachable Hub fail at once with a :class:`SourceError` naming the repo.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from segmoe_lab.sources.errors import SourceError
from segmoe_lab.sources.local import WEIGHT_COMPONENTS, _resolve_local
from segmoe_lab.sources.resolved import ResolvedSource

_VARIANT = re.compile(r"\.(fp16|bf16|fp32|ema|non_ema|non-ema)(?=[.-])")
# segmoe loads variant="fp16" first (and falls back to full precision); it also halves SDXL downloads
PREFERRED_VARIANTS = ("fp16", None)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # read the environment too: notebooks set HF_HUB_OFFLINE after huggingface_hub was imported
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cache(cache_dir) -> Optional[str]:
    if cache_dir:
        return str(Path(cache_dir).expanduser())
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None  # huggingface_hub's default


def _hub_fix(repo: str) -> str:
    return (f"Download it on a connected machine (hf download {repo} --local-dir DIR; older huggingface_hub: "
            f"huggingface-cli download {repo}), then point source_model at the folder, or set HF_HOME to a cache "
            "that has it.")


def _resolve_hub(source: str, cache_dir, allow_ckpt: bool, timeout: float, unet_only: bool) -> ResolvedSource:
    parts = source.split("/")
    repo, file = "/".join(parts[:2]), "/".join(parts[2:]) or None
    cache = _hub_cache(cache_dir)
    where = f"the Hugging Face cache ({cache or 'default HF_HUB_CACHE'})"
    cached = _cached_snapshot(repo, cache)
    if cached is not None and (cached / (file or "")).exists():
        try:
            return _resolve_local(cached / (file or ""), source, allow_ckpt, unet_only, "hub")
        except SourceError as err:  # partly cached (e.g. only a UNet): download the rest
            where += f" (only partly: {err})"
    if _hub_offline():
        raise SourceError(f"{source!r} is not in {where}, and HF_HUB_OFFLINE is set, so it was not downloaded. "
                          + _hub_fix(repo))
    files = _list_repo(repo, timeout, where)
    patterns = [file] if file else _hub_patterns(repo, files, allow_ckpt, unet_only)
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo, allow_patterns=patterns, cache_dir=cache, etag_timeout=timeout)
    except Exception as err:  # huggingface_hub raises httpx, OS and its own errors here
        raise SourceError(f"downloading {repo} from the Hugging Face Hub failed ({type(err).__name__}: {err}). "
                          + _hub_fix(repo)) from None
    return _resolve_local(Path(folder) / (file or ""), source, allow_ckpt, unet_only, "hub")


def _cached_snapshot(repo: str, cache: Optional[str]) -> Optional[Path]:
    """The snapshot folder of ``repo`` in the HF cache, without any network call (None if absent)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, cache_dir=cache, local_files_only=True, allow_patterns=["model_index.json"]))
    except Exception:  # not cached, or cached incompletely: both mean "download"
        return None


def _list_repo(repo: str, timeout: float, where: str) -> list[str]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:  # one short request first, so an offline machine fails in `timeout` seconds, not minutes
        info = HfApi(endpoint=os.environ.get("HF_ENDPOINT")).model_info(repo, timeout=timeout)
    except GatedRepoError:
        raise SourceError(f"{repo} is gated on the Hugging Face Hub: accept its licence on huggingface.co and log "
                          "in (hf auth login). " + _hub_fix(repo)) from None
    except RepositoryNotFoundError:
        raise SourceError(f"{repo} is not on the Hugging Face Hub (or is private) and not in {where}. Check the "
                          "spelling; for a private repo log in with hf auth login.") from None
    except Exception as err:  # connection refused, DNS failure, timeout, HTTP 5xx ...
        raise SourceError(f"{repo} is not in {where}, and the Hugging Face Hub could not be reached "
                          f"({type(err).__name__}: {err}). " + _hub_fix(repo)) from None
    return [s.rfilename for s in info.siblings or []]


def _hub_patterns(repo: str, files: list[str], allow_ckpt: bool, unet_only: bool = False) -> list[str]:
    """The files of a repo worth downloading: a diffusers pipeline's configs and one weights set each."""
    if "model_index.json" not in files:
        top = [f for f in files if "/" not in f and f.endswith(".safetensors")]
        if len(top) == 1:
            return top
        if top:
            raise SourceError(f"{repo} holds several weights files ({', '.join(top)}); name one: "
                              f"source_model: {repo}/{top[0]}")
        raise SourceError(f"{repo} is neither a diffusers pipeline (no model_index.json) nor holds a .safetensors "
                          f"file (files: {', '.join(files[:10])}).")
    components = ("unet",) if unet_only else WEIGHT_COMPONENTS
    patterns = ["model_index.json", *(f"{c}/config.json" for c in components)]
    if not unet_only:
        patterns += ["scheduler/*.json", "tokenizer/*", "tokenizer_2/*", "feature_extractor/*.json"]
    for comp in components:
        names = [f for f in files if f.startswith(comp + "/") and re.search(r"\.safetensors(\.index.*\.json)?$", f)]
        if not names and allow_ckpt:
            names = [f for f in files if f.startswith(comp + "/") and f.endswith((".bin", ".bin.index.json"))]
        patterns += _pick_variant(names)
    if not any(p.startswith("unet/") and not p.endswith("config.json") for p in patterns):
        raise SourceError(f"{repo} has no UNet weights in safetensors format (unet/*.safetensors). Use a "
                          "safetensors version of the model, or allow_ckpt=True for pickled weights you trust.")
    return patterns


def _pick_variant(names: list[str]) -> list[str]:
    """One weights set of a component: fp16 when the repo has it, as segmoe, else full precision (never both)."""
    by_variant: dict[Optional[str], list[str]] = {}
    for n in names:
        m = _VARIANT.search(n.rsplit("/", 1)[-1])
        by_variant.setdefault(m.group(1) if m else None, []).append(n)
    for choice in (*PREFERRED_VARIANTS, *sorted(k for k in by_variant if k)):
        if choice in by_variant:
            return by_variant[choice]
    return []
