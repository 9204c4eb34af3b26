"""Diagnostics that catch a bad gate: collapse, routing accuracy on labelled prompts, self-routing.

All three read *top-1 decisions*: at one site, one denoising step and one prompt (the
conditional half of guidance), the expert with the highest mean gate probability.

* **Collapse** (:func:`collapsed_sites`): a site that sends at least :data:`COLLAPSE_SHARE` (90 %)
  of a prompt set to one expert (a prompt goes where most of its steps' top-1 decisions go), or
  whose utilisation entropy over the prompts is below :data:`COLLAPSE_ENTROPY` (half the maximum,
  ``log E``; for 3 experts e.g. 85/15/0 is 0.39, 80/20/0 0.46, 80/10/10 0.58). A
  collapsed site routes every prompt the same way, whatever its domain: it is a fixed choice of
  expert, not a router. Judge it on a prompt set balanced across the experts' domains.
* **Routing accuracy** (:func:`routing_accuracy`): per site and per site kind, the share of top-1
  decisions on each prompt's labelled expert, with a bootstrap CI over prompts (a gate tested on
  three prompts can score 1.0 by luck).
* **Self-routing** (:func:`self_routing`): each expert's own gate prompts should route to it. A
  gate built from those very prompts gets them right almost by construction, so with several
  prompts per expert each is judged by gates built without it (leave-one-out, through ``refit``).

:func:`gate_health` records a merge on labelled prompts and returns a :class:`GateHealth` with
``.warnings`` and a printable summary::

    health = gate_health(pipe, prompts=list(table.prompt), labels=list(table.expert_index),
                         expert_prompts=[e.prompts for e in cfg.experts])
    print(health)            # accuracy per site kind, collapsed sites, warnings
    health.warnings          # ['collapse: down1.a0.t0 cross-k sends 97% of top-1 decisions to expert 1', ...]
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np
import pandas as pd

from segmoe_lab.resample import bootstrap_ci

COLLAPSE_SHARE = 0.9  # one expert gets at least this share of a site's top-1 decisions
COLLAPSE_ENTROPY = 0.5  # utilisation entropy / log(E) below this
MOST = 6  # sites named in one warning


def top1_shares(frame: pd.DataFrame, half: str = "cond") -> pd.DataFrame:
    """Per prompt x site x expert: ``top1`` (share of the prompt's steps on which the expert was the site's
    top-1 choice) and ``chosen`` (share of steps the merge's routing used it), from :meth:`GateRecording.frame`."""
    f = frame[frame.cfg_half.isin([half, "none"])]
    keys = ["call", "sample", "label"]
    best = f.loc[f.groupby(keys, observed=True).prob_mean.idxmax(), keys + ["prompt_index", "expert"]]
    steps = best.groupby("prompt_index").call.nunique().rename("steps")
    top1 = best.groupby(["prompt_index", "label", "expert"], observed=True).size().rename("n").reset_index()
    top1 = top1.merge(steps, left_on="prompt_index", right_index=True)
    top1 = top1.assign(top1=top1.n / top1.steps).drop(columns=["n", "steps"])
    chosen = f.groupby(["prompt_index", "prompt", "label", "kind", "expert"], observed=True).chosen.mean().reset_index()
    out = chosen.merge(top1, on=["prompt_index", "label", "expert"], how="left").fillna({"top1": 0.0})
    return out[["prompt_index", "prompt", "label", "kind", "expert", "top1", "chosen"]]


def utilisation_entropy(shares: np.ndarray) -> float:
    """Entropy of a utilisation vector over ``E`` experts, divided by ``log E`` (1: even, 0: one expert)."""
    p = np.asarray(shares, dtype=np.float64)
    p = p / p.sum() if p.sum() > 0 else np.full_like(p, 1 / len(p))
    h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0))
    return max(0.0, float(h / np.log(len(p)))) if len(p) > 1 else 1.0  # max: no -0.00


