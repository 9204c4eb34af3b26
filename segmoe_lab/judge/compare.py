"""Judge a merge: generate every prompt x seed with the merge, its base and each expert, and score them.

All models use the same seeds, sampler and settings. Images are cached on disk as
``cache_dir/<model fingerprint>/<settings hash>.png`` (written atomically, the settings stored in
the PNG), so re-scoring, adding a scorer or a model, or resuming an interrupted run regenerates
nothing that is already there. The base and the experts share one pipeline: the base is loaded
once and each expert's UNet weights are swapped in (its LoRAs fused), so an expert is judged with
the base's text encoders and VAE, exactly as the merge uses it.

Runs shard prompts across processes with accelerate and gather one table::

    accelerate launch --num_processes 2 -m segmoe_lab.cli compare toy --prompts toy    # or torchrun

Example::

    result = run_comparison(CompareConfig(merge="toy", prompts="toy", seeds=[0, 1], scorers=["clip", "toy_truth"]))
    result.table            # one row per model x prompt x seed x scorer
    stats.paired(result.table)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from segmoe_lab.judge.images import (
    ImageCache,
    ModelRef,
    Settings,
    default_cache_dir,
    generate_image,
    image_key,
)
from segmoe_lab.judge.models import MODEL_GROUPS, ModelLoader, model_refs, reference_refs, resolve_merge, variant_refs
from segmoe_lab.judge.prompts import load_prompts
from segmoe_lab.judge.scorers import SCORERS, get_scorer
from segmoe_lab.merge.config import (
    MergeConfig,
    SchedulerName,
)

# --- prompt sets -----------------------------------------------------------------------------


# --- what a comparison is -------------------------------------------------------------------------

class Sampling(BaseModel):
    """Generation settings, identical for every model of a comparison."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    negative_prompt: str = ""
    scheduler: Optional[SchedulerName] = None  # None: the merge's own (segmoe: ddpm)
    height: Optional[int] = Field(None, ge=8)
    width: Optional[int] = Field(None, ge=8)


