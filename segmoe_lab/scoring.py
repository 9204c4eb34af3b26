"""Scorers: how well each image follows its prompt, one number per image.

Every scorer has one interface, ``score(images, prompts, descriptions=None) -> np.ndarray``
(one float per image), and lives in the plain-dict registry :data:`SCORERS`:

- ``clip``: CLIP score with open_clip, ``100 * max(cos(image, text), 0)``. ``model`` is an
  open_clip model name with a ``pretrained`` tag or weights file (``"ViT-L-14"``,
  ``"openai"``), an open_clip folder (``open_clip_config.json`` + weights, or
  ``"local-dir:/path"``), a transformers CLIP folder (converted once into an open_clip folder,
  see :func:`openclip_from_transformers`), or ``"toy"`` (the toy world's tiny CLIP).
- ``torchmetrics``: ``torchmetrics.multimodal.CLIPScore`` over a transformers CLIP folder or
  hub id, the implementation most diffusion papers report (same 0-100 scale).
- ``toy_truth``: the toy world's ground-truth checker (needs each prompt's structured
  description: given, or looked up in the toy prompt set).

Weights are never fetched silently on an offline machine: a real scorer whose weights are
neither local nor cached fails when it is created, naming the model and how to provide it.

Example::

    scorer = get_scorer("clip", model="toy")
    scorer.score(images, ["two red circles"] * len(images))      # -> array([31.2, ...])
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import socket
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

HF_HUB_HOST = "huggingface.co"


class ScorerError(OSError):
    """A scorer whose model or weights cannot be found or loaded; the message says how to provide them."""


class Scorer(ABC):
    """One way to score images against prompts; ``score`` returns one float per image."""

    name: str = ""

    @abstractmethod
    def score(self, images: Sequence, prompts: Sequence[str], descriptions: Optional[Sequence] = None) -> np.ndarray:
        """Score ``images[i]`` against ``prompts[i]`` (``descriptions[i]`` where the scorer needs one)."""

    def __call__(self, images, prompts, descriptions=None) -> np.ndarray:
        return self.score(images, prompts, descriptions)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def describe(self) -> str:
        """What this scorer measures with, for tables and reports."""
        return self.name


def _check_lengths(images, prompts, descriptions=None) -> None:
    if len(images) != len(prompts) or (descriptions is not None and len(descriptions) != len(images)):
        n_desc = "" if descriptions is None else f", {len(descriptions)} descriptions"
        raise ValueError(f"score() needs one prompt per image; got {len(images)} images, {len(prompts)} prompts{n_desc}")


def _device(device: Optional[str]) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _reachable(host: str = HF_HUB_HOST, timeout: float = 5.0) -> bool:
    """Whether ``host:443`` accepts a connection within ``timeout`` (False offline, quickly)."""
    if _hub_offline():
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _toy_clip() -> Path:
    from . import toy

    return Path(toy.clip_path())


def _is_transformers_clip(folder: Path) -> bool:
    cfg = folder / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "clip"


# --- open_clip ----------------------------------------------------------------------------------

def folder_fingerprint(folder: Path) -> str:
    """A short hash of a folder's files (name, size, mtime): changes when any file is replaced."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _openclip_state_dict(hf: dict) -> dict:
    """transformers ``CLIPModel`` tensors -> open_clip ``CLIP`` tensors (the inverse of
    transformers' ``convert_clip_original_pytorch_to_hf.py``): fused q/k/v, transposed projections."""
    import torch

    out, qkv = {}, {}
    top = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight", "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "logit_scale": "logit_scale",
    }
    layer = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for key, t in hf.items():
        if key in top:
            out[top[key]] = t
        elif key == "text_projection.weight":
            out["text_projection"] = t.T  # (width, embed_dim)
        elif key == "visual_projection.weight":
            out["visual.proj"] = t.T
        elif ".encoder.layers." in key:
            tower, rest = key.split(".encoder.layers.")
            i, name = rest.split(".", 1)
            prefix = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{i}"
            module, leaf = name.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, leaf), {})[module[-6]] = t
            else:
                out[f"{prefix}.{layer[module]}.{leaf}"] = t
        elif not key.endswith("position_ids"):
            raise ScorerError(f"unexpected tensor {key} in a transformers CLIP checkpoint; cannot convert it to open_clip")
    for (prefix, leaf), parts in qkv.items():
        out[f"{prefix}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])  # (3 * width, ...)
    return out


def _image_processor_config(folder: Path) -> dict:
    """The CLIP image processor settings of a transformers folder (older or newer file layout), or {}."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if (folder / name).is_file():
            data = json.loads((folder / name).read_text())
            return data.get(key, {}) if key else data
    return {}


def _openclip_config(folder: Path) -> dict:
    """An ``open_clip_config.json`` describing the transformers CLIP in ``folder``."""
    cfg = json.loads((folder / "config.json").read_text())
    tc, vc = cfg["text_config"], cfg["vision_config"]
    acts = {tc.get("hidden_act", "quick_gelu"), vc.get("hidden_act", "quick_gelu")}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) > 1:
        raise ScorerError(f"{folder}: hidden_act {sorted(acts)} has no open_clip equivalent (needs quick_gelu or gelu in both towers)")

    def tower(c: dict) -> dict:
        return {"width": c["hidden_size"], "layers": c["num_hidden_layers"], "mlp_ratio": c["intermediate_size"] / c["hidden_size"],
                "norm_kwargs": {"eps": c.get("layer_norm_eps", 1e-5)}}

    eos = tc.get("eos_token_id", 2)
    text = {**tower(tc), "heads": tc["num_attention_heads"], "context_length": tc["max_position_embeddings"],
            "vocab_size": tc["vocab_size"], "hf_tokenizer_name": str(folder),
            # transformers pools at the first eos token, or (legacy configs with eos_token_id=2) at the argmax id
            "pool_type": "argmax" if eos == 2 else "eos", "eos_id": eos}
    vision = {**tower(vc), "head_width": vc["hidden_size"] // vc["num_attention_heads"], "patch_size": vc["patch_size"],
              "image_size": vc["image_size"]}
    model_cfg = {"embed_dim": cfg.get("projection_dim", 512), "quick_gelu": acts == {"quick_gelu"},
                 "vision_cfg": vision, "text_cfg": text}
    pre = {"size": vc["image_size"], "interpolation": "bicubic", "resize_mode": "shortest"}
    p = _image_processor_config(folder)
    pre.update({k: p[src] for k, src in (("mean", "image_mean"), ("std", "image_std")) if src in p})
    return {"model_cfg": model_cfg, "preprocess_cfg": pre}


def openclip_from_transformers(folder, out_root=None) -> Path:
    """Convert a transformers CLIP folder into an open_clip folder (``local-dir:`` form), once.

    open_clip cannot read a transformers ``CLIPModel`` directly, but OpenAI's CLIP exists in both
    libraries with the same modules, so the conversion is a renaming: an
    ``open_clip_config.json`` (tower widths, QuickGELU, eos pooling, the folder's tokenizer as
    open_clip's ``HFTokenizer``, its image mean/std) and ``open_clip_model.safetensors``. The result
    is cached under ``$SEGMOE_LAB_CACHE/open_clip`` by the source folder's files.

    Returns:
        The open_clip folder: load it with ``open_clip.create_model_and_transforms("local-dir:" + str(path))``.
    """
    from safetensors.torch import save_file
    from transformers import CLIPModel

    folder = Path(folder)
    if not _is_transformers_clip(folder):
        raise ScorerError(f"{folder} is not a transformers CLIP folder (config.json with model_type 'clip')")
    if out_root is None:
        from .sources import default_cache_dir

        out_root = default_cache_dir() / "open_clip"
    out = Path(out_root) / f"{folder.name}-{folder_fingerprint(folder)}"
    if (out / "open_clip_model.safetensors").is_file():
        return out
    config = _openclip_config(folder)
    state = CLIPModel.from_pretrained(folder).state_dict()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for p in folder.iterdir():  # tokenizer files: open_clip's HFTokenizer reads them from this folder
            if p.is_file() and ("token" in p.name or p.name in ("vocab.json", "merges.txt")):
                shutil.copy2(p, tmp / p.name)
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in _openclip_state_dict(state).items()}, str(tmp / "open_clip_model.safetensors"))
        tmp.replace(out) if not out.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _weights_fix(model: str) -> str:
    return (f'Download the weights on a connected machine and pass the file: get_scorer("clip", model="{model}", '
            f'pretrained="/path/open_clip_pytorch_model.bin") (or an open_clip folder, or a transformers CLIP folder '
            'as model=...); or use the toy world\'s CLIP with model="toy".')


def _tag_is_cached(tag_cfg: dict, cache_dir: Optional[str]) -> bool:
    """Whether open_clip would find a pretrained tag's weights without the network."""
    from huggingface_hub import try_to_load_from_cache

    if tag_cfg.get("file"):
        return Path(tag_cfg["file"]).is_file()
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, n, cache_dir=cache_dir), str) for n in names):
            return True
    url = tag_cfg.get("url", "")
    return bool(url) and (Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(url)).is_file()


