"""Oracle-normalised statistics: every model's gain over the base as a share of the model oracle's.

The *model oracle* sends each prompt through its labelled expert's full model
(:mod:`segmoe_lab.judge.variants`); its mean gain over the base is what perfect routing between
whole experts would win. A variant keeping ``x %`` of it is reported with a paired bootstrap CI:
prompts are resampled jointly for the variant, the oracle and the base (seeds averaged within a
prompt first), and the ratio of mean gains is taken in every resample.

Example::

    table = oracle_table(result)            # one row per model: mean, gain, p vs base, % of oracle [CI], routing accuracy
    print(format_oracle_table(table))
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

ORACLE = "model_oracle"


def _per_prompt(table: pd.DataFrame, scorer: str) -> pd.DataFrame:
    """prompt_id x model scores of ``scorer``, seeds averaged."""
    t = table[table.scorer == scorer]
    return t.pivot_table(index="prompt_id", columns="model", values="score", aggfunc="mean", sort=False)


def share_of_oracle(gain: np.ndarray, oracle_gain: np.ndarray, n_boot: int = 2000, ci: float = 0.95,
                    seed: int = 0) -> tuple[float, float, float]:
    """``(mean(gain) / mean(oracle_gain), low, high)``: the ratio of mean gains with a paired percentile bootstrap
    CI over prompts (the same resampled prompts for both). NaN when the oracle does not gain on average.

    Example::

        share_of_oracle(np.array([0.1, 0.0, 0.2]), np.array([0.2, 0.2, 0.2]))   # (0.5, ..., ...)
    """
    g, o = np.asarray(gain, dtype=np.float64), np.asarray(oracle_gain, dtype=np.float64)
    if g.size == 0 or o.mean() <= 1e-9:  # no oracle gain (or float noise around 0): no ratio
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, g.size, size=(n_boot, g.size))
    og = o[idx].mean(axis=1)
    ratios = np.where(og > 1e-9, g[idx].mean(axis=1) / np.where(og > 1e-9, og, 1.0), np.nan)  # a resample without oracle gain has no ratio
    alpha = (1 - ci) / 2
    lo, hi = np.nanquantile(ratios, [alpha, 1 - alpha])
    return float(g.mean() / o.mean()), float(lo), float(hi)


def oracle_gains(table: pd.DataFrame, scorer: str = "toy_truth", base: str = "base", oracle: str = ORACLE,
                 n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per model of ``table``: n prompts, mean, gain over ``base`` with its CI and p-value, and
    ``pct_oracle`` (gain / the oracle's gain) with a paired bootstrap CI, over the prompts every model
    was scored on. The gain's CI and p come from one sign-flip test (:func:`segmoe_lab.judge.stats.sign_flip_p`,
    as in :func:`~segmoe_lab.judge.stats.paired`), so the CI excludes 0 exactly when p < 0.05."""
    from segmoe_lab.judge.stats import sign_flip_ci, sign_flip_p

    wide = _per_prompt(table, scorer)
    if base not in wide or oracle not in wide:
        raise ValueError(f"oracle_gains needs the models {base!r} and {oracle!r} in the table; it has {list(wide)}")
    wide = wide[wide[oracle].notna() & wide[base].notna()]
    o_gain = (wide[oracle] - wide[base]).to_numpy()
    rows = []
    for model in wide.columns:
        s = wide[model].dropna()
        gain = (s - wide.loc[s.index, base]).to_numpy()
        lo, hi = sign_flip_ci(gain, n_random=n_boot, seed=seed) if model != base else (0.0, 0.0)
        pct, plo, phi = share_of_oracle(gain, (wide.loc[s.index, oracle] - wide.loc[s.index, base]).to_numpy(),
                                        n_boot, seed=seed)
        rows.append({"model": model, "n": len(s), "mean": s.mean(), "gain": gain.mean(), "gain_low": lo, "gain_high": hi,
                     "p_vs_base": float("nan") if model == base else sign_flip_p(gain, n_random=n_boot, seed=seed),
                     "pct_oracle": pct, "pct_low": plo, "pct_high": phi})
    out = pd.DataFrame(rows)
    out.attrs["oracle_gain"] = float(o_gain.mean()) if o_gain.size else float("nan")
    return out


def oracle_table(result, scorer: Optional[str] = None, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """:func:`oracle_gains` of a comparison, with each model's routing accuracy overall and per site kind
    (self-attn, cross-q, cross-kv, ff), and the number of collapsed sites, where its routing was recorded.

    ``scorer`` defaults to ``toy_truth`` when the comparison has it, else its first scorer.
    """
    from segmoe_lab.judge.routing import accuracy, routing_table
    from segmoe_lab.observe.gate_health import collapsed_sites

    scorers = list(dict.fromkeys(result.table.scorer))
    scorer = scorer or ("toy_truth" if "toy_truth" in scorers else scorers[0])
    table = oracle_gains(result.table, scorer, n_boot=n_boot, seed=seed)
    table.insert(1, "scorer", scorer)
    routing = routing_table(result, models=[m for m in table.model if m in result.routes])
    labels = result.labels
    if routing.empty or labels is None or labels.notna().sum() == 0:
        return table
    overall = accuracy(routing, labels, n_boot=n_boot, seed=seed)[["model", "accuracy", "ci_low", "ci_high"]]
    overall = overall.rename(columns={"accuracy": "routing_acc", "ci_low": "routing_low", "ci_high": "routing_high"})
    kinds = accuracy(routing, labels, by=["group"], n_boot=n_boot, seed=seed)
    kinds = kinds.pivot(index="model", columns="group", values="accuracy").add_prefix("acc_").reset_index()
    collapsed = {m: len(collapsed_sites(g)) for m, g in routing.groupby("model", sort=False)}
    table = table.merge(overall, on="model", how="left").merge(kinds, on="model", how="left")
    table["collapsed_sites"] = table.model.map(collapsed)
    return table


def format_oracle_table(table: pd.DataFrame) -> str:
    """The oracle table as fixed-width text: ``mean``, ``gain (p)``, ``% of oracle [CI]``, routing accuracy."""
    def pct(r):
        return "" if np.isnan(r.pct_oracle) else f"{r.pct_oracle:.0%} [{r.pct_low:.0%}, {r.pct_high:.0%}]"

    def gain(r):
        return "" if np.isnan(r.p_vs_base) else f"{r.gain:+.3f} [{r.gain_low:+.3f}, {r.gain_high:+.3f}] p={r.p_vs_base:.2g}"

    cols = {"model": table.model, "n": table.n, "mean": table["mean"].map("{:.3f}".format),
            "gain over base [CI] (p)": table.apply(gain, axis=1), "% of model oracle [CI]": table.apply(pct, axis=1)}
    if "routing_acc" in table:
        cols["routing acc [CI]"] = table.apply(lambda r: "" if pd.isna(r.routing_acc) else
                                               f"{r.routing_acc:.2f} [{r.routing_low:.2f}, {r.routing_high:.2f}]", axis=1)
        for c in [c for c in table.columns if c.startswith("acc_")]:
            cols[c.removeprefix("acc_")] = table[c].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
        cols["collapsed"] = table.collapsed_sites.map(lambda v: "" if pd.isna(v) else f"{int(v)}")
    return pd.DataFrame(cols).to_string(index=False)
