"""The toy world's tiny models: tokenizer, CLIP, VAE, SD 1.5- and SDXL-layout UNets, schedulers.

Everything is built in code (no download). The tokenizer is a real CLIP BPE cut down to the
merges the world's words need, so captions tokenize exactly as in CLIP and any other text still
tokenizes (into characters). The CLIP's text tower is the pipelines' text encoder (SDXL: the
same tower twice, the second with CLIP's text projection).

Sizes: images 32x32, VAE factor 2 (latent 4x16x16), so the UNets' attention runs at 16x16 and below.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from . import world

MAX_TOKENS = 32  # caption tokens incl. start/end (the captions use at most 12)
TEXT_WIDTH = 64  # CLIP text tower width = the SD UNet's cross_attention_dim
EMBED_DIM = 32  # CLIP's joint embedding
SD_CHANNELS = (32, 48, 48, 48)
SDXL_CHANNELS = (32, 48, 48)
TIME_EMBED = 8  # SDXL addition_time_embed_dim (6 time ids x 8)
LATENT = 16  # latent side (image 32 / VAE factor 2)


# --- tokenizer ------------------------------------------------------------------------------------

def _bpe_merges_used(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to ``word`` (lowest rank first, as OpenAI's ``bpe()``)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        used.append((parts[i], parts[i + 1]))
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return used


def make_tokenizer(pad_token: str = "<|endoftext|>"):
    """A ``CLIPTokenizer`` with CLIP's byte alphabet and only the merges the toy's words need.

    Keeping a subset of CLIP's merges in their original order tokenizes those words exactly as
    CLIP does (BPE always applies the lowest-ranked merge present), here as single tokens.
    """
    from transformers import CLIPTokenizer

    from segmoe_lab.sources.layouts import _bytes_to_unicode, _clip_merges

    full = [tuple(m.split(" ")) for m in _clip_merges()]
    ranks = {pair: i for i, pair in enumerate(full)}
    keep = {pair for w in world.words() + [",", ":"] for pair in _bpe_merges_used(w, ranks)}
    merges = sorted(keep, key=ranks.__getitem__)
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=MAX_TOKENS)


# --- CLIP -----------------------------------------------------------------------------------------

def clip_config(tokenizer):
    from transformers import CLIPConfig

    text = dict(hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=3, num_attention_heads=4,
                vocab_size=len(tokenizer), max_position_embeddings=MAX_TOKENS, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=EMBED_DIM)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  image_size=world.SIZE, patch_size=4, projection_dim=EMBED_DIM)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED_DIM)


def make_clip(tokenizer, seed: int = 0):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(clip_config(tokenizer))


def image_processor():
    """CLIP's preprocessing at 32 px (resize + centre crop to 32, CLIP's mean/std)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": world.SIZE}, crop_size={"height": world.SIZE, "width": world.SIZE})


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, 32, 32) -> CLIP's normalised pixel values (what the processor gives)."""
    proc = image_processor()
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def save_clip(model, tokenizer, folder) -> Path:
    from transformers import CLIPProcessor

    folder = Path(folder)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def text_encoders(clip):
    """``(CLIPTextModel, CLIPTextModelWithProjection)`` carrying the CLIP's text tower."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    src = clip.state_dict()
    out = []
    for cls in (CLIPTextModel, CLIPTextModelWithProjection):
        model = cls(copy.deepcopy(clip.config.text_config)).float()  # own config: saving writes its dtype
        # transformers 5 names CLIPTextModel's tensors without the "text_model." prefix, 4 with it
        state = {k: (src[k] if k in src else src[f"text_model.{k}"]).clone() for k in model.state_dict()}
        model.load_state_dict(state)
        out.append(model.eval())
    return tuple(out)


# --- VAE ------------------------------------------------------------------------------------------

def make_vae(seed: int = 0):
    """An ``AutoencoderKL`` with one downsampling (factor 2): 3x32x32 <-> 4x16x16."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=world.SIZE, mid_block_add_attention=False)


# --- UNets ----------------------------------------------------------------------------------------

def sd_unet_config() -> dict:
    """SD 1.5's block layout (3 cross-attention down blocks + 1 plain, mirrored up), tiny widths.

    One head at 16x16 (head width 32): CPU attention with 8-wide heads was 1.5x slower per step."""
    return dict(sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=SD_CHANNELS, cross_attention_dim=TEXT_WIDTH, attention_head_dim=(1, 2, 2, 2),
                norm_num_groups=8)


def sdxl_unet_config() -> dict:
    """SDXL's block layout (plain, cross-attention, cross-attention with 2 transformer layers; text_time)."""
    return dict(sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=SDXL_CHANNELS, transformer_layers_per_block=(1, 1, 2),
                cross_attention_dim=2 * TEXT_WIDTH, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
                projection_class_embeddings_input_dim=EMBED_DIM + 6 * TIME_EMBED, norm_num_groups=8)


def make_unet(layout: str = "sd", seed: int = 0):
    from diffusers import UNet2DConditionModel

    configs = {"sd": sd_unet_config, "sdxl": sdxl_unet_config}
    if layout not in configs:
        raise ValueError(f"layout {layout!r}: choose one of {list(configs)}")
    torch.manual_seed(seed)
    return UNet2DConditionModel(**configs[layout]())


# --- schedulers -----------------------------------------------------------------------------------

def scheduler_config() -> dict:
    """v-prediction, no sample clipping (clipping the predicted image with v-prediction and
    guidance inverted backgrounds), trailing timesteps (few-step sampling starts at t=999)."""
    return dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                timestep_spacing="trailing")


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config())


def sample_scheduler():
    """The scheduler the pipelines ship with (DDIM, eta 0)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config())


# --- pipelines ------------------------------------------------------------------------------------

def sd_pipeline(unet, vae, clip, tokenizer):
    from diffusers import StableDiffusionPipeline

    te, _ = text_encoders(clip)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tokenizer, scheduler=sample_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(unet, vae, clip, tokenizer):
    from diffusers import StableDiffusionXLPipeline

    te, te2 = text_encoders(clip)
    pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, scheduler=sample_scheduler(), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, folder) -> Path:
    """Save as a standard diffusers folder, fp16 safetensors."""
    folder = Path(folder)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    pipe.to(torch.float32)
    drop_source_paths(folder)
    return folder


def drop_source_paths(folder) -> None:
    """Remove ``_name_or_path`` from the folder's configs: a pipeline loaded from a training
    stage's folder records that (temporary, absolute) path, which means nothing in a shipped model."""
    for f in Path(folder).rglob("*.json"):
        data = json.loads(f.read_text())
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            f.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
