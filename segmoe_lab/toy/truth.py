"""Ground truth for the toy world: read an image back into objects and score it against a description.

Foreground = pixels far from the domain's background colour; objects = its connected components
(8-connected, at least :data:`MIN_AREA` pixels); an object's colour = the palette colour nearest
to the median of its most saturated pixels; its shape = from how much of its bounding box it
fills (square ~1, circle ~0.79, triangle ~0.5).

Example::

    check(image, {"domain": "neon", "shape": "circle", "colour": "pink", "count": 2})
    # {'colour': True, 'shape': True, 'count': True, 'exact': True, 'style': True, 'score': 1.0, ...}
"""
from __future__ import annotations

import json
from typing import Union

import numpy as np
from PIL import Image
from scipy import ndimage

from .world import BACKGROUNDS, COLOURS, SIZE

MIN_AREA = 10  # pixels: smaller blobs are noise, not objects
FG_DISTANCE = 110.0  # RGB distance from the background that makes a pixel foreground
STYLE_DISTANCE = 60.0  # the image border's median must be this close to the domain's background
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (C, 3)
_NAMES = list(COLOURS)


def _as_array(image) -> np.ndarray:
    """(32, 32, 3) float32 RGB in [0, 255] from a PIL image or an array (HWC, uint8 or float in [0, 1])."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (SIZE, SIZE):
            image = image.resize((SIZE, SIZE), Image.BOX)
        return np.asarray(image, dtype=np.float32)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image: expected an RGB image (H, W, 3), got an array of shape {arr.shape}")
    if arr.max() <= 1.0:
        arr = arr * 255.0
    return _as_array(Image.fromarray(arr.clip(0, 255).astype(np.uint8)))


def _as_description(description) -> dict:
    d = json.loads(description) if isinstance(description, str) else dict(description)
    missing = [k for k in ("domain", "shape", "colour", "count") if k not in d]
    if missing:
        raise ValueError(f"description {d!r} lacks {missing}; a toy description has domain, shape, colour, count")
    return d


def shape_features(mask: np.ndarray) -> tuple[float, float]:
    """``(corners, top)``: how full the bounding box's four corners are (square ~1, circle ~0,
    triangle ~0.5) and the top half's area over the bottom half's (triangle, apex up, ~0.33)."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)  # (h, w)
    h, w = box.shape
    c = max(1, round(min(h, w) / 5))
    corners = float(np.mean([box[:c, :c].mean(), box[:c, -c:].mean(), box[-c:, :c].mean(), box[-c:, -c:].mean()]))
    top, bottom = box[: h // 2].sum(), box[(h + 1) // 2:].sum()
    return corners, float(top / max(bottom, 1.0))


def shape_of(mask: np.ndarray) -> str:
    """``triangle`` (top half much lighter than the bottom), else ``square`` (full corners) or ``circle``."""
    corners, top = shape_features(mask)
    if top < 0.6:
        return "triangle"
    return "square" if corners >= 0.6 else "circle"


def find_objects(image, domain: str) -> list[dict]:
    """The objects in ``image`` drawn on ``domain``'s background: colour, shape, area, centre, fill."""
    arr = _as_array(image)  # (H, W, 3)
    dist = np.linalg.norm(arr - np.array(BACKGROUNDS[domain], dtype=np.float32), axis=-1)  # (H, W)
    labels, n = ndimage.label(dist > FG_DISTANCE, structure=np.ones((3, 3)))
    objects = []
    for i in range(1, n + 1):
        mask = labels == i
        area = int(mask.sum())
        if area < MIN_AREA:
            continue
        strong = mask & (dist >= np.percentile(dist[mask], 50))  # the object's core, not its antialiased rim
        rgb = np.median(arr[strong], axis=0)
        colour = _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=-1)))]
        ys, xs = np.nonzero(mask)
        objects.append({"colour": colour, "shape": shape_of(mask), "area": area,
                        "x": float(xs.mean()), "y": float(ys.mean())})
    return objects


def check(image, description: Union[dict, str]) -> dict:
    """Score ``image`` against a scene description (dict or its JSON).

    Returns:
        ``colour`` / ``shape``: every object found has the asked colour / shape (and there is one);
        ``count``: as many objects as asked; ``exact``: all three; ``style``: the border is the
        domain's background; ``score``: the mean of colour, shape and count (0, 1/3, 2/3, 1);
        ``n_found`` and ``objects`` (what was read).
    """
    d = _as_description(description)
    if d["domain"] not in BACKGROUNDS:
        raise ValueError(f"description domain {d['domain']!r} is not a toy domain; choose one of {list(BACKGROUNDS)}")
    arr = _as_array(image)
    objects = find_objects(arr, d["domain"])
    colour = bool(objects) and all(o["colour"] == d["colour"] for o in objects)
    shape = bool(objects) and all(o["shape"] == d["shape"] for o in objects)
    count = len(objects) == int(d["count"])
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])  # (4 * 32, 3)
    style = float(np.linalg.norm(np.median(border, axis=0) - np.array(BACKGROUNDS[d["domain"]]))) < STYLE_DISTANCE
    return {"colour": colour, "shape": shape, "count": count, "exact": colour and shape and count,
            "style": bool(style), "score": (colour + shape + count) / 3.0, "n_found": len(objects), "objects": objects}
