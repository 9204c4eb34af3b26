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

import gc
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .config import MergeConfig, SchedulerName, load_config, parse_config
from .scoring import SCORERS, folder_fingerprint, get_scorer

PROMPT_COLUMNS = ("prompt", "category")
MODEL_GROUPS = ("merge", "base", "experts")
Settings = dict  # the JSON-able generation settings that key a cached image


# --- prompt sets -----------------------------------------------------------------------------

def prompt_dirs() -> list[Path]:
    """Where prompt set names are looked up: the kit's ``data/prompts`` and ``./data/prompts``, ``../data/prompts``."""
    here = Path(__file__).resolve().parent
    dirs = [here.parent / "data" / "prompts", here / "data" / "prompts", Path("data/prompts"), Path("../data/prompts")]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def prompt_sets() -> list[str]:
    """Names of the prompt sets found in :func:`prompt_dirs`."""
    return sorted({p.stem for d in prompt_dirs() for p in d.glob("*.csv")})


def _prompt_file(source: Union[str, Path]) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    for d in prompt_dirs():
        if (d / f"{source}.csv").is_file():
            return d / f"{source}.csv"
    raise FileNotFoundError(f"prompt set {str(source)!r}: no such CSV file or set name; choose one of {prompt_sets()} "
                            "or give the path of a CSV with prompt and category columns")


def load_prompts(source: Union[str, Path] = "toy", n: Optional[int] = None, categories=None) -> pd.DataFrame:
    """A prompt set as a table with ``prompt``, ``category`` (and any other columns, e.g. ``description``).

    Args:
        source (`str` or `Path`, *optional*, defaults to ``"toy"``): a set name from ``data/prompts``
            (``toy``, ``segmoe_examples``, ``adherence``) or a CSV path.
        n (`int`, *optional*): keep ``n`` prompts, taken in turn from each category (file order), so a
            short run still covers every category.
        categories (`list[str]`, *optional*): keep only these categories.
    """
    path = _prompt_file(source)
    table = pd.read_csv(path, keep_default_na=False)
    missing = [c for c in PROMPT_COLUMNS if c not in table]
    if missing:
        raise ValueError(f"{path}: prompt sets need columns {list(PROMPT_COLUMNS)}; missing {missing}")
    dup = table.prompt[table.prompt.duplicated()].tolist()
    if dup:
        raise ValueError(f"{path}: prompts must be unique (they key the results); repeated: {dup[:3]}")
    if categories:
        unknown = sorted(set(categories) - set(table.category))
        if unknown:
            raise ValueError(f"categories {unknown} are not in {path.name}; choose from {sorted(set(table.category))}")
        table = table[table.category.isin(categories)]
    if n is not None:
        rank = table.groupby("category", sort=False).cumcount()  # round-robin over categories
        table = table.assign(_r=rank).sort_values("_r", kind="stable").head(n).sort_index().drop(columns="_r")
    return table.reset_index(drop=True)


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

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value):
        if len(set(value)) != len(value):
            raise ValueError(f"seeds {value} repeat a seed")
        return value


@dataclass(frozen=True)
class ModelRef:
    """One model of a comparison: ``merge``, ``base`` or ``expert_<i>``, and what fixes its images."""

    name: str
    kind: Literal["merge", "base", "expert"]
    fingerprint: str
    detail: dict = field(default_factory=dict, hash=False, compare=False)
    index: Optional[int] = None  # expert index


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _source_signature(source: str, model_type: str) -> dict:
    """What identifies a source's weights: its resolved path and its files' names, sizes and times."""
    from .sources import resolve_source

    res = resolve_source(source, model_type=model_type)
    sig = folder_fingerprint(res.path) if res.path.is_dir() else f"{res.path.stat().st_size}:{res.path.stat().st_mtime_ns}"
    return {"source": source, "path": str(res.path), "files": sig}


def resolve_merge(merge: Union[str, Path, MergeConfig, dict]) -> tuple[MergeConfig, Optional[Path]]:
    """``(config, folder)`` of a merge given as ``"toy"``, a config (object, dict, YAML) or a merge folder."""
    if isinstance(merge, (MergeConfig, dict)):
        return parse_config(merge), None
    if str(merge) == "toy":
        from . import toy

        return toy.merge_config(), None
    path = Path(merge)
    if path.is_file():
        return load_config(path), None
    from .io import read_merge_config
    from .sources import resolve_source

    folder = path if path.is_dir() else resolve_source(str(merge)).path
    return read_merge_config(folder)[1], folder


