"""segmoe-lab: build, look inside and judge training-free Mixture-of-Experts merges of Stable Diffusion.

The heavy parts (torch, diffusers) load on first use, so ``import segmoe_lab`` and the config
checks stay fast.
"""
from importlib import import_module

from .config import ConfigError, MergeConfig, load_config, parse_config

__version__ = "0.1.0"

_LAZY = {
    "SegMoEPipeline": "segmoe_lab.pipeline",
    "build_merge": "segmoe_lab.build",
    "load_merge": "segmoe_lab.io",
    "save_merge": "segmoe_lab.io",
    "find_sites": "segmoe_lab.discovery",
    "Site": "segmoe_lab.discovery",
    "MoELayer": "segmoe_lab.moe",
    "record_gates": "segmoe_lab.recording",
    "GateRecording": "segmoe_lab.recording",
    "run_comparison": "segmoe_lab.compare",
    "CompareConfig": "segmoe_lab.compare",
    "cache_cross_kv": "segmoe_lab.kvcache",
    "enable_expert_offload": "segmoe_lab.offload",
}

__all__ = ["ConfigError", "MergeConfig", "load_config", "parse_config", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segmoe_lab' has no attribute {name!r}")
