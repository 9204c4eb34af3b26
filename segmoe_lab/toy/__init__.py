"""The toy world: a tiny trained base, domain experts and CLIP, with ground truth.

Scenes of coloured shapes in three domains (``flat``, ``neon``, ``mosaic``), each carrying a
concept the base saw rarely (triangles; pink and cyan; orange and purple). The weights ship in
``segmoe_lab/toy/weights`` (standard diffusers folders, fp16) and retrain with
``segmoe-lab toy train``.

Example::

    from segmoe_lab import toy
    pipe = toy.load_base()
    image = pipe("two pink circles, neon style", num_inference_steps=20).images[0]
    toy.check(image, {"domain": "neon", "shape": "circle", "colour": "pink", "count": 2})
    cfg = toy.merge_config(num_experts_per_tok=2)      # a MergeConfig over the shipped base and experts
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .truth import check, find_objects
from .world import DOMAINS, Scene, caption, render, sample_scene, sample_scenes

__all__ = ["DOMAINS", "MERGE_PRESETS", "POSITIVE_PROMPTS", "SEGMOE_PROMPTS", "Scene", "caption", "check", "clip_path", "expert_paths", "find_objects",
           "load_base", "load_pipeline", "merge_config", "paths", "render", "sample_scene", "sample_scenes", "WEIGHTS"]

WEIGHTS = Path(__file__).parent / "weights"

# segmoe's gate prompts, one per expert: its style and its own concept (the ``segmoe`` preset).
SEGMOE_PROMPTS = {
    "flat": "two blue triangles, flat style",
    "neon": "two pink circles, neon style",
    "mosaic": "two orange squares, mosaic style",
}
# The gate prompts of each domain's expert, as lists (mergekit-moe style): the content (shape,
# colour, count, caption template) varies and the domain's style stays, half with its own concept,
# so a gate fitted on them learns the domain rather than the content words of a single prompt.
# Written by hand, and disjoint from the held-out set data/prompts/toy_heldout.csv (a test checks it):
# the held-out numbers must come from prompts no gate or router was fitted on.
POSITIVE_PROMPTS = {
    "flat": ["two blue triangles, flat style", "a red circle, flat style", "three green squares, flat style",
             "a yellow triangle, flat style", "two red squares, flat style", "three blue circles, flat style",
             "a flat picture of two blue squares", "a flat picture of a red circle"],
    "neon": ["two pink circles, neon style", "a red square, neon style", "three cyan circles, neon style",
             "a green circle, neon style", "two cyan squares, neon style", "three blue squares, neon style",
             "a neon picture of a yellow square", "a neon picture of two green circles"],
    "mosaic": ["two orange squares, mosaic style", "two green squares, mosaic style", "three purple circles, mosaic style",
               "a red square, mosaic style", "two purple squares, mosaic style", "two red circles, mosaic style",
               "a mosaic picture of a green square", "a mosaic picture of two yellow squares"],
}


def paths(weights=None) -> dict[str, Path]:
    """Every shipped model by name: ``base``, ``flat``/``neon``/``mosaic`` (experts), ``control``,
    ``clip``, ``mosaic_lora``, ``neon_single_file``, ``sdxl_base``, ``sdxl_flat``, ``sdxl_neon``."""
    w = Path(weights) if weights is not None else WEIGHTS
    out = {"base": w / "sd" / "base", **{d: w / "sd" / d for d in DOMAINS}, "control": w / "sd" / "control",
           "clip": w / "clip", "mosaic_lora": w / "sd" / "mosaic_lora", "neon_single_file": w / "sd" / "neon.safetensors",
           "sdxl_base": w / "sdxl" / "base"}
    out.update({f"sdxl_{d}": w / "sdxl" / d for d in ("flat", "neon")})
    return out


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the toy weights ship with the repo (segmoe_lab/toy/weights); "
                                "retrain them with `segmoe-lab toy train`")
    return path


def clip_path() -> Path:
    """The tiny CLIP (a transformers ``CLIPModel`` folder with its tokenizer and processor)."""
    return _existing(paths()["clip"])


def expert_paths(layout: str = "sd") -> dict[str, Path]:
    """``{domain: expert folder}``: all three domains (``sd``) or ``flat`` and ``neon`` (``sdxl``)."""
    p = paths()
    if layout == "sd":
        return {d: _existing(p[d]) for d in DOMAINS}
    if layout == "sdxl":
        return {d: _existing(p[f"sdxl_{d}"]) for d in ("flat", "neon")}
    raise ValueError(f"layout {layout!r}: choose 'sd' or 'sdxl'")


def load_pipeline(name: str = "base", device: str = "cpu", weights=None):
    """A shipped model (a name of :func:`paths`: ``base``, an expert, ``control``, ``sdxl_base`` ...)
    as a float32 diffusers pipeline; ``weights`` reads another weights folder (as ``toy train --out``)."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    p = paths(weights)
    if name not in p or name in ("clip", "mosaic_lora", "neon_single_file"):
        raise ValueError(f"model {name!r} is not a toy pipeline; choose one of "
                         f"{[k for k in p if k not in ('clip', 'mosaic_lora', 'neon_single_file')]}")
    cls = StableDiffusionXLPipeline if name.startswith("sdxl") else StableDiffusionPipeline
    pipe = cls.from_pretrained(_existing(p[name]), dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_base(layout: str = "sd", device: str = "cpu"):
    """The toy base model (``sd``: SD 1.5 layout; ``sdxl``: SDXL layout) as a float32 pipeline."""
    if layout not in ("sd", "sdxl"):
        raise ValueError(f"layout {layout!r}: choose 'sd' or 'sdxl'")
    return load_pipeline("base" if layout == "sd" else "sdxl_base", device)


def merge_config(layout: str = "sd", **overrides: Any):
    """The toy merge (:class:`~segmoe_lab.merge.config.MergeConfig`) over the shipped base and domain
    experts, with absolute paths; ``overrides`` replace top-level fields (``num_experts_per_tok=2``).

    ``preset="segmoe"`` gives segmoe 0.0.4's exact settings (one prompt per expert, ``hidden`` gates,
    ``segmoe`` routing, attention and feed-forward only); ``prompts="lists"|"segmoe"`` picks the
    gate prompts (lists by default, segmoe's single prompts under the segmoe preset).

    The same merge with repo-relative paths is ``experiments/toy.yaml``."""
    from segmoe_lab.merge.config import parse_config

    experts = expert_paths(layout)
    base = paths()["base" if layout == "sd" else "sdxl_base"]
    overrides = dict(overrides)
    presets = {"default": (DEFAULT_MERGE, "lists"), "segmoe": (SEGMOE_MERGE, "segmoe")}
    prompt_sets = {"lists": POSITIVE_PROMPTS, "segmoe": SEGMOE_PROMPTS}
    preset = overrides.pop("preset", "default")
    if preset not in presets:
        raise ValueError(f"preset={preset!r}: choose one of {sorted(presets)}")
    settings, prompt_set = presets[preset]
    prompts = prompt_sets[overrides.pop("prompts", prompt_set)]
    data = {"base_model": str(_existing(base)), "type": "sd" if layout == "sd" else "sdxl",
            "num_experts": len(experts), **settings,
            "experts": [{"source_model": str(p), "positive_prompt": prompts[d]} for d, p in experts.items()]}
    data.update(overrides)
    return parse_config(data, source="toy.merge_config()")


# Settings of the toy merge besides its models and prompts (experiments/toy.yaml repeats them);
# chosen by the held-out ablation (segmoe_lab.toy.ablation, see the README's table).
# The whole-UNet switch: every parameterised layer (segmoe's sites, the mid block and every extra kind)
# follows one prompt-level decision per sample, so top-1 runs the chosen expert's own UNet. The site
# gates (hidden, from the prompt lists) decide nothing under the router; they are what segmoe 0.0.4
# reads when it loads a saved folder.
DEFAULT_MERGE = {"moe_layers": "all", "include_mid": True, "moe_extra": ["all"], "router": "prompt",
                 "routing": "per_sample", "init": "hidden", "gate": {"method": "fast"},
                 "num_experts_per_tok": 1, "scheduler": "ddim"}
# segmoe 0.0.4's own settings over the toy models: merge_config(preset="segmoe"), experiments/toy_segmoe.yaml
SEGMOE_MERGE = {"moe_layers": "all", "num_experts_per_tok": 1, "scheduler": "ddim", "init": "hidden", "routing": "segmoe"}
# Named merges compared by the ablation: overrides of merge_config (a "prompts" key picks the prompt lists).
MERGE_PRESETS = {
    "segmoe": {"preset": "segmoe"},
    "hidden, prompt lists": {"preset": "segmoe", "prompts": "lists"},
    "discriminant, lists, per_sample": {"init": "discriminant", "routing": "per_sample", "gate": {"method": "fast"}},
    "prompt router (attn+ff)": {"init": "uniform", "router": "prompt", "routing": "per_sample"},
    "prompt router + resnet, norm": {"init": "uniform", "router": "prompt", "routing": "per_sample",
                                     "moe_extra": ["resnet", "norm"]},
    "whole-UNet switch": {"init": "uniform", "router": "prompt", "routing": "per_sample", "moe_extra": ["all"],
                          "include_mid": True},
    "discriminant, lists, all kinds, per_sample": {"init": "discriminant", "routing": "per_sample",
                                                   "gate": {"method": "fast"}, "moe_extra": ["all"], "include_mid": True},
}