def model_refs(cfg: MergeConfig, folder: Optional[Path] = None, models=MODEL_GROUPS) -> list[ModelRef]:
    """The merge, the base and each expert as :class:`ModelRef` s, fingerprinted from their weights."""
    from .build import expert_specs

    specs = expert_specs(cfg)
    loras = [*cfg.loras, *(lora for e in cfg.experts for lora in e.loras)]
    sources = sorted({cfg.base_model, *(s.source for s in specs), *(lora.source_model for lora in loras)})
    sig = {s: _source_signature(s, cfg.type) for s in sources}
    lora_sig = lambda loras: [{**sig[lora.source_model], "scale": lora.scale} for lora in loras]  # noqa: E731
    base_fused = cfg.loras if cfg.loras and cfg.experts else []  # top-level LoRAs are fused into the base, as build does
    base = {"base": sig[cfg.base_model], "loras": lora_sig(base_fused)}
    if folder is not None:
        merge = {"folder": str(folder), "files": folder_fingerprint(folder)}
    else:
        merge = {"config": cfg.model_dump(mode="json"), "sources": sig}
    refs = [ModelRef("merge", "merge", _hash(["merge", merge]), merge)]
    if "base" in models:
        refs.append(ModelRef("base", "base", _hash(["base", base]), base))
    unknown = sorted(set(m for m in models if m.startswith("expert_")) - {f"expert_{i}" for i in range(len(specs))})
    if unknown:
        raise ValueError(f"models {unknown}: this merge has experts expert_0 .. expert_{len(specs) - 1}")
    for i, spec in enumerate(specs):
        if "experts" in models or f"expert_{i}" in models:
            detail = {"base": sig[cfg.base_model], "unet": sig[spec.source], "loras": lora_sig(spec.loras)}
            refs.append(ModelRef(f"expert_{i}", "expert", _hash(["expert", detail]), detail, i))
    return refs


# --- the image cache ---------------------------------------------------------------------------