class CompareConfig(BaseModel):
    """A comparison run: which merge, which prompts and seeds, how to generate and how to score.

    ``scorers`` maps a column label to the scorer's options (``{"clip": {"model": "toy"}}``); a
    label other than a registry name picks its scorer with ``"scorer"`` (``{"clip_h": {"scorer": "clip",
    "model": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"}}``). A list of names uses defaults.
    On the toy world (``merge="toy"``) the CLIP scorers default to the toy's CLIP (``model="toy"``)
    and ``scorers`` defaults to ``clip`` and ``toy_truth``; elsewhere to ``clip`` (ViT-L-14, openai).

    ``variants`` adds oracle and baseline rows (:mod:`segmoe_lab.judge.variants`: ``model_oracle``,
    ``site_oracle``, ``uniform``, ``random``, ``per_sample``, ``per_token``); ``None`` means
    :data:`~segmoe_lab.judge.variants.DEFAULT_VARIANTS` when the prompts have expert labels, none
    otherwise, ``[]`` none. ``references`` adds full models judged like experts (``{"control": path}``).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    merge: Union[str, MergeConfig] = "toy"
    prompts: str = "toy"
    n_prompts: Optional[int] = Field(None, ge=1)
    categories: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    sampling: Sampling = Field(default_factory=Sampling)
    models: list[str] = Field(default_factory=lambda: list(MODEL_GROUPS))
    scorers: Optional[dict[str, dict]] = None
    variants: Optional[list[str]] = None
    references: dict[str, str] = Field(default_factory=dict)
    cache_dir: Optional[str] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    progress: bool = True

    @classmethod
    def of(cls, **values) -> "CompareConfig":
        """Validate notebook / CLI values; every bad field is named in one :class:`ValueError`."""
        from pydantic import ValidationError

        try:
            return cls.model_validate(values)
        except ValidationError as err:
            lines = []
            for e in err.errors():
                where = ".".join(str(p) for p in e["loc"]) or "(config)"
                if e["type"] == "literal_error":
                    lines.append(f"{where}={e['input']!r} is not a valid choice; choose one of {e['ctx']['expected']}")
                elif e["type"] == "extra_forbidden":
                    fields = Sampling.model_fields if e["loc"][0] == "sampling" else cls.model_fields
                    lines.append(f"{where}: unknown setting; valid: {', '.join(fields)}")
                else:
                    lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
            raise ValueError("comparison settings: " + "; ".join(lines)) from None

    @field_validator("scorers", mode="before")
    @classmethod
    def _scorer_names(cls, value):
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            value = {name: {} for name in value}
        for label, opts in dict(value).items():
            name = dict(opts or {}).get("scorer", label)
            if name not in SCORERS:
                raise ValueError(f"scorer {name!r} is not known; choose one of {sorted(SCORERS)}")
        return value

    @model_validator(mode="after")
    def _toy_defaults(self) -> "CompareConfig":
        toy = isinstance(self.merge, str) and self.merge == "toy"
        scorers = self.scorers if self.scorers is not None else ({"clip": {}, "toy_truth": {}} if toy else {"clip": {}})
        if toy:
            scorers = {k: ({"model": "toy", **v} if v.get("scorer", k) in ("clip", "torchmetrics") else v)
                       for k, v in ((k, dict(v or {})) for k, v in scorers.items())}
        self.scorers = scorers
        return self

    @field_validator("models")
    @classmethod
    def _model_names(cls, value):
        bad = [m for m in value if m not in MODEL_GROUPS and not m.startswith("expert_")]
        if bad or "merge" not in value:
            raise ValueError(f"models {value}: list 'merge' and any of 'base', 'experts', 'expert_<i>'")
        return value

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value):
        from segmoe_lab.judge.variants import VARIANTS

        bad = [v for v in value or [] if v not in VARIANTS]
        if bad:
            raise ValueError(f"variants {bad} are not known; choose any of {sorted(VARIANTS)}")
        return value

    @field_validator("references")
    @classmethod
    def _reference_names(cls, value):
        taken = [n for n in value if n in MODEL_GROUPS or n.startswith(("expert_", "site_oracle")) or n in _variant_names_()]
        if taken:
            raise ValueError(f"references {taken}: those names are the comparison's own models; choose other names")
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value):
        if len(set(value)) != len(value):
            raise ValueError(f"seeds {value} repeat a seed")
        return value


def _variant_names_() -> set[str]:
    from segmoe_lab.judge.variants import VARIANTS

    return set(VARIANTS)



# --- generating -------------------------------------------------------------------------------


# --- running --------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """The result of :func:`run_comparison`: the tidy table and how to get back to every image."""

    table: pd.DataFrame  # model, kind, prompt_id, prompt, category, seed, scorer, score, image
    prompts: pd.DataFrame
    models: list[ModelRef]
    config: CompareConfig
    settings: Settings
    cache: ImageCache
    generated: dict[str, int]  # images generated by this run, per model (0 when all were cached)
    labels: Optional[pd.Series] = None  # per prompt_id, the labelled expert's index (NaN: none)
    routes: tuple = ()  # models whose images came with their gates' routing (judge.routing), and that route
    notes: tuple = ()  # what was left out and why (e.g. oracle rows without labels)

    def oracle_table(self, **kwargs) -> pd.DataFrame:
        """Every model as % of the model oracle's gain over the base, with routing accuracy (:func:`segmoe_lab.judge.oracle.oracle_table`)."""
        from segmoe_lab.judge.oracle import oracle_table

        return oracle_table(self, **kwargs)

    def routing(self) -> pd.DataFrame:
        """The recorded routing of every routed image (:func:`segmoe_lab.judge.routing.routing_table`)."""
        from segmoe_lab.judge.routing import routing_table

        return routing_table(self)

    def routing_accuracy(self, by=(), **kwargs) -> pd.DataFrame:
        """Share of top-1 gate decisions on each prompt's labelled expert, per routed model (x ``by``: ``"label"`` per
        site, ``"group"`` per site kind), with a bootstrap CI over prompts (:func:`segmoe_lab.judge.routing.accuracy`)."""
        from segmoe_lab.judge.routing import accuracy

        table = self.routing()
        if self.labels is None or self.labels.notna().sum() == 0 or table.empty:
            return pd.DataFrame()
        return accuracy(table[table.model.isin(self.routes)], self.labels, by=list(by), **kwargs)

    def utilisation(self) -> pd.DataFrame:
        """Per routed model x site x expert: its share of the routing's choices and of top-1 decisions."""
        from segmoe_lab.judge.routing import utilisation

        table = self.routing()
        return utilisation(table) if not table.empty else pd.DataFrame()

    def image(self, model: str, prompt: str, seed: int):
        """The cached image of ``model`` for ``prompt`` and ``seed`` (PIL)."""
        ref = next(r for r in self.models if r.name == model)
        return self.cache.load(ref, image_key(prompt, seed, self.settings))

    def summary(self, **kwargs) -> pd.DataFrame:
        """Mean per scorer x model with bootstrap CIs (:func:`segmoe_lab.judge.stats.summary`)."""
        from segmoe_lab.judge.stats import summary

        return summary(self.table, **kwargs)

    def paired(self, **kwargs) -> pd.DataFrame:
        """The merge against every other model (:func:`segmoe_lab.judge.stats.paired`)."""
        from segmoe_lab.judge.stats import paired

        return paired(self.table, **kwargs)

    def grid(self, **kwargs):
        """Prompts x models image grid for one seed (:func:`segmoe_lab.judge.report.grid`)."""
        from segmoe_lab.judge.report import grid

        return grid(self, **kwargs)

    def report(self, out_dir, **kwargs) -> Path:
        """Write every table, statistic and grid to ``out_dir`` (:func:`segmoe_lab.judge.report.report`)."""
        from segmoe_lab.judge.report import report

        return report(self, out_dir, **kwargs)


