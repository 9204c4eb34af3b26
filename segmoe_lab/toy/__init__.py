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

__all__ = ["DOMAINS", "POSITIVE_PROMPTS", "Scene", "caption", "check", "clip_path", "expert_paths", "find_objects",
           "load_base", "load_pipeline", "merge_config", "paths", "render", "sample_scene", "sample_scenes", "WEIGHTS"]

WEIGHTS = Path(__file__).parent / "weights"

# The gate prompts of each domain's expert: its style and its own concept.
POSITIVE_PROMPTS = {
    "flat": "two blue triangles, flat style",
    "neon": "two pink circles, neon style",
    "mosaic": "two orange squares, mosaic style",
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

    The same merge with repo-relative paths is ``experiments/toy.yaml``."""
    from segmoe_lab.merge.config import parse_config

    experts = expert_paths(layout)
    base = paths()["base" if layout == "sd" else "sdxl_base"]
    data = {"base_model": str(_existing(base)), "type": "sd" if layout == "sd" else "sdxl",
            "num_experts": len(experts), **DEFAULT_MERGE,
            "experts": [{"source_model": str(p), "positive_prompt": POSITIVE_PROMPTS[d]} for d, p in experts.items()]}
    data.update(overrides)
    return parse_config(data, source="toy.merge_config()")


# Settings of the toy merge besides its models (experiments/toy.yaml repeats them).
DEFAULT_MERGE = {"moe_layers": "all", "num_experts_per_tok": 1, "scheduler": "ddim"}
