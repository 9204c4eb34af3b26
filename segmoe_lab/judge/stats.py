"""Statistics over a comparison's tidy table: per-model summaries and paired merge-vs-model tests.

The table has one row per model x prompt x seed x scorer (see :mod:`segmoe_lab.judge.compare`). The
unit of resampling is the **prompt** by default: a prompt's seeds are averaged first, because
images of one prompt are not independent draws, and the bootstrap then resamples prompts. Pass
``unit="image"`` to treat every prompt x seed as independent (narrower, optimistic intervals).

- :func:`summary`: mean per model with a seeded percentile-bootstrap 95% CI.
- :func:`paired`: the merge against each other model on the same prompts and seeds: mean paired
  difference with bootstrap CI, win rate (ties count half, over images), Wilcoxon signed-rank
  p-value (scipy, over units), overall and per prompt category.
- :func:`agreement`: how two scorers rank the same images (Spearman, Pearson).

Example::

    summary(table)                         # scorer, model, n, mean, ci_low, ci_high
    paired(table, reference="merge")       # one row per scorer x category x other model
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import numpy as np
import pandas as pd

Unit = Literal["prompt", "image"]
ALL = "(all)"  # the category label of overall rows


def bootstrap_ci(values, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (seeded: the same data give the same interval)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # (n_boot,)
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _units(table: pd.DataFrame, unit: Unit) -> pd.DataFrame:
    """Scores per (scorer, model, unit): seeds averaged per prompt for ``unit="prompt"``."""
    if unit not in ("prompt", "image"):
        raise ValueError(f"unit={unit!r} is not valid; choose 'prompt' or 'image'")
    keys = ["scorer", "model", "category", "prompt_id"] + (["seed"] if unit == "image" else [])
    return table.groupby(keys, sort=False, as_index=False)["score"].mean()


def summary(table: pd.DataFrame, unit: Unit = "prompt", n_boot: int = 2000, ci: float = 0.95, seed: int = 0,
            by_category: bool = False) -> pd.DataFrame:
    """Mean score per scorer x model (x category) with a bootstrap CI over units."""
    units = _units(table, unit)
    groups = ["scorer", "model"] + (["category"] if by_category else [])
    rows = []
    for key, g in units.groupby(groups, sort=False):
        lo, hi = bootstrap_ci(g.score, n_boot, ci, seed)
        rows.append({**dict(zip(groups, key)), "n": len(g), "mean": g.score.mean(), "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def _wilcoxon(diff: np.ndarray) -> float:
    from scipy.stats import wilcoxon

    if diff.size == 0:
        return float("nan")
    if np.all(diff == 0):
        return 1.0  # no difference at all: nothing to test
    return float(wilcoxon(diff).pvalue)


def _compare(a: pd.DataFrame, b: pd.DataFrame, unit: Unit, n_boot: int, ci: float, seed: int) -> dict:
    """``a`` minus ``b`` on the same prompt x seed images (tables of one scorer and model each)."""
    on = ["prompt_id", "seed"]
    pairs = a[on + ["score", "category"]].merge(b[on + ["score"]], on=on, suffixes=("_a", "_b"))
    d = pairs.score_a - pairs.score_b
    per_unit = d.groupby(pairs.prompt_id).mean() if unit == "prompt" else d
    lo, hi = bootstrap_ci(per_unit, n_boot, ci, seed)
    wins = (d > 0).sum() + 0.5 * (d == 0).sum()
    return {"n_units": len(per_unit), "n_images": len(d), "mean_a": pairs.score_a.mean(), "mean_b": pairs.score_b.mean(),
            "diff": per_unit.mean(), "ci_low": lo, "ci_high": hi,
            "win_rate": wins / len(d) if len(d) else float("nan"), "wilcoxon_p": _wilcoxon(per_unit.to_numpy())}


def paired(table: pd.DataFrame, reference: str = "merge", others: Optional[Sequence[str]] = None, unit: Unit = "prompt",
           by_category: bool = True, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """``reference`` (model a) against each of ``others`` (model b; default every other model).

    Returns one row per scorer x category (``"(all)"`` first, then each category when
    ``by_category``) x other model, with ``diff = mean(a - b)`` and its CI: a CI above 0 means
    ``reference`` scores higher.
    """
    models = list(dict.fromkeys(table.model))
    if reference not in models:
        raise ValueError(f"reference={reference!r} is not in the table; choose one of {models}")
    others = [m for m in models if m != reference] if others is None else list(others)
    rows = []
    for scorer, s in table.groupby("scorer", sort=False):
        cats = [(ALL, s)] + (list(s.groupby("category", sort=False)) if by_category else [])
        for cat, c in cats:
            a = c[c.model == reference]
            for other in others:
                stats = _compare(a, c[c.model == other], unit, n_boot, ci, seed)
                rows.append({"scorer": scorer, "category": cat, "model_a": reference, "model_b": other, **stats})
    return pd.DataFrame(rows)


def agreement(table: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Spearman and Pearson correlation of scorers ``x`` and ``y`` over the same images, per model and overall."""
    from scipy.stats import pearsonr, spearmanr

    wide = table.pivot_table(index=["model", "prompt_id", "seed"], columns="scorer", values="score").reset_index()
    for name in (x, y):
        if name not in wide:
            raise ValueError(f"scorer {name!r} is not in the table; choose from {sorted(set(table.scorer))}")
    rows = []
    for model, g in [(ALL, wide)] + list(wide.groupby("model", sort=False)):
        constant = g[x].nunique() < 2 or g[y].nunique() < 2
        rho = float("nan") if constant else spearmanr(g[x], g[y]).statistic
        r = float("nan") if constant else pearsonr(g[x], g[y]).statistic
        rows.append({"model": model, "x": x, "y": y, "n": len(g), "spearman": rho, "pearson": r})
    return pd.DataFrame(rows)
