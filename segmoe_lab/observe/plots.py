"""Plots of recorded gate activity (:mod:`segmoe_lab.observe.recording`); each function returns its figure.

Every plot reads a :meth:`GateRecording.frame <segmoe_lab.observe.recording.GateRecording.frame>` (or the
recording itself) and names sites by block and layer (``"down1.a0.t0 cross-k"``), in the order the
UNet runs them: down blocks, mid, up blocks. Unless told otherwise a plot shows the conditional
half of classifier-free guidance (the prompt's own half; runs without guidance count too).

Experts are named from the merge's config (``flat``, ``neon``, ``mosaic`` on the toy world; see
:func:`~segmoe_lab.observe.recording.expert_names`) and drawn in :data:`EXPERT_PALETTE`, muted
colours chosen away from every colour the toy world draws with, so an expert's colour is never
read as an object's. Every figure has a title and labelled axes, and keeps legends and colour
bars outside the data.

Example::

    rec = record_gates(pipe, prompts, steps=8, spatial=True)
    frame = rec.frame()
    block_heatmap(frame, prompts=[0, 1])               # blocks x experts per prompt: the overview
    site_heatmap(frame, prompt=0, block="up1")         # drill down: that block's sites x experts
    step_heatmap(frame, "up1.a0.t0 cross-q", prompt=0) # steps x experts for one site
    usage_bars(frame); agreement_matrix(frame)
    routing_map(rec, "up1.a0.t0 self-q", prompt=0)     # token routing over the image
"""
from __future__ import annotations

import textwrap
from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure

from segmoe_lab.observe.plot_base import (  # noqa: F401  (the public helpers are part of this module's API)
    EXPERT_PALETTE,
    VALUE_NAMES,
    VALUES,
    Prompt,
    _axes,
    _block_rules,
    _check_value,
    _expert_legend,
    _frame,
    _heat,
    _prompt_label,
    _prompt_title,
    _site_ticks,
    _tall,
    conditional,
    expert_colors,
    expert_names,
    prompt_rows,
    shorten,
    site_label,
    site_labels,
)
from segmoe_lab.observe.routing_maps import object_mask, routing_map, routing_maps  # noqa: F401  (part of this module's API)

# --- selecting -----------------------------------------------------------------------------------


# --- heatmaps -------------------------------------------------------------------------------------

def site_heatmap(frame, prompt: Prompt = 0, step: Optional[int] = None, value: str = "prob_mean",
                 kind: Optional[str] = None, half: str = "cond", ax=None, block: Optional[str] = None) -> Figure:
    """Sites x experts for one prompt: ``value`` averaged over steps, or at one ``step``; rows
    grouped by UNet block (its name left of its band). :func:`block_heatmap` is the overview.

    Args:
        frame: a recording or its frame.
        prompt (`int` or `str`, *optional*, defaults to 0): prompt index or text.
        step (`int`, *optional*): one denoising step (default: the mean over all steps).
        value (`str`, *optional*, defaults to ``"prob_mean"``): a column of :data:`VALUES`.
        kind (`str`, *optional*): only sites of this kind (``"cross-q"``, ``"ff"``, ...).
        half (`str`, *optional*, defaults to ``"cond"``): guidance half.
        block (`str`, *optional*): only this block's sites (``"up1"``: the drill-down of one row of
            :func:`block_heatmap`).
    """
    _check_value(value)
    names = expert_names(frame)
    f = prompt_rows(conditional(_frame(frame), half), prompt)
    if kind is not None:
        f = f[f.kind == kind]
    if block is not None:
        f = f[f.layer.astype(str).str.split(".").str[0] == block]
    if step is not None:
        f = f[f.step == step]
    if f.empty:
        raise ValueError(f"nothing recorded for prompt={prompt!r}, step={step}, kind={kind!r}, block={block!r}")
    labels = site_labels(f)
    grid = f.pivot_table(index="label", columns="expert", values=value, aggfunc="mean", observed=True).reindex(labels)
    fig, ax = _axes(ax, (2.4 + 0.6 * grid.shape[1] + 1.6, _tall(len(labels))))
    im = _heat(ax, grid)
    _site_ticks(ax, labels)
    ax.set_xticks(range(grid.shape[1]), [names[e] for e in grid.columns], fontsize=8, rotation=30, ha="right")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer (by block)", labelpad=4)
    _block_rules(ax, labels)
    when = "mean over steps" if step is None else f"step {step}"
    where = "".join(f", {x}" for x in (block, kind) if x)
    ax.set_title(f"{_prompt_title(f, prompt)}\n{VALUE_NAMES[value]}, {when}{where}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08, pad=0.04, label=VALUE_NAMES[value])
    fig.tight_layout()
    return fig


def block_heatmap(frame, prompts: Optional[Sequence[Prompt]] = None, step: Optional[int] = None,
                  value: str = "prob_mean", kind: Optional[str] = None, half: str = "cond") -> Figure:
    """Blocks x experts, one panel per prompt: ``value`` averaged over each block's sites (and the
    steps, or at one ``step``), on one colour scale. The overview of :func:`site_heatmap`; drill
    into a block with ``site_heatmap(frame, prompt, block="up1")``.
    """
    _check_value(value)
    names = expert_names(frame)
    f = conditional(_frame(frame), half)
    if kind is not None:
        f = f[f.kind == kind]
    if step is not None:
        f = f[f.step == step]
    prompts = list(prompts) if prompts is not None else sorted(f.prompt_index.unique())[:6]
    f = f.assign(unit_block=f.layer.astype(str).str.split(".").str[0])
    order = list(dict.fromkeys(lab.split(".")[0] for lab in site_labels(f)))
    grids = [prompt_rows(f, p).pivot_table(index="unit_block", columns="expert", values=value, aggfunc="mean",
                                           observed=True).reindex(order) for p in prompts]
    values = np.concatenate([g.to_numpy(dtype=float).ravel() for g in grids])
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    fig, axes = plt.subplots(1, len(prompts), figsize=(1.4 + 2.1 * len(prompts) + 1.2, 0.42 * len(order) + 2.4),
                             squeeze=False, sharey=True)
    for ax, p, grid in zip(axes[0], prompts, grids):
        im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=low, vmax=max(high, low + 1e-6))
        ax.set_xticks(range(grid.shape[1]), [names[e] for e in grid.columns], fontsize=8, rotation=30, ha="right")
        ax.set_title(textwrap.fill(_prompt_title(f, p), 24), fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
    axes[0, 0].set_yticks(range(len(order)), order, fontsize=9)
    axes[0, 0].set_ylabel("UNet block (down -> up)")
    when = "mean over steps" if step is None else f"step {step}"
    fig.suptitle(f"{VALUE_NAMES[value]} per block, {when}{'' if kind is None else f', {kind} sites'}", fontsize=10)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.04, pad=0.02, label=VALUE_NAMES[value])
    return fig