def _settings(cfg: CompareConfig, merge: MergeConfig, device: str, dtype: str) -> Settings:
    s = cfg.sampling
    return {"steps": s.steps, "guidance_scale": s.guidance_scale, "negative_prompt": s.negative_prompt,
            "scheduler": s.scheduler or merge.scheduler, "height": s.height, "width": s.width,
            "dtype": dtype, "device": device.split(":")[0]}


def _placement(cfg: CompareConfig):
    import torch
    from accelerate import PartialState

    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if cfg.device == "cuda" and cpu:
        raise ValueError("device='cuda' but no CUDA GPU is visible; use device='auto' or 'cpu'")
    state = PartialState(cpu=cpu)
    device = "cpu" if cpu else str(state.device)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("float32" if cpu else "float16")
    return state, device, dtype


def run_comparison(config: Union[CompareConfig, dict, None] = None, **overrides) -> Comparison:
    """Generate (what is not cached) and score every model x prompt x seed; see :class:`CompareConfig`.

    Under ``accelerate launch`` / ``torchrun`` each process takes a share of the prompts, and every
    process returns the same gathered :class:`Comparison`.
    """
    values = dict(config.__dict__) if isinstance(config, CompareConfig) else dict(config or {})
    cfg = CompareConfig.of(**{**values, **overrides})
    state, device, dtype = _placement(cfg)
    merge_cfg, folder = resolve_merge(cfg.merge)
    prompts = load_prompts(cfg.prompts, cfg.n_prompts, cfg.categories or None)
    refs, plan, subsets, hidden = _plan_models(cfg, merge_cfg, folder, prompts)
    recorded = {r.name for r in refs if r.kind in ("merge", "variant") and not r.name.startswith("site_oracle")
                and merge_cfg.num_experts > 1}
    settings = _settings(cfg, merge_cfg, device, dtype)
    cache = ImageCache(cfg.cache_dir or default_cache_dir())
    with state.split_between_processes(list(prompts.index)) as mine:
        mine = prompts.loc[list(mine)]
        generated = _generate(refs, mine, cfg, settings, cache, ModelLoader(merge_cfg, folder, device, _torch_dtype(dtype),
                                                                             settings["scheduler"]), state, subsets, recorded)
        rows = _score(refs, mine, cfg, settings, cache, device, state, subsets)
    result = _gather(state, rows, generated, prompts, refs, cfg, settings, cache)
    return _with_variants(result, plan, hidden, recorded)