def resolve_openclip(model: str, pretrained: Optional[str] = None, cache_dir: Optional[str] = None) -> tuple[str, Optional[str]]:
    """``(model_name, pretrained)`` for ``open_clip.create_model_and_transforms``, weights checked first.

    Raises :class:`ScorerError` at once when the weights are neither given nor cached and the
    Hugging Face Hub cannot be reached (or ``HF_HUB_OFFLINE`` is set).
    """
    import open_clip

    if model == "toy":
        model = str(_toy_clip())
    path = Path(str(model).removeprefix("local-dir:")).expanduser()
    if str(model).startswith("local-dir:") or path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return f"local-dir:{path}", None
        if _is_transformers_clip(path):
            return f"local-dir:{openclip_from_transformers(path)}", None
        raise ScorerError(f"{path} is neither an open_clip folder (open_clip_config.json + weights) nor a transformers "
                          "CLIP folder (config.json with model_type 'clip')")
    if str(model).startswith("hf-hub:"):
        repo = model.removeprefix("hf-hub:")
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(repo, "open_clip_config.json", cache_dir=cache_dir), str) and not _reachable():
            raise ScorerError(f"open_clip model {model}: not in the Hugging Face cache and the Hub cannot be reached "
                              f"(offline). {_weights_fix(model)}")
        return model, None
    name = str(model).replace("/", "-")
    if name not in open_clip.list_models():
        raise ScorerError(f"open_clip model {model!r} not found; give a folder, 'local-dir:...', 'hf-hub:...' or one of "
                          f"{open_clip.list_models()}")
    if pretrained is None:
        raise ScorerError(f"open_clip model {model!r} needs weights: pretrained=<tag> (one of "
                          f"{open_clip.list_pretrained_tags_by_model(name)}) or pretrained=<weights file>")
    weights = Path(pretrained).expanduser()
    if weights.is_file():
        return name, str(weights)
    if weights.is_dir() or os.sep in pretrained:
        found = _find_weights(weights) if weights.is_dir() else None
        if found is None:
            raise ScorerError(f"pretrained={pretrained!r}: no such weights file for open_clip model {model!r}. {_weights_fix(model)}")
        return name, str(found)
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        raise ScorerError(f"pretrained={pretrained!r} is not a tag of open_clip model {model!r}; choose one of "
                          f"{open_clip.list_pretrained_tags_by_model(name)} or give a weights file")
    if not _tag_is_cached(tag_cfg, cache_dir) and not _reachable():
        raise ScorerError(f"open_clip model {model} ({pretrained}): weights are not cached and the Hugging Face Hub "
                          f"cannot be reached (offline). {_weights_fix(model)}")
    return name, pretrained


