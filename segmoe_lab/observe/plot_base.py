"""What every gate plot shares: selecting rows of a recording's frame, site and prompt labels, the expert palette and names, and small axes helpers."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap

VALUES = ("prob_mean", "topk_share", "routed_share", "chosen", "sample_topk")


VALUE_NAMES = {"prob_mean": "mean gate probability", "topk_share": "share of tokens with it in their top-k",
               "routed_share": "share of tokens routed to it", "chosen": "chosen by the layer's routing",
               "sample_topk": "in the sample's top-k"}


Prompt = Union[int, str]


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
