"""Helpers that keep the notebooks thin: parameters in, kit objects out, one call per cell.

Each notebook's ``parameters`` cell holds plain values; the next cell turns them into the kit's
config objects with the functions here (:func:`merge_config`, :class:`Runtime`,
:class:`Generation`), so a bad value fails at once with the kit's message. The rest are the
few steps every notebook shares: open a merge where it fits (:func:`open_merge`), generate a
seeded batch (:func:`generate`), show images (:func:`show_images`) and write the result table
that ``segmoe-lab runs`` collects (:func:`write_results`). Each turns any failure below it into
a kit error; :func:`quiet_errors` shows those as one message, without a traceback.

Example::

    cfg = merge_config("toy", num_experts_per_tok=2)
    place = Runtime(device="auto").place(cfg)        # cuda/float16 when present; offload if too big
    pipe = open_merge(cfg, place)
    images = generate(pipe, ["two red circles"], Generation(steps=8))
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from segmoe_lab.errors import SettingsError, format_problems, kit_errors, quiet_errors, validation_problems  # noqa: F401
from segmoe_lab.merge.config import ConfigError, MergeConfig, load_config
from segmoe_lab.merge.settings import GenerationSettings, Steps

GiB = 2**30
HEADROOM = 1.5 * GiB  # activations, CUDA context and allocator slack on top of the weights (rough)


class NotebookError(SettingsError):
    """A notebook parameter that cannot be used; the message names it and the valid choices."""


def _validate(model: type[BaseModel], values: dict, what: str):
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise NotebookError(format_problems(f"{what}: {{n}} problem(s)", validation_problems(err, model))) from None


# --- the merge ----------------------------------------------------------------------------------

def is_built_merge(config) -> bool:
    """Whether a ``config`` parameter names a built merge (a merge folder or hub id), not a config to build."""
    if isinstance(config, MergeConfig) or str(config) == "toy":
        return False
    path = Path(config)
    return path.is_dir() or (not path.suffix and not path.exists() and "/" in str(config))


@kit_errors
def merge_config(config: Union[str, Path, MergeConfig] = "toy", **overrides: Any) -> MergeConfig:
    """The merge a notebook works on, validated with ``overrides`` applied (``None`` ones ignored).

    Args:
        config: ``"toy"`` (the toy world's merge), a YAML merge config (e.g.
            ``"../experiments/segmoe_sd_4x2.yaml"``), a merge folder or hub id (its stored config),
            or a :class:`MergeConfig`.
        overrides: config fields to change, e.g. ``num_experts_per_tok=2, routing="per_token"``.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if str(config) == "toy" and not isinstance(config, MergeConfig):
        from segmoe_lab import toy

        return toy.merge_config(**overrides)
    if isinstance(config, MergeConfig):
        cfg, source = config, "config"
    elif is_built_merge(config):
        from segmoe_lab.merge.io import read_merge_config
        from segmoe_lab.sources import resolve_source

        folder = Path(config) if Path(config).is_dir() else resolve_source(str(config)).path
        cfg, source = read_merge_config(folder)[1], str(config)
    elif Path(config).is_file():
        cfg, source = load_config(config), str(config)
    else:
        raise ConfigError(f"config={str(config)!r}: no such file (relative paths start at {Path.cwd()}); give 'toy', "
                          "a YAML merge config such as '../experiments/segmoe_sd_4x2.yaml', a merge folder or a hub id")
    return cfg.updated(source, **overrides)


# --- where it runs ------------------------------------------------------------------------------

@dataclass
class Placement:
    """Where a merge runs: device, dtype, offload mode and why."""

    device: str
    dtype: str
    offload: str  # "none", "model" (diffusers model CPU offload) or "experts" (segmoe_lab.merge.offload)
    note: str

    def __str__(self) -> str:
        return f"device={self.device} dtype={self.dtype} offload={self.offload}: {self.note}"


