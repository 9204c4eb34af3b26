"""Routing diagnostics over a gate recording: does each site send a domain's prompts to that domain's expert?"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd


def domain_routing(frame: pd.DataFrame, domain_of_prompt: Union[Mapping, pd.Series], expert_of_domain: Mapping[str, int],
                   by: Union[str, Sequence[str]] = "label", half: str = "cond") -> pd.DataFrame:
    """How often prompts of a domain route to that domain's expert, per site (or ``by`` columns) and overall.

    Args:
        frame (`pd.DataFrame`): :meth:`GateRecording.frame`.
        domain_of_prompt (`dict` or `pd.Series`): prompt text (or prompt index) -> domain; prompts
            without a domain, or whose domain has no expert, are left out.
        expert_of_domain (`dict`): domain -> expert index.
        by (`str` or `list[str]`, *optional*, defaults to ``"label"``): frame columns to group by
            (``"label"`` per site; ``"kind"``, ``"block"``, ``"step"``, ...).
        half (`str`, *optional*, defaults to ``"cond"``): which guidance half to judge (the
            unconditional half sees the negative prompt); ``"none"`` runs without guidance are
            always included.

    Returns:
        One row per group, then one ``"all"`` row, with ``n`` (prompt-steps judged), ``chance``
        (k / E), and the rate at which the domain's expert is: ``chosen`` (by the merge's own
        routing), ``per_sample`` (in the sample's top-k of summed logits), ``per_token`` (mean
        share of tokens with it in their top-k), ``top1`` (highest mean probability), and its mean
        probability ``prob``.
    """
    by = [by] if isinstance(by, str) else list(by)
    mapping = dict(domain_of_prompt.items()) if isinstance(domain_of_prompt, pd.Series) else dict(domain_of_prompt)
    key = "prompt_index" if mapping and all(isinstance(k, (int, np.integer)) for k in mapping) else "prompt"
    f = frame[frame.cfg_half.isin([half, "none"])]
    domain = f[key].astype(object).map(mapping)
    target = domain.map(dict(expert_of_domain))
    f = f.assign(domain=domain, target=target)
    f = f[f.target.notna()]
    if f.empty:
        raise ValueError("no recorded prompt has a domain with an expert: check domain_of_prompt's keys "
                         f"(prompt texts or indices) against the frame and expert_of_domain ({dict(expert_of_domain)})")
    keys = ["call", "site", "sample"]
    top1 = f.loc[f.groupby(keys, observed=True).prob_mean.idxmax(), keys + ["expert"]]
    top1 = top1.rename(columns={"expert": "top1_expert"})
    mine = f[f.expert == f.target.astype(int)].merge(top1, on=keys)
    mine = mine.assign(chosen=mine.chosen.astype(float), per_sample=mine.sample_topk.astype(float),
                       per_token=mine.topk_share, top1=(mine.top1_expert == mine.expert).astype(float))
    metrics = {"n": ("prob_mean", "size"), "chosen": ("chosen", "mean"), "per_sample": ("per_sample", "mean"),
               "per_token": ("per_token", "mean"), "top1": ("top1", "mean"), "prob": ("prob_mean", "mean")}
    table = mine.groupby(by, observed=True, sort=True).agg(**metrics).reset_index()
    overall = {c: "all" for c in by} | {name: mine[col].agg(fn) for name, (col, fn) in metrics.items()}
    table = pd.concat([table.astype({c: object for c in by}), pd.DataFrame([overall])], ignore_index=True)
    table.insert(len(by) + 1, "chance", _chance(f))
    return table


def _chance(f: pd.DataFrame) -> float:
    """k / E: how often a random pick of k experts out of E would hit the domain's expert."""
    per = f.groupby(["call", "site", "sample"], observed=True).agg(k=("sample_topk", "sum"), E=("expert", "size"))
    return float((per.k / per.E).mean())


def domain_experts(cfg, domains) -> dict[str, int]:
    """Each domain's expert in a merge config, matched by name: the domain appears in exactly one
    expert's ``source_model`` (else in exactly one ``positive_prompt``), case-insensitively.

    Args:
        cfg (`MergeConfig`): the merge (its ``experts`` list; the LoRA-only form has none).
        domains (iterable of `str`): e.g. the ``category`` column of the toy prompt set.

    Returns:
        ``{domain: expert index}`` for the domains that match one expert (others are left out).
    """
    experts = list(getattr(cfg, "experts", None) or [])
    found = {}
    for domain in dict.fromkeys(str(d) for d in domains):
        for field_ in ("source_model", "positive_prompt"):
            hits = [i for i, e in enumerate(experts) if domain.lower() in str(getattr(e, field_)).lower()]
            if len(hits) == 1:
                found[domain] = hits[0]
                break
    return found


def describe_domain_routing(table: Optional[pd.DataFrame], routing: str = "the merge's", margin: float = 0.15,
                            most: int = 8) -> str:
    """Which layers route by domain, in words, from a :func:`domain_routing` table.

    A group (site, kind, block, ... whatever the table is by) *routes by domain* when its domain's
    expert is in the per-sample top-k at least ``margin`` above chance. ``routing`` names the
    merge's own policy (the ``chosen`` column).
    """
    if table is None or table.empty:
        return ("No domain ground truth: the prompts' categories do not name the merge's experts "
                "(the toy world's prompt set and merge have it).")
    by = [c for c in table.columns if c not in ("n", "chance", "chosen", "per_sample", "per_token", "top1", "prob")]
    rows = table[table[by[0]] != "all"]
    overall = table[table[by[0]] == "all"].iloc[0]
    chance = float(overall.chance)
    names = rows[by].astype(str).agg(" ".join, axis=1)
    lifted = rows.per_sample - rows.chance
    routes = lifted >= margin
    groups = "sites" if by in (["label"], ["site"]) else "groups by " + " / ".join(by)
    lines = [
        f"Over {len(rows)} {groups}, a prompt's own domain expert is the gate's first choice "
        f"(highest mean probability) for {overall.top1:.0%} of prompt-steps, against {chance:.0%} by chance. "
        f"Per policy: per-sample top-k picks it {overall.per_sample:.0%} of the time, per-token top-k gives it "
        f"{overall.per_token:.0%} of the tokens, and {routing} routing used it {overall.chosen:.0%} of the time.",
    ]
    if routes.any():
        order = lifted[routes].sort_values(ascending=False).index
        shown = ", ".join(f"{names[i]} ({rows.per_sample[i]:.0%})" for i in order[:most])
        more = f" and {routes.sum() - most} more" if routes.sum() > most else ""
        lines.append(f"{int(routes.sum())} of {len(rows)} route by domain (per-sample rate at least {margin:.0%} above "
                     f"chance): {shown}{more}.")
    else:
        lines.append(f"No group routes by domain (none has a per-sample rate {margin:.0%} above chance).")
    flat = rows[~routes]
    if len(flat):
        lines.append(f"The other {len(flat)} stay below that (mean per-sample rate {flat.per_sample.mean():.0%}).")
    best = max(("per_sample", "per_token", "chosen"), key=lambda c: overall[c])
    label = {"per_sample": "per-sample routing", "per_token": "per-token routing", "chosen": f"{routing} routing"}[best]
    lines.append(f"Of the policies, {label} keeps the most domain information ({overall[best]:.0%}).")
    return "\n".join(lines)