def _find_weights(folder: Path) -> Optional[Path]:
    for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin"):
        if (folder / n).is_file():
            return folder / n
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.bin"))
    return found[0] if found else None


class OpenClipScorer(Scorer):
    """CLIP score, ``100 * max(cos(image, text), 0)``, computed with open_clip.

    Args:
        model (`str`, *optional*, defaults to ``"ViT-L-14"``): an open_clip model name, an open_clip
            folder / ``local-dir:`` / ``hf-hub:`` id, a transformers CLIP folder, or ``"toy"``.
        pretrained (`str`, *optional*, defaults to ``"openai"``): a tag of ``model`` or a weights
            file (ignored for folders). OpenAI weights given as a file want ``model="ViT-L-14-quickgelu"``.
        device (`str`, *optional*): defaults to ``"cuda"`` when present.
        batch_size (`int`, *optional*, defaults to 32): images per forward pass.
        clamp (`bool`, *optional*, defaults to `True`): clip negative cosines at 0, as CLIPScore does.
        cache_dir (`str`, *optional*): open_clip's download cache.
    """

    name = "clip"

    def __init__(self, model: str = "ViT-L-14", pretrained: Optional[str] = "openai", device: Optional[str] = None,
                 batch_size: int = 32, clamp: bool = True, cache_dir: Optional[str] = None):
        import open_clip

        self.model_name, self.pretrained = resolve_openclip(model, pretrained, cache_dir)
        self.device, self.batch_size, self.clamp = _device(device), batch_size, clamp
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            self.model_name, pretrained=self.pretrained, device=self.device, cache_dir=cache_dir)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(self.model_name, cache_dir=cache_dir)
        self._text: dict[str, "np.ndarray"] = {}

    def describe(self) -> str:
        return f"open_clip {self.model_name}" + (f" ({self.pretrained})" if self.pretrained else "")

    def _text_features(self, prompts: Sequence[str]):
        import torch

        new = sorted(set(prompts) - set(self._text))
        with torch.inference_mode():
            for start in range(0, len(new), self.batch_size):
                chunk = new[start:start + self.batch_size]
                f = self.model.encode_text(self.tokenizer(chunk).to(self.device), normalize=True)  # (B, D)
                self._text.update(zip(chunk, f.float().cpu()))
        return torch.stack([self._text[p] for p in prompts])  # (N, D)

    def image_features(self, images: Sequence):
        """Normalised image embeddings, (N, D) on CPU."""
        import torch

        feats = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                x = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start:start + self.batch_size]])
                feats.append(self.model.encode_image(x.to(self.device), normalize=True).float().cpu())  # (B, D)
        return torch.cat(feats)

    def score(self, images, prompts, descriptions=None) -> np.ndarray:
        _check_lengths(images, prompts, descriptions)
        if not len(images):
            return np.zeros(0)
        cos = (self.image_features(images) * self._text_features(list(prompts))).sum(-1).numpy()  # (N,)
        return 100.0 * (np.maximum(cos, 0.0) if self.clamp else cos).astype(np.float64)


