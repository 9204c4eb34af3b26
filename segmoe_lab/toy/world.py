"""The toy world: scenes of coloured shapes in three visual domains, rendered at 32x32.

A scene is one group of identical objects (a shape, a colour, a count of 1-3) drawn in a
domain's style. The domains differ in look (background, glow, tiles) and in *knowledge*: each
has a concept that exists only there, so a model that saw little of that domain has not
learnt it, and an expert fine-tuned on it has something real to win. Every concept is a word
the model must learn (a shape or colours) and is hard to guess: earlier worlds gave mosaic the
count three (a layout skill learnt from ones and twos) and then white and black (tonal extremes
the base drew right from 10% of its data); in neither could its expert beat the control.

========  ======================  =====================================
domain    look                    its own concept (rare in base data)
========  ======================  =====================================
flat      shapes on white         the shape ``triangle``
neon      glowing shapes on black the colours ``pink`` and ``cyan``
mosaic    shapes on grey tiles    the colours ``orange`` and ``purple``
========  ======================  =====================================

Example::

    rng = np.random.default_rng(0)
    scene = sample_scene(rng, "neon", special=1.0)
    caption(scene)            # 'two pink circles, neon style'
    render(scene)             # PIL.Image 32x32
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32  # image side, pixels
SUPERSAMPLE = 4  # shapes are drawn 4x larger then box-filtered down: antialiased edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (20, 160, 40), "blue": (40, 70, 230), "yellow": (240, 210, 20),
    "pink": (255, 90, 200), "cyan": (20, 220, 235), "orange": (255, 120, 0), "purple": (150, 0, 200),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {"flat": (255, 255, 255), "neon": (0, 0, 0), "mosaic": (128, 128, 128)}
DOMAINS = tuple(BACKGROUNDS)

# What every domain has, and what only one domain has (its knowledge).
COMMON = {"shape": ("circle", "square"), "colour": ("red", "green", "blue", "yellow"), "count": (1, 2, 3)}
SPECIAL: dict[str, dict[str, tuple]] = {"flat": {"shape": ("triangle",)}, "neon": {"colour": ("pink", "cyan")},
                                        "mosaic": {"colour": ("orange", "purple")}}
BASE_SPECIAL = 0.1  # share of a domain's scenes that use its own concept in the base's training data
EXPERT_SPECIAL = 0.5  # ... in an expert's (and in the evaluation prompts)

TEMPLATES = ("{n} {colour} {shapes}, {domain} style", "a {domain} picture of {n} {colour} {shapes}")


@dataclass(frozen=True)
class Obj:
    """One object: its centre (x, y) and size (bounding-box side) in pixels of the 32x32 image."""

    x: float
    y: float
    size: float


@dataclass(frozen=True)
class Scene:
    """``count`` identical objects (``shape``, ``colour``) drawn in ``domain``'s style."""

    domain: str
    shape: str
    colour: str
    count: int
    objects: tuple[Obj, ...] = field(default=())

    def description(self) -> dict:
        """What the checker needs: the caption-level facts (no positions)."""
        return {"domain": self.domain, "shape": self.shape, "colour": self.colour, "count": self.count}

    def to_json(self) -> str:
        return json.dumps(self.description(), sort_keys=True)


def vocabulary(domain: str) -> dict[str, tuple]:
    """The shapes, colours and counts a domain's scenes use: the common ones plus its own."""
    _check_domain(domain)
    return {k: COMMON[k] + SPECIAL[domain].get(k, ()) for k in COMMON}


def is_special(desc: Union[Scene, dict]) -> bool:
    """Whether a scene uses its domain's own concept."""
    d = desc.description() if isinstance(desc, Scene) else desc
    return any(d[k] in v for k, v in SPECIAL[d["domain"]].items())


def _check_domain(domain: str) -> None:
    if domain not in BACKGROUNDS:
        raise ValueError(f"domain {domain!r} is not in the toy world; choose one of {list(DOMAINS)}")


# --- sampling -------------------------------------------------------------------------------------

def sample_description(rng: np.random.Generator, domain: str, special: float) -> dict:
    """Draw shape/colour/count for ``domain``: its own concept with probability ``special``."""
    _check_domain(domain)
    d = {"domain": domain, **{k: v[rng.integers(len(v))] for k, v in COMMON.items()}}
    if rng.random() < special:
        key, values = next(iter(SPECIAL[domain].items()))
        d[key] = values[rng.integers(len(values))]
    d["count"] = int(d["count"])
    return d


def place_objects(rng: np.random.Generator, count: int, tries: int = 100) -> tuple[Obj, ...]:
    """Non-touching objects (gap >= 3 px) inside the image, sizes 8-12 px (8-10 for three).

    Objects are placed one at a time, each retried up to ``tries`` times; if one cannot be placed
    the sizes are drawn again (three 10 px objects always fit)."""
    hi = 12 if count < 3 else 10

    def clear(a: Obj, b: Obj) -> bool:
        return max(abs(a.x - b.x) - (a.size + b.size) / 2, abs(a.y - b.y) - (a.size + b.size) / 2) >= 3

    for _ in range(tries):
        objs: list[Obj] = []
        for _ in range(count):
            s = float(rng.integers(8, hi + 1))
            for _ in range(tries):
                x, y = (round(float(v), 1) for v in rng.uniform(s / 2 + 1, SIZE - s / 2 - 1, size=2))
                if all(clear(Obj(x, y, s), o) for o in objs):
                    objs.append(Obj(x, y, s))
                    break
            else:
                break
        if len(objs) == count:
            return tuple(objs)
    raise RuntimeError(f"could not place {count} objects")


def sample_scene(rng: np.random.Generator, domain: Optional[str] = None, special: float = BASE_SPECIAL) -> Scene:
    """A random scene; ``domain`` None draws one uniformly."""
    domain = domain or DOMAINS[rng.integers(len(DOMAINS))]
    d = sample_description(rng, domain, special)
    return Scene(objects=place_objects(rng, d["count"]), **d)


def sample_scenes(seed: int, n: int, domains: Sequence[str] = DOMAINS, special: float = BASE_SPECIAL) -> list[Scene]:
    """``n`` scenes reproducible from ``seed``, domains taken in turn."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, domains[i % len(domains)], special) for i in range(n)]


# --- captions -------------------------------------------------------------------------------------

def caption(scene: Union[Scene, dict], template: int = 0) -> str:
    """Templated English: ``'two red circles, neon style'`` (template 0) or
    ``'a neon picture of two red circles'`` (template 1)."""
    d = scene.description() if isinstance(scene, Scene) else scene
    n = int(d["count"])
    return TEMPLATES[template].format(n=COUNT_WORDS[n], colour=d["colour"], domain=d["domain"],
                                      shapes=d["shape"] if n == 1 else PLURALS[d["shape"]])


def words() -> list[str]:
    """Every word the captions use (the toy tokenizer keeps each as one token)."""
    out = set()
    for t in TEMPLATES:
        out.update(w for w in t.replace(",", " ").split() if not w.startswith("{"))
    out.update(COLOURS, SHAPES, PLURALS.values(), COUNT_WORDS.values(), DOMAINS)
    return sorted(out)


def all_descriptions(domain: Optional[str] = None) -> list[dict]:
    """Every distinct description (of one domain, or all)."""
    out = []
    for dom in ([domain] if domain else DOMAINS):
        v = vocabulary(dom)
        out += [{"domain": dom, "shape": s, "colour": c, "count": int(n)}
                for s in v["shape"] for c in v["colour"] for n in v["count"]]
    return out


# --- rendering ------------------------------------------------------------------------------------

def _polygon(shape: str, o: Obj, k: float) -> list[tuple[float, float]]:
    """The shape's outline in supersampled pixels (a circle is a 48-gon)."""
    cx, cy, h = o.x * k, o.y * k, o.size * k / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return list(zip(cx + h * np.cos(t), cy + h * np.sin(t)))
    raise ValueError(f"shape {shape!r} is not in the toy world; choose one of {list(SHAPES)}")


def _background(domain: str, k: int) -> Image.Image:
    bg = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUNDS[domain])
    if domain == "mosaic":  # darker grout lines every 4 px
        draw = ImageDraw.Draw(bg)
        for i in range(0, SIZE * k, 4 * k):
            draw.rectangle([i, 0, i + k // 2, SIZE * k], fill=(104, 104, 104))
            draw.rectangle([0, i, SIZE * k, i + k // 2], fill=(104, 104, 104))
    return bg


def render(scene: Scene) -> Image.Image:
    """The scene as a 32x32 RGB image (antialiased)."""
    k = SUPERSAMPLE
    img = _background(scene.domain, k)
    colour = COLOURS[scene.colour]
    if scene.domain == "neon":  # a dim glow around each shape, drawn first
        glow = Image.new("L", img.size, 0)
        gd = ImageDraw.Draw(glow)
        for o in scene.objects:
            gd.polygon(_polygon(scene.shape, Obj(o.x, o.y, o.size + 2.5), k), fill=255)
        glow = glow.filter(ImageFilter.GaussianBlur(k))
        img.paste(Image.new("RGB", img.size, tuple(int(c * 0.3) for c in colour)), mask=glow)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        draw.polygon(_polygon(scene.shape, o, k), fill=colour)
    return img.resize((SIZE, SIZE), Image.BOX)


def render_array(scenes: Sequence[Scene]) -> np.ndarray:
    """Scenes as a float32 batch in [-1, 1], shape (B, 3, 32, 32)."""
    arr = np.stack([np.asarray(render(s), dtype=np.float32) for s in scenes])  # (B, H, W, 3)
    return (arr / 127.5 - 1.0).transpose(0, 3, 1, 2)


def grid(images: Sequence[Image.Image], cols: int, scale: int = 2) -> Image.Image:
    """Images side by side in rows of ``cols``, each enlarged ``scale`` times (nearest)."""
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * w * scale, rows * h * scale), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im.resize((w * scale, h * scale), Image.NEAREST), ((i % cols) * w * scale, (i // cols) * h * scale))
    return out


def as_dict(scene: Scene) -> dict:
    return asdict(scene)


def prompt_set(seed: int = 0, per_domain: int = 24) -> list[dict]:
    """``per_domain`` distinct captions (template 0) of each domain, half of them with the
    domain's own concept (as the experts' data and the quality script), drawn and shuffled from
    ``seed``: rows of ``prompt``, ``category`` (the domain) and ``description`` (JSON), as
    ``data/prompts/toy.csv``."""
    rng = np.random.default_rng(seed)
    rows = []
    for domain in DOMAINS:
        descs = all_descriptions(domain)
        own = [d for d in descs if is_special(d)]
        common = [d for d in descs if not is_special(d)]
        half = min(per_domain // 2, len(own))
        picked = [own[i] for i in rng.choice(len(own), half, replace=False)]
        picked += [common[i] for i in rng.choice(len(common), min(per_domain - half, len(common)), replace=False)]
        for i in rng.permutation(len(picked)):
            d = picked[i]
            rows.append({"prompt": caption(d), "category": domain, "description": json.dumps(d, sort_keys=True)})
    return rows
