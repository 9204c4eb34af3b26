"""The error every source helper raises: a model source that cannot be found, fetched or read.

It lives below the helpers (:mod:`.resolve`, :mod:`.hub`, :mod:`.downloads`, :mod:`.single_file`)
so that none of them imports another just for its error type. The classes themselves are
defined with the rest of the kit's errors in :mod:`segmoe_lab.errors`.
"""
from __future__ import annotations

import os
from pathlib import Path

from segmoe_lab.errors import SourceError, WeightsError

__all__ = ["SourceError", "WeightsError", "CACHE_ENV", "default_cache_dir"]

CACHE_ENV = "SEGMOE_LAB_CACHE"


def default_cache_dir() -> Path:
    """segmoe-lab's own download cache: ``$SEGMOE_LAB_CACHE`` or ``~/.cache/segmoe_lab``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/segmoe_lab").expanduser()
