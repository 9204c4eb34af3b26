"""Statistics over a comparison's tidy table: per-model summaries and paired merge-vs-model tests.

The table has one row per model x prompt x seed x scorer (see :mod:`segmoe_lab.judge.compare`). The
unit of resampling is the **prompt** by default: a prompt's seeds are averaged first, because
images of one prompt are not independent draws. Pass ``unit="image"`` to treat every prompt x
seed as independent (narrower, optimistic intervals).

- :func:`summary`: mean per model with a seeded percentile-bootstrap 95% CI over units.
- :func:`paired`: the merge against each other model on the same prompts and seeds: mean paired
  difference, its 95% CI and p-value, and the win rate (ties count half, over images), overall
  and per prompt category.
- :func:`agreement`: how two scorers rank the same images (Spearman, Pearson).
- :func:`merge_identical_scorers`: one row set for scorers that give every image the same number
  (``clip`` and ``torchmetrics`` over the same CLIP), labelled ``"clip = torchmetrics"``.

**Paired CI and p-value come from one procedure**, a sign-flip permutation test of the mean
per-unit difference (exact over all 2^n sign patterns up to :data:`EXACT_UP_TO` units, else
``n_boot`` seeded random patterns, the same patterns for every question): the p-value tests
"no difference", and the CI is the set of shifts the same test does not reject. So the CI
excludes 0 exactly when p < 1 - ci, at any n. With fewer than :data:`MIN_UNITS` units no test at
the 5% level can ever reject (the smallest exact p is 2 / 2^n = 0.0625 at n = 5), so no CI is
given: ``ci_low`` / ``ci_high`` are NaN and ``note`` says "n too small". :func:`summary` leaves
its bootstrap CI out below :data:`MIN_UNITS` units too, for the same reason: five points do not
make an interval.

Example::

    summary(table)                         # scorer, model, n, mean, ci_low, ci_high, note
    paired(table, reference="merge")       # one row per scorer x category x other model
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import numpy as np
import pandas as pd

from segmoe_lab.resample import bootstrap_ci

Unit = Literal["prompt", "image"]
ALL = "(all)"  # the category label of overall rows
MIN_UNITS = 6  # below this many units no CI is shown: an exact sign-flip test cannot reach p < 0.05
EXACT_UP_TO = 12  # sign-flip tests enumerate all 2^n patterns up to this n (4096), then sample n_boot
TOO_SMALL = f"n too small (< {MIN_UNITS} units): no CI"


def _units(table: pd.DataFrame, unit: Unit) -> pd.DataFrame:
    """Scores per (scorer, model, unit): seeds averaged per prompt for ``unit="prompt"``."""
    if unit not in ("prompt", "image"):
        raise ValueError(f"unit={unit!r} is not valid; choose 'prompt' or 'image'")
    keys = ["scorer", "model", "category", "prompt_id"] + (["seed"] if unit == "image" else [])
    return table.groupby(keys, sort=False, as_index=False)["score"].mean()


def summary(table: pd.DataFrame, unit: Unit = "prompt", n_boot: int = 2000, ci: float = 0.95, seed: int = 0,
            by_category: bool = False) -> pd.DataFrame:
    """Mean score per scorer x model (x category) with a bootstrap CI over units (none below :data:`MIN_UNITS`)."""
    units = _units(table, unit)
    groups = ["scorer", "model"] + (["category"] if by_category else [])
    rows = []
    for key, g in units.groupby(groups, sort=False):
        lo, hi = bootstrap_ci(g.score, n_boot, ci, seed) if len(g) >= MIN_UNITS else (float("nan"), float("nan"))
        rows.append({**dict(zip(groups, key)), "n": len(g), "mean": g.score.mean(), "ci_low": lo, "ci_high": hi,
                     "note": "" if len(g) >= MIN_UNITS else TOO_SMALL})
    return pd.DataFrame(rows)


def _signs(n: int, n_random: int, seed: int) -> np.ndarray:
    """Sign patterns (patterns, n) of a sign-flip test: all 2^n when n <= EXACT_UP_TO, else seeded random ones."""
    if n <= EXACT_UP_TO:
        codes = np.arange(2**n)[:, None] >> np.arange(n)[None, :]  # (2^n, n) bits
        return np.where(codes & 1, -1.0, 1.0)
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_random, n))


def sign_flip_p(diff, shift: float = 0.0, signs: Optional[np.ndarray] = None, n_random: int = 2000,
                seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of "the mean of ``diff`` is ``shift``".

    Under that hypothesis each unit's ``diff - shift`` is as likely negative as positive; p is the
    share of sign patterns whose mean is at least as far from 0 as the observed one (exact when
    ``signs`` holds all 2^n patterns; with random patterns the observed one is counted in, so p > 0).
    """
    x = np.asarray(diff, dtype=np.float64) - shift
    if x.size == 0:
        return float("nan")
    signs = _signs(x.size, n_random, seed) if signs is None else signs
    observed = abs(x.mean())
    flipped = np.abs(signs @ x) / x.size  # (patterns,)
    hits = int((flipped >= observed - 1e-12 * max(1.0, observed)).sum())
    exact = len(signs) == 2**x.size
    return hits / len(signs) if exact else (hits + 1) / (len(signs) + 1)


