"""Where CLIP weights for the scorers come from: open_clip names and tags, open_clip or transformers folders, the toy CLIP; never fetched silently offline."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Optional

from segmoe_lab.errors import SourceError

HF_HUB_HOST = "huggingface.co"


class ScorerError(SourceError):
    """A scorer whose model or weights cannot be found or loaded; the message says how to provide them."""


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
    from segmoe_lab import toy

    return Path(toy.clip_path())


def _is_transformers_clip(folder: Path) -> bool:
    cfg = folder / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "clip"


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
        from segmoe_lab.sources import default_cache_dir

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


def _processor_for_torchmetrics(folder: Path):
    """A transformers CLIPProcessor that truncates captions to the CLIP's context.

    torchmetrics' CLIPScore tokenizes with ``padding=True`` only; transformers 5 then also passes
    the tokenizer's own ``max_length`` and warns once per caption that it is ignored without a
    truncation strategy. Truncating to that length is what CLIPScore does next anyway (it cuts
    the ids to ``max_position_embeddings``), so asking for it here gives the same ids, quietly.
    """
    from transformers import CLIPProcessor

    class TruncatingCLIPProcessor(CLIPProcessor):
        def __call__(self, *args, **kwargs):
            if kwargs.get("text") is not None:
                kwargs.setdefault("truncation", True)
            return super().__call__(*args, **kwargs)

    return TruncatingCLIPProcessor.from_pretrained(folder)
