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


# Muted colours at least 80 (RGB distance) from every colour and background of the toy world
# (segmoe_lab.toy.world.COLOURS / BACKGROUNDS) and 55 from each other; tests/test_figures.py checks it.
EXPERT_PALETTE = ("#800000", "#2f4f4f", "#d8bfd8", "#6b8e23", "#000080", "#8b4513")


def expert_colors(n: int) -> ListedColormap:
    """One distinct colour per expert: :data:`EXPERT_PALETTE` (up to 6 experts), else tab20."""
    if n <= len(EXPERT_PALETTE):
        return ListedColormap(list(EXPERT_PALETTE[:n]), name=f"experts{n}")
    base = plt.get_cmap("tab20")
    return ListedColormap([base(i % base.N) for i in range(n)], name=f"experts{n}")


def expert_names(data, n: Optional[int] = None) -> list[str]:
    """The experts' names a frame (``frame.attrs["expert_names"]``) or recording carries, else ``expert i``."""
    names = getattr(data, "expert_names", None) or getattr(data, "attrs", {}).get("expert_names")
    if n is None:
        n = len(names) if names else int(_frame(data).expert.max()) + 1
    names = list(names or [])
    return names[:n] + [f"expert {i}" for i in range(len(names), n)]


def _expert_legend(target, names: Sequence[str], title: str = "expert", **kw):
    """A legend of expert colour patches outside the axes (right of ``target``, an axes or figure)."""
    cmap = expert_colors(len(names))
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(e)) for e in range(len(names))]
    where = dict(bbox_to_anchor=(1.02, 1), loc="upper left") if hasattr(target, "transAxes") else \
        dict(loc="upper left", bbox_to_anchor=(1.0, 0.95))
    return target.legend(handles, list(names), title=title, fontsize=8, title_fontsize=8, frameon=False, **{**where, **kw})


def _block_rules(ax, labels: Sequence[str]) -> None:
    """White lines between blocks and each block's name, bold, left of its band of rows."""
    blocks = [lab.split(".")[0] for lab in labels]
    start = 0
    for i in range(1, len(blocks) + 1):
        if i == len(blocks) or blocks[i] != blocks[start]:
            if i < len(blocks):
                ax.axhline(i - 0.5, color="white", lw=2)
            ax.annotate(blocks[start], xy=(0, (start + i - 1) / 2), xycoords=("axes fraction", "data"),
                        xytext=(-92, 0), textcoords="offset points", va="center", ha="right", fontsize=9,
                        fontweight="bold")
            start = i


def _site_ticks(ax, labels: Sequence[str]) -> None:
    """Row labels without their block (the block's name stands left of its band, see _block_rules)."""
    short = [lab.split(".", 1)[1] if "." in lab else lab for lab in labels]
    ax.set_yticks(range(len(labels)), short, fontsize=8)


def _tall(n_rows: int) -> float:
    """Figure height for ``n_rows`` heatmap rows: 0.17 in (8-pt labels) per row plus title room."""
    return max(2.6, 0.17 * n_rows + 1.4)


def _prompt_label(i, text, n: int = 44) -> str:
    return shorten(f"{int(i)}: {text}", n)


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

def object_mask(image, threshold: float = 60.0, smallest: int = 6) -> np.ndarray:
    """Where an image's objects are: pixels that differ from the background (the median colour of
    its border) by more than ``threshold`` (RGB distance), without specks under ``smallest``
    pixels (a mosaic's grid lines). (H, W) bool."""
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float64)[..., :3]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    mask = np.linalg.norm(img - np.median(border, axis=0), axis=-1) > threshold
    parts, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, parts, range(1, n + 1))
    return np.isin(parts, 1 + np.flatnonzero(sizes >= smallest))