def collapsed_sites(shares: pd.DataFrame, share: float = COLLAPSE_SHARE, entropy: float = COLLAPSE_ENTROPY) -> pd.DataFrame:
    """Sites that send (nearly) every prompt to one expert.

    A site's decision for a prompt is the expert that won most of its top-1 decisions over the
    denoising steps; a site is collapsed when one expert gets at least ``share`` of the prompts,
    or when the entropy of its decisions over the experts is below ``entropy`` x ``log E``.
    Judging per prompt, not per step, keeps a gate whose rows are nearly tied from passing as
    healthy because step-to-step noise flips its choice.

    Args:
        shares (`pd.DataFrame`): rows with ``label`` (the site), ``expert``, ``top1`` (a share of
            decisions) and the prompt (``prompt_index``, or ``prompt_id`` and ``seed`` for a
            comparison's routing table), e.g. :func:`top1_shares`.
        share, entropy: the thresholds (:data:`COLLAPSE_SHARE`, :data:`COLLAPSE_ENTROPY`).

    Returns:
        One row per collapsed site: ``label``, ``top_expert``, ``top_share``, ``entropy``, ``why``.
    """
    unit = [c for c in ("prompt_index", "prompt_id", "seed") if c in shares.columns]
    n_experts = int(shares.expert.max()) + 1 if len(shares) else 1
    won = shares.loc[shares.groupby([*unit, "label"], sort=False, observed=True).top1.idxmax(), ["label", "expert"]]
    use = won.groupby(["label", "expert"], sort=False, observed=True).size().unstack("expert", fill_value=0)
    use = use.reindex(columns=range(n_experts), fill_value=0)
    rows = []
    for label, u in use.iterrows():
        total = u.sum()
        top = float(u.max() / total) if total > 0 else 0.0
        ent = utilisation_entropy(u.to_numpy())
        why = [w for w, hit in ((f"top share {top:.0%} >= {share:.0%}", top >= share),
                                (f"entropy {ent:.2f} < {entropy:.2f}", ent < entropy)) if hit]
        if why:
            rows.append({"label": label, "top_expert": int(u.idxmax()), "top_share": top, "entropy": ent,
                         "why": "; ".join(why)})
    return pd.DataFrame(rows, columns=["label", "top_expert", "top_share", "entropy", "why"])


def kind_group(kind: str) -> str:
    """Site kinds as routing is reported: ``self-attn`` (self-q/k/v), ``cross-q``, ``cross-kv`` (text input), ``ff``."""
    return "self-attn" if str(kind).startswith("self") else ("cross-kv" if kind in ("cross-k", "cross-v") else str(kind))


def routing_accuracy(shares: pd.DataFrame, labels: Sequence, by: str = "label", n_boot: int = 2000,
                     seed: int = 0) -> pd.DataFrame:
    """Share of top-1 decisions on each prompt's labelled expert, per ``by`` (``label``: per site; ``group``: per
    site kind, self-attn / cross-q / cross-kv / ff; ``all``), with a bootstrap CI over prompts.

    Args:
        shares: :func:`top1_shares` (``prompt_index`` indexes ``labels``).
        labels: per prompt, its expert's index (``None``/NaN: unlabelled, left out).
    """
    target = pd.Series(list(labels), dtype=float)
    t = shares.assign(target=shares.prompt_index.map(target), group=shares.kind.map(kind_group), all="all")
    n_experts = int(t.expert.max()) + 1 if len(t) else 1
    t = t[t.target.notna() & (t.expert == t.target)]
    per = t.groupby([by, "prompt_index"], sort=False, observed=True).top1.mean().reset_index()
    rows = []
    for key, g in per.groupby(by, sort=False, observed=True):
        lo, hi = bootstrap_ci(g.top1, n_boot, seed=seed)
        rows.append({by: key, "n_prompts": len(g), "accuracy": g.top1.mean(), "ci_low": lo, "ci_high": hi,
                     "chance": 1 / n_experts})
    return pd.DataFrame(rows, columns=[by, "n_prompts", "accuracy", "ci_low", "ci_high", "chance"])


def self_routing(record: Callable[[list[str]], pd.DataFrame], expert_prompts: Sequence[Sequence[str]],
                 refit: Optional[Callable[[int, int], ContextManager]] = None) -> pd.DataFrame:
    """How each expert's own gate prompts route: per expert x site, the share of top-1 decisions on that expert.

    Args:
        record: ``prompts -> top1_shares frame`` (e.g. records the merge on them).
        expert_prompts: per expert, its gate prompts (one or several).
        refit: ``(expert, prompt index) -> context manager`` under which the merge's gates are built
            without that prompt (leave-one-out). Used for experts with several prompts; without it
            they are judged in-sample and the ``loo`` column says so.

    Returns:
        Rows ``expert``, ``prompt``, ``label``, ``kind``, ``self`` (share on its own expert), ``loo``.
    """
    parts = []
    for e, prompts in enumerate(expert_prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        loo = refit is not None and len(prompts) > 1
        for j, prompt in enumerate(prompts):
            with (refit(e, j) if loo else nullcontext()):
                shares = record([prompt])
            mine = shares[shares.expert == e]
            parts.append(mine[["label", "kind", "top1"]].rename(columns={"top1": "self"})
                         .assign(expert=e, prompt=prompt, loo=loo))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["expert", "prompt", "label", "kind", "self", "loo"])
    return out[["expert", "prompt", "label", "kind", "self", "loo"]]


