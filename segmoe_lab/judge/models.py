"""The models of a comparison: fingerprints that key their images, and one loader that holds one pipeline at a time."""
from __future__ import annotations

import gc
import warnings
from pathlib import Path
from typing import Optional, Union

from segmoe_lab.judge.clip_weights import folder_fingerprint
from segmoe_lab.judge.images import ModelRef, _hash
from segmoe_lab.merge.config import MergeConfig, load_config, parse_config

MODEL_GROUPS = ("merge", "base", "experts")


def _source_signature(source: str, model_type: str) -> dict:
    """What identifies a source's weights: its resolved path and its files' names, sizes and times."""
    from segmoe_lab.sources import resolve_source

    res = resolve_source(source, model_type=model_type)
    sig = folder_fingerprint(res.path) if res.path.is_dir() else f"{res.path.stat().st_size}:{res.path.stat().st_mtime_ns}"
    return {"source": source, "path": str(res.path), "files": sig}


def resolve_merge(merge: Union[str, Path, MergeConfig, dict]) -> tuple[MergeConfig, Optional[Path]]:
    """``(config, folder)`` of a merge given as ``"toy"``, a config (object, dict, YAML) or a merge folder."""
    if isinstance(merge, (MergeConfig, dict)):
        return parse_config(merge), None
    if str(merge) == "toy":
        from segmoe_lab import toy

        return toy.merge_config(), None
    path = Path(merge)
    if path.is_file():
        return load_config(path), None
    from segmoe_lab.merge.io import read_merge_config
    from segmoe_lab.sources import resolve_source

    folder = path if path.is_dir() else resolve_source(str(merge)).path
    return read_merge_config(folder)[1], folder


def model_refs(cfg: MergeConfig, folder: Optional[Path] = None, models=MODEL_GROUPS) -> list[ModelRef]:
    """The merge, the base and each expert as :class:`ModelRef` s, fingerprinted from their weights."""
    from segmoe_lab.merge.build import expert_specs

    specs = expert_specs(cfg)
    loras = [*cfg.loras, *(lora for e in cfg.experts for lora in e.loras)]
    sources = sorted({cfg.base_model, *(s.source for s in specs), *(lora.source_model for lora in loras)})
    sig = {s: _source_signature(s, cfg.type) for s in sources}
    lora_sig = lambda loras: [{**sig[lora.source_model], "scale": lora.scale} for lora in loras]  # noqa: E731
    base_fused = cfg.loras if cfg.loras and cfg.experts else []  # top-level LoRAs are fused into the base, as build does
    base = {"base": sig[cfg.base_model], "loras": lora_sig(base_fused)}
    if folder is not None:
        merge = {"folder": str(folder), "files": folder_fingerprint(folder)}
    else:
        merge = {"config": cfg.model_dump(mode="json"), "sources": sig}
    refs = [ModelRef("merge", "merge", _hash(["merge", merge]), merge)]
    if "base" in models:
        refs.append(ModelRef("base", "base", _hash(["base", base]), base))
    unknown = sorted(set(m for m in models if m.startswith("expert_")) - {f"expert_{i}" for i in range(len(specs))})
    if unknown:
        raise ValueError(f"models {unknown}: this merge has experts expert_0 .. expert_{len(specs) - 1}")
    for i, spec in enumerate(specs):
        if "experts" in models or f"expert_{i}" in models:
            detail = {"base": sig[cfg.base_model], "unet": sig[spec.source], "loras": lora_sig(spec.loras)}
            refs.append(ModelRef(f"expert_{i}", "expert", _hash(["expert", detail]), detail, i))
    return refs


def variant_refs(merges: dict, routes: bool = True) -> list[ModelRef]:
    """The internal merges of a :class:`~segmoe_lab.judge.variants.VariantPlan` (``{name: MergeConfig}``) as refs of
    kind ``variant``; a variant's images are keyed by its config and its sources' files, as a config merge's are."""
    out = []
    for name, cfg in merges.items():
        ref = model_refs(cfg, None, ["merge"])[0]
        out.append(ModelRef(name, "variant", ref.fingerprint, ref.detail))
    return out


def reference_refs(cfg: MergeConfig, references: dict[str, str]) -> list[ModelRef]:
    """Extra full models judged like experts (``{"control": "path/to/unet source"}``): the base pipeline with that
    UNet swapped in. An expert with the same source has the same fingerprint, so they share images."""
    base = {"base": _source_signature(cfg.base_model, cfg.type), "loras": []}
    if cfg.loras and cfg.experts:
        raise ValueError("references: merges with top-level LoRAs fuse them into every model; not supported here")
    out = []
    for name, source in references.items():
        detail = {"base": base["base"], "unet": _source_signature(source, cfg.type), "loras": []}
        out.append(ModelRef(name, "reference", _hash(["expert", detail]), detail))
    return out


class ModelLoader:
    """Holds one pipeline at a time: the merge, or the base pipeline with a base/expert UNet swapped in."""

    def __init__(self, cfg: MergeConfig, folder: Optional[Path], device: str, dtype, scheduler: str):
        self.cfg, self.folder, self.device, self.dtype, self.scheduler = cfg, folder, device, dtype, scheduler
        self.pipe, self.holds, self.unet_of = None, None, None

    def release(self) -> None:
        import torch

        self.pipe = self.holds = self.unet_of = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def get(self, ref: ModelRef):
        """The diffusers pipeline that generates ``ref``'s images."""
        from segmoe_lab.merge.build import make_scheduler

        if ref.kind in ("merge", "variant"):
            if self.holds != ref.name:
                from segmoe_lab.merge.pipeline import SegMoEPipeline

                self.release()
                what = (self.folder or self.cfg) if ref.kind == "merge" else MergeConfig.model_validate(ref.detail["config"])
                with warnings.catch_warnings():
                    if ref.kind == "variant":  # baselines' gates are degenerate by design (zeros, one row, random)
                        warnings.filterwarnings("ignore", message=".*condition number.*")
                    self.pipe = SegMoEPipeline(what, device=self.device, torch_dtype=self.dtype, progress=False).pipe
                self.holds = ref.name
        else:
            self._plain(ref)
        self.pipe.scheduler = make_scheduler(self.scheduler, self.pipe.scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        return self.pipe

    def _plain(self, ref: ModelRef) -> None:
        from segmoe_lab import sources
        from segmoe_lab.merge.build import expert_specs, fuse_loras

        cfg = self.cfg
        if self.holds != "plain":
            self.release()
            base = sources.resolve_source(cfg.base_model, model_type=cfg.type)
            self.pipe = sources.load_pipeline(base, cfg.type, torch_dtype=self.dtype).to(self.device)
            self.holds, self.unet_of = "plain", "base"
            if cfg.loras and cfg.experts:
                fuse_loras(self.pipe, cfg.loras, "top-level loras")
        if self.unet_of == ref.name:
            return
        spec = expert_specs(cfg)[ref.index] if ref.kind == "expert" else None
        source = spec.source if spec else (ref.detail["unet"]["source"] if ref.kind == "reference" else cfg.base_model)
        res = sources.resolve_source(source, model_type=cfg.type)
        unet = self.pipe.unet
        state = sources.load_unet_state_dict(res, cfg.type, dict(unet.config))
        unet.load_state_dict({k: v.to(self.dtype) for k, v in state.items()}, strict=True)
        del state
        loras = spec.loras if spec else (cfg.loras if cfg.loras and cfg.experts else [])
        if loras:
            fuse_loras(self.pipe, loras, ref.name)
        self.unet_of = ref.name
