"""The real configs of the four model layouts segmoe-lab knows, written in code (no download).

A *layout* is one UNet architecture and the text encoders, VAE and scheduler that come with it:

========  ==============================================  =====  =================================
layout    hub repo                                        type   UNet transformer depth (down/mid/up)
========  ==============================================  =====  =================================
sd15      runwayml/stable-diffusion-v1-5                  sd     1,1,1 / 1 / 1,1,1
sdxl      stabilityai/stable-diffusion-xl-base-1.0        sdxl   -,2,10 / 10 / 10,2,-
vega      segmind/Segmind-Vega                            sdxl   -,1,2 / none / 2,1,-
ssd1b     segmind/SSD-1B                                  sdxl   -,2,4 / none / (4,4,10),(2,1,1),-
========  ==============================================  =====  =================================

Sources of the values (checked against each other where two exist):

* SD 1.5 and SDXL base: the ``unet/``, ``text_encoder*/``, ``vae/`` and ``scheduler/`` config.json
  files of the hub repos above (keys diffusers/transformers fill with defaults are left out).
* SSD-1B: ``reverse_transformer_layers_per_block [[4, 4, 10], [2, 1, 1], 1]`` as in the repo's
  ``unet/config.json`` (quoted in a hub diff of a config derived from it), ``mid_block_type
  "UNetMidBlock2D"`` (one ResNet, no attention); both agree with ComfyUI's
  ``comfy/model_detection.py`` (``SSD_1B``: ``transformer_depth [0,0,2,2,4,4]``,
  ``transformer_depth_output [0,0,0,1,1,2,10,4,4]``, ``transformer_depth_middle -1``), which
  matches real checkpoints tensor by tensor.
* Segmind Vega: its config.json was not available here. The per-block depths are ComfyUI's
  ``Segmind_Vega`` (``transformer_depth [0,0,1,1,2,2]``, ``transformer_depth_output
  [0,0,0,1,1,1,2,2,2]``, ``transformer_depth_middle -1``), so the tensors match a real Vega
  checkpoint; *how* the hub file spells them (e.g. ``[1, 1, 2]`` without a reverse list, since
  Vega is symmetric) may differ from what is written here.
* Vega and SSD-1B reuse SDXL's text encoders, tokenizers, VAE and scheduler unchanged (their
  repos ship SDXL's files; the papers change only the UNet).
"""
from __future__ import annotations

import copy
import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

Layout = Literal["sd15", "sdxl", "vega", "ssd1b"]
LAYOUTS: tuple[str, ...] = ("sd15", "sdxl", "vega", "ssd1b")
HUB_REPOS = {
    "sd15": "runwayml/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "vega": "segmind/Segmind-Vega",
    "ssd1b": "segmind/SSD-1B",
}

# --- UNets --------------------------------------------------------------------------------------

_SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,  # diffusers' name; it is the number of heads (head dim = 40..160)
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

_SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],  # number of heads per block (head dim 64)
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP ViT-bigG), concatenated
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled text + 6 time ids * 256
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# Distilled SDXL UNets (Gupta et al. 2024, "Progressive Knowledge Distillation of Stable Diffusion
# XL using Layer Level Loss"): transformer blocks removed, mid block reduced to one ResNet. The up
# path is asymmetric in SSD-1B, so it needs diffusers' reverse_transformer_layers_per_block
# (one list per up block; the last entry is for the attention-free UpBlock2D and is unused).
_SSD1B_UNET = {
    **_SDXL_UNET,
    "mid_block_type": "UNetMidBlock2D",
    "transformer_layers_per_block": [1, 2, 4],
    "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], 1],
}

_VEGA_UNET = {
    **_SDXL_UNET,
    "mid_block_type": "UNetMidBlock2D",
    "transformer_layers_per_block": [1, 1, 2],  # see the module docstring: depths certain, spelling not
    "reverse_transformer_layers_per_block": [[2, 2, 2], [1, 1, 1], 1],
}

_UNETS = {"sd15": _SD15_UNET, "sdxl": _SDXL_UNET, "vega": _VEGA_UNET, "ssd1b": _SSD1B_UNET}

# --- text encoders ------------------------------------------------------------------------------