@dataclass
class GateHealth:
    """The diagnostics of one merge on one prompt set; ``str()`` is a short printable summary.

    Attributes:
        by_site / by_kind: :func:`routing_accuracy` per site / per site kind (``None``: no labels).
        collapsed: :func:`collapsed_sites`.
        self_routing: :func:`self_routing` (``None``: not run).
        warnings: one line per problem, naming the sites.
        source: which prompts the numbers come from (for reports).
    """

    by_site: Optional[pd.DataFrame]
    by_kind: Optional[pd.DataFrame]
    collapsed: pd.DataFrame
    self_routing: Optional[pd.DataFrame] = None
    warnings: list[str] = field(default_factory=list)
    source: str = ""
    n_prompts: int = 0

    def __str__(self) -> str:
        lines = [f"Gate health on {self.n_prompts} prompts{f' ({self.source})' if self.source else ''}:"]
        if self.by_kind is not None and len(self.by_kind):
            acc = ", ".join(f"{r.group} {r.accuracy:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]" for r in self.by_kind.itertuples())
            lines.append(f"  routing accuracy (top-1 on the labelled expert; chance {self.by_kind.chance.iloc[0]:.2f}): {acc}")
        lines.append(f"  collapsed sites: {len(self.collapsed)}"
                     + (f" ({_names(self.collapsed.label)})" if len(self.collapsed) else ""))
        if self.self_routing is not None and len(self.self_routing):
            per = self.self_routing.groupby("expert").self.mean()
            lines.append("  self-routing (own prompts on own expert): "
                         + ", ".join(f"expert {e} {v:.2f}" for e, v in per.items()))
        lines += [f"  WARNING {w}" for w in self.warnings] or ["  no warnings"]
        return "\n".join(lines)


def _names(labels, most: int = MOST) -> str:
    labels = list(labels)
    return ", ".join(map(str, labels[:most])) + (f" and {len(labels) - most} more" if len(labels) > most else "")


def health_from_shares(shares: pd.DataFrame, labels: Optional[Sequence] = None, self_rows: Optional[pd.DataFrame] = None,
                       source: str = "", n_boot: int = 2000, self_margin: float = 0.5) -> GateHealth:
    """:class:`GateHealth` of :func:`top1_shares` (and optional :func:`self_routing` rows): the warnings are

    * ``collapse``: every collapsed site, by name;
    * ``chance``: site kinds whose routing accuracy CI includes chance (they do not route by label);
    * ``self-routing``: experts whose own prompts go to their expert at fewer than ``self_margin`` of the sites.
    """
    collapsed = collapsed_sites(shares)
    warnings = []
    if len(collapsed):
        worst = collapsed.sort_values("top_share", ascending=False)
        warnings.append(f"collapse: {len(collapsed)} site(s) send nearly all top-1 decisions to one expert: "
                        + _names(f"{r.label} (expert {r.top_expert}, {r.top_share:.0%})" for r in worst.itertuples()))
    by_site = by_kind = None
    if labels is not None and pd.Series(list(labels), dtype=float).notna().any():
        by_site = routing_accuracy(shares, labels, "label", n_boot)
        by_kind = routing_accuracy(shares, labels, "group", n_boot)
        for r in by_kind.itertuples():
            if r.ci_low <= r.chance:
                warnings.append(f"chance: {r.group} sites route to the labelled expert {r.accuracy:.2f} "
                                f"[{r.ci_low:.2f}, {r.ci_high:.2f}] of the time, not above chance ({r.chance:.2f})")
    if self_rows is not None and len(self_rows):
        per = self_rows.groupby(["expert", "label"], observed=True).self.mean().gt(0.5).groupby("expert").mean()
        for e, ok in per.items():
            if ok < self_margin:
                warnings.append(f"self-routing: expert {e}'s own prompts route to it at only {ok:.0%} of the sites")
    n = int(shares.prompt_index.nunique()) if len(shares) else 0
    return GateHealth(by_site, by_kind, collapsed, self_rows, warnings, source, n)


def gate_health(pipe, prompts: Sequence[str], labels: Optional[Sequence] = None,
                expert_prompts: Optional[Sequence[Sequence[str]]] = None, steps: int = 15, guidance_scale: float = 3.0,
                seed: int = 0, source: str = "", refit=None, frame: Optional[pd.DataFrame] = None) -> GateHealth:
    """Record ``pipe`` (a merge) on ``prompts`` and return its :class:`GateHealth`.

    Args:
        labels: per prompt, its expert's index (``None``: no accuracy rows).
        expert_prompts: per expert, its gate prompts, for :func:`self_routing` (``None``: skipped).
        steps, guidance_scale, seed: generation settings of the recordings.
        frame: a recording's frame of ``prompts`` made already (the demo's, a notebook's), so they
            are not generated again; only the experts' own prompts are then recorded.
    """
    from segmoe_lab.observe.recording import record_gates

    def record(ps):
        return top1_shares(record_gates(pipe, list(ps), steps=steps, guidance_scale=guidance_scale, seed=seed).frame())

    shares = record(prompts) if frame is None else top1_shares(frame)
    self_rows = self_routing(record, expert_prompts, refit) if expert_prompts else None
    return health_from_shares(shares, labels, self_rows, source)
