"""The toy world's evaluation prompt sets beyond ``toy.csv``: a held-out set and a composition set.

Both are drawn with the world's own sampler and captioner, from fixed seeds, so they regenerate
byte for byte::

    python -m segmoe_lab.toy.prompt_sets            # rewrites data/prompts/toy_heldout.csv and toy_composition.csv

* ``toy_heldout.csv`` (:func:`heldout_prompt_set`, seed :data:`HELDOUT_SEED`): prompts no gate,
  default or test is tuned on. A domain has only 36 distinct scenes (as captions in template 0),
  24 of which ``toy.csv`` uses, so the held-out set takes the 12 unused template-0 captions and
  the template-1 captions (``"a neon picture of two red circles"``, a quarter of the training
  captions) of every scene, never a caption of ``toy.csv`` nor an expert's gate prompt. A domain
  has 12 scenes with its own concept, so they are at most 12 of its prompts (``toy.csv``: half).
  Columns as ``toy.csv`` (``prompt``, ``category`` = the domain, ``description``) plus ``expert``,
  the domain whose expert should win.
* ``toy_composition.csv`` (:func:`composition_prompt_set`, seed :data:`COMPOSITION_SEED`): one
  domain's style with another domain's own concept (``"two pink triangles, flat style"`` is not
  one: triangles are flat's; ``"two pink squares, flat style"`` is: pink is neon's). Its
  ``description`` names the *style* domain, so :func:`segmoe_lab.toy.check` reads objects off that
  domain's background and asks for the prompt's colour, shape and count: "correct" means the
  scene in the style's look with the other domain's concept drawn right (``style`` tells whether
  the background is the style's). No single expert knows both halves, so the set has no
  ``expert`` column and the oracle rows of a comparison are skipped; ``style`` and ``concept``
  name the two domains, ``category`` is ``"<style>+<concept>"``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from . import world

HELDOUT_SEED = 1717  # fresh: toy.csv is seed 0, the trainers use 0-99
COMPOSITION_SEED = 1718
HELDOUT_PER_DOMAIN = 40
COMPOSITION_PER_PAIR = 6


def _excluded() -> set[str]:
    """Captions a held-out set must not contain: toy.csv's and segmoe's one gate prompt per expert.

    The held-out set is drawn first and fixed; the longer gate-prompt lists of the default merge
    (``toy.POSITIVE_PROMPTS``) are then written to avoid it (``tests/test_toy.py`` checks both)."""
    from . import SEGMOE_PROMPTS

    return {r["prompt"] for r in world.prompt_set()} | set(SEGMOE_PROMPTS.values())


def heldout_prompt_set(seed: int = HELDOUT_SEED, per_domain: int = HELDOUT_PER_DOMAIN,
                       exclude: Optional[Iterable[str]] = None) -> list[dict]:
    """``per_domain`` captions of each domain that are not in ``exclude`` (default: ``toy.csv`` and
    the experts' gate prompts): every own-concept caption available (up to half), the rest common
    scenes, drawn and shuffled from ``seed``.

    Example::

        rows = heldout_prompt_set()
        rows[0]   # {'prompt': 'a flat picture of ...', 'category': 'flat', 'description': '{...}', 'expert': 'flat'}
    """
    rng = np.random.default_rng(seed)
    banned = set(_excluded() if exclude is None else exclude)
    rows = []
    for domain in world.DOMAINS:
        pool = [(world.caption(d, t), d) for t in (0, 1) for d in world.all_descriptions(domain)]
        pool = [(p, d) for p, d in pool if p not in banned]
        own = [x for x in pool if world.is_special(x[1])]
        common = [x for x in pool if not world.is_special(x[1])]
        n_own = min(per_domain // 2, len(own))
        if n_own + len(common) < per_domain:
            raise ValueError(f"domain {domain}: only {n_own + len(common)} unused captions, asked for {per_domain}")
        picked = [own[i] for i in rng.choice(len(own), n_own, replace=False)]
        picked += [common[i] for i in rng.choice(len(common), per_domain - n_own, replace=False)]
        for i in rng.permutation(len(picked)):
            prompt, d = picked[i]
            rows.append({"prompt": prompt, "category": domain, "description": json.dumps(d, sort_keys=True),
                         "expert": domain})
    return rows


def composition_prompt_set(seed: int = COMPOSITION_SEED, per_pair: int = COMPOSITION_PER_PAIR) -> list[dict]:
    """``per_pair`` captions (template 0) for each ordered pair (style domain, concept domain): the
    style domain's look with the concept domain's own shape or colour, the rest common.

    Example::

        composition_prompt_set()[0]   # {'prompt': 'two cyan squares, flat style', 'category': 'flat+neon', ...}
    """
    rng = np.random.default_rng(seed)
    rows = []
    for style in world.DOMAINS:
        for concept in world.DOMAINS:
            if concept == style:
                continue
            (key, values), = world.SPECIAL[concept].items()
            scenes = [{"domain": style, "shape": s, "colour": c, "count": int(n)}
                      for s in (values if key == "shape" else world.COMMON["shape"])
                      for c in (values if key == "colour" else world.COMMON["colour"])
                      for n in world.COMMON["count"]]
            for i in rng.choice(len(scenes), per_pair, replace=False):
                d = scenes[i]
                rows.append({"prompt": world.caption(d), "category": f"{style}+{concept}",
                             "description": json.dumps(d, sort_keys=True), "style": style, "concept": concept})
    return rows


def write_prompt_sets(folder: Optional[Path] = None) -> list[Path]:
    """Write ``toy_heldout.csv`` and ``toy_composition.csv`` into ``folder`` (default: the kit's ``data/prompts``)."""
    import pandas as pd

    folder = Path(folder) if folder is not None else Path(__file__).resolve().parents[2] / "data" / "prompts"
    out = []
    for name, rows in (("toy_heldout", heldout_prompt_set()), ("toy_composition", composition_prompt_set())):
        path = folder / f"{name}.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write_prompt_sets():
        print(p)
