"""What a comparison is: which merge, prompts, seeds, sampling, models, variants and scorers, validated once (:class:`CompareConfig`)."""
from __future__ import annotations

from typing import ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from segmoe_lab.errors import SettingsError, format_problems, validation_problems
from segmoe_lab.judge.models import MODEL_GROUPS
from segmoe_lab.judge.scorers import SCORERS
from segmoe_lab.merge.config import MergeConfig
from segmoe_lab.merge.settings import GenerationSettings, Seed


class Sampling(GenerationSettings):
    """Generation settings, identical for every model of a comparison (validated as :class:`GenerationSettings`)."""

    UNUSED: ClassVar[dict[str, str]] = {"seed": "list the comparison's seeds in `seeds`",
                                        "num_images": "each prompt x seed gives one image; add seeds for more"}

    negative_prompt: str = ""


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
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1, max_length=10_000)
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
    def of(cls, source: str = "comparison settings", **values) -> "CompareConfig":
        """Validate notebook / CLI values; every bad field is named in one :class:`SettingsError`."""
        from pydantic import ValidationError

        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise SettingsError(format_problems(f"{source}: {{n}} problem(s)", validation_problems(err, cls))) from None

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
        if bad or "merge" not in value or len(set(value)) < 2:
            raise ValueError(f"models {value}: list 'merge' and at least one of 'base', 'experts', 'expert_<i>' "
                             "(the merge is compared with them)")
        return value

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value):
        known = _variant_names_()
        bad = [v for v in value or [] if v not in known]
        if bad:
            raise ValueError(f"variants {bad} are not known; choose any of {sorted(known)}")
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
