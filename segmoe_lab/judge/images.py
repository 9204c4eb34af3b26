"""The image cache of a comparison: one PNG per model x prompt x seed x settings, written atomically.

Two runs may share a cache: each writes under a name of its own (process id and a random part)
and renames into place, so a reader sees a whole image or none, and two runs generating the same
image both write the same bytes. A cached file that does not decode (damaged on disk, or made by
something else) is discarded with a warning and generated again.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
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
        """Whether a whole, decodable image is cached; a damaged one is deleted (and so generated again)."""
        path = self.path(ref, key)
        if not path.is_file():
            return False
        try:
            from PIL import Image

            with Image.open(path) as im:
                im.verify()  # every chunk's checksum, up to the end marker: a cut or altered file fails
        except Exception as err:  # noqa: BLE001 - any decoding failure means the same: regenerate it
            warnings.warn(f"{path}: damaged cached image ({type(err).__name__}); deleted, it will be generated again",
                          stacklevel=2)
            path.unlink(missing_ok=True)
            return False
        return True

    def load(self, ref: ModelRef, key: dict):
        from segmoe_lab.errors import FolderError

        path = self.path(ref, key)
        try:
            return self._read(path)
        except FileNotFoundError:
            raise FolderError(f"{path}: the cached image is missing; run the comparison again to generate it") from None
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a damaged file
            raise FolderError(f"{path}: the cached image is damaged ({type(err).__name__}); delete it and run the "
                              "comparison again to generate it") from None

    @staticmethod
    def _read(path: Path):
        from PIL import Image

        with Image.open(path) as im:
            return im.convert("RGB")  # decodes every pixel: a truncated file fails here

    def clean(self) -> list[Path]:
        """Delete temporary files of runs that crashed (their process is gone); returns them."""
        from segmoe_lab.atomic import _alive

        stale = []
        for tmp in self.root.glob("*/.*.tmp.png"):
            pid = tmp.name.split(".")[2] if tmp.name.count(".") >= 3 else ""
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)
                stale.append(tmp)
        return stale

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
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}.", suffix=".tmp.png", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            image.save(tmp, format="PNG", pnginfo=info)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def _atomic_write_text(path: Path, text: str) -> None:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


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
