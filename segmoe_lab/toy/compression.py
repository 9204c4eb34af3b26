"""Quality of compressed experts at each rank, on the toy world's ground truth.

The toy merge (:func:`segmoe_lab.toy.merge_config`) is built once; each rank's merge is the same
merge with its experts compressed against the toy base's own weights
(:func:`segmoe_lab.merge.lowrank.compress_unet`), so gates, prompts and seeds are shared and the
paired difference to the uncompressed merge isolates what compression changes. Prompts are
held out (:func:`segmoe_lab.toy.quality.eval_prompts` with ``seed=2027``), ``n`` per domain, one seed
each; 15 steps, guidance 3; every image is scored by :func:`segmoe_lab.toy.truth.check`.

Example (a notebook cell)::

    from segmoe_lab.toy.compression import rank_quality, plot_rank_quality
    table = rank_quality(ranks=(1, 2, 4, 8, 16), n=40)
    plot_rank_quality(table, "docs/rank_quality.png")
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import merge_config, world
from .quality import GUIDANCE, eval_prompts, generate
from .truth import check

HELD_OUT_SEED = 2027


def bootstrap_ci(d: np.ndarray, reps: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of ``d``."""
    rng = np.random.default_rng(seed)
    means = rng.choice(d, size=(reps, len(d)), replace=True).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def rank_quality(ranks: Sequence[Optional[int]] = (1, 2, 4, 8, 16, 32), n: int = 40, steps: int = 15,
                 guidance: float = GUIDANCE, progress: bool = True):
    """Ground-truth score of the toy merge with experts compressed at each rank, paired to the uncompressed merge.

    Args:
        ranks: fixed ranks (``None``: full rank, i.e. ``energy=1``).
        n (`int`): held-out prompts per domain (one seed each).

    Returns:
        A ``pandas.DataFrame``, one row per rank plus ``"full experts"``: ``score``, ``diff`` (paired, to
        the uncompressed merge) with its bootstrap ``ci_low``/``ci_high``, ``expert_mb`` (bytes of the
        experts' storage: factors and vectors, plus the shared base weights of the compressed sites)
        and ``share`` (of the uncompressed experts' bytes).
    """
    import pandas as pd
    import torch

    from segmoe_lab.merge.lowrank import compress_unet, lowrank_bytes
    from segmoe_lab.merge.pipeline import SegMoEPipeline

    from . import load_base

    torch.set_num_threads(1)
    cfg = merge_config()
    torch.manual_seed(0)
    merged = SegMoEPipeline(cfg, device="cpu", progress=False)
    base_tensors = {k: v.detach() for k, v in load_base().unet.state_dict().items()}
    descs = [d for dom in world.DOMAINS for d in eval_prompts(dom, n, seed=HELD_OUT_SEED)]
    caps = [world.caption(d) for d in descs]

    def scores(pipe) -> np.ndarray:
        images = generate(pipe, caps, range(len(caps)), steps, guidance)
        return np.array([check(im, d)["score"] for im, d in zip(images, descs)])

    full_bytes = lowrank_bytes(merged.unet)["experts"]
    ref = scores(merged.pipe)
    rows = [{"rank": "full experts", "score": ref.mean(), "diff": 0.0, "ci_low": 0.0, "ci_high": 0.0,
             "expert_mb": full_bytes / 2**20, "share": 1.0}]
    for r in ranks:
        pipe = copy.copy(merged.pipe)
        pipe.register_modules(unet=copy.deepcopy(merged.unet))
        compress_unet(pipe.unet, cfg.updated(compress={"rank": r} if r else {"energy": 1.0}), base_tensors)
        b = lowrank_bytes(pipe.unet)
        s = scores(pipe)
        lo, hi = bootstrap_ci(s - ref)
        rows.append({"rank": str(r or "full rank"), "score": s.mean(), "diff": float((s - ref).mean()), "ci_low": lo,
                     "ci_high": hi, "expert_mb": (b["experts"] + b["base_weights"]) / 2**20,
                     "share": (b["experts"] + b["base_weights"]) / full_bytes})
        if progress:
            print(f"rank {rows[-1]['rank']:>9}: score {s.mean():.3f}  diff {rows[-1]['diff']:+.3f} "
                  f"[{lo:+.3f}, {hi:+.3f}]  {rows[-1]['share']:.2f} of the experts' bytes", flush=True)
    table = pd.DataFrame(rows)
    table.attrs.update(n_images=len(caps), steps=steps, guidance=guidance)
    return table


def smallest_rank_within(table, margin: float = 0.02) -> Optional[str]:
    """The smallest rank whose paired 95 % CI lies inside ``±margin``, or None."""
    for _, row in table[table["rank"] != "full experts"].iterrows():
        if -margin <= row["ci_low"] and row["ci_high"] <= margin:
            return row["rank"]
    return None


def plot_rank_quality(table, path: Optional[Path] = None):
    """Paired difference to the uncompressed merge (95 % CI) against rank and against bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table[table["rank"] != "full experts"]
    err = np.array([rows["diff"] - rows["ci_low"], rows["ci_high"] - rows["diff"]])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, x, label in ((axes[0], range(len(rows)), "rank"), (axes[1], rows["share"], "experts' bytes / uncompressed")):
        ax.errorbar(list(x), rows["diff"], yerr=err, fmt="o-", capsize=3)
        ax.axhspan(-0.02, 0.02, color="tab:green", alpha=0.15, label="±0.02")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("score − uncompressed merge")
    axes[0].set_xticks(range(len(rows)), rows["rank"])
    axes[1].set_xscale("log")
    axes[0].legend(loc="lower right")
    n = table.attrs.get("n_images", "?")
    fig.suptitle(f"toy merge, experts as base + rank-r deltas: ground-truth score difference (95 % bootstrap CI, {n} paired images)")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    return fig
