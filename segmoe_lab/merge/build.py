"""Build a SegMoE merge: base pipeline + expert sites -> one UNet with MoE layers.

Memory is kept to one UNet plus the merged sites: the base pipeline is loaded once; each expert
is read into the base's UNet in place (when its gate rows need a generation, or it has LoRAs to
fuse) or only its site tensors are read from its weights file, a group of sites at a time
(:mod:`segmoe_lab.merge.streaming`); after the experts, the base's own
UNet tensors are streamed back. No expert pipeline is ever loaded whole.

Example::

    pipe = build_merge(load_config("experiments/toy.yaml"))
    pipe("two red circles, neon style").images[0]
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from segmoe_lab import sources
from segmoe_lab.errors import SegMoELabError
from segmoe_lab.merge.capture import capture_hidden
from segmoe_lab.merge.config import LoraConfig, MergeConfig, parse_config
from segmoe_lab.merge.discovery import (
    Site,
    find_sites,
    get_module,
    meta_copy,
    set_module,
    tensors_by_site,
)
from segmoe_lab.merge.gating import (
    GateContext,
    gate_report,
    get_gate_init,
    warn_degenerate,
)
from segmoe_lab.merge import lowrank as _lowrank  # noqa: F401  (importing it registers the compressed layer kinds)
from segmoe_lab.merge.deltas import SiteCompressor, compressible
from segmoe_lab.merge.kinds import extra_layer, find_extra_sites
from segmoe_lab.merge.moe import moe_layer
from segmoe_lab.merge.streaming import _stream_unet_into, read_sites, release_freed_memory
from segmoe_lab.merge.prompt_router import (
    Gate,
    attach_router,
    fit_router,
    pipeline_text_encode,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class MergeError(SegMoELabError, ValueError):
    """A merge that cannot be built (mismatched architectures, a LoRA that does not fit, ...)."""

    kind = "merge error"


@dataclass
class ExpertSpec:
    """One expert as the builder sees it: where its weights are, what to fuse, its prompts."""

    source: str
    positive: str
    negative: str
    loras: list[LoraConfig] = field(default_factory=list)
    positives: list[str] = field(default_factory=list)  # every positive prompt (a list in the config); [positive] if one

    def __post_init__(self):
        self.positives = self.positives or [self.positive]


def expert_specs(cfg: MergeConfig) -> list[ExpertSpec]:
    """The experts of a config, with segmoe's rules for LoRA prompts and the LoRA-only form.

    With ``experts``, each expert's LoRA prompts are appended to its own prompts. Without them
    (segmoe's LoRA-only form), ``num_experts`` copies of the base share the top-level LoRAs,
    split in order into groups of ``ceil(remaining / experts)``.
    """
    if cfg.experts:
        specs = []
        for e in cfg.experts:
            extra = [lora.positive_prompt for lora in e.loras if lora.positive_prompt]
            positives = [" ".join([p] + extra) for p in e.prompts]
            neg = " ".join([e.negative_prompt] + [lora.negative_prompt for lora in e.loras if lora.negative_prompt])
            specs.append(ExpertSpec(e.source_model, positives[0], neg, list(e.loras), positives))
        return specs
    n = cfg.num_experts
    groups: list[list[LoraConfig]] = [[] for _ in range(n)]
    remaining, start, i = len(cfg.loras), 0, 0
    while remaining:
        size = math.ceil(remaining / n)
        groups[i].extend(cfg.loras[start:start + size])
        start, remaining, i = start + size, remaining - size, i + 1
    return [
        ExpertSpec(cfg.base_model, " ".join(l.positive_prompt for l in g), " ".join(l.negative_prompt for l in g), g)
        for g in groups
    ]


def fuse_loras(pipe, loras: list[LoraConfig], what: str) -> None:
    """Fuse LoRAs into ``pipe.unet`` in place (text encoders untouched: the merge keeps the base's)."""
    for j, lora in enumerate(loras):
        res = sources.resolve_source(lora.source_model)
        name = f"lora{j}"
        try:
            with _quiet_diffusers():  # it logs the whole mismatch list before raising; we raise a short one
                pipe.load_lora_weights(str(res.path), adapter_name=name)
        except Exception as err:  # diffusers raises many types for a LoRA that does not fit
            raise MergeError(
                f"{what}: LoRA {lora.source_model} does not fit this model ({_first_lines(err)}). "
                "Use a LoRA trained for the same base architecture (sd vs sdxl)."
            ) from None
        pipe.fuse_lora(components=["unet"], lora_scale=lora.scale, adapter_names=[name])
        pipe.unload_lora_weights()


@contextmanager
def _quiet_diffusers():
    log = logging.getLogger("diffusers")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _first_lines(err: Exception, lines: int = 2, chars: int = 400) -> str:
    """The head of an error whose message may list hundreds of mismatched tensors."""
    text = " ".join(line.strip() for line in str(err).splitlines()[:lines])
    return f"{type(err).__name__}: {text[:chars]}{' ...' if len(str(err)) > len(text) else ''}"


def check_same_architecture(reference: dict[str, torch.Size], candidate: dict[str, torch.Size], what: str) -> None:
    """Raise :class:`MergeError` naming the first tensor where two UNets differ."""
    for name, shape in reference.items():
        other = candidate.get(name)
        if other is None:
            raise MergeError(f"{what} does not have the base's tensor {name}: its UNet architecture differs from the base. "
                             "All experts must be fine-tunes of the same base model (same type: sd or sdxl).")
        if tuple(other) != tuple(shape):
            raise MergeError(f"{what}: tensor {name} is {tuple(other)} but the base's is {tuple(shape)}; "
                             "all experts must be fine-tunes of the same base architecture.")
    extra = sorted(set(candidate) - set(reference))
    if extra:
        raise MergeError(f"{what} has tensor {extra[0]} that the base lacks: its UNet architecture differs from the base.")


def _site_module(base_site: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh module shaped like ``base_site`` holding an expert's tensors."""
    if isinstance(base_site, nn.Linear):
        m = nn.Linear(base_site.in_features, base_site.out_features, bias=base_site.bias is not None,
                      device="meta")
    else:
        m = meta_copy(base_site)
    m.load_state_dict(tensors, assign=True)
    return m


def _load_unet_weights(res, model_type: str, unet: nn.Module, what: str, shapes: dict) -> None:
    """Replace ``unet``'s weights with a source's (same architecture, checked from file headers first)."""
    config = dict(unet.config)
    check_same_architecture(shapes, sources.unet_tensor_shapes(res, model_type, config), what)
    if not _stream_unet_into(res, model_type, config, unet):
        state = sources.read_unet_tensors(res, model_type, config, names=None)
        unet.load_state_dict(state, strict=True)


def _site_tensors(unet: nn.Module, site: Site) -> dict[str, torch.Tensor]:
    # views, not copies: run() copies them into the site's expert stacks before the UNet changes again
    return {k: v.detach() for k, v in get_module(unet, site.path).state_dict().items()}


def _store_expert(stacks: dict[str, torch.Tensor], i: int, n: int, tensors: dict[str, torch.Tensor],
                  device, dtype) -> None:
    """Copy expert ``i``'s site tensors into row ``i`` of ``(n, ...)`` stacks (allocated on first use).

    The MoE layer adopts these rows as its experts' parameters without another copy, so a build
    holds each site's experts once, never a list of copies plus their stack (issue 9).
    """
    for name, t in tensors.items():
        if name not in stacks:
            stacks[name] = torch.empty((n, *t.shape), dtype=dtype, device=device)
        stacks[name][i].copy_(t)


class _Builder:
    def __init__(self, cfg: MergeConfig, device: str, dtype: torch.dtype, progress: bool):
        self.cfg, self.device, self.dtype, self.progress = cfg, device, dtype, progress
        self.gate_init = get_gate_init(cfg.init)

    def load_base(self):
        self.base_res = sources.resolve_source(self.cfg.base_model, model_type=self.cfg.type)
        pipe = sources.load_pipeline(self.base_res, self.cfg.type, torch_dtype=self.dtype)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.base_fused = bool(self.cfg.loras and self.cfg.experts)
        if self.base_fused:
            fuse_loras(pipe, self.cfg.loras, "top-level loras")
        self.pipe = pipe
        self.shapes = {k: v.shape for k, v in pipe.unet.state_dict().items()}
        self.sites = find_sites(pipe.unet, self.cfg.moe_layers, self.cfg.include_mid)
        # extra layer kinds (merge.kinds): read, captured and gated like segmoe's sites, built as SampleMoE
        self.extra = find_extra_sites(pipe.unet, self.cfg.moe_extra)
        self.site_names = tensors_by_site(self.shapes, [s.path for s in (*self.sites, *self.extra)])
        # only needed when an expert must be swapped into the UNet and the base has no file to reread
        self._base_copy = None

    def _needs_full_unet(self, spec: ExpertSpec) -> bool:
        return self.gate_init.needs_capture or bool(spec.loras)

    def read_expert(self, i: int, spec: ExpertSpec) -> tuple[Iterator[tuple[str, dict]], Optional[dict]]:
        """``(path, site tensors)`` of expert ``i``, one site at a time (and its captured hidden rows,
        for ``init=hidden``)."""
        what = f"expert {i} ({spec.source})"
        res = self.base_res if spec.source == self.cfg.base_model else sources.resolve_source(spec.source, model_type=self.cfg.type)
        unet = self.pipe.unet
        if not self._needs_full_unet(spec):
            # shapes first (cheap: file headers), so a mismatch fails before any tensor is read
            check_same_architecture(self.shapes, sources.unet_tensor_shapes(res, self.cfg.type, dict(unet.config)), what)
            return self._read_sites(res), None
        if self.base_fused and self._base_copy is None:
            self._base_copy = {k: v.detach().to("cpu", copy=True) for k, v in unet.state_dict().items()}
        _load_unet_weights(res, self.cfg.type, unet, what, self.shapes)  # streamed: no second UNet in memory
        self.swapped = True
        if spec.loras:
            fuse_loras(self.pipe, spec.loras, what)
        hidden = None
        if self.gate_init.needs_capture:
            # one generation per positive prompt (a single prompt: exactly segmoe's capture)
            hidden = [capture_hidden(self.pipe, [*self.sites, *self.extra], p, spec.negative, self.cfg.gate, seed=self.cfg.seed)
                      for p in spec.positives]
        return ((s.path, _site_tensors(unet, s)) for s in (*self.sites, *self.extra)), hidden

    def _read_sites(self, res) -> Iterator[tuple[str, dict]]:
        return read_sites(res, self.cfg.type, dict(self.pipe.unet.config), self.site_names, self.shapes, self.dtype)

    def restore_base(self) -> None:
        """Put the base's own (non-site) UNet tensors back after experts were swapped in."""
        if self._base_copy is not None:
            self.pipe.unet.load_state_dict(self._base_copy, strict=True)
            self._base_copy = None
            return
        _load_unet_weights(self.base_res, self.cfg.type, self.pipe.unet, "base model", self.shapes)

    def run(self):
        self.swapped = False
        self.load_base()
        specs = expert_specs(self.cfg)
        per_site: dict[str, dict[str, torch.Tensor]] = {s.path: {} for s in (*self.sites, *self.extra)}  # name -> (E, ...) stack
        compressors = self._compressors(specs)
        hidden = []
        with self._scheduler_for_gates():
            for i, spec in enumerate(tqdm(specs, desc="experts", disable=not self.progress)):
                tensors, rows = self.read_expert(i, spec)
                for path, t in tensors:
                    if compressors and path in compressors:  # each delta is factored as it arrives: no full stacks
                        compressors[path].add({n: v.to(self.dtype) for n, v in t.items()})
                    else:
                        _store_expert(per_site[path], i, len(specs), t, self.device, self.dtype)
                del tensors
                release_freed_memory()
                if rows is not None:
                    hidden.append(rows)
        if self.swapped:
            self.restore_base()
        means = [{p: torch.stack([h[p] for h in rows]).mean(0) for p in rows[0]} for rows in hidden] if hidden else None
        ctx = GateContext([*self.sites, *self.extra], len(specs), means, seed=self.cfg.seed, dtype=self.dtype,
                          samples=hidden or None, shrinkage=self.cfg.gate.shrinkage)
        gates = self.gate_init(ctx)
        unet = self.pipe.unet
        for s in tqdm([*self.sites, *self.extra], desc="MoE sites", disable=not self.progress):
            base_site = get_module(unet, s.path)
            stacks = per_site.pop(s.path)
            if compressors and s.path in compressors:  # compressed experts (norms have nothing to factor: full)
                experts = compressors.pop(s.path).experts()
            else:
                experts = [_site_module(base_site, {n: st[i] for n, st in stacks.items()}) for i in range(len(specs))]
            rows, bias = gates[s.path] if isinstance(gates[s.path], tuple) else (gates[s.path], None)
            # a bias cannot fold into segmoe's bias-free gate: Gate keeps it as an offset saved beside
            gate = (Gate(s.in_features, len(specs), bias, device=self.device, dtype=self.dtype) if bias is not None
                    else nn.Linear(s.in_features, len(specs), bias=False, device=self.device, dtype=self.dtype))
            with torch.no_grad():
                gate.weight.copy_(rows)
            layer = (moe_layer if isinstance(s, Site) else extra_layer)(experts, self.cfg, gate, base=base_site)
            set_module(unet, s.path, layer.to(self.device))
        if self.cfg.router == "prompt":
            router = fit_router(pipeline_text_encode(self.pipe), [spec.positives for spec in specs],
                                self.cfg.gate.shrinkage, self.cfg.gate.router_pool)
            attach_router(self.pipe, router)
        self.pipe.scheduler = make_scheduler(self.cfg.scheduler, self.pipe.scheduler)
        return self.pipe

    def _compressors(self, specs: list[ExpertSpec]) -> Optional[dict[str, SiteCompressor]]:
        """Per site, a compressor against the base's site tensors (``cfg.compress``), else None.

        Views of the UNet's own tensors when experts are read from files; a copy of the sites when
        an expert will be swapped into the UNet (gate capture or LoRAs), which overwrites them.
        """
        if self.cfg.compress is None:
            return None
        copy_ = any(self._needs_full_unet(spec) for spec in specs)
        unet = self.pipe.unet
        return {s.path: SiteCompressor({k: v.clone() if copy_ else v for k, v in _site_tensors(unet, s).items()},
                                       self.cfg.compress)
                for s in (*self.sites, *self.extra) if compressible(get_module(unet, s.path))}

    @contextmanager
    def _scheduler_for_gates(self):
        # segmoe generates its gate prompts with DDPM whatever the merge's scheduler is.
        old = self.pipe.scheduler
        if self.gate_init.needs_capture:
            self.pipe.scheduler = make_scheduler("ddpm", old)
        try:
            yield
        finally:
            self.pipe.scheduler = old


def make_scheduler(name: str, current):
    """A scheduler of kind ``name`` built from ``current``'s config (``keep`` keeps it)."""
    import diffusers

    classes = {
        "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler", "dpm": "DPMSolverMultistepScheduler",
        "lms": "LMSDiscreteScheduler", "pndm": "PNDMScheduler", "unipc": "UniPCMultistepScheduler",
    }
    if name == "keep":
        return current
    if name not in classes:
        raise ValueError(f"scheduler={name!r} is not known; choose one of {sorted(classes) + ['keep']}")
    return getattr(diffusers, classes[name]).from_config(current.config)


def build_merge(config, *, device: str = "cpu", torch_dtype: Optional[torch.dtype] = None, progress: bool = True):
    """Build the merged diffusers pipeline described by ``config``.

    Args:
        config (`MergeConfig` or `dict`): the merge (see :mod:`segmoe_lab.merge.config`).
        device (`str`, *optional*, defaults to ``"cpu"``): where to build and run gate prompts.
        torch_dtype (`torch.dtype`, *optional*): defaults to the config's ``dtype``.
        progress (`bool`, *optional*, defaults to `True`): show progress bars.

    Returns:
        The base pipeline (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``) whose
        UNet sites are :class:`~segmoe_lab.merge.moe.MoELayer` s; ``pipe.segmoe_config`` holds the config.
    """
    cfg = parse_config(config)
    dtype = torch_dtype or DTYPES[cfg.dtype]
    with torch.no_grad():
        pipe = _Builder(cfg, device, dtype, progress).run()
    if cfg.router == "none":  # under a prompt router the site gates decide nothing
        warn_degenerate(gate_report(pipe.unet))
    pipe.segmoe_config = cfg
    return pipe