class Runtime(BaseModel):
    """Device, dtype and offload as a notebook's parameters give them (``auto`` picks)."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    offload: Literal["auto", "none", "model", "experts"] = "auto"

    @classmethod
    def of(cls, **values) -> "Runtime":
        """Validate notebook parameters into a Runtime (a bad value raises :class:`NotebookError`)."""
        return _validate(cls, values, "runtime parameters")

    def place(self, cfg: MergeConfig) -> Placement:
        """Pick device and dtype (float16 on CUDA), and offload when the merge would not fit."""
        import torch

        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        if device == "cuda" and not torch.cuda.is_available():
            raise NotebookError("device='cuda' but no CUDA GPU is visible; use device='auto' or 'cpu'")
        dtype = ("float16" if device == "cuda" else "float32") if self.dtype == "auto" else self.dtype
        if device == "cpu":
            return Placement(device, dtype, "none", "CPU: everything in RAM")
        if self.offload != "auto":
            return Placement(device, dtype, self.offload, "offload chosen by the offload parameter")
        return Placement(device, dtype, *_offload_for(cfg, dtype))


def _offload_for(cfg: MergeConfig, dtype: str) -> tuple[str, str]:
    import torch

    from segmoe_lab.merge.estimate import estimate

    est = estimate(cfg)
    size = 2 if dtype in ("float16", "bfloat16") else 4
    pipeline, unet = (est.merge_unet + est.others) * size, est.merge_unet * size
    free = torch.cuda.mem_get_info()[0]
    gib = f"merged pipeline {pipeline / GiB:.1f} GiB, UNet {unet / GiB:.1f} GiB, GPU free {free / GiB:.1f} GiB"
    if pipeline + HEADROOM < free:
        return "none", f"the merge fits on the GPU ({gib})"
    if unet + HEADROOM < free:
        return "model", f"the merge does not fit whole, so model CPU offload moves each component to the GPU when used ({gib})"
    return "experts", f"even the merged UNet does not fit, so the experts stay in CPU memory and only the routed ones go to the GPU ({gib})"


@kit_errors
def open_merge(config: Union[str, Path, MergeConfig], place: Placement, progress: bool = True, **overrides: Any):
    """A :class:`~segmoe_lab.SegMoEPipeline` placed as ``place`` says: built from a config
    (``"toy"``, a YAML file or a :class:`MergeConfig`, with ``overrides``), or loaded from a merge
    folder / hub id (``routing`` and ``num_experts_per_tok`` overrides applied after loading)."""
    from segmoe_lab.merge.pipeline import SegMoEPipeline

    on = place.device if place.offload == "none" else "cpu"
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if is_built_merge(config):
        if set(overrides) - {"routing", "num_experts_per_tok"}:
            raise NotebookError(f"{config} is a built merge: only routing and num_experts_per_tok can change, not {overrides}")
        pipe = SegMoEPipeline(config, device=on, torch_dtype=place.dtype, progress=progress)
        pipe.set_routing(overrides.get("routing"), overrides.get("num_experts_per_tok"))
    else:
        pipe = SegMoEPipeline(merge_config(config, **overrides), device=on, torch_dtype=place.dtype, progress=progress)
    if place.offload == "model":
        pipe.pipe.enable_model_cpu_offload(device=place.device)
    elif place.offload == "experts":
        from segmoe_lab.merge.offload import enable_expert_offload

        pipe.expert_offload = enable_expert_offload(pipe.pipe, place.device)
    pipe.pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_count(module) -> int:
    """Number of parameters of a module (a UNet, a MoE layer)."""
    return sum(p.numel() for p in module.parameters())


# --- generating ---------------------------------------------------------------------------------

class Generation(GenerationSettings):
    """Sampling settings a notebook's parameters give (validated as :class:`GenerationSettings`; see :func:`generate`)."""

    UNUSED: ClassVar[dict[str, str]] = {"num_images": "generate() makes one image per prompt; list a prompt twice"}

    steps: Steps = 8

    @classmethod
    def of(cls, **values) -> "Generation":
        """Validate notebook parameters into Generation settings (a bad value raises :class:`NotebookError`)."""
        return _validate(cls, values, "generation parameters")


def _diffusers(pipe):
    return getattr(pipe, "pipe", pipe)  # a SegMoEPipeline wraps a diffusers pipeline


@contextmanager
def use_scheduler(pipe, name: Optional[str]):
    """Generate with scheduler ``name`` (built from the pipeline's own config) inside the block."""
    from segmoe_lab.merge.build import make_scheduler

    target = _diffusers(pipe)
    old = target.scheduler
    if name is not None:
        target.scheduler = make_scheduler(name, old)
    try:
        yield target.scheduler
    finally:
        target.scheduler = old