def sign_flip_ci(diff, ci: float = 0.95, signs: Optional[np.ndarray] = None, n_random: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """The shifts :func:`sign_flip_p` does not reject at level ``1 - ci``: a CI of the mean difference.

    Each end is found by bisection between a shift the test accepts and one it rejects, using 0
    as a bracket end whenever it lies on that side, so the interval excludes 0 exactly when
    ``sign_flip_p(diff) < 1 - ci``. An end the test can never reach is infinite.
    """
    x = np.asarray(diff, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    signs = _signs(x.size, n_random, seed) if signs is None else signs
    alpha, mean = 1 - ci, float(x.mean())
    accepts = lambda s: sign_flip_p(x, s, signs) >= alpha  # noqa: E731
    span = float(x.max() - x.min()) + abs(mean) + 1.0

    def end(direction: int) -> float:
        inside = mean
        outside = mean + direction * span
        if not accepts(0.0) and direction * (0.0 - mean) > 0:
            outside = 0.0  # 0 is rejected on this side: the end lies between the mean and 0
        elif accepts(0.0) and direction * (0.0 - mean) > 0:
            inside = 0.0  # 0 is accepted: the end lies beyond it
        if accepts(outside):
            return direction * float("inf")
        for _ in range(60):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if accepts(mid) else (inside, mid)
        return inside

    return end(-1), end(+1)


def _compare(a: pd.DataFrame, b: pd.DataFrame, unit: Unit, n_boot: int, ci: float, seed: int) -> dict:
    """``a`` minus ``b`` on the same prompt x seed images (tables of one scorer and model each)."""
    on = ["prompt_id", "seed"]
    pairs = a[on + ["score", "category"]].merge(b[on + ["score"]], on=on, suffixes=("_a", "_b"))
    d = pairs.score_a - pairs.score_b
    per_unit = (d.groupby(pairs.prompt_id).mean() if unit == "prompt" else d).to_numpy()
    n = len(per_unit)
    signs = _signs(n, n_boot, seed) if n else None
    lo, hi = sign_flip_ci(per_unit, ci, signs) if n >= MIN_UNITS else (float("nan"), float("nan"))
    wins = (d > 0).sum() + 0.5 * (d == 0).sum()
    return {"n_units": n, "n_images": len(d), "mean_a": pairs.score_a.mean(), "mean_b": pairs.score_b.mean(),
            "diff": per_unit.mean() if n else float("nan"), "ci_low": lo, "ci_high": hi,
            "win_rate": wins / len(d) if len(d) else float("nan"),
            "p_value": sign_flip_p(per_unit, 0.0, signs) if n else float("nan"),
            "note": "" if n >= MIN_UNITS else TOO_SMALL}


def paired(table: pd.DataFrame, reference: str = "merge", others: Optional[Sequence[str]] = None, unit: Unit = "prompt",
           by_category: bool = True, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """``reference`` (model a) against each of ``others`` (model b; default every other model).

    Returns one row per scorer x category (``"(all)"`` first, then each category when
    ``by_category``) x other model, with ``diff = mean(a - b)``, its sign-flip CI and ``p_value``
    (one procedure, so they agree: a CI above 0 means ``reference`` scores higher and p < 1 - ci),
    ``win_rate`` and a ``note`` where there are too few units for a CI (see the module docstring).
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


def identical_scorers(table: pd.DataFrame, rtol: float = 1e-4, atol: float = 1e-3) -> list[list[str]]:
    """Groups of scorers that give every image the same score (within ``rtol`` / ``atol``): scorers
    that wrap the same model, e.g. ``clip`` and ``torchmetrics`` over one CLIP. Groups of one are left out."""
    wide = table.pivot_table(index=["model", "prompt_id", "seed"], columns="scorer", values="score", sort=False)
    groups: list[list[str]] = []
    for name in dict.fromkeys(table.scorer):
        for g in groups:
            if np.allclose(wide[name], wide[g[0]], rtol=rtol, atol=atol, equal_nan=True):
                g.append(name)
                break
        else:
            groups.append([name])
    return [g for g in groups if len(g) > 1]


def merge_identical_scorers(table: pd.DataFrame, rtol: float = 1e-4, atol: float = 1e-3) -> pd.DataFrame:
    """``table`` with each group of :func:`identical_scorers` kept once, its scorer labelled with
    every name in the group (``"clip = torchmetrics"``), so tables carry no silent duplicate rows."""
    table = table.copy()
    for group in identical_scorers(table, rtol, atol):
        table = table[~table.scorer.isin(group[1:])]
        table.loc[table.scorer == group[0], "scorer"] = " = ".join(group)
    return table.reset_index(drop=True)
