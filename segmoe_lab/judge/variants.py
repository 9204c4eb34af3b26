"""Oracles and baselines judged beside a merge: what a perfect router would get, and what no router gets.

A comparison (:mod:`segmoe_lab.judge.compare`) can add these rows next to ``merge``, ``base`` and
the experts; each is a registered :class:`Variant` (:data:`VARIANTS`):

===============  ========================================================================  ======
variant          each prompt goes through                                                   labels
===============  ========================================================================  ======
``model_oracle`` its labelled expert's full model (the expert images: nothing generated)   yes
``site_oracle``  a one-expert merge of its labelled expert with the merge's own settings   yes
                 (``moe_layers`` ...): that expert at the MoE sites, the base elsewhere
``uniform``      the merge with every expert averaged at every site (zero gates, k = E)     no
``random``       the merge with seeded random gates (``init: random``, the merge's seed)   no
``per_sample``   the merge with ``routing: per_sample``                                     no
``per_token``    the merge with ``routing: per_token``                                      no
===============  ========================================================================  ======

*Labels* say which expert should serve a prompt (:func:`prompt_labels`): an ``expert`` column of the
prompt set (an expert's index or name), else the prompt's ``category`` when it names exactly one
expert (the toy sets: the domain). Without labels, the variants that need them are skipped and
:attr:`VariantPlan.notes` says so.

Example::

    cfg = toy.merge_config()
    labels = prompt_labels(load_prompts("toy_heldout"), cfg)   # Series of expert indices (NaN: none)
    VARIANTS["uniform"].configs(cfg)                           # {'uniform': MergeConfig(init='uniform', k=3, ...)}
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from segmoe_lab.merge.config import MergeConfig
from segmoe_lab.registry import Registry


@dataclass(frozen=True)
class Variant:
    """A row a comparison can add beside the merge.

    Args:
        name: the row's model name.
        description: one line, for reports.
        configs: ``cfg -> {internal model name: MergeConfig}``: the merges to generate with (empty
            for ``model_oracle``, which reuses the experts' images).
        per_label: the internal merge ``<name>_<i>`` serves the prompts labelled ``i`` (the site
            oracle); otherwise the single merge serves every prompt.
        needs_labels: skipped (with a note) when the prompts have no expert labels.
        routes: the variant's gates express a preference, so its routing accuracy means something
            (not for ``uniform``, whose zero gates tie).
    """

    name: str
    description: str
    configs: Callable[[MergeConfig], dict[str, MergeConfig]]
    per_label: bool = False
    needs_labels: bool = False
    routes: bool = True

    @property
    def doc(self) -> str:
        """What the variant is, for reports and the registry's checks."""
        return self.description


def _one_expert_merges(cfg: MergeConfig) -> dict[str, MergeConfig]:
    # One expert: its gate has one row, softmax gives it weight 1 at every site whatever the init,
    # so ``uniform`` (no capture generation) builds the same model as ``hidden``, faster.
    return {f"site_oracle_{i}": cfg.updated("variant", experts=[e.model_dump()], num_experts=1, num_experts_per_tok=1,
                                            init="uniform")
            for i, e in enumerate(cfg.experts)}


VARIANTS: Registry[Variant] = Registry("variants", "a comparison variant")


def register_variant(variant: Variant) -> Variant:
    """Add ``variant`` to :data:`VARIANTS` (a name given twice is an error)."""
    return VARIANTS.add(variant.name, variant)


register_variant(Variant("model_oracle", "each prompt through its labelled expert's full model", lambda cfg: {},
                         needs_labels=True, routes=False))
register_variant(Variant("site_oracle", "each prompt through a one-expert merge of its labelled expert",
                         _one_expert_merges, per_label=True, needs_labels=True, routes=False))
# Both baselines drop a prompt router: its logits replace every gate's, so a merge that has one
# would otherwise route exactly as before (measured: "random" then matched the merge to the image).
register_variant(Variant("uniform", "every expert averaged at every site (zero gates, top-k = all experts, no router)",
                         lambda cfg: {"uniform": cfg.updated("variant", init="uniform", num_experts_per_tok=cfg.num_experts,
                                                             router="none")},
                         routes=False))
register_variant(Variant("random", "the merge with seeded random gates (and no router)",
                         lambda cfg: {"random": cfg.updated("variant", init="random", router="none")}))
register_variant(Variant("per_sample", "the merge with per-sample routing",
                         lambda cfg: {"per_sample": cfg.updated("variant", routing="per_sample")}))
register_variant(Variant("per_token", "the merge with per-token routing",
                         lambda cfg: {"per_token": cfg.updated("variant", routing="per_token")}))

# What ``CompareConfig.variants=None`` asks for when the prompts have labels.
DEFAULT_VARIANTS = ("model_oracle", "site_oracle", "uniform", "random")


def get_variant(name: str) -> Variant:
    """The variant registered as ``name``; unknown names list the choices."""
    return VARIANTS.lookup(name)


# --- labels ---------------------------------------------------------------------------------------

def expert_names(cfg: MergeConfig) -> list[str]:
    """Each expert's name: its source's folder (or file) name, e.g. ``neon``."""
    return [Path(e.source_model).stem if Path(e.source_model).suffix in (".safetensors", ".ckpt")
            else Path(e.source_model).name for e in cfg.experts]


def _expert_index(value, cfg: MergeConfig) -> Optional[int]:
    """An ``expert`` cell as an index: an integer, an expert's name, or a word naming exactly one expert."""
    from segmoe_lab.observe.diagnostics import domain_experts

    text = str(value).strip()
    if text == "" or text.lower() == "nan":
        return None
    if text.lstrip("-").isdigit():
        i = int(text)
        if not 0 <= i < len(cfg.experts):
            raise ValueError(f"expert label {i}: this merge has experts 0 .. {len(cfg.experts) - 1}")
        return i
    names = expert_names(cfg)
    if text in names and names.count(text) == 1:
        return names.index(text)
    found = domain_experts(cfg, [text])
    if text not in found:
        raise ValueError(f"expert label {text!r} names no single expert of the merge; give an index or one of {names}")
    return found[text]


def prompt_labels(prompts: pd.DataFrame, cfg: MergeConfig) -> pd.Series:
    """Per prompt, the index of the expert that should serve it (float, NaN where unknown).

    From the ``expert`` column when the set has one (index or name; an empty cell: no label),
    else from ``category`` when it names exactly one expert (:func:`~segmoe_lab.observe.diagnostics.domain_experts`).
    """
    if not cfg.experts:
        return pd.Series(np.nan, index=prompts.index, dtype=float)
    if "expert" in prompts:
        return prompts.expert.map(lambda v: _expert_index(v, cfg)).astype(float)
    from segmoe_lab.observe.diagnostics import domain_experts

    found = domain_experts(cfg, prompts.category)
    return prompts.category.astype(str).map(found).astype(float)


# --- what a comparison generates for its variants --------------------------------------------------

@dataclass
class VariantPlan:
    """The variants a comparison runs, resolved against its merge and prompts.

    Attributes:
        names: the variants kept (in order).
        merges: internal model name -> MergeConfig to generate with.
        prompts_of: internal model name -> prompt indices it generates (absent: all prompts).
        rows: variant name -> [(internal model name, prompt indices)] whose rows make up its rows
            (``model_oracle``: the experts').
        labels: per prompt, the labelled expert (NaN: none).
        notes: what was skipped and why.
    """

    names: list[str]
    merges: dict[str, MergeConfig]
    prompts_of: dict[str, list[int]]
    rows: dict[str, list[tuple[str, list[int]]]]
    labels: pd.Series
    notes: list[str]


def plan_variants(names: Optional[list[str]], cfg: MergeConfig, prompts: pd.DataFrame) -> VariantPlan:
    """Resolve ``names`` (``None``: :data:`DEFAULT_VARIANTS` when the prompts have labels, else none)."""
    labels = prompt_labels(prompts, cfg)
    labelled = [int(i) for i in labels.index[labels.notna()]]
    notes = []
    if names is None:
        names = list(DEFAULT_VARIANTS) if labelled else []
        if not labelled:
            notes.append("no oracle rows: the prompts have no expert labels (add an `expert` column, or categories "
                         "that name the experts)")
    kept, merges, prompts_of, rows = [], {}, {}, {}
    for name in names:
        v = get_variant(name)
        if v.needs_labels and not labelled:
            notes.append(f"{name} skipped: the prompts have no expert labels")
            continue
        kept.append(name)
        if name == "model_oracle":
            rows[name] = [(f"expert_{e}", [i for i in labelled if labels[i] == e]) for e in range(len(cfg.experts))]
            continue
        configs = v.configs(cfg)
        merges.update(configs)
        if v.per_label:
            for e, internal in enumerate(configs):
                mine = [i for i in labelled if labels[i] == e]
                prompts_of[internal] = mine
            rows[name] = [(internal, prompts_of[internal]) for internal in configs]
        else:
            (internal,) = configs
            rows[name] = [(internal, list(prompts.index))]
    if len(labelled) < len(prompts) and labelled and any(get_variant(n).needs_labels for n in kept):
        notes.append(f"oracle rows cover the {len(labelled)} of {len(prompts)} prompts with an expert label")
    return VariantPlan(kept, merges, prompts_of, rows, labels, notes)
