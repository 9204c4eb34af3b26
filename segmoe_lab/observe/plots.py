"""Plots of recorded gate activity (:mod:`segmoe_lab.observe.recording`); each function returns its figure.

Every plot reads a :meth:`GateRecording.frame <segmoe_lab.observe.recording.GateRecording.frame>` (or the
recording itself) and names sites by block and layer (``"down1.a0.t0 cross-k"``), in the order the
UNet runs them: down blocks, mid, up blocks. Unless told otherwise a plot shows the conditional
half of classifier-free guidance (the prompt's own half; runs without guidance count too).

Example::

    rec = record_gates(pipe, prompts, steps=8, spatial=True)
    frame = rec.frame()
    site_heatmap(frame, prompt=0)                      # sites x experts, mean over steps
    step_heatmap(frame, "up1.a0.t0 cross-q", prompt=0) # steps x experts for one site
    usage_bars(frame); agreement_matrix(frame)
    routing_map(rec, "up1.a0.t0 self-q", prompt=0)     # token routing over the image
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

VALUES = ("prob_mean", "topk_share", "routed_share", "chosen", "sample_topk")
VALUE_NAMES = {"prob_mean": "mean gate probability", "topk_share": "share of tokens with it in their top-k",
               "routed_share": "share of tokens routed to it", "chosen": "chosen by the layer's routing",
               "sample_topk": "in the sample's top-k"}
Prompt = Union[int, str]


# --- selecting -----------------------------------------------------------------------------------

def _frame(data) -> pd.DataFrame:
    return data.frame() if hasattr(data, "frame") else data


def _check_value(value: str) -> None:
    if value not in VALUES:
        raise ValueError(f"value={value!r} is not a frame value; choose one of {list(VALUES)}")


def conditional(frame: pd.DataFrame, half: str = "cond") -> pd.DataFrame:
    """Rows of one guidance half (``"cond"`` / ``"uncond"``), plus rows recorded without guidance."""
    if half not in ("cond", "uncond", "none"):
        raise ValueError(f"half={half!r}; choose one of ['cond', 'uncond', 'none']")
    return frame[frame.cfg_half.isin([half, "none"])]


def prompt_rows(frame: pd.DataFrame, prompt: Prompt) -> pd.DataFrame:
    """Rows of one prompt, by index (into the recording's prompts) or text."""
    rows = frame[frame.prompt_index == prompt] if isinstance(prompt, (int, np.integer)) else frame[frame.prompt == prompt]
    if rows.empty:
        known = frame.drop_duplicates("prompt_index")[["prompt_index", "prompt"]].head(6).values.tolist()
        raise KeyError(f"prompt {prompt!r} is not in the frame; recorded prompts are e.g. {known}")
    return rows


def site_label(frame: pd.DataFrame, site: str) -> str:
    """The label of a site given by path or label."""
    for col in ("label", "site"):
        hit = frame.loc[frame[col] == site, "label"]
        if len(hit):
            return str(hit.iloc[0])
    raise KeyError(f"no site {site!r} in the frame; e.g. {list(frame.label.cat.categories[:4])}")


def site_labels(frame: pd.DataFrame) -> list[str]:
    """Site labels present in ``frame``, in UNet order (the categories' order)."""
    present = set(frame.label.unique())
    return [lab for lab in frame.label.cat.categories if lab in present]


def _prompt_title(frame: pd.DataFrame, prompt: Prompt) -> str:
    rows = prompt_rows(frame, prompt)
    text = str(rows.prompt.iloc[0]) or "(embeddings)"
    return f"prompt {int(rows.prompt_index.iloc[0])}: {text if len(text) <= 48 else text[:45] + '...'}"


def expert_colors(n: int) -> ListedColormap:
    """One distinct colour per expert (tab10, then tab20)."""
    base = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return ListedColormap([base(i % base.N) for i in range(n)], name=f"experts{n}")


def _block_rules(ax, labels: Sequence[str]) -> None:
    """Lines between blocks and the block name at the right of each band."""
    blocks = [lab.split(".")[0] for lab in labels]
    start = 0
    for i in range(1, len(blocks) + 1):
        if i == len(blocks) or blocks[i] != blocks[start]:
            if i < len(blocks):
                ax.axhline(i - 0.5, color="white", lw=1.5)
            ax.text(1.01, (start + i - 1) / 2, blocks[start], transform=ax.get_yaxis_transform(), va="center", fontsize=7)
            start = i


def _site_ticks(ax, labels: Sequence[str], most: int = 90) -> None:
    """Site labels on the y axis; beyond ``most`` rows every n-th, so they stay readable."""
    every = max(1, -(-len(labels) // most))
    rows = range(0, len(labels), every)
    ax.set_yticks(list(rows), [labels[i] for i in rows], fontsize=6 if len(labels) > 30 else 8)


def _tall(n_rows: int) -> float:
    return min(max(2.5, 0.13 * n_rows + 1.2), 24.0)


# --- heatmaps -------------------------------------------------------------------------------------

def site_heatmap(frame, prompt: Prompt = 0, step: Optional[int] = None, value: str = "prob_mean",
                 kind: Optional[str] = None, half: str = "cond", ax=None) -> Figure:
    """Sites x experts for one prompt: ``value`` averaged over steps, or at one ``step``.

    Args:
        frame: a recording or its frame.
        prompt (`int` or `str`, *optional*, defaults to 0): prompt index or text.
        step (`int`, *optional*): one denoising step (default: the mean over all steps).
        value (`str`, *optional*, defaults to ``"prob_mean"``): a column of :data:`VALUES`.
        kind (`str`, *optional*): only sites of this kind (``"cross-q"``, ``"ff"``, ...).
        half (`str`, *optional*, defaults to ``"cond"``): guidance half.
    """
    _check_value(value)
    f = prompt_rows(conditional(_frame(frame), half), prompt)
    if kind is not None:
        f = f[f.kind == kind]
    if step is not None:
        f = f[f.step == step]
    if f.empty:
        raise ValueError(f"nothing recorded for prompt={prompt!r}, step={step}, kind={kind!r}")
    labels = site_labels(f)
    grid = f.pivot_table(index="label", columns="expert", values=value, aggfunc="mean", observed=True).reindex(labels)
    fig, ax = _axes(ax, (1.0 + 0.5 * grid.shape[1] + 2.2, _tall(len(labels))))
    im = _heat(ax, grid)
    _site_ticks(ax, labels)
    ax.set_xticks(range(grid.shape[1]), [f"expert {e}" for e in grid.columns], fontsize=8, rotation=45)
    _block_rules(ax, labels)
    when = "mean over steps" if step is None else f"step {step}"
    ax.set_title(f"{_prompt_title(f, prompt)}\n{VALUE_NAMES[value]}, {when}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08, pad=0.12)
    fig.tight_layout()
    return fig


def step_heatmap(frame, site: str, prompt: Prompt = 0, value: str = "prob_mean", half: str = "cond", ax=None) -> Figure:
    """Steps x experts for one site and prompt: how the gate's preference moves while denoising."""
    _check_value(value)
    f = prompt_rows(conditional(_frame(frame), half), prompt)
    label = site_label(f, site)
    f = f[f.label == label]
    grid = f.pivot_table(index="step", columns="expert", values=value, aggfunc="mean", observed=True).sort_index()
    timesteps = f.groupby("step").timestep.first()
    fig, ax = _axes(ax, (1.0 + 0.5 * grid.shape[1] + 2.0, _tall(len(grid)) * 0.8 + 0.6))
    im = _heat(ax, grid)
    ax.set_yticks(range(len(grid)), [f"{s} (t={timesteps[s]:.0f})" for s in grid.index], fontsize=7)
    ax.set_xticks(range(grid.shape[1]), [f"expert {e}" for e in grid.columns], fontsize=8, rotation=45)
    ax.set_ylabel("step (timestep)")
    ax.set_title(f"{label}: {VALUE_NAMES[value]}\n{_prompt_title(f, prompt)}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08)
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
    share.columns = [f"expert {e}" for e in share.columns]
    names = f.drop_duplicates("prompt_index").set_index("prompt_index").prompt.astype(str)
    return share.rename_axis(None, axis=1).assign(prompt=names.reindex(share.index).to_numpy())


def usage_bars(frame, value: str = "chosen", kind: Optional[str] = None, half: str = "cond", ax=None) -> Figure:
    """Expert usage per prompt as stacked bars: each expert's share of ``value`` over all sites and steps."""
    share = usage(frame, value, kind, half)
    experts = [c for c in share.columns if c != "prompt"]
    fig, ax = _axes(ax, (max(4.0, 0.7 * len(share) + 2.5), 3.6))
    colors = expert_colors(len(experts))
    bottom = np.zeros(len(share))
    for j, e in enumerate(experts):
        ax.bar(range(len(share)), share[e], bottom=bottom, color=colors(j), label=e)
        bottom += share[e].to_numpy()
    ax.set_xticks(range(len(share)), [shorten(f"{i}: {p}", 28) for i, p in zip(share.index, share.prompt)],
                  rotation=40, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"share ({VALUE_NAMES[value]})", fontsize=8)
    ax.set_title(f"expert usage per prompt{'' if kind is None else f' ({kind} sites)'}", fontsize=9)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
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
    fig, ax = _axes(ax, (2.0 + 0.45 * n + 1.5, 1.6 + 0.45 * n))
    im = ax.imshow(agree, vmin=0, vmax=1, cmap="magma")
    ticks = [str(i) for i in top.columns]
    ax.set_xticks(range(n), ticks, fontsize=7)
    ax.set_yticks(range(n), ticks, fontsize=7)
    ax.set_xlabel("prompt")
    ax.set_ylabel("prompt")
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{agree[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if agree[i, j] < 0.6 else "black")
    where = "" if kind is None else f" ({kind})"
    ax.set_title(f"routing agreement{where}\nshare of layers x steps with the same top expert", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
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
    n_exp = int(f.expert.max()) + 1
    cmap = expert_colors(n_exp)
    fig, ax = _axes(ax, (2.6 + 0.5 * best.shape[1] + 1.3, _tall(len(labels))))
    ax.imshow(best.to_numpy(dtype=float), aspect="auto", cmap=cmap, norm=BoundaryNorm(np.arange(n_exp + 1) - 0.5, n_exp),
              interpolation="nearest")
    _site_ticks(ax, labels)
    ax.set_xticks(range(best.shape[1]), [str(p) for p in best.columns], fontsize=8)
    ax.set_xlabel("prompt")
    _block_rules(ax, labels)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(e)) for e in range(n_exp)]
    ax.legend(handles, [f"expert {e}" for e in range(n_exp)], fontsize=7, bbox_to_anchor=(1.12, 1), loc="upper left")
    ax.set_title("expert used most, per layer and prompt", fontsize=9)
    fig.tight_layout()
    return fig


# --- routing maps ---------------------------------------------------------------------------------

def routing_map(recording, site: str, prompt: int = 0, step: int = -1, image=None, value: str = "argmax",
                alpha: float = 0.55, ax=None) -> Figure:
    """Per-token expert choice of one site and step, drawn over the generated image.

    Args:
        recording (`GateRecording`): recorded with ``spatial=True``.
        site (`str`): a site path or label with image tokens (``recording.spatial_sites``).
        prompt (`int`, *optional*, defaults to 0): prompt index (its conditional half is drawn).
        step (`int`, *optional*, defaults to -1): step within the prompt's generation.
        image (PIL image or array, *optional*): defaults to ``recording.images[prompt]`` when present.
        value (`str`, *optional*, defaults to ``"argmax"``): ``"argmax"`` (each token's most probable
            expert) or ``"chosen"`` (the expert the layer's routing weighted most; constant over the
            image under ``segmoe`` / ``per_sample`` routing).
    """
    if value not in ("argmax", "chosen"):
        raise ValueError(f"value={value!r}; choose 'argmax' or 'chosen'")
    generation, sample = recording.sample_of(prompt)
    grid = recording.spatial(site, step=step, sample=sample, generation=generation, value=value)  # (h, w)
    if image is None and prompt < len(recording.images):
        image = recording.images[prompt]
    n_exp = recording.num_experts
    cmap = expert_colors(n_exp)
    fig, ax = _axes(ax, (4.4, 3.8))
    extent = None
    if image is not None:
        img = np.asarray(image)
        ax.imshow(img)
        extent = (-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5)
    ax.imshow(grid, cmap=cmap, norm=BoundaryNorm(np.arange(n_exp + 1) - 0.5, n_exp), interpolation="nearest",
              alpha=alpha if image is not None else 1.0, extent=extent)
    ax.set_axis_off()
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(e)) for e in range(n_exp)]
    ax.legend(handles, [f"expert {e}" for e in range(n_exp)], fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    label = recording.site(site).label
    step_name = recording.generations[generation].steps + step if step < 0 else step
    what = "most probable expert per token" if value == "argmax" else "routed expert per token"
    ax.set_title(f"{label}, step {step_name}, prompt {prompt}\n{what} ({grid.shape[0]}x{grid.shape[1]} tokens)", fontsize=8)
    fig.tight_layout()
    return fig


def routing_maps(recording, prompts: Sequence[int], sites: Sequence[str], step: int = -1, value: str = "argmax",
                 images: Optional[Sequence] = None) -> Figure:
    """A grid of :func:`routing_map` panels: one row per prompt, one column per site."""
    fig, axes = plt.subplots(len(prompts), len(sites), figsize=(3.2 * len(sites) + 1.2, 3.0 * len(prompts)), squeeze=False)
    for i, p in enumerate(prompts):
        for j, s in enumerate(sites):
            image = images[p] if images is not None and p < len(images) else None
            routing_map(recording, s, prompt=p, step=step, value=value, image=image, ax=axes[i, j])
            if j < len(sites) - 1 or i > 0:
                legend = axes[i, j].get_legend()
                if legend is not None:
                    legend.remove()
    fig.tight_layout()
    return fig


# --- helpers ---------------------------------------------------------------------------------------

def _heat(ax, grid: pd.DataFrame):
    """A heatmap over the grid's own range: mean probabilities sit near 1 / E, so a fixed 0-1 scale
    would hide their differences (the colour bar gives the values)."""
    values = grid.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5
    return ax.imshow(values, aspect="auto", cmap="viridis", vmin=low, vmax=high, interpolation="nearest")


def _axes(ax, size: tuple[float, float]):
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=size)
    return fig, ax


def shorten(text: str, n: int) -> str:
    """``text`` cut to ``n`` characters with "..." when longer."""
    return text if len(text) <= n else text[: n - 3] + "..."
