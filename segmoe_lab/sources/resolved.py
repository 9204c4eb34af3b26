"""What a source resolves to: local files, their form and where they came from."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ResolvedSource:
    """Local files for a ``source_model`` string.

    Attributes:
        path (`Path`): a diffusers folder (``form="folder"``) or one weights file (``"single_file"``).
        form (`str`): ``"folder"`` or ``"single_file"``.
        origin (`str`): ``"local"``, ``"hub"``, ``"civitai"`` or ``"url"``.
        source (`str`): the string it was resolved from.
        allow_pickle (`bool`): pickled weights were allowed (``allow_ckpt=True``).
    """

    path: Path
    form: Literal["folder", "single_file"]
    origin: Literal["local", "hub", "civitai", "url"]
    source: str = ""
    allow_pickle: bool = False