@kit_errors
def generate(pipe, prompts: Sequence[str], gen: Generation) -> list:
    """One image per prompt, prompt ``i`` seeded with ``gen.seed + i`` (so a prompt's image does not
    depend on the others); works for a merge and for a plain diffusers pipeline. Returns PIL images."""
    import torch

    images = []
    with use_scheduler(pipe, gen.scheduler):
        for i, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(gen.seed + i)
            out = _diffusers(pipe)(prompt, negative_prompt=gen.negative_prompt, num_inference_steps=gen.steps,
                                   guidance_scale=gen.guidance_scale, generator=generator)
            images.append(out.images[0])
    return images


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)``."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


# --- showing and saving -------------------------------------------------------------------------

def show_images(images: Sequence, titles: Optional[Sequence[str]] = None, cols: int = 4, size: float = 2.2):
    """A grid of images with (wrapped, shortened) titles; returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    titles = [str(t) for t in titles] if titles is not None else [""] * len(images)
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image)
        ax.set_title(title if len(title) <= 40 else title[:37] + "...", fontsize=8)
    fig.tight_layout()
    return fig


def write_results(table, output_dir: Optional[Union[str, Path]], name: str = "results.csv") -> Optional[Path]:
    """Write a result table to ``output_dir/name`` (what ``segmoe-lab runs`` collects); no-op without a folder."""
    if not output_dir:
        return None
    if len(table) == 0:  # a header-only file would look like a finished run that found nothing
        raise NotebookError(f"write_results: the table for {name} has no rows; nothing was written")
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        table.to_csv(tmp, index=False)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def work_dir(path: Optional[Union[str, Path]] = None) -> Path:
    """``path`` (created), or a new temporary folder when None."""
    import tempfile

    folder = Path(path) if path else Path(tempfile.mkdtemp(prefix="segmoe-lab-"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --- prompts and judging -------------------------------------------------------------------------

@kit_errors
def prompt_table(prompts: Sequence[str] = (), n: int = 4, prompt_set: str = "toy"):
    """The prompts to generate: ``prompts`` if given, else ``n`` prompts of a prompt set (default
    the toy world's, with ground-truth descriptions) taken in turn from each category."""
    import pandas as pd

    from segmoe_lab.judge.compare import load_prompts

    if isinstance(prompts, str):
        raise NotebookError(f"prompts={prompts!r}: give a list of prompts, e.g. [{prompts!r}]")
    if prompts:
        return pd.DataFrame({"prompt": list(prompts), "category": "custom"})
    if n < 1:
        raise NotebookError(f"n_prompts={n}: choose at least 1")
    return load_prompts(prompt_set, n=n)


def judge(name: str = "toy_truth", **options):
    """``judge(images, table) -> scores``: the scorer ``name`` of :data:`segmoe_lab.judge.scorers.SCORERS`
    (``toy_truth``: the toy world's ground truth; ``clip``: CLIP score, ``model="toy"`` on the toy world)."""
    from segmoe_lab.judge.scorers import get_scorer

    scorer = get_scorer(name, **options)

    def score(images: Sequence, table) -> list[float]:
        descriptions = list(table["description"]) if "description" in table else None
        return [float(s) for s in scorer.score(images, list(table["prompt"]), descriptions)]

    score.scorer = scorer
    return score


@kit_errors
def judges(scorers: dict[str, dict]) -> dict:
    """``{label: judge}`` for a ``{label: options}`` mapping, as ``CompareConfig.scorers``
    (``{"toy_truth": {}, "clip": {"model": "toy"}}``; a label other than a scorer's name picks it
    with ``"scorer"``). Scorers are created now, so missing weights fail before any generation."""
    if not isinstance(scorers, dict) or not scorers:
        raise NotebookError(f"scorers={scorers!r}: give a mapping of scorer name to options, e.g. {{'clip': {{}}}}")
    return {label: judge(dict(opts or {}).pop("scorer", label), **{k: v for k, v in dict(opts or {}).items() if k != "scorer"})
            for label, opts in scorers.items()}


def score_table(images: Sequence, table, judges_: dict):
    """The prompt table with one score column per judge."""
    return table.assign(**{label: j(images, table) for label, j in judges_.items()})


# --- inspecting ----------------------------------------------------------------------------------

@kit_errors
def open_base(cfg: MergeConfig, place: Placement, progress: bool = False):
    """The merge's base model alone (a diffusers pipeline), with the merge's scheduler, placed as ``place``."""
    from segmoe_lab.merge.build import DTYPES, make_scheduler
    from segmoe_lab.sources import load_pipeline, resolve_source

    pipe = load_pipeline(resolve_source(cfg.base_model, model_type=cfg.type), cfg.type, torch_dtype=DTYPES[place.dtype])
    pipe.scheduler = make_scheduler(cfg.scheduler, pipe.scheduler)
    if place.offload == "none":
        pipe.to(place.device)
    else:
        pipe.enable_model_cpu_offload(device=place.device)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def site_table(cfg: MergeConfig):
    """The sites ``cfg`` turns into MoE layers (path, block, kind, label, widths, parameters per
    expert), found on an empty (meta) copy of the base UNet: nothing is loaded."""
    import pandas as pd
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from segmoe_lab.merge.discovery import find_sites, get_module
    from segmoe_lab.merge.estimate import model_configs

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(model_configs(cfg).unet)
    return pd.DataFrame([{"path": s.path, "block": s.block, "kind": s.kind, "label": s.label,
                          "in_features": s.in_features, "out_features": s.out_features,
                          "params_per_expert": parameter_count(get_module(unet, s.path))}
                         for s in find_sites(unet, cfg.moe_layers, cfg.include_mid)])


def plot_gates(pipe, report=None, n: int = 4):
    """For ``n`` sites (the least well-conditioned for routing first): the gate matrix (experts x
    hidden) and the cosine similarity between its expert rows."""
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    report = report if report is not None else pipe.gate_report()
    layers = dict(pipe.moe_layers)
    order = "routing_condition" if "routing_condition" in report else "condition_number"
    sites = list(report.sort_values(order, ascending=False).site[:n])
    fig, axes = plt.subplots(2, len(sites), figsize=(3.2 * len(sites), 4.6), squeeze=False)
    for j, site in enumerate(sites):
        w = layers[site].gate.weight.detach().float().cpu()  # (E, hidden)
        unit = F.normalize(w, dim=-1)
        axes[0, j].imshow(w, aspect="auto", cmap="coolwarm")
        axes[0, j].set_title(site.replace(".transformer_blocks", "").replace("attentions", "a")[-38:], fontsize=7)
        im = axes[1, j].imshow(unit @ unit.T, vmin=-1, vmax=1, cmap="coolwarm")  # (E, E)
        axes[0, j].set_yticks(range(len(w)))
        axes[1, j].set_xticks(range(len(w)))
        axes[1, j].set_yticks(range(len(w)))
        axes[1, j].set_xlabel("expert", fontsize=8)
    axes[0, 0].set_ylabel("gate rows (expert)", fontsize=8)
    axes[1, 0].set_ylabel("cosine(expert rows)", fontsize=8)
    fig.colorbar(im, ax=axes[1, -1], fraction=0.05)
    fig.tight_layout()
    return fig


def max_pixel_difference(a: Sequence, b: Sequence) -> int:
    """The largest difference (0-255) between two lists of images, pixel by pixel."""
    import numpy as np

    return int(max(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max() for x, y in zip(a, b)))


def merge_summary(cfg: MergeConfig, sites, report, build_seconds: float, reload_difference: int,
                  scores: dict[str, Sequence[float]]):
    """One row describing a built merge (what ``segmoe-lab runs`` collects from notebook 01)."""
    import pandas as pd

    row = {"moe_layers": cfg.moe_layers, "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
           "routing": cfg.routing, "init": cfg.init, "sites": len(sites),
           "expert_params": int(sites.params_per_expert.sum()) * cfg.num_experts, "build_seconds": round(build_seconds, 2),
           "degenerate_gates": int(report.degenerate.sum()), "reload_max_difference": reload_difference}
    row.update({f"{name}_score": sum(s) / len(s) for name, s in scores.items()})
    return pd.DataFrame([row])
