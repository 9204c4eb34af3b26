"""The merge config: segmoe's YAML schema plus segmoe-lab's own fields, validated once.

Every field of segmoe 0.0.4's configs is accepted unchanged (so its README examples load as
they are); our additions all have defaults. A misspelt key, a wrong type or an unknown mode
fails in one :class:`ConfigError` that names every bad field, its value and the valid choices.
The ``routing`` and ``init`` choices are the keys of their registries
(:data:`segmoe_lab.merge.routing.ROUTINGS`, :data:`segmoe_lab.merge.gating.GATE_INITS`), read when
a config is validated; importing this module loads no torch.

Example::

    >>> cfg = MergeConfig.model_validate({
    ...     "base_model": "runwayml/stable-diffusion-v1-5", "type": "sd",
    ...     "experts": [{"source_model": "a", "positive_prompt": "x"},
    ...                 {"source_model": "b", "positive_prompt": "y"}]})
    >>> cfg.num_experts, cfg.moe_layers, cfg.routing
    (2, 'attn', 'segmoe')
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from segmoe_lab.errors import (
    ConfigError,
    format_problems,
    validate,
    validation_problems,
)
from segmoe_lab.safe_load import SafeLoader, load_yaml

MoELayers = Literal["ff", "attn", "all"]
ModelType = Literal["sd", "sdxl"]
DTypeName = Literal["float32", "float16", "bfloat16"]
SchedulerName = Literal["ddpm", "ddim", "euler", "euler_a", "dpm", "lms", "pndm", "unipc", "keep"]
GateMethod = Literal["exact", "fast"]
TokenReduce = Literal["mean", "last", "real"]
# extra layer kinds a merge may route (merge.kinds.EXTRA_KINDS; "all": every one of them)
ExtraKind = Literal["resnet", "proj", "attn_out", "norm", "time", "io", "all"]
RouterName = Literal["none", "prompt"]
TextPool = Literal["mean", "real"]
NegativeMode = Literal["cfg", "subtract"]

# Keys segmoe adds to the config it stores in unet/config.json["segmoe_config"]; they describe
# segmoe's hard-coded block ranges and are derived, never read, by segmoe-lab.
SEGMOE_DERIVED_KEYS = ("up_idx_start", "up_idx_end", "down_idx_start", "down_idx_end")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Strict):
    """One LoRA fused into an expert (or into the base, when listed at the top level)."""

    source_model: str = Field(min_length=1)
    positive_prompt: str = ""
    negative_prompt: str = ""
    scale: float = 1.0  # segmoe-lab: the weight the LoRA is fused with


class ExpertConfig(_Strict):
    """One expert: a fine-tune of the base, and the prompts its gate rows are made from.

    ``positive_prompt`` may be a list (as in mergekit-moe): prompts that vary the content and keep
    what the expert is for; captured site inputs are averaged over the list (``hidden``) or fitted
    on (``discriminant``), and the prompt router learns from all of them.
    """

    source_model: str = Field(min_length=1)
    positive_prompt: Union[str, list[str]] = ""

    @field_validator("positive_prompt")
    @classmethod
    def _prompt_list(cls, value):
        if isinstance(value, list) and (not value or not all(isinstance(p, str) and p for p in value)):
            raise ValueError(f"positive_prompt: a list must hold at least one non-empty prompt (got {value!r})")
        return value

    @property
    def prompts(self) -> list[str]:
        """The positive prompts as a list (one item for segmoe's single string)."""
        return list(self.positive_prompt) if isinstance(self.positive_prompt, list) else [self.positive_prompt]
    negative_prompt: str = ""
    loras: list[LoraConfig] = Field(default_factory=list)


class GateOptions(_Strict):
    """How the ``hidden`` gate initialiser turns expert prompts into gate rows.

    ``method="exact"`` is segmoe's: a full ``steps``-step DDPM generation per expert, capturing
    each MoE site's input at the last step. ``method="fast"`` generates with only ``probe_steps``
    steps and averages the captured inputs over them. ``reduce`` turns a site's input tokens into
    one vector (``mean``, segmoe; ``last``, mergekit-moe); ``negative`` is ``cfg`` (the negative
    prompt is only the guidance negative, segmoe) or ``subtract`` (negative's hidden state
    subtracted from the positive's, mergekit-moe).
    """

    method: GateMethod = "exact"
    reduce: TokenReduce = "mean"  # "real": cross-attention k/v sites average their real tokens only (no padding)
    shrinkage: float = Field(0.5, ge=0, le=1)  # discriminant gates: covariance shrunk this far towards a scaled identity
    router_pool: TextPool = "mean"  # prompt router: all positions (mean, padding included) or real tokens only (real)
    negative: NegativeMode = "cfg"
    steps: int = Field(25, ge=1)
    probe_steps: int = Field(3, ge=1)
    guidance_scale: Optional[float] = Field(None, ge=0)  # None: the pipeline's default, as segmoe
    height: Optional[int] = Field(None, ge=8)
    width: Optional[int] = Field(None, ge=8)


class CompressOptions(_Strict):
    """Experts stored as the base's weights plus low-rank deltas (:mod:`segmoe_lab.merge.lowrank`).

    Give exactly one target: ``rank`` (the same rank for every weight of rank >= 2 at every site)
    or ``energy`` (per weight, the smallest rank keeping this share of the delta's squared singular
    values; needs a full SVD, so slower at real size). Biases and norm scales stay full.
    """

    rank: Optional[int] = Field(None, ge=1)
    energy: Optional[float] = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _one_target(self) -> "CompressOptions":
        if (self.rank is None) == (self.energy is None):
            raise ValueError("compress: give exactly one of rank (e.g. 16) or energy (e.g. 0.9)")
        return self


class MergeConfig(_Strict):
    """A SegMoE merge: the base, its experts and how their layers are mixed."""

    # --- segmoe's schema -------------------------------------------------------------------
    base_model: str = Field(min_length=1)
    num_experts: Optional[int] = Field(None, ge=1)
    moe_layers: MoELayers = "attn"
    num_experts_per_tok: int = Field(1, ge=1)
    type: ModelType = "sdxl"
    experts: list[ExpertConfig] = Field(default_factory=list)
    loras: list[LoraConfig] = Field(default_factory=list)
    init: str = "hidden"  # a key of merge.gating.GATE_INITS
    # --- segmoe-lab's additions --------------------------------------------------------------
    routing: str = "segmoe"  # a key of merge.routing.ROUTINGS
    gate: GateOptions = Field(default_factory=GateOptions)
    scheduler: SchedulerName = "ddpm"  # segmoe forces DDPM; Turbo merges want euler_a or dpm
    dtype: DTypeName = "float32"
    include_mid: bool = False
    seed: int = 0
    # MoE beyond attention and feed-forward (merge.kinds): extra layer kinds, each routed per sample
    moe_extra: list[ExtraKind] = Field(default_factory=list)
    # "prompt": one decision per sample for every site, from the prompt's text embedding (merge.prompt_router);
    # pair it with routing: per_sample (a batch-scope routing such as segmoe sums the samples' router logits)
    router: RouterName = "none"
    compress: Optional[CompressOptions] = None  # experts as base + low-rank deltas (merge.lowrank)

    @field_validator("routing", "init")
    @classmethod
    def _registered(cls, name: str, info) -> str:
        # imported here: the gate registry loads torch, which validating a config needs, importing it doesn't
        from segmoe_lab.merge.gating import GATE_INITS
        from segmoe_lab.merge.routing import ROUTINGS

        {"routing": ROUTINGS, "init": GATE_INITS}[info.field_name].lookup(name)
        return name

    @model_validator(mode="after")
    def _check_counts(self) -> "MergeConfig":
        errors = []
        if not self.experts and not self.loras:
            errors.append("experts: at least one expert (or, segmoe's LoRA-only form, one top-level lora) is required")
        n = len(self.experts) if self.experts else None
        if self.num_experts is None:
            # segmoe: num_experts defaults to len(experts), else len(loras); validate_assignment
            # would re-enter this validator, so write through __dict__.
            self.__dict__["num_experts"] = n or max(len(self.loras), 1)
        elif n is not None and self.num_experts != n:
            errors.append(
                f"num_experts: is {self.num_experts} but experts lists {n}; "
                f"set num_experts: {n} or list {self.num_experts} experts"
            )
        if self.num_experts is not None and self.num_experts_per_tok > self.num_experts:
            errors.append(
                f"num_experts_per_tok: is {self.num_experts_per_tok} but there are only "
                f"{self.num_experts} experts; choose 1..{self.num_experts}"
            )
        if errors:
            raise ValueError("\n".join(errors))  # one line each: _format lists them apart
        return self

    def updated(self, source: str = "config", **overrides: Any) -> "MergeConfig":
        """A validated copy with ``overrides`` applied; they are validated together with the rest of
        the config, so coupled fields change at once (``experts`` with ``num_experts``); bad values
        raise :class:`ConfigError`.

        Example::

            cfg.updated(num_experts_per_tok=2, routing="per_token")
            cfg.updated(experts=[cfg.experts[0]], num_experts=1, num_experts_per_tok=1)
        """
        unknown = sorted(set(overrides) - set(type(self).model_fields))
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {unknown}; valid fields: {', '.join(type(self).model_fields)}")
        try:
            return type(self).model_validate({**self.model_dump(), **overrides})
        except ValidationError as err:
            raise ConfigError(_format(err, f"{source} with {overrides}")) from None

    def to_yaml(self) -> str:
        """The config as YAML, with every default written out."""
        return yaml.safe_dump(self.model_dump(), sort_keys=False, allow_unicode=True)

    def to_segmoe_dict(self) -> dict[str, Any]:
        """The keys segmoe 0.0.4 itself reads: what a merge folder stores as ``segmoe_config``."""
        d = self.model_dump(include={"base_model", "num_experts", "moe_layers", "num_experts_per_tok", "type", "init"})
        if "init" not in self.model_fields_set:  # segmoe copies only the keys a YAML gives; its default is hidden
            d.pop("init")
        d["experts"] = [e.model_dump(exclude={"loras"} if not e.loras else None) for e in self.experts]
        for e in d["experts"]:  # segmoe reads one prompt string; the full list stays in segmoe_lab_config
            if isinstance(e["positive_prompt"], list):
                e["positive_prompt"] = e["positive_prompt"][0]
        if self.loras:
            d["loras"] = [lora.model_dump() for lora in self.loras]
        return d


def _format(err: ValidationError, source: str) -> str:
    header = f"{source}: {{n}} problem(s) in the merge config"
    return format_problems(header, validation_problems(err, MergeConfig))


def parse_config(data: Union[dict, MergeConfig], source: str = "config") -> MergeConfig:
    """Validate a dict (e.g. parsed YAML) into a :class:`MergeConfig`, or raise :class:`ConfigError`.

    segmoe's derived block-range keys (``up_idx_start`` ...) and ``num_experts`` as written back
    by segmoe are accepted and dropped, so a ``segmoe_config`` from a merge folder parses too.
    """
    if isinstance(data, MergeConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a merge config must be a mapping of keys to values, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k not in SEGMOE_DERIVED_KEYS}
    return validate(MergeConfig, data, source, ConfigError, "merge config")


_UniqueKeyLoader = SafeLoader  # the old name of the kit's YAML loader (no aliases, no repeated keys)


def load_config(path: Union[str, Path]) -> MergeConfig:
    """Read and validate a YAML merge config (see :func:`segmoe_lab.safe_load.load_yaml`).

    Example::

        cfg = load_config("experiments/toy.yaml")
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file; pass the path of a YAML merge config")
    data = load_yaml(path, ConfigError, "merge config (YAML)")
    if data is None:
        raise ConfigError(f"{path}: the file is empty; a merge config needs at least base_model and experts")
    return parse_config(data, source=str(path))


def summarize(cfg: MergeConfig) -> str:
    """A short human-readable description of a merge, as printed by ``segmoe-lab validate``."""
    lines = [
        f"{cfg.num_experts}x{cfg.num_experts_per_tok} {cfg.type} merge of {cfg.base_model}",
        f"  moe_layers={cfg.moe_layers} routing={cfg.routing} init={cfg.init} "
        f"(gate: {cfg.gate.method}, reduce={cfg.gate.reduce}, negative={cfg.gate.negative})",
        f"  scheduler={cfg.scheduler} dtype={cfg.dtype} include_mid={cfg.include_mid}",
    ]
    if cfg.moe_extra or cfg.router != "none":
        lines.append(f"  moe_extra={cfg.moe_extra} router={cfg.router} (beyond segmoe: saved beside its files)")
    for i, e in enumerate(cfg.experts):
        lora = f" + {len(e.loras)} LoRA(s)" if e.loras else ""
        more = f" (+{len(e.prompts) - 1} more)" if len(e.prompts) > 1 else ""
        lines.append(f"  expert {i}: {e.source_model}{lora}  [+] {e.prompts[0][:60]!r}{more}")
    for lora in cfg.loras:
        lines.append(f"  top-level LoRA: {lora.source_model}")
    return "\n".join(lines)

