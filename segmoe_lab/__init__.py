"""segmoe-lab: build, look inside and judge training-free Mixture-of-Experts merges of Stable Diffusion.

The heavy parts (torch, diffusers) load on first use, so ``import segmoe_lab`` and the config
checks stay fast.
"""
from importlib import import_module

from segmoe_lab import _compat
from segmoe_lab.merge.config import ConfigError, MergeConfig, load_config, parse_config

_compat.install()

__version__ = "0.1.0"

_LAZY = {
    "SegMoEPipeline": "segmoe_lab.merge.pipeline",
    "build_merge": "segmoe_lab.merge.build",
    "load_merge": "segmoe_lab.merge.io",
    "save_merge": "segmoe_lab.merge.io",
    "find_sites": "segmoe_lab.merge.discovery",
    "Site": "segmoe_lab.merge.discovery",
    "MoELayer": "segmoe_lab.merge.moe",
    "record_gates": "segmoe_lab.observe.recording",
    "GateRecording": "segmoe_lab.observe.recording",
    "run_comparison": "segmoe_lab.judge.compare",
    "CompareConfig": "segmoe_lab.judge.compare",
    "cache_cross_kv": "segmoe_lab.merge.kvcache",
    "enable_expert_offload": "segmoe_lab.merge.offload",
}

__all__ = ["ConfigError", "MergeConfig", "load_config", "parse_config", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segmoe_lab' has no attribute {name!r}")