def _plan_models(cfg: CompareConfig, merge_cfg: MergeConfig, folder, prompts: pd.DataFrame):
    """``(refs, variant plan, {ref name: prompt ids it generates}, names of refs whose rows only feed variants)``."""
    from segmoe_lab.judge.variants import plan_variants

    refs = model_refs(merge_cfg, folder, cfg.models)
    plan = plan_variants(cfg.variants, merge_cfg, prompts)
    subsets = dict(plan.prompts_of)
    hidden = set(plan.merges) - set(plan.names)  # site_oracle_<i>: only their composed rows are reported
    if "model_oracle" in plan.names:
        have = {r.name for r in refs}
        for internal, ids in plan.rows["model_oracle"]:
            if internal not in have:  # the experts were not asked for: generate just their labelled prompts
                refs += [r for r in model_refs(merge_cfg, folder, ["merge", internal]) if r.name == internal]
                subsets[internal] = ids
                hidden.add(internal)
    refs += variant_refs(plan.merges) + reference_refs(merge_cfg, cfg.references)
    return refs, plan, subsets, hidden


def _with_variants(result: "Comparison", plan, hidden: set, recorded: set) -> "Comparison":
    """Compose each variant's rows from its internal models' rows and drop the rows that only fed them."""
    from segmoe_lab.judge.variants import get_variant

    t = result.table
    parts = [t[~t.model.isin(hidden)]]
    for name in plan.names:
        if name in set(t.model) and name not in hidden:
            continue  # a variant with one merge over every prompt: its rows are already named after it
        pieces = [t[(t.model == internal) & t.prompt_id.isin(ids)] for internal, ids in plan.rows[name]]
        kind = "oracle" if get_variant(name).needs_labels else "variant"
        parts.append(pd.concat(pieces).assign(model=name, kind=kind))
    table = pd.concat(parts, ignore_index=True)
    order = {m: i for i, m in enumerate(dict.fromkeys(
        [r.name for r in result.models if r.name not in hidden and r.kind not in ("variant", "reference")] + plan.names
        + [r.name for r in result.models if r.kind == "reference"]))}
    labels = {s: i for i, s in enumerate(result.config.scorers)}
    table = (table.assign(_m=table.model.map(order), _s=table.scorer.map(labels))
             .sort_values(["_s", "_m", "prompt_id", "seed"]).drop(columns=["_m", "_s"]).reset_index(drop=True))
    routes = tuple(m for m in recorded if m == "merge" or (m in plan.names and get_variant(m).routes))
    result.table, result.labels, result.routes, result.notes = table, plan.labels, routes, tuple(plan.notes)
    return result


def _torch_dtype(name: str):
    from segmoe_lab.merge.build import DTYPES

    return DTYPES[name]


def _progress(cfg: CompareConfig, state, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not cfg.progress or not state.is_local_main_process, **kw)


def _mine(prompts: pd.DataFrame, ref, subsets) -> pd.DataFrame:
    """The prompts ``ref`` generates: all, or its subset (a site oracle's one-expert merge serves its expert's prompts)."""
    return prompts if ref.name not in subsets else prompts[prompts.index.isin(subsets[ref.name])]


