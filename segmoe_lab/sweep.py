"""Sampling-settings sweeps: how steps, guidance, negative prompt, seed and scheduler change
adherence and latency, for the base model and a merge (notebook 04_settings).

A :class:`Sweep` lists values per setting; the first value of each list is the *reference*, and
:meth:`Sweep.points` changes one setting at a time away from it (one-factor-at-a-time: 1 + the
sum of (values - 1) points instead of the product). :func:`run_sweep` generates every prompt at
every point with every model, times each image and judges it (``judge(images, table)`` returns
one number per image, e.g. the toy world's ground-truth adherence).

Example::

    sweep = Sweep.of(steps=[8, 4, 16], scheduler=["ddpm", "euler_a"])
    table = run_sweep({"base": base, "merge": merge}, prompts, sweep, judge=toy_adherence)
    plot_sweep(table)
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from segmoe_lab.merge.config import SchedulerName
from segmoe_lab.merge.settings import Guidance, Seed, Steps
from segmoe_lab.notebook import Generation, _validate

FACTORS = ("steps", "guidance_scale", "negative_prompt", "seed", "scheduler")


class Sweep(BaseModel):
    """Values per setting; the first of each list is the reference the others are compared with."""

    model_config = ConfigDict(extra="forbid")

    # each value is checked as GenerationSettings checks it (steps >= 1, finite guidance, ...)
    steps: list[Steps] = Field(default_factory=lambda: [8])
    guidance_scale: list[Guidance] = Field(default_factory=lambda: [7.5])
    negative_prompt: list[str] = Field(default_factory=lambda: [""])
    seed: list[Seed] = Field(default_factory=lambda: [0])
    scheduler: list[SchedulerName] = Field(default_factory=lambda: ["ddpm"])

    @field_validator(*FACTORS)
    @classmethod
    def _non_empty(cls, values: list) -> list:
        if not values:
            raise ValueError("give at least one value (the first is the reference)")
        return values

    @classmethod
    def of(cls, **values) -> "Sweep":
        """Validate notebook parameters into a Sweep (a bad value raises :class:`~segmoe_lab.notebook.NotebookError`)."""
        return _validate(cls, values, "sweep parameters")

    def reference(self) -> dict:
        return {f: getattr(self, f)[0] for f in FACTORS}

    def points(self) -> list[tuple[str, Generation]]:
        """``(factor, Generation)``: the reference (factor ``"reference"``), then each other value
        of each setting with the rest at the reference."""
        ref = self.reference()
        points = [("reference", self._gen(ref))]
        for factor in FACTORS:
            points += [(factor, self._gen({**ref, factor: value})) for value in getattr(self, factor)[1:]]
        return points

    @staticmethod
    def _gen(values: dict) -> Generation:
        return Generation(steps=values["steps"], guidance_scale=values["guidance_scale"],
                          negative_prompt=values["negative_prompt"] or None, seed=values["seed"],
                          scheduler=values["scheduler"])


def run_sweep(models: dict, table, sweep: Sweep, judge: Callable[[list, object], Sequence[float]],
              progress: bool = True):
    """One row per (model, point, prompt): ``model, factor`` (the setting changed, or
    ``reference``), the five settings, ``prompt, score, seconds`` (per image).

    Args:
        models: name -> pipeline (a :class:`~segmoe_lab.SegMoEPipeline` or a diffusers pipeline).
        table: prompts (a DataFrame with a ``prompt`` column; ``judge`` gets the whole table).
        sweep: the settings (see :class:`Sweep`).
        judge: ``judge(images, table) -> scores``, one per image.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from segmoe_lab.notebook import generate

    rows, points = [], sweep.points()
    bar = tqdm(total=len(models) * len(points), desc="sweep", disable=not progress)
    for name, pipe in models.items():
        for factor, gen in points:
            start = time.perf_counter()
            images = generate(pipe, list(table.prompt), gen)
            seconds = (time.perf_counter() - start) / len(images)
            settings = {"steps": gen.steps, "guidance_scale": gen.guidance_scale,
                        "negative_prompt": gen.negative_prompt or "", "seed": gen.seed, "scheduler": gen.scheduler}
            for prompt, score in zip(table.prompt, judge(images, table)):
                rows.append({"model": name, "factor": factor, **settings, "prompt": prompt,
                             "score": float(score), "seconds": seconds})
            bar.update()
    bar.close()
    return pd.DataFrame(rows)


def summarize_sweep(table):
    """Mean score and seconds per image for every point (rows) and model (columns)."""
    return table.groupby(["factor", *FACTORS, "model"], sort=False)[["score", "seconds"]].mean().unstack("model")


def plot_sweep(table, score_label: str = "adherence"):
    """One column per swept setting (the reference point included), score above, latency below."""
    import matplotlib.pyplot as plt

    factors = [f for f in FACTORS if f in set(table.factor)] or ["steps"]
    fig, axes = plt.subplots(2, len(factors), figsize=(3.2 * len(factors), 5), squeeze=False)
    for j, factor in enumerate(factors):
        part = table[table.factor.isin(["reference", factor])]
        numeric = factor in ("steps", "guidance_scale", "seed")
        for name, rows in part.groupby("model", sort=False):
            means = rows.groupby(factor, sort=numeric)[["score", "seconds"]].mean()
            labels = [str(v) if v != "" else "(none)" for v in means.index]
            axes[0, j].plot(labels, means.score, "o-", label=name)
            axes[1, j].plot(labels, means.seconds, "o-", label=name)
        axes[0, j].set_title(factor, fontsize=9)
        axes[1, j].tick_params(axis="x", labelsize=7)
    axes[0, 0].set_ylabel(score_label)
    axes[1, 0].set_ylabel("seconds / image")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig
