"""Deprecated import paths of the flat 0.1 layout (``segmoe_lab.config``, ``segmoe_lab.moe`` ...).

Each old name is an alias of the module that now holds it (the same module object, so patches and
``isinstance`` keep working) and warns once with the new path. Removed in 0.3.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "layouts": "sources.layouts", "downloads": "sources.downloads", "single_file": "sources.single_file",
    "config": "merge.config", "discovery": "merge.discovery", "gating": "merge.gating", "moe": "merge.moe",
    "build": "merge.build", "io": "merge.io", "estimate": "merge.estimate", "offload": "merge.offload",
    "kvcache": "merge.kvcache", "pipeline": "merge.pipeline",
    "recording": "observe.recording", "plots": "observe.plots", "explore": "observe.explore",
    "scoring": "judge.scorers", "compare": "judge.compare", "stats": "judge.stats", "report": "judge.report",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix("segmoe_lab.")
        if fullname.startswith("segmoe_lab.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = "segmoe_lab." + MOVED[spec.name.removeprefix("segmoe_lab.")]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes away in segmoe-lab 0.3",
                      DeprecationWarning, stacklevel=3)
        module = importlib.import_module(new)
        self._spec = module.__spec__  # the import system overwrites __spec__: restore it in exec_module
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
