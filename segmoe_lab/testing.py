"""Tiny random-weight models that mirror the real layouts block for block, for tests and demos.

Every layout of :mod:`segmoe_lab.sources.layouts` (SD 1.5, SDXL, Segmind Vega, SSD-1B) gets a pipeline
with the real block types, ``layers_per_block``, per-block transformer depths, mid block and
conditioning (SDXL's two text encoders and ``text_time`` embedding), at tiny widths: it builds in
about a second on CPU and makes 64x64 images (UNet ``sample_size`` 32, VAE factor 2). The
tokenizers are CLIP's real BPE cut to its first 2,000 merges (built offline), so prompts tokenize
as they would in the real model and different prompts give different ids.

Example::

    fs = write_fixture_set(tmp_path, "sdxl", n_experts=3)
    merged = build_merge(fs.config(moe_layers="all"))
"""
from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from segmoe_lab.sources import layouts
from segmoe_lab.sources.layouts import LAYOUTS
from segmoe_lab.sources.ldm_writer import ldm_state_dict, save_single_file

__all__ = ["LAYOUTS", "EXPERT_PROMPTS", "FixtureSet", "make_pipeline", "perturb_unet", "save_single_file",
           "tiny_unet_config", "unet_inputs", "write_fixture_set", "expert_prompt", "ldm_state_dict"]

TEXT_WIDTH = 24  # cross-attention width: SD 1.5's 768, SDXL's 768 + 1280
TOKENIZER_MERGES = 2000  # CLIP's most frequent merges: common words stay one token, as in the real vocab
EXPERT_PROMPTS = (
    "a photo of a red cat", "a watercolor painting of a blue dog", "a pencil sketch of a green car",
    "a neon poster of a yellow house", "pixel art of a purple tree", "an oil painting of an orange boat",
)

# --- tiny configs -------------------------------------------------------------------------------

def tiny_unet_config(layout: str) -> dict:
    """The real UNet config of ``layout`` with tiny widths; block structure and depths unchanged.

    The text width (24) differs from every block width, so a test can tell cross-attention's
    key/value inputs from the hidden states.
    """
    cfg = layouts.unet_config(layout)
    cfg.update(cross_attention_dim=TEXT_WIDTH, norm_num_groups=8, sample_size=32)
    if layouts.model_type(layout) == "sd":
        cfg.update(block_out_channels=[16, 32, 32, 32], attention_head_dim=2)
    else:
        # pooled text (text_encoder_2's projection, 16) + 6 time ids x 8, as SDXL's 1280 + 6 x 256
        cfg.update(block_out_channels=[16, 32, 32], attention_head_dim=[1, 2, 4], addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=16 + 6 * 8)
    return cfg


def _tiny_text_configs(layout: str, vocab_size: int) -> dict[str, dict]:
    # SD 1.5: one encoder as wide as cross-attention. SDXL: two of different widths adding up to it
    # (8 + 16, as 768 + 1280): diffusers' single-file loader tells the two apart by their width.
    configs = layouts.text_encoder_configs(layout)
    widths = [TEXT_WIDTH] if len(configs) == 1 else [8, TEXT_WIDTH - 8]
    for cfg, width in zip(configs.values(), widths):
        cfg.update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2, num_hidden_layers=2,
                   projection_dim=16, vocab_size=vocab_size)
    return configs


def _tiny_vae_config(layout: str) -> dict:
    cfg = layouts.vae_config(layout)
    cfg.update(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4, sample_size=64)
    return cfg


# --- pipelines ----------------------------------------------------------------------------------

def _scheduler(layout: str):
    import diffusers

    cfg = layouts.scheduler_config(layout)
    return getattr(diffusers, cfg.pop("_class_name")).from_config(cfg)


def _text_encoder(cfg: dict):
    import transformers

    cls = getattr(transformers, cfg["architectures"][0])
    return cls(transformers.CLIPTextConfig(**cfg)).eval()


def make_pipeline(layout: str = "sd15", seed: int = 0):
    """A seeded tiny pipeline of ``layout`` with random weights (fp32, CPU).

    Args:
        layout (`str`, *optional*, defaults to ``"sd15"``): one of :data:`LAYOUTS`.
        seed (`int`, *optional*, defaults to 0): the same seed gives the same weights.

    Returns:
        ``StableDiffusionPipeline`` (sd15) or ``StableDiffusionXLPipeline`` (sdxl, vega, ssd1b).
    """
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    pads = layouts.tokenizer_pad_tokens(layout)
    tokenizers = {name: layouts.clip_tokenizer(TOKENIZER_MERGES, pad) for name, pad in pads.items()}
    vocab_size = len(tokenizers["tokenizer"])
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(tiny_unet_config(layout)).eval()
        vae = AutoencoderKL.from_config(_tiny_vae_config(layout)).eval()
        encoders = {name: _text_encoder(cfg) for name, cfg in _tiny_text_configs(layout, vocab_size).items()}
    parts = dict(unet=unet, vae=vae, scheduler=_scheduler(layout), **encoders, **tokenizers)
    if layouts.model_type(layout) == "sd":
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def perturb_unet(unet, seed: int, scale: float = 0.05):
    """Add seeded noise to every UNet parameter in place: a stand-in for a fine-tuned expert.

    Each tensor moves by ``scale`` times its own RMS, so the expert stays close to the base
    (as fine-tunes do) while every non-zero tensor differs. Returns ``unet``.
    """
    g = torch.Generator().manual_seed(seed)
    for _, p in unet.named_parameters():
        rms = p.detach().float().pow(2).mean().sqrt()
        p.add_((torch.randn(p.shape, generator=g) * (scale * rms)).to(p.dtype))
    return unet