class ImageCache:
    """PNG files under ``root/<fingerprint>/<key hash>.png``, one per (model, prompt, seed, settings)."""

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)

    def path(self, ref: ModelRef, key: dict) -> Path:
        return self.root / ref.fingerprint[:20] / f"{_hash(key)[:32]}.png"

    def has(self, ref: ModelRef, key: dict) -> bool:
        return self.path(ref, key).is_file()

    def load(self, ref: ModelRef, key: dict):
        from PIL import Image

        with Image.open(self.path(ref, key)) as im:
            return im.convert("RGB")

    def save(self, ref: ModelRef, key: dict, image) -> Path:
        """Write atomically (a temporary file, then rename), with the key in the PNG's text."""
        from PIL.PngImagePlugin import PngInfo

        path = self.path(ref, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = path.parent / "model.json"
        if not meta.is_file():
            _atomic_write_text(meta, json.dumps({"name": ref.name, "kind": ref.kind, "detail": ref.detail}, indent=2, default=str))
        info = PngInfo()
        info.add_text("segmoe_lab", json.dumps(key, sort_keys=True))
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
        image.save(tmp, pnginfo=info)
        os.replace(tmp, path)
        return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def image_key(prompt: str, seed: int, settings: Settings) -> dict:
    """What fixes one image of a model: prompt, seed and the generation settings."""
    return {"prompt": prompt, "seed": int(seed), **settings}


# --- generating -------------------------------------------------------------------------------

def generate_image(pipe, prompt: str, seed: int, settings: Settings):
    """One image, seeded with a CPU generator (the same latents on every device)."""
    import torch

    kwargs = {k: settings[k] for k in ("height", "width") if settings.get(k)}
    out = pipe(prompt, negative_prompt=settings["negative_prompt"] or None, num_inference_steps=settings["steps"],
               guidance_scale=settings["guidance_scale"], generator=torch.Generator("cpu").manual_seed(int(seed)), **kwargs)
    return out.images[0]


class ModelLoader:
    """Holds one pipeline at a time: the merge, or the base pipeline with a base/expert UNet swapped in."""

    def __init__(self, cfg: MergeConfig, folder: Optional[Path], device: str, dtype, scheduler: str):
        self.cfg, self.folder, self.device, self.dtype, self.scheduler = cfg, folder, device, dtype, scheduler
        self.pipe, self.holds, self.unet_of = None, None, None

    def release(self) -> None:
        import torch

        self.pipe = self.holds = self.unet_of = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def get(self, ref: ModelRef):
        """The diffusers pipeline that generates ``ref``'s images."""
        from .build import make_scheduler

        if ref.kind == "merge" and self.holds != "merge":
            from .pipeline import SegMoEPipeline

            self.release()
            self.pipe = SegMoEPipeline(self.folder or self.cfg, device=self.device, torch_dtype=self.dtype, progress=False).pipe
            self.holds = "merge"
        elif ref.kind != "merge":
            self._plain(ref)
        self.pipe.scheduler = make_scheduler(self.scheduler, self.pipe.scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        return self.pipe

    def _plain(self, ref: ModelRef) -> None:
        from . import sources
        from .build import expert_specs, fuse_loras

        cfg = self.cfg
        if self.holds != "plain":
            self.release()
            base = sources.resolve_source(cfg.base_model, model_type=cfg.type)
            self.pipe = sources.load_pipeline(base, cfg.type, torch_dtype=self.dtype).to(self.device)
            self.holds, self.unet_of = "plain", "base"
            if cfg.loras and cfg.experts:
                fuse_loras(self.pipe, cfg.loras, "top-level loras")
        if self.unet_of == ref.name:
            return
        spec = expert_specs(cfg)[ref.index] if ref.kind == "expert" else None
        res = sources.resolve_source(spec.source if spec else cfg.base_model, model_type=cfg.type)
        unet = self.pipe.unet
        state = sources.load_unet_state_dict(res, cfg.type, dict(unet.config))
        unet.load_state_dict({k: v.to(self.dtype) for k, v in state.items()}, strict=True)
        del state
        loras = spec.loras if spec else (cfg.loras if cfg.loras and cfg.experts else [])
        if loras:
            fuse_loras(self.pipe, loras, ref.name)
        self.unet_of = ref.name


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

    def image(self, model: str, prompt: str, seed: int):
        """The cached image of ``model`` for ``prompt`` and ``seed`` (PIL)."""
        ref = next(r for r in self.models if r.name == model)
        return self.cache.load(ref, image_key(prompt, seed, self.settings))

    def summary(self, **kwargs) -> pd.DataFrame:
        """Mean per scorer x model with bootstrap CIs (:func:`segmoe_lab.stats.summary`)."""
        from .stats import summary

        return summary(self.table, **kwargs)

    def paired(self, **kwargs) -> pd.DataFrame:
        """The merge against every other model (:func:`segmoe_lab.stats.paired`)."""
        from .stats import paired

        return paired(self.table, **kwargs)

    def grid(self, **kwargs):
        """Prompts x models image grid for one seed (:func:`segmoe_lab.report.grid`)."""
        from .report import grid

        return grid(self, **kwargs)

    def report(self, out_dir, **kwargs) -> Path:
        """Write every table, statistic and grid to ``out_dir`` (:func:`segmoe_lab.report.report`)."""
        from .report import report

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


def default_cache_dir() -> Path:
    """``$SEGMOE_LAB_CACHE/images`` (default ``~/.cache/segmoe_lab/images``)."""
    from .sources import default_cache_dir as root

    return root() / "images"


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
    refs = model_refs(merge_cfg, folder, cfg.models)
    settings = _settings(cfg, merge_cfg, device, dtype)
    cache = ImageCache(cfg.cache_dir or default_cache_dir())
    with state.split_between_processes(list(prompts.index)) as mine:
        mine = prompts.loc[list(mine)]
        generated = _generate(refs, mine, cfg, settings, cache, ModelLoader(merge_cfg, folder, device, _torch_dtype(dtype),
                                                                             settings["scheduler"]), state)
        rows = _score(refs, mine, cfg, settings, cache, device, state)
    return _gather(state, rows, generated, prompts, refs, cfg, settings, cache)


def _torch_dtype(name: str):
    from .build import DTYPES

    return DTYPES[name]


def _progress(cfg: CompareConfig, state, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not cfg.progress or not state.is_local_main_process, **kw)


def _generate(refs, prompts, cfg, settings, cache, loader, state) -> dict[str, int]:
    """Generate every missing image of ``prompts`` x seeds for each model; each is saved at once."""
    jobs = [(p, s) for p in prompts.prompt for s in cfg.seeds]
    generated = {}
    for ref in refs:
        missing = [(p, s) for p, s in jobs if not cache.has(ref, image_key(p, s, settings))]
        generated[ref.name] = 0
        if not missing:
            continue
        pipe = loader.get(ref)
        for prompt, seed in _progress(cfg, state, iterable=missing, desc=f"generating {ref.name}", unit="img"):
            cache.save(ref, image_key(prompt, seed, settings), generate_image(pipe, prompt, seed, settings))
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


def _score(refs, prompts, cfg, settings, cache, device, state) -> list[dict]:
    rows = []
    descriptions = list(prompts.description) if "description" in prompts else None
    for label, (name, opts) in scorer_specs(cfg).items():
        if name != "toy_truth":
            opts.setdefault("device", device)
        with state.main_process_first():  # conversions and downloads happen once
            scorer = get_scorer(name, **opts)
        for ref in _progress(cfg, state, iterable=refs, desc=f"scoring {label}", unit="model"):
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