def _generate(refs, prompts, cfg, settings, cache, loader, state, subsets=None, recorded=()) -> dict[str, int]:
    """Generate every missing image of ``prompts`` x seeds for each model; each is saved at once. The models in
    ``recorded`` generate under a gate recording and keep its routing beside the image (:mod:`segmoe_lab.judge.routing`);
    a cached image without its routing is generated again (same seed: the same image)."""
    from segmoe_lab.judge.routing import generate_recorded, routing_path, save_routing

    generated = {}
    for ref in refs:
        jobs = [(p, s) for p in _mine(prompts, ref, subsets or {}).prompt for s in cfg.seeds]
        record = ref.name in recorded

        def done(p, s):
            path = cache.path(ref, image_key(p, s, settings))
            return path.is_file() and (not record or routing_path(path).is_file())

        missing = [(p, s) for p, s in jobs if not done(p, s)]
        generated[ref.name] = 0
        if not missing:
            continue
        pipe = loader.get(ref)
        for prompt, seed in _progress(cfg, state, iterable=missing, desc=f"generating {ref.name}", unit="img"):
            key = image_key(prompt, seed, settings)
            if record:
                image, routing = generate_recorded(pipe, prompt, seed, settings, generate_image)
                save_routing(cache.save(ref, key, image), routing)
            else:
                cache.save(ref, key, generate_image(pipe, prompt, seed, settings))
            generated[ref.name] += 1
    loader.release()
    return generated


def scorer_specs(cfg: CompareConfig) -> dict[str, tuple[str, dict]]:
    """label -> (registry name, options) for every scorer of ``cfg``."""
    out = {}
    for label, opts in cfg.scorers.items():
        opts = dict(opts or {})
        out[label] = (opts.pop("scorer", label), opts)
    return out


def _score(refs, all_prompts, cfg, settings, cache, device, state, subsets=None) -> list[dict]:
    rows = []
    for label, (name, opts) in scorer_specs(cfg).items():
        if name != "toy_truth":
            opts.setdefault("device", device)
        with state.main_process_first():  # conversions and downloads happen once
            scorer = get_scorer(name, **opts)
        for ref in _progress(cfg, state, iterable=refs, desc=f"scoring {label}", unit="model"):
            prompts = _mine(all_prompts, ref, subsets or {})
            if prompts.empty:
                continue
            descriptions = list(prompts.description) if "description" in prompts else None
            for seed in cfg.seeds:
                keys = [image_key(p, seed, settings) for p in prompts.prompt]
                images = [cache.load(ref, k) for k in keys]
                scores = scorer.score(images, list(prompts.prompt), descriptions)
                for (i, row), key, score in zip(prompts.iterrows(), keys, scores):
                    rows.append({"model": ref.name, "kind": ref.kind, "prompt_id": int(i), "prompt": row.prompt,
                                 "category": row.category, "seed": int(seed), "scorer": label, "score": float(score),
                                 "image": str(cache.path(ref, key).relative_to(cache.root))})
        del scorer
    return rows


def _gather(state, rows, generated, prompts, refs, cfg, settings, cache) -> Comparison:
    from accelerate.utils import gather_object

    if state.num_processes > 1:
        rows = gather_object(rows)
        totals: dict[str, int] = {}
        for part in gather_object([generated]):
            for k, v in part.items():
                totals[k] = totals.get(k, 0) + v
        generated = totals
    order = {r.name: i for i, r in enumerate(refs)}
    labels = {label: i for i, label in enumerate(cfg.scorers)}
    table = pd.DataFrame(rows, columns=["model", "kind", "prompt_id", "prompt", "category", "seed", "scorer", "score", "image"])
    table = (table.assign(_m=table.model.map(order), _s=table.scorer.map(labels))
             .sort_values(["_s", "_m", "prompt_id", "seed"]).drop(columns=["_m", "_s"]).reset_index(drop=True))
    return Comparison(table, prompts, refs, cfg, settings, cache, generated)

