"""Routing recorded while a comparison generates: which expert each MoE site preferred, per image.

A merge's image is generated under :func:`~segmoe_lab.observe.recording.record_gates`, and the
recording is reduced at once to one small CSV beside the cached PNG (``<key>.routing.csv``): per
site and expert, ``top1`` (share of the conditional-half denoising steps on which the expert had
the highest mean gate probability: a *top-1 decision*) and ``chosen`` (share of steps the merge's
own routing used it). An image whose routing file is missing is generated again (with the same
seed: the same image), so cached comparisons get their routing once.

Example::

    table = routing_table(result)                     # model, prompt_id, seed, label, kind, expert, top1, chosen
    accuracy(table, labels)                           # per model: share of top-1 decisions on the labelled expert
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

ROUTING_COLUMNS = ("label", "kind", "expert", "top1", "chosen")


def routing_path(image_path: Path) -> Path:
    """Where the routing of the image at ``image_path`` is kept."""
    return image_path.with_name(image_path.stem + ".routing.csv")


def summarise_routing(frame: pd.DataFrame) -> pd.DataFrame:
    """A one-image gate recording (:meth:`GateRecording.frame`) as :data:`ROUTING_COLUMNS` rows."""
    from segmoe_lab.observe.gate_health import top1_shares

    return top1_shares(frame)[list(ROUTING_COLUMNS)]


def generate_recorded(pipe, prompt: str, seed: int, settings: dict, generate) -> tuple[object, pd.DataFrame]:
    """``generate(pipe, prompt, seed, settings)`` under a gate recording: ``(image, routing rows)``."""
    from segmoe_lab.observe.recording import record_gates

    with record_gates(pipe) as rec:
        image = generate(pipe, prompt, seed, settings)
    return image, summarise_routing(rec.frame())


def save_routing(image_path: Path, rows: pd.DataFrame) -> None:
    """Write atomically (the PNG may already be there: a reader never sees half a file)."""
    import os

    path = routing_path(image_path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rows.to_csv(tmp, index=False, float_format="%.4g")
    os.replace(tmp, path)


def load_routing(image_path: Path) -> Optional[pd.DataFrame]:
    path = routing_path(image_path)
    return pd.read_csv(path) if path.is_file() else None


def routing_table(result, models: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Every recorded routing of a :class:`~segmoe_lab.judge.compare.Comparison`: one row per model x prompt x
    seed x site x expert (the models whose images came with routing: merges and their variants)."""
    t = result.table.drop_duplicates(["model", "prompt_id", "seed"])
    parts = []
    for row in t.itertuples():
        if models is not None and row.model not in models:
            continue
        r = load_routing(result.cache.root / row.image)
        if r is not None:
            parts.append(r.assign(model=row.model, prompt_id=row.prompt_id, seed=row.seed))
    if not parts:
        return pd.DataFrame(columns=["model", "prompt_id", "seed", *ROUTING_COLUMNS])
    out = pd.concat(parts, ignore_index=True)
    return out[["model", "prompt_id", "seed", *ROUTING_COLUMNS]]


def per_prompt_accuracy(table: pd.DataFrame, labels: pd.Series, by: Sequence[str] = ()) -> pd.DataFrame:
    """Per model x prompt (x ``by``): the share of top-1 decisions on the prompt's labelled expert,
    averaged over seeds, sites and steps. ``by`` may name ``label`` (per site) or ``group`` (:func:`kind_group`)."""
    from segmoe_lab.observe.gate_health import kind_group

    t = table.assign(target=table.prompt_id.map(labels), group=table.kind.map(kind_group))
    t = t[t.target.notna() & (t.expert == t.target)]
    keys = ["model", "prompt_id", *by]
    return t.groupby(keys, sort=False, observed=True).top1.mean().rename("accuracy").reset_index()


def accuracy(table: pd.DataFrame, labels: pd.Series, by: Sequence[str] = (), n_boot: int = 2000,
             seed: int = 0) -> pd.DataFrame:
    """Routing accuracy per model (x ``by``) with a bootstrap CI over prompts; ``chance`` = 1 / E."""
    from segmoe_lab.resample import bootstrap_ci

    per = per_prompt_accuracy(table, labels, by)
    n_experts = table.groupby(["model", "prompt_id", "seed", "label"]).size().max() if len(table) else np.nan
    rows = []
    for key, g in per.groupby(["model", *by], sort=False, observed=True):
        key = key if isinstance(key, tuple) else (key,)
        lo, hi = bootstrap_ci(g.accuracy, n_boot, seed=seed)
        rows.append({**dict(zip(["model", *by], key)), "n_prompts": len(g), "accuracy": g.accuracy.mean(),
                     "ci_low": lo, "ci_high": hi, "chance": 1 / n_experts})
    return pd.DataFrame(rows)


def utilisation(table: pd.DataFrame) -> pd.DataFrame:
    """Per model x site x expert: the share of (prompt, step) decisions the merge's routing gave it (``chosen``)
    and the share of top-1 decisions it won (``top1``)."""
    return table.groupby(["model", "label", "kind", "expert"], sort=False, observed=True)[["chosen", "top1"]].mean().reset_index()
