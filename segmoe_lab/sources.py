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

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional
from urllib.parse import urlsplit

CIVITAI_BASE = "https://civitai.com"
CIVITAI_TOKEN_ENV = "CIVITAI_API_TOKEN"
CACHE_ENV = "SEGMOE_LAB_CACHE"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/.+\.safetensors)?")
_VARIANT = re.compile(r"\.(fp16|bf16|fp32|ema|non_ema|non-ema)(?=[.-])")
# segmoe loads variant="fp16" first (and falls back to full precision); it also halves SDXL downloads
PREFERRED_VARIANTS = ("fp16", None)


class SourceError(OSError):
    """A model source that cannot be found, fetched or read; the message says what to do."""


@dataclass(frozen=True)
class ResolvedSource:
    """Local files for a ``source_model`` string.

    Attributes:
        path (`Path`): a diffusers folder (``form="folder"``) or one weights file (``"single_file"``).
        form (`str`): ``"folder"`` or ``"single_file"``.
        origin (`str`): ``"local"``, ``"hub"``, ``"civitai"`` or ``"url"``.
        source (`str`): the string it was resolved from.
        allow_pickle (`bool`): pickled weights were allowed (``allow_ckpt=True``).
    """

    path: Path
    form: Literal["folder", "single_file"]
    origin: Literal["local", "hub", "civitai", "url"]
    source: str = ""
    allow_pickle: bool = False


def default_cache_dir() -> Path:
    """segmoe-lab's own download cache: ``$SEGMOE_LAB_CACHE`` or ``~/.cache/segmoe_lab``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/segmoe_lab").expanduser()


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
        from .downloads import download_url

        civitai = source.startswith(civitai_base.rstrip("/") + "/") or urlsplit(source).hostname == "civitai.com"
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "civitai"
        path = download_url(source, root, token=os.environ.get(CIVITAI_TOKEN_ENV) if civitai else None,
                            allow_pickle=allow_ckpt, timeout=timeout, progress=progress,
                            token_env=CIVITAI_TOKEN_ENV if civitai else None)
        return ResolvedSource(path, "single_file", "civitai" if civitai else "url", source, allow_ckpt)
    local = Path(source).expanduser()
    if local.exists():
        return _resolve_local(local, source, allow_ckpt, unet_only)
    if _HUB_ID.fullmatch(source):
        return _resolve_hub(source, cache_dir, allow_ckpt, timeout, unet_only)
    raise SourceError(
        f"source_model {source!r} is neither an existing path ({local.resolve()} does not exist), a Hugging Face "
        "repo id (org/name) nor an http(s) download link. Fix the spelling, or give the full path of a diffusers "
        "folder or a .safetensors file.")


# --- local files ---------------------------------------------------------------------------------

def _resolve_local(path: Path, source: str, allow_ckpt: bool, unet_only: bool = False,
                   origin: str = "local") -> ResolvedSource:
    path = Path(os.path.abspath(path))  # not resolve(): HF cache files are symlinks to nameless blobs
    if path.is_file():
        _check_weights_file(path, allow_ckpt)
        return ResolvedSource(path, "single_file", origin, source, allow_ckpt)
    if (path / "model_index.json").is_file() or (path / "unet").is_dir():
        _check_unet_weights(path, allow_ckpt)
        if not unet_only:
            _check_components(path)
        return ResolvedSource(path, "folder", origin, source, allow_ckpt)
    files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
    if len(files) == 1:  # a folder holding one file, e.g. a LoRA
        return ResolvedSource(files[0], "single_file", origin, source, allow_ckpt)
    found = ", ".join(p.name for p in sorted(path.iterdir())[:8]) or "nothing"
    raise SourceError(
        f"{path} is not a diffusers folder (no model_index.json, no unet/ subfolder) and does not hold exactly one "
        f".safetensors file (found: {found}). Point source_model at the diffusers folder or at the weights file.")


def _check_weights_file(path: Path, allow_ckpt: bool) -> None:
    if path.suffix in PICKLE_SUFFIXES and not allow_ckpt:
        raise SourceError(
            f"{path} is a pickled checkpoint ({path.suffix}): loading it can run arbitrary code, so it is refused. "
            "Use a .safetensors version of the model, or opt in for files you trust with allow_ckpt=True "
            "(resolve_source(..., allow_ckpt=True)).")
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise SourceError(f"{path}: not a weights file (expected .safetensors, or .ckpt with allow_ckpt=True)")


def _check_unet_weights(folder: Path, allow_ckpt: bool) -> None:
    unet = folder / "unet"
    if any(unet.glob("*.safetensors")):
        return
    if any(unet.glob("*.bin")):
        if allow_ckpt:
            return
        raise SourceError(
            f"{unet} has only pickled weights (.bin): loading them can run arbitrary code, so they are refused. "
            "Convert the folder to safetensors (pipe.save_pretrained(folder, safe_serialization=True)), "
            "or opt in for files you trust with allow_ckpt=True.")
    raise SourceError(f"{folder} has no UNet weights (unet/*.safetensors is missing); the folder is incomplete. "
                      "Download or copy the model again.")


def _check_components(folder: Path) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        return
    optional = {"safety_checker", "feature_extractor", "image_encoder"}  # loaded as None when absent
    missing = [name for name, value in json.loads(index.read_text()).items()
               if isinstance(value, list) and value[0] and name not in optional and not (folder / name).is_dir()]
    if missing:
        raise SourceError(f"{folder} lacks the pipeline parts {', '.join(missing)} that its model_index.json lists; "
                          "the folder is incomplete. Download or copy the whole model again.")


# --- Hugging Face Hub ----------------------------------------------------------------------------

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


# --- loading -------------------------------------------------------------------------------------

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
    name = json.loads(index.read_text()).get("_class_name", "")
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
            tokenizers describe the model. Default: written from :mod:`segmoe_lab.layouts` for the
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
    from .single_file import config_folder_for

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
        return tuple(self._handles[file].get_slice(key).get_shape())

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
    from safetensors import safe_open

    if resolved.form == "folder":
        files = _unet_files(resolved.path)
    else:
        files = [resolved.path]
    if any(f.suffix != ".safetensors" for f in files):
        yield UnetTensors({}, {}, loaded=_load_pickled_unet(files, unet_config, resolved.form))
        return
    handles = {f: safe_open(str(f), framework="pt") for f in files}
    keys = {k: (f, k) for f, h in handles.items() for k in h.keys()}
    if resolved.form == "single_file":
        from .single_file import ldm_unet_key_map

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
        from .single_file import ldm_unet_key_map

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