def perturbed_copies(module, n: int = 3, seed: int = 0, scale: float = 0.1) -> list:
    """``n`` copies of ``module`` with seeded Gaussian noise (``scale``) added to every parameter: experts
    of one site for layer tests."""
    g = torch.Generator().manual_seed(seed)
    out = [copy.deepcopy(module) for _ in range(n)]
    with torch.no_grad():
        for e in out:
            for p in e.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def full_and_compressed(cfg, compress: dict):
    """Two builds of ``cfg`` from the same seed: with full experts and with ``compress`` (e.g.
    ``{"energy": 1.0}``), so their gates agree and outputs can be compared."""
    from segmoe_lab.merge.pipeline import SegMoEPipeline

    builds = []
    for c in (None, compress):
        torch.manual_seed(0)
        builds.append(SegMoEPipeline(cfg.updated(compress=c), device="cpu", progress=False))
    return tuple(builds)


def unet_inputs(unet, batch: int = 1, seed: int = 0, seq_len: int = 77) -> dict:
    """Seeded random keyword arguments for ``unet(**inputs)``, shaped from its config.

    SDXL-family UNets also get ``added_cond_kwargs`` (pooled ``text_embeds`` and 6 ``time_ids``).
    """
    cfg, g = unet.config, torch.Generator().manual_seed(seed)
    size = cfg.sample_size
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),  # (B, C, H, W)
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, seq_len, cfg.cross_attention_dim, generator=g),  # (B, T, D)
    }
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        px = float(size * 2)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=g),
            "time_ids": torch.tensor([[px, px, 0.0, 0.0, px, px]] * batch),  # original size, crop, target
        }
    return {k: _to(v, unet) for k, v in inputs.items()}


def _to(value, unet):
    if isinstance(value, dict):
        return {k: _to(v, unet) for k, v in value.items()}
    return value.to(unet.device, unet.dtype if value.is_floating_point() else value.dtype)


# --- fixture sets on disk -----------------------------------------------------------------------

def expert_prompt(i: int) -> str:
    """Expert ``i``'s positive prompt: distinct for every ``i`` (a number is added after the list runs out)."""
    prompt = EXPERT_PROMPTS[i % len(EXPERT_PROMPTS)]
    return prompt if i < len(EXPERT_PROMPTS) else f"{prompt}, variant {i // len(EXPERT_PROMPTS)}"


@dataclass
class FixtureSet:
    """A base model and its experts written as diffusers folders (and optionally single files)."""

    root: Path
    layout: str
    base: Path
    experts: list[Path]
    prompts: list[str]
    single_files: list[Path] = field(default_factory=list)  # expert_i.safetensors, LDM layout
    base_single_file: Optional[Path] = None

    @property
    def model_type(self) -> str:
        """``"sd"`` or ``"sdxl"``."""
        return layouts.model_type(self.layout)

    def config(self, *, single_file: bool = False, **overrides):
        """A valid :class:`~segmoe_lab.merge.config.MergeConfig` merging these experts into the base.

        Defaults keep tests quick: hidden gates from a 2-step generation (segmoe's method, fewer
        steps). Any top-level key can be overridden, e.g. ``config(moe_layers="all", init="random")``.
        ``single_file=True`` names the experts by their single-file checkpoints instead of folders.
        """
        from segmoe_lab.merge.config import parse_config

        if single_file and not self.single_files:
            raise ValueError(f"{self.root} has no single files; write it with write_fixture_set(..., single_file=True)")
        sources = self.single_files if single_file else self.experts
        cfg = {
            "base_model": str(self.base), "type": self.model_type, "gate": {"steps": 2},
            "experts": [{"source_model": str(s), "positive_prompt": p, "negative_prompt": "blurry"}
                        for s, p in zip(sources, self.prompts)],
        }
        cfg.update(overrides)
        return parse_config(cfg)


def write_fixture_set(root, layout: str = "sd15", n_experts: int = 2, seed: int = 0,
                      single_file: bool = False) -> FixtureSet:
    """Write ``root/base`` and ``root/expert_<i>`` (diffusers folders, perturbed UNets) for ``layout``.

    Args:
        root (`str` or `Path`): output folder (created; existing fixture folders are replaced).
        layout (`str`, *optional*, defaults to ``"sd15"``): one of :data:`LAYOUTS`.
        n_experts (`int`, *optional*, defaults to 2): experts differ from the base only in the UNet.
        seed (`int`, *optional*, defaults to 0): seeds the base weights and every perturbation.
        single_file (`bool`, *optional*, defaults to False): also write ``base.safetensors`` and
            ``expert_<i>.safetensors`` in the original Stable Diffusion key layout.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pipe = make_pipeline(layout, seed)
    base = root / "base"
    shutil.rmtree(base, ignore_errors=True)
    pipe.save_pretrained(base)
    fs = FixtureSet(root, layout, base, [], [expert_prompt(i) for i in range(n_experts)])
    if single_file:
        fs.base_single_file = save_single_file(pipe, root / "base.safetensors")
    for i in range(n_experts):
        unet = perturb_unet(copy.deepcopy(pipe.unet), seed=seed * 1000 + i + 1)
        folder = root / f"expert_{i}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(base, folder, ignore=lambda d, names: ["unet"] if Path(d) == base else [])
        unet.save_pretrained(folder / "unet")
        fs.experts.append(folder)
        if single_file:
            fs.single_files.append(save_single_file(pipe, root / f"expert_{i}.safetensors", unet=unet))
    return fs


# --- single-file (original Stable Diffusion) checkpoints ----------------------------------------
# The inverse of diffusers' loaders/single_file_utils.py converters (convert_ldm_unet_checkpoint,
# convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint).