def routing_map(recording, site: str, prompt: int = 0, step: int = -1, image=None, value: str = "argmax",
                outline: bool = True, ax=None) -> Figure:
    """Per-token expert choice of one site and step, in expert colours, with the outlines of the
    image's objects drawn over it (not the image itself, so object and expert colours never mix;
    :func:`routing_maps` shows the images beside the maps).

    Args:
        recording (`GateRecording`): recorded with ``spatial=True``.
        site (`str`): a site path or label with image tokens (``recording.spatial_sites``).
        prompt (`int`, *optional*, defaults to 0): prompt index (its conditional half is drawn).
        step (`int`, *optional*, defaults to -1): step within the prompt's generation.
        image (PIL image or array, *optional*): whose objects to outline; defaults to
            ``recording.images[prompt]`` when present.
        value (`str`, *optional*, defaults to ``"argmax"``): ``"argmax"`` (each token's most probable
            expert) or ``"chosen"`` (the expert the layer's routing weighted most; constant over the
            image under ``segmoe`` / ``per_sample`` routing).
        outline (`bool`, *optional*, defaults to True): draw the objects' outlines.
    """
    if value not in ("argmax", "chosen"):
        raise ValueError(f"value={value!r}; choose 'argmax' or 'chosen'")
    generation, sample = recording.sample_of(prompt)
    grid = recording.spatial(site, step=step, sample=sample, generation=generation, value=value)  # (h, w)
    if image is None and prompt < len(recording.images):
        image = recording.images[prompt]
    names = expert_names(recording)
    cmap = expert_colors(len(names))
    fig, ax = _axes(ax, (4.6, 3.4))
    extent = (-0.5, grid.shape[1] - 0.5, grid.shape[0] - 0.5, -0.5)
    ax.imshow(grid, cmap=cmap, norm=BoundaryNorm(np.arange(len(names) + 1) - 0.5, len(names)), interpolation="nearest",
              extent=extent)
    if outline and image is not None:
        mask = object_mask(image).astype(float)  # (H, W) on the image's pixels, drawn over the token grid
        ys = np.linspace(-0.5, grid.shape[0] - 0.5, mask.shape[0])
        xs = np.linspace(-0.5, grid.shape[1] - 0.5, mask.shape[1])
        for color, width in (("black", 2.6), ("white", 1.2)):  # a white line edged in black reads on any colour
            ax.contour(xs, ys, mask, levels=[0.5], colors=color, linewidths=width)
    ax.set_xticks([])
    ax.set_yticks([])
    label = recording.site(site).label
    step_name = recording.generations[generation].steps + step if step < 0 else step
    what = "most probable expert" if value == "argmax" else "routed expert"
    ax.set_title(f"{label}, step {step_name}\n{grid.shape[0]}x{grid.shape[1]} tokens", fontsize=8)
    ax.set_xlabel(f"prompt {prompt}: {what} per token;\nwhite lines: the image's objects", fontsize=7)
    if fig.axes == [ax]:  # a figure of its own: legend outside, right
        _expert_legend(ax, names)
        fig.tight_layout()
    return fig


def routing_maps(recording, prompts: Sequence[int], sites: Sequence[str], step: int = -1, value: str = "argmax",
                 images: Optional[Sequence] = None) -> Figure:
    """One row per prompt: its image, then a :func:`routing_map` per site (objects outlined); one
    expert legend for the figure, outside the panels."""
    images = list(images) if images is not None else list(recording.images)
    fig, axes = plt.subplots(len(prompts), len(sites) + 1, figsize=(2.6 * (len(sites) + 1) + 1.8, 2.9 * len(prompts)),
                             squeeze=False)
    for i, p in enumerate(prompts):
        image = images[p] if p < len(images) else None
        ax = axes[i, 0]
        if image is not None:
            ax.imshow(np.asarray(image))
        ax.set_xticks([])
        ax.set_yticks([])
        text = recording.prompts[p] if p < len(recording.prompts) else ""
        ax.set_title(textwrap.fill(_prompt_label(p, text, 60), 26), fontsize=8)
        ax.set_ylabel("generated image" if i == 0 else "", fontsize=7)
        for j, s in enumerate(sites):
            routing_map(recording, s, prompt=p, step=step, value=value, image=image, ax=axes[i, j + 1])
            axes[i, j + 1].set_xlabel("")
    what = "most probable" if value == "argmax" else "routed"
    fig.suptitle(f"Where in the image: each token's {what} expert (white lines: the image's objects)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 0.97))
    _expert_legend(fig, expert_names(recording), bbox_to_anchor=(1 - 1.55 / fig.get_figwidth(), 0.93))
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
