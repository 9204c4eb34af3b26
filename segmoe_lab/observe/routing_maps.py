"""Routing maps: which expert each image token went to at one site, beside the generated image, with the objects outlined (never a colour overlay that mixes object and expert colours)."""
from __future__ import annotations

import textwrap
from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure

from segmoe_lab.observe.plot_base import (
    _axes,
    _expert_legend,
    _prompt_label,
    expert_colors,
    expert_names,
)


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