# openai/clip-vit-large-patch14's text tower, as SD 1.5 ships it. The ids 0/2/1 are the legacy
# values: with eos_token_id == 2, transformers pools at the largest token id (<|endoftext|>).
_CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's text_encoder_2).
_CLIP_BIGG = {
    **_CLIP_L,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

# --- VAEs and schedulers ------------------------------------------------------------------------

_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_SDXL_VAE = {**_VAE, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025}

_SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
_SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def _check(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(map(repr, LAYOUTS))}")
    return layout


def model_type(layout: str) -> str:
    """``"sd"`` for SD 1.5, ``"sdxl"`` for SDXL and its distilled UNets (segmoe's ``type:``)."""
    return "sd" if _check(layout) == "sd15" else "sdxl"


def unet_config(layout: str) -> dict:
    """The real ``UNet2DConditionModel`` config of ``layout`` (a fresh copy; safe to edit)."""
    return copy.deepcopy(_UNETS[_check(layout)])


def text_encoder_configs(layout: str) -> dict[str, dict]:
    """``{"text_encoder": ..., "text_encoder_2": ...}`` CLIP text configs (only the first for sd15)."""
    if model_type(layout) == "sd":
        return {"text_encoder": copy.deepcopy(_CLIP_L)}
    return {"text_encoder": copy.deepcopy(_CLIP_L), "text_encoder_2": copy.deepcopy(_CLIP_BIGG)}


def vae_config(layout: str) -> dict:
    """The real ``AutoencoderKL`` config of ``layout``."""
    return copy.deepcopy(_VAE if model_type(layout) == "sd" else _SDXL_VAE)


def scheduler_config(layout: str) -> dict:
    """The scheduler config the layout's repo ships (PNDM for SD 1.5, Euler for the SDXL family)."""
    return copy.deepcopy(_SD15_SCHEDULER if model_type(layout) == "sd" else _SDXL_SCHEDULER)


def tokenizer_pad_tokens(layout: str) -> dict[str, str]:
    """Pad token per tokenizer subfolder: SDXL's ``tokenizer_2`` pads with ``"!"`` (OpenCLIP's habit)."""
    if model_type(layout) == "sd":
        return {"tokenizer": "<|endoftext|>"}
    return {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}


def transformer_depths(config: dict) -> dict[str, list[int]]:
    """Transformer blocks per attention module, per UNet block, as a config builds them.

    Returns ``{"down.1": [2, 2], "mid": [10], "up.0": [10, 10, 10], ...}`` for blocks that have
    attention. Follows diffusers' ``UNet2DConditionModel.__init__`` rules (an int applies to every
    block; the up path uses ``reverse_transformer_layers_per_block`` or the reversed down list).
    """
    n = len(config["down_block_types"])
    per_block = config.get("transformer_layers_per_block", 1)
    per_block = [per_block] * n if isinstance(per_block, int) else list(per_block)
    lpb = config.get("layers_per_block", 2)
    reverse = config.get("reverse_transformer_layers_per_block") or list(reversed(per_block))
    out: dict[str, list[int]] = {}
    for i, kind in enumerate(config["down_block_types"]):
        if "CrossAttn" in kind:
            d = per_block[i]
            out[f"down.{i}"] = list(d) if isinstance(d, (list, tuple)) else [d] * lpb
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid == "UNetMidBlock2DCrossAttn":
        d = per_block[-1]
        out["mid"] = [d if isinstance(d, int) else d[-1]]
    for i, kind in enumerate(config["up_block_types"]):
        if "CrossAttn" in kind:
            d = reverse[i]
            out[f"up.{i}"] = list(d) if isinstance(d, (list, tuple)) else [d] * (lpb + 1)
    return out


# --- CLIP tokenizer, offline --------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@lru_cache(maxsize=None)
def _clip_merges() -> tuple[str, ...]:
    """CLIP's 48,894 BPE merges, from the file open_clip_torch ships (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ImportError("open_clip_torch is needed for the offline CLIP tokenizer: pip install open_clip_torch")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    return tuple(lines[1:49152 - 256 - 2 + 1])  # line 0 is a version header


def clip_vocab(num_merges: Optional[int] = None) -> tuple[dict[str, int], list[str]]:
    """CLIP's BPE vocabulary and merges, rebuilt offline exactly as OpenAI's tokenizer builds them.

    Args:
        num_merges (`int`, *optional*): keep only the first (most frequent) merges: a smaller but
            still valid BPE (every merge's parts come from earlier merges). ``None``: all, which
            gives the 49,408-token vocabulary of ``openai/clip-vit-large-patch14``.

    Returns:
        ``(vocab, merges)``: token -> id (``<|startoftext|>`` and ``<|endoftext|>`` last, so the
        end token has the largest id, as CLIP's pooling expects) and ``"a b"`` merge strings.
    """
    merges = list(_clip_merges()[:num_merges])
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(num_merges: Optional[int] = None, pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` built offline (see :func:`clip_vocab`)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab(num_merges)
    pairs = [tuple(m.split(" ")) for m in merges]  # the tokenizers BPE wants (left, right) pairs
    return CLIPTokenizer(vocab=vocab, merges=pairs, pad_token=pad_token, model_max_length=model_max_length)


def write_clip_tokenizer(folder, pad_token: str = "<|endoftext|>", num_merges: Optional[int] = None) -> Path:
    """Write a CLIP tokenizer folder (``vocab.json``, ``merges.txt``, configs) without any download."""
    folder = Path(folder)
    clip_tokenizer(num_merges, pad_token).save_pretrained(str(folder))
    vocab, merges = clip_vocab(num_merges)  # the classic files too, for loaders that want them
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder
