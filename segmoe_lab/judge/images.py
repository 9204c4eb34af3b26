"""The image cache of a comparison: one PNG per model x prompt x seed x settings, written atomically."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

Settings = dict  # the JSON-able generation settings that key a cached image


@dataclass(frozen=True)
class ModelRef:
    """One model of a comparison: ``merge``, ``base``, ``expert_<i>``, a variant merge (``uniform`` ...) or a reference
    model (``control``), and what fixes its images."""

    name: str
    kind: Literal["merge", "base", "expert", "variant", "reference"]
    fingerprint: str
    detail: dict = field(default_factory=dict, hash=False, compare=False)
    index: Optional[int] = None  # expert index


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class ImageCache:
    """PNG files under ``root/<fingerprint>/<key hash>.png``, one per (model, prompt, seed, settings)."""

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)

    def path(self, ref: ModelRef, key: dict) -> Path:
        return self.root / ref.fingerprint[:20] / f"{_hash(key)[:32]}.png"

    def has(self, ref: ModelRef, key: dict) -> bool:
        return self.path(ref, key).is_file()

    def load(self, ref: ModelRef, key: dict):
        from PIL import Image

        with Image.open(self.path(ref, key)) as im:
            return im.convert("RGB")

    def save(self, ref: ModelRef, key: dict, image) -> Path:
        """Write atomically (a temporary file, then rename), with the key in the PNG's text."""
        from PIL.PngImagePlugin import PngInfo

        path = self.path(ref, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = path.parent / "model.json"
        if not meta.is_file():
            _atomic_write_text(meta, json.dumps({"name": ref.name, "kind": ref.kind, "detail": ref.detail}, indent=2, default=str))
        info = PngInfo()
        info.add_text("segmoe_lab", json.dumps(key, sort_keys=True))
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
        image.save(tmp, pnginfo=info)
        os.replace(tmp, path)
        return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def image_key(prompt: str, seed: int, settings: Settings) -> dict:
    """What fixes one image of a model: prompt, seed and the generation settings."""
    return {"prompt": prompt, "seed": int(seed), **settings}


def generate_image(pipe, prompt: str, seed: int, settings: Settings):
    """One image, seeded with a CPU generator (the same latents on every device)."""
    import torch

    kwargs = {k: settings[k] for k in ("height", "width") if settings.get(k)}
    out = pipe(prompt, negative_prompt=settings["negative_prompt"] or None, num_inference_steps=settings["steps"],
               guidance_scale=settings["guidance_scale"], generator=torch.Generator("cpu").manual_seed(int(seed)), **kwargs)
    return out.images[0]


def default_cache_dir() -> Path:
    """``$SEGMOE_LAB_CACHE/images`` (default ``~/.cache/segmoe_lab/images``)."""
    from segmoe_lab.sources import default_cache_dir as root

    return root() / "images"