# --- torchmetrics ---------------------------------------------------------------------------------

def _transformers_clip_folder(model: str, cache_dir: Optional[str]) -> Path:
    """A local transformers CLIP folder for ``model`` (a folder, ``"toy"`` or a cached hub id)."""
    if model == "toy":
        return _toy_clip()
    path = Path(model).expanduser()
    if path.is_dir():
        if not _is_transformers_clip(path):
            raise ScorerError(f"{path} is not a transformers CLIP folder (config.json with model_type 'clip')")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, cache_dir=cache_dir, local_files_only=True))
    except Exception:
        pass
    fix = (f"Download it on a connected machine (hf download {model} --local-dir DIR) and pass "
           f'get_scorer("torchmetrics", model="DIR"), or use the toy world\'s CLIP with model="toy".')
    if not _reachable():
        raise ScorerError(f"torchmetrics CLIPScore model {model}: not a local folder, not in the Hugging Face cache, "
                          f"and the Hub cannot be reached (offline). {fix}")
    try:
        return Path(snapshot_download(model, cache_dir=cache_dir, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as err:
        raise ScorerError(f"torchmetrics CLIPScore model {model}: download failed ({type(err).__name__}: {err}). {fix}") from None


def _clip_for_torchmetrics(folder: Path):
    """A transformers CLIPModel whose ``get_*_features`` return tensors.

    transformers >= 5 returns a ``BaseModelOutputWithPooling`` (the projected features in
    ``pooler_output``); torchmetrics 1.9's CLIPScore calls ``.norm()`` on it and fails
    (Lightning-AI/torchmetrics#3407, fixed upstream by #3408). Harmless once torchmetrics unwraps it.
    """
    import torch
    from transformers import CLIPModel

    def tensor(out):
        return out if torch.is_tensor(out) else out.pooler_output

    class CLIPModelTensorFeatures(CLIPModel):
        def get_image_features(self, *args, **kwargs):
            return tensor(super().get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return tensor(super().get_text_features(*args, **kwargs))

    return CLIPModelTensorFeatures.from_pretrained(folder).eval()


class TorchmetricsScorer(Scorer):
    """CLIP score as ``torchmetrics.multimodal.CLIPScore`` computes it: ``100 * max(cos, 0)``.

    Args:
        model (`str`, *optional*, defaults to ``"openai/clip-vit-large-patch14"``): a transformers
            CLIP folder, a hub id (from the Hugging Face cache, or downloaded when online) or ``"toy"``.
        device (`str`, *optional*): defaults to ``"cuda"`` when present.
        cache_dir (`str`, *optional*): the Hugging Face cache to look in.
    """

    name = "torchmetrics"

    def __init__(self, model: str = "openai/clip-vit-large-patch14", device: Optional[str] = None,
                 cache_dir: Optional[str] = None):
        from torchmetrics.multimodal import CLIPScore
        from transformers import CLIPProcessor

        folder = _transformers_clip_folder(model, cache_dir)
        self.model_name, self.device = str(folder), _device(device)
        # torchmetrics accepts only a few hub ids by name; a callable is its documented way to pass any CLIP
        self.metric = CLIPScore(model_name_or_path=lambda: (_clip_for_torchmetrics(folder), CLIPProcessor.from_pretrained(folder)))
        self.metric.to(self.device)

    def describe(self) -> str:
        return f"torchmetrics CLIPScore {self.model_name}"

    def score(self, images, prompts, descriptions=None) -> np.ndarray:
        import torch
        from torchvision.transforms.functional import pil_to_tensor

        _check_lengths(images, prompts, descriptions)
        out = []
        with torch.inference_mode():
            for image, prompt in zip(images, prompts):
                x = pil_to_tensor(image.convert("RGB")).to(self.device)  # (3, H, W) uint8
                out.append(float(self.metric(x, prompt)))  # one image: CLIPScore of that pair
        self.metric.reset()
        return np.asarray(out, dtype=np.float64)


# --- toy world ground truth -------------------------------------------------------------------------

class ToyTruthScorer(Scorer):
    """The toy world's ground truth: ``toy.check(image, description)[key]`` per image.

    Args:
        key (`str`, *optional*, defaults to ``"score"``): which entry of the checker's result to report.
        prompts (`str` or `Path`, *optional*): a prompt set CSV with ``prompt`` and ``description``
            columns to look descriptions up in, when ``score`` is not given them (default: the toy set).
    """

    name = "toy_truth"

    def __init__(self, key: str = "score", prompts=None):
        from . import toy

        self.toy, self.key, self._prompts = toy, key, prompts
        self._lookup: Optional[dict] = None

    def describe(self) -> str:
        return f"toy world ground truth ({self.key})"

    def _descriptions(self, prompts: Sequence[str]) -> list:
        if self._lookup is None:
            from .compare import load_prompts

            table = load_prompts(self._prompts or "toy")
            if "description" not in table:
                raise ValueError(f"prompt set {self._prompts or 'toy'} has no description column; toy_truth needs one")
            self._lookup = dict(zip(table.prompt, table.description))
        missing = sorted(set(prompts) - set(self._lookup))
        if missing:
            raise ValueError(f"toy_truth: no description for prompts {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
                             "pass descriptions= or use prompts from the toy prompt set")
        return [self._lookup[p] for p in prompts]

    def score(self, images, prompts, descriptions=None) -> np.ndarray:
        _check_lengths(images, prompts, descriptions)
        descriptions = self._descriptions(prompts) if descriptions is None else descriptions
        out = []
        for image, desc in zip(images, descriptions):
            result = self.toy.check(image, desc)
            if self.key not in result:
                raise ValueError(f"toy_truth: key={self.key!r} is not in the checker's result; choose one of {sorted(result)}")
            out.append(float(result[self.key]))
        return np.asarray(out, dtype=np.float64)


# --- registry ---------------------------------------------------------------------------------------

SCORERS: dict[str, type[Scorer]] = {"clip": OpenClipScorer, "torchmetrics": TorchmetricsScorer, "toy_truth": ToyTruthScorer}


def get_scorer(name: str, **options) -> Scorer:
    """The scorer ``name`` of :data:`SCORERS`, created with ``options`` (e.g. ``model="toy"``)."""
    if name not in SCORERS:
        raise ValueError(f"scorer {name!r} is not known; choose one of {sorted(SCORERS)}")
    cls = SCORERS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"scorer {name!r}: unknown option(s) {unknown}; valid options: {accepted}")
    return cls(**options)