def step_heatmap(frame, site: str, prompt: Prompt = 0, value: str = "prob_mean", half: str = "cond", ax=None) -> Figure:
    """Steps x experts for one site and prompt: how the gate's preference moves while denoising."""
    _check_value(value)
    f = prompt_rows(conditional(_frame(frame), half), prompt)
    label = site_label(f, site)
    f = f[f.label == label]
    grid = f.pivot_table(index="step", columns="expert", values=value, aggfunc="mean", observed=True).sort_index()
    timesteps = f.groupby("step").timestep.first()
    names = expert_names(frame)
    fig, ax = _axes(ax, (1.6 + 0.6 * grid.shape[1] + 1.6, _tall(len(grid)) * 0.9 + 0.4))
    im = _heat(ax, grid)
    ax.set_yticks(range(len(grid)), [f"{s} (t={timesteps[s]:.0f})" for s in grid.index], fontsize=8)
    ax.set_xticks(range(grid.shape[1]), [names[e] for e in grid.columns], fontsize=8, rotation=30, ha="right")
    ax.set_xlabel("expert")
    ax.set_ylabel("step (timestep)")
    ax.set_title(f"{label}: {VALUE_NAMES[value]}\n{_prompt_title(f, prompt)}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08, label=VALUE_NAMES[value])
    fig.tight_layout()
    return fig


# --- per prompt -----------------------------------------------------------------------------------

def usage(frame, value: str = "chosen", kind: Optional[str] = None, half: str = "cond") -> pd.DataFrame:
    """Prompts x experts: each expert's share of ``value`` summed over all sites and steps (rows sum to 1)."""
    _check_value(value)
    f = conditional(_frame(frame), half)
    if kind is not None:
        f = f[f.kind == kind]
    use = f.assign(v=f[value].astype(float)).pivot_table(index="prompt_index", columns="expert", values="v",
                                                         aggfunc="sum", observed=True)
    share = use.div(use.sum(axis=1).replace(0, np.nan), axis=0).fillna(0)
    names = expert_names(frame)
    share.columns = [names[e] for e in share.columns]
    names = f.drop_duplicates("prompt_index").set_index("prompt_index").prompt.astype(str)
    return share.rename_axis(None, axis=1).assign(prompt=names.reindex(share.index).to_numpy())


def usage_bars(frame, value: str = "chosen", kind: Optional[str] = None, half: str = "cond", ax=None) -> Figure:
    """Expert usage per prompt as horizontal stacked bars (each expert's share of ``value`` over all
    sites and steps), the whole prompt written beside its bar."""
    share = usage(frame, value, kind, half)
    experts = [c for c in share.columns if c != "prompt"]
    fig, ax = _axes(ax, (8.0, 0.42 * len(share) + 1.6))
    colors = expert_colors(len(experts))
    left = np.zeros(len(share))
    rows = np.arange(len(share))
    for j, e in enumerate(experts):
        ax.barh(rows, share[e], left=left, color=colors(j), label=e, edgecolor="white", linewidth=0.5)
        left += share[e].to_numpy()
    ax.set_yticks(rows, [_prompt_label(i, p, 60) for i, p in zip(share.index, share.prompt)], fontsize=8)
    ax.invert_yaxis()  # prompt 0 at the top
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share ({VALUE_NAMES[value]})", fontsize=8)
    ax.set_title(f"expert usage per prompt{'' if kind is None else f' ({kind} sites)'}", fontsize=9)
    ax.legend(title="expert", fontsize=8, title_fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left", frameon=False)
    fig.tight_layout()
    return fig


def spread_sites(recording, n: int = 3, spatial: bool = True) -> list[str]:
    """Labels of ``n`` sites spread over the UNet (first, middle, last, ...), with image tokens if ``spatial``."""
    pool = recording.spatial_sites if spatial else recording.sites
    if len(pool) <= n:
        return [s.label for s in pool]
    return [pool[round(i * (len(pool) - 1) / (n - 1))].label if n > 1 else pool[0].label for i in range(n)]


def top_expert(frame: pd.DataFrame, value: str = "prob_mean") -> pd.DataFrame:
    """Per (call, site, sample): the expert with the largest ``value`` (ties: the lowest index)."""
    keys = ["call", "site", "sample"]
    idx = frame.assign(v=frame[value].astype(float)).groupby(keys, observed=True).v.idxmax()
    return frame.loc[idx]


def agreement_matrix(frame, value: str = "prob_mean", kind: Optional[str] = None, step: Optional[int] = None,
                     half: str = "cond", ax=None) -> Figure:
    """Prompts x prompts: the share of (site, step) pairs where two prompts' top expert (largest ``value``) agrees."""
    _check_value(value)
    f = conditional(_frame(frame), half)
    if kind is not None:
        f = f[f.kind == kind]
    if step is not None:
        f = f[f.step == step]
    top = top_expert(f, value).pivot_table(index=["label", "step"], columns="prompt_index", values="expert",
                                           aggfunc="first", observed=True)  # (site-steps, prompts)
    m = top.to_numpy(dtype=float)
    n = m.shape[1]
    agree = np.array([[np.nanmean(m[:, i] == m[:, j]) for j in range(n)] for i in range(n)])
    texts = f.drop_duplicates("prompt_index").set_index("prompt_index").prompt.astype(str)
    fig, ax = _axes(ax, (3.4 + 0.5 * n + 1.5, 2.4 + 0.5 * n))
    im = ax.imshow(agree, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(n), [str(i) for i in top.columns], fontsize=8)
    ax.set_yticks(range(n), [_prompt_label(i, texts[i], 40) for i in top.columns], fontsize=8)
    ax.set_xlabel("prompt (number as on the left)")
    ax.set_ylabel("prompt")
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{agree[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if agree[i, j] < 0.6 else "black")
    where = "" if kind is None else f" ({kind})"
    ax.set_title(f"routing agreement{where}\nshare of layers x steps with the same top expert", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, label="share with the same top expert")
    fig.tight_layout()
    return fig


def plot_choices(data, value: str = "routed_share", half: str = "cond", ax=None) -> Figure:
    """Sites (down -> mid -> up) x prompts: the expert each layer used most for the prompt over
    all steps (largest ``value``; for ``segmoe`` routing with top-1 that is the expert it chose)."""
    _check_value(value)
    f = conditional(_frame(data), half)
    mean = f.assign(v=f[value].astype(float)).groupby(["label", "prompt_index", "expert"], observed=True).v.mean()
    best = mean.groupby(level=["label", "prompt_index"], observed=True).idxmax().map(lambda t: t[2]).unstack("prompt_index")
    labels = site_labels(f)
    best = best.reindex(labels)
    names = expert_names(data)
    n_exp = len(names)
    cmap = expert_colors(n_exp)
    fig, ax = _axes(ax, (3.6 + 0.5 * best.shape[1] + 1.6, _tall(len(labels)) + 1.2))
    ax.imshow(best.to_numpy(dtype=float), aspect="auto", cmap=cmap, norm=BoundaryNorm(np.arange(n_exp + 1) - 0.5, n_exp),
              interpolation="nearest")
    _site_ticks(ax, labels)
    texts = f.drop_duplicates("prompt_index").set_index("prompt_index").prompt.astype(str)
    ax.set_xticks(range(best.shape[1]), [_prompt_label(p, texts[p], 44) for p in best.columns], fontsize=8,
                  rotation=40, ha="right")
    ax.set_xlabel("prompt")
    ax.set_ylabel("MoE layer (by block)")
    _block_rules(ax, labels)
    _expert_legend(ax, names)
    ax.set_title("expert used most, per layer and prompt", fontsize=9)
    fig.tight_layout()
    return fig


# --- routing maps ---------------------------------------------------------------------------------


# --- helpers ---------------------------------------------------------------------------------------


