"""Generation settings, validated once: the one model every entry point builds its sampling from.

The CLI (``generate``, ``compare``), :class:`~segmoe_lab.merge.pipeline.SegMoEPipeline`, the
comparison (:class:`segmoe_lab.judge.compare.Sampling`), the notebooks
(:class:`segmoe_lab.notebook.Generation`) and the sweeps all validate through
:class:`GenerationSettings`, so ``steps=0``, ``guidance=nan`` or ``height=30`` fail in one place
with one message. Sub-classes only change defaults.

Example::

    GenerationSettings.of(steps=20, height=512)      # ok
    GenerationSettings.of(steps=0)                   # SettingsError: steps=0: ...
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from segmoe_lab.errors import SettingsError, validate
from segmoe_lab.merge.config import SchedulerName

MAX_STEPS = 1000  # schedulers are trained on 1000 timesteps; more steps repeat them
MAX_SIDE = 4096  # pixels; SDXL's native size is 1024, and 4096^2 already needs tens of GiB
MAX_GUIDANCE = 100.0
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range, non-negative part
MAX_IMAGES = 64  # images per prompt in one call

Steps = Annotated[int, Field(ge=1, le=MAX_STEPS, description="inference steps, 1..1000")]
Guidance = Annotated[float, Field(ge=0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                  description="classifier-free guidance scale, finite, 0..100")]
Side = Annotated[int, Field(ge=8, le=MAX_SIDE, multiple_of=8, description="pixels: a multiple of 8, 8..4096")]
Seed = Annotated[int, Field(strict=True, ge=0, le=MAX_SEED, description="a whole number, 0..2**63-1")]
Count = Annotated[int, Field(ge=1, le=MAX_IMAGES, description="images per prompt, 1..64")]


class GenerationSettings(BaseModel):
    """How to sample: steps, guidance, negative prompt, image size, seed, images per prompt, scheduler."""

    model_config = ConfigDict(extra="forbid")

    steps: Steps = 25
    guidance_scale: Guidance = 7.5
    negative_prompt: Optional[str] = None
    height: Optional[Side] = None  # None: the model's native size
    width: Optional[Side] = None
    seed: Seed = 0
    num_images: Count = 1
    scheduler: Optional[SchedulerName] = None  # None: the merge's own

    # fields a sub-class's user cannot set because its caller decides them (a comparison's seeds)
    UNUSED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="after")
    def _refuse_unused(self):
        for name, why in self.UNUSED.items():
            if name in self.model_fields_set:
                raise ValueError(f"{name}: not a setting here; {why}")
        return self

    @classmethod
    def of(cls, source: str = "generation settings", **values: Any):
        """Validate ``values`` (``None`` ones take the default); a bad one raises :class:`SettingsError` naming it."""
        return validate(cls, {k: v for k, v in values.items() if v is not None}, source, SettingsError, "settings")

    def pipeline_kwargs(self) -> dict:
        """The diffusers pipeline keyword arguments for these settings (no generator, no scheduler)."""
        kwargs = {"num_inference_steps": self.steps, "guidance_scale": self.guidance_scale,
                  "negative_prompt": self.negative_prompt or None, "num_images_per_prompt": self.num_images}
        kwargs.update({k: getattr(self, k) for k in ("height", "width") if getattr(self, k)})
        return kwargs


# diffusers' keyword -> our field, for checking a call to a pipeline
PIPELINE_KWARGS = {"num_inference_steps": "steps", "guidance_scale": "guidance_scale", "height": "height",
                   "width": "width", "num_images_per_prompt": "num_images"}


def check_pipeline_kwargs(kwargs: dict) -> None:
    """Validate the sampling keywords of a diffusers call (``num_inference_steps`` ...) that are given."""
    given = {field: kwargs[k] for k, field in PIPELINE_KWARGS.items() if kwargs.get(k) is not None}
    if given:
        GenerationSettings.of("pipeline call", **given)


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """``"0,1,2"`` or ``"0-3"`` (inclusive) or a mix -> distinct seeds; anything else is a :class:`SettingsError`."""
    out: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise SettingsError("give seeds like 0,1,2 or 0-3 (whole numbers from 0, ranges low-high)",
                                key=option, value=text)
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first or max(first, last) > MAX_SEED:
            raise SettingsError(f"the range {part} is empty or beyond {MAX_SEED}", key=option, value=text)
        if last - first >= 10_000:
            raise SettingsError(f"the range {part} has {last - first + 1:,} seeds; give at most 10,000",
                                key=option, value=text)
        out += range(first, last + 1)
    if len(set(out)) != len(out):
        raise SettingsError("repeats a seed; list each seed once", key=option, value=text)
    return out
