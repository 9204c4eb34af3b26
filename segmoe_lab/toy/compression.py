"""Quality of compressed experts at each rank, on the toy world's ground truth.

The toy merge (:func:`segmoe_lab.toy.merge_config`: the whole-UNet switch, so every layer of every
expert is compressed) is built once; each target's merge is the same merge with its experts
compressed against the toy base's own weights (:func:`segmoe_lab.merge.lowrank.compress_unet`), so
gates, prompts and seeds are shared and the paired difference to the uncompressed merge isolates what
compression changes. Prompts: the fixed held-out set ``data/prompts/toy_heldout.csv`` (never tuned
on), ``n`` per domain, ``seeds`` seeds each; 15 steps, guidance 3; every image is scored by
:func:`segmoe_lab.toy.truth.check`. The base and the model oracle (each prompt through its labelled
expert's own model) run on the same prompts and seeds, so each row also reports its share of the
oracle's gain over the base.

Example (a notebook cell)::

    from segmoe_lab.toy.compression import rank_quality, plot_rank_quality
    table = rank_quality(ranks=(1, 2, 4, 8, 16), energies=(0.9,), n=40)
    plot_rank_quality(table, "docs/rank_quality.png")
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from segmoe_lab.resample import bootstrap_ci

from . import merge_config
from .quality import GUIDANCE, generate
from .truth import check


def _heldout(n: Optional[int]) -> list[dict]:
    """Rows of the fixed held-out set (``toy_heldout.csv``, regenerated exactly by
    :func:`~segmoe_lab.toy.prompt_sets.heldout_prompt_set`): the first ``n`` of each domain (all when None)."""
    import json

    from .prompt_sets import heldout_prompt_set

    kept, count = [], {}
    for r in heldout_prompt_set():
        count[r["expert"]] = count.get(r["expert"], 0) + 1
        if n is None or count[r["expert"]] <= n:
            kept.append({"prompt": r["prompt"], "expert": r["expert"], "desc": json.loads(r["description"])})
    return kept


def rank_quality(ranks: Sequence[Optional[int]] = (1, 2, 4, 8, 16, 32), n: Optional[int] = None, steps: int = 15,
                 guidance: float = GUIDANCE, progress: bool = True, energies: Sequence[float] = (),
                 seeds: int = 1):
    """Ground-truth score of the toy merge with experts compressed at each target, paired to the uncompressed merge.

    Args:
        ranks: fixed ranks (``None``: full rank, i.e. ``energy=1``).
        n (`int`, *optional*): held-out prompts per domain (default: all 40 of ``toy_heldout.csv``).
        energies: energy targets (per weight, the smallest rank keeping that share of the delta's energy).
        seeds (`int`): seeds per prompt (0 .. seeds-1); a prompt's score is its mean over seeds.

    Returns:
        A ``pandas.DataFrame``, one row per target plus ``"full experts"``: ``score``, ``diff`` (paired
        over prompts, to the uncompressed merge) with its bootstrap ``ci_low``/``ci_high``,
        ``oracle_pct`` (100 x the row's gain over the base / the model oracle's), ``keeps`` (its
        ``oracle_pct`` / the uncompressed merge's), ``expert_mb`` (the experts' storage: factors and
        vectors, plus the compressed sites' shared base weights), ``share`` (of the uncompressed
        experts' bytes) and ``unet_x`` (the merged UNet's bytes / one base UNet's). ``table.attrs``
        holds the base and oracle scores.
    """
    import pandas as pd
    import torch

    from segmoe_lab.merge.lowrank import compress_unet, lowrank_bytes
    from segmoe_lab.merge.pipeline import SegMoEPipeline
    from segmoe_lab.merge.prompt_router import copy_unet

    from . import load_base, load_pipeline

    torch.set_num_threads(1)
    cfg = merge_config()
    torch.manual_seed(0)
    merged = SegMoEPipeline(cfg, device="cpu", progress=False)
    base = load_base()
    base_tensors = {k: v.detach() for k, v in base.unet.state_dict().items()}
    base_bytes = sum(v.numel() * v.element_size() for v in base_tensors.values())
    rows_in = _heldout(n)
    caps = [r["prompt"] for r in rows_in for _ in range(seeds)]
    descs = [r["desc"] for r in rows_in for _ in range(seeds)]
    seed_list = [s for _ in rows_in for s in range(seeds)]

    def scores(pipe, idx=None) -> np.ndarray:
        idx = range(len(caps)) if idx is None else idx
        images = generate(pipe, [caps[i] for i in idx], [seed_list[i] for i in idx], steps, guidance)
        per_image = np.array([check(im, descs[i])["score"] for im, i in zip(images, idx)])
        return per_image

    def per_prompt(s: np.ndarray) -> np.ndarray:
        return s.reshape(len(rows_in), seeds).mean(1)

    base_s = per_prompt(scores(base))
    oracle = np.zeros(len(caps))
    for dom in sorted({r["expert"] for r in rows_in}):
        idx = [i for i, r in enumerate(r for r in rows_in for _ in range(seeds)) if r["expert"] == dom]
        oracle[idx] = scores(load_pipeline(dom), idx)
    oracle_s = per_prompt(oracle)
    gain = oracle_s.mean() - base_s.mean()

    def pct(s: np.ndarray) -> float:
        return float(100 * (s.mean() - base_s.mean()) / gain) if gain else float("nan")

    full_bytes = lowrank_bytes(merged.unet)["experts"]
    ref = per_prompt(scores(merged.pipe))
    rows = [{"rank": "full experts", "score": ref.mean(), "diff": 0.0, "ci_low": 0.0, "ci_high": 0.0,
             "oracle_pct": pct(ref), "keeps": 1.0, "expert_mb": full_bytes / 2**20, "share": 1.0,
             "unet_x": lowrank_bytes(merged.unet)["total"] / base_bytes}]
    targets = [(str(r or "full rank"), {"rank": r} if r else {"energy": 1.0}) for r in ranks]
    targets += [(f"energy {e:g}", {"energy": e}) for e in energies]
    for name, target in targets:
        pipe = copy.copy(merged.pipe)
        pipe.register_modules(unet=copy_unet(merged.unet))  # the twin keeps following the prompt router
        compress_unet(pipe.unet, cfg.updated(compress=target), base_tensors)
        b = lowrank_bytes(pipe.unet)
        s = per_prompt(scores(pipe))
        lo, hi = bootstrap_ci(s - ref, n_boot=4000)
        rows.append({"rank": name, "score": s.mean(), "diff": float((s - ref).mean()), "ci_low": lo, "ci_high": hi,
                     "oracle_pct": pct(s), "keeps": pct(s) / pct(ref) if pct(ref) else float("nan"),
                     "expert_mb": (b["experts"] + b["base_weights"]) / 2**20,
                     "share": (b["experts"] + b["base_weights"]) / full_bytes, "unet_x": b["total"] / base_bytes})
        if progress:
            r = rows[-1]
            print(f"{name:>11}: score {r['score']:.3f}  diff {r['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]  "
                  f"{r['oracle_pct']:.0f} % of the oracle's gain  {r['share']:.2f} of the experts' bytes  "
                  f"UNet {r['unet_x']:.2f}x the base's", flush=True)
    table = pd.DataFrame(rows)
    table.attrs.update(n_prompts=len(rows_in), n_images=len(caps), seeds=seeds, steps=steps, guidance=guidance,
                       base=float(base_s.mean()), oracle=float(oracle_s.mean()))
    return table


def smallest_rank_within(table, margin: float = 0.02, keeps: Optional[float] = None) -> Optional[str]:
    """The cheapest target (fewest bytes) whose paired 95 % CI lies inside ``±margin`` (and, with
    ``keeps``, that keeps at least that share of the uncompressed merge's share of the oracle's gain), or None."""
    rows = table[table["rank"] != "full experts"].sort_values("share")
    for _, row in rows.iterrows():
        if -margin <= row["ci_low"] and row["ci_high"] <= margin and (keeps is None or row["keeps"] >= keeps):
            return row["rank"]
    return None


def plot_rank_quality(table, path: Optional[Path] = None):
    """Against the merged UNet's size (in base UNets), fixed ranks and energy targets as two series:
    left, each target's share of the model oracle's gain (the uncompressed merge's, and 95 % of it,
    as lines); right, the paired score difference to the uncompressed merge (95 % CI, ±0.02 band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = table[table["rank"] == "full experts"].iloc[0]
    rows = table[table["rank"] != "full experts"]
    energy = rows["rank"].str.startswith("energy")
    series = [(rows[~energy], "fixed rank", "o-"), (rows[energy], "energy kept", "s--")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for part, label, style in series:
        if part.empty:
            continue
        axes[0].plot(part["unet_x"], part["oracle_pct"], style, label=label)
        err = np.array([part["diff"] - part["ci_low"], part["ci_high"] - part["diff"]])
        axes[1].errorbar(part["unet_x"], part["diff"], yerr=err, fmt=style, capsize=3, label=label)
        for ax, col in ((axes[0], "oracle_pct"), (axes[1], "diff")):
            for x, y, name in zip(part["unet_x"], part[col], part["rank"]):
                ax.annotate(name.replace("energy ", ""), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    axes[0].axhline(full["oracle_pct"], color="tab:green", lw=1, label=f"uncompressed merge ({full['oracle_pct']:.0f} %)")
    axes[0].axhline(0.95 * full["oracle_pct"], color="tab:green", lw=1, ls=":", label="95 % of it")
    axes[0].set_ylabel("% of the model oracle's gain")
    axes[1].axhspan(-0.02, 0.02, color="tab:green", alpha=0.15, label="±0.02")
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set_ylabel("score − uncompressed merge")
    for ax in axes:
        ax.axvline(full["unet_x"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"merged UNet bytes / one base UNet (uncompressed: {full['unet_x']:.2f})")
        ax.legend(loc="lower right", fontsize=8)
    n = table.attrs.get("n_prompts", "?")
    fig.suptitle(f"toy whole-UNet switch, experts as base + low-rank deltas (held-out prompts; 95 % bootstrap "
                 f"CI over {n} paired prompts)")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    return fig
