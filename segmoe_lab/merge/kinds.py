"""MoE beyond attention and feed-forward: more layer kinds, routed once per sample.

segmoe mixes only the ``to_q/to_k/to_v`` projections and feed-forwards of transformer blocks
(:mod:`segmoe_lab.merge.discovery`). What the experts learned elsewhere (ResNet convolutions,
norms, ``proj_in``/``proj_out``, the time embedding ...) then comes from the base. The config's
``moe_extra`` list adds these kinds (:data:`EXTRA_KINDS`); their sites are found by walking the
module tree (parents recognised by their attributes, never by block indices) and become
:class:`SampleMoE` layers: a gate ``Linear(channels, E)`` scores the input *pooled over its spatial
positions/tokens*, so each sample makes one decision per site (a convolution's output cannot be
mixed token by token the way a Linear's can, and a norm sees statistics of the whole map).

Extra kinds cover the whole UNet, the mid block included. ``moe_extra: [all]`` lists every kind;
with ``moe_layers: all``, ``include_mid: true`` and ``router: prompt`` every parameterised layer
follows one prompt-level decision: the **whole-UNet switch** (top-1 runs exactly the chosen expert's
UNet for each sample; see :mod:`segmoe_lab.merge.prompt_router`).

Example::

    sites = find_extra_sites(pipe.unet, ["resnet", "norm"])
    sites[0].path, sites[0].kind         # ('conv_in' ...) / ('down_blocks.0.attentions.0.norm', 'norm')
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segmoe_lab.merge.discovery import block_name, transformer_blocks
from segmoe_lab.merge.moe import build_layer
from segmoe_lab.merge.routing import Scope, get_routing, single_expert

# kind -> what it holds (the config's moe_extra choices; "all" expands to every kind)
EXTRA_KINDS = {
    "resnet": "ResNet blocks' conv1, conv2, conv_shortcut and time_emb_proj",
    "proj": "proj_in / proj_out of transformer models",
    "attn_out": "attention output projections (to_out.0) of transformer blocks",
    "norm": "every GroupNorm / LayerNorm with an affine weight",
    "time": "the time embedding's linear_1 / linear_2",
    "io": "conv_in, conv_out and the down/up samplers' convolutions",
}
_RESNET_LEAVES = ("conv1", "conv2", "conv_shortcut", "time_emb_proj")


@dataclass(frozen=True)
class ExtraSite:
    """One layer of an extra kind: dotted ``path``, ``kind`` (a key of :data:`EXTRA_KINDS`),
    ``block`` (``down.<i>``/``mid``/``up.<i>``/``other``) and ``in_features`` (the gate's width:
    the layer's input channels)."""

    path: str
    kind: str
    block: str
    in_features: int

    @property
    def label(self) -> str:
        return f"{self.path} ({self.kind})"

    @property
    def is_cross_kv(self) -> bool:
        return False


def expand_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """``["all"]`` -> every kind; otherwise the kinds in :data:`EXTRA_KINDS` order (unknown ones raise)."""
    kinds = list(kinds)
    bad = [k for k in kinds if k != "all" and k not in EXTRA_KINDS]
    if bad:
        raise ValueError(f"moe_extra: {bad} not layer kinds; choose from {sorted(EXTRA_KINDS) + ['all']}")
    return tuple(k for k in EXTRA_KINDS if "all" in kinds or k in kinds)


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    raise TypeError(f"{type(module).__name__} is not a layer an extra kind can hold")


def _kind_of(path: str, module: nn.Module, parent: nn.Module) -> str | None:
    leaf = path.rsplit(".", 1)[-1]
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        return "norm" if getattr(module, "weight", None) is not None else None
    if path.startswith("time_embedding.") and isinstance(module, nn.Linear):
        return "time"
    if leaf in _RESNET_LEAVES and all(hasattr(parent, a) for a in ("conv1", "conv2", "norm1")):
        return "resnet"
    if leaf in ("proj_in", "proj_out") and hasattr(parent, "transformer_blocks"):
        return "proj"
    if path.endswith(".to_out.0") and isinstance(module, nn.Linear):
        return "attn_out"
    if path in ("conv_in", "conv_out") or (leaf == "conv" and path.split(".")[-3] in ("downsamplers", "upsamplers")):
        return "io"
    return None


def find_extra_sites(unet: nn.Module, kinds: Iterable[str]) -> list[ExtraSite]:
    """The layers of ``kinds`` in ``unet`` (plain or merged; MoE layers already there are skipped),
    in module order. Every layer of a kind anywhere in the UNet counts, the mid block included."""
    want = set(expand_kinds(kinds))
    if not want:
        return []
    modules = dict(unet.named_modules())
    inside_blocks = {p for p, _ in transformer_blocks(unet)}
    sites = []
    for path, module in modules.items():
        if not path or any(True for _ in module.children()) or not any(True for _ in module.parameters(recurse=False)):
            continue
        if ".experts." in path or path.endswith(".gate"):
            continue  # inside a MoE layer already
        parent = modules[path.rpartition(".")[0]] if "." in path else unet
        kind = _kind_of(path, module, parent)
        if kind == "attn_out" and not any(path.startswith(b + ".") for b in inside_blocks):
            kind = None
        if kind in want:
            sites.append(ExtraSite(path, kind, block_name(path), _in_features(module)))
    return sites


def pool(x: torch.Tensor) -> torch.Tensor:
    """One vector per sample: (B, C, H, W) averaged over H, W; (B, T, C) over T; (B, C) as is."""
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 3:
        return x.mean(dim=1)
    return x


class SampleMoE(nn.Module):
    """A MoE layer over any module kind, routed once per sample (or once per batch under a
    ``BATCH``-scope policy such as ``segmoe``) from its pooled input.

    State-dict names follow :class:`~segmoe_lab.merge.moe.MoELayer` (``gate.weight``,
    ``experts.<i>.<param>``). Each chosen expert runs on the rows routed to it; outputs mix with a
    softmax over the chosen experts' logits.
    """

    def __init__(self, experts: Sequence[nn.Module], gate: nn.Linear | None = None, top_k: int = 1,
                 routing: str = "per_sample"):
        super().__init__()
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({len(experts)})")
        self.experts = nn.ModuleList(experts)
        self.hidden_size = _in_features(experts[0])
        if gate is None:
            p = next(experts[0].parameters())
            gate = nn.Linear(self.hidden_size, len(experts), bias=False, device=p.device, dtype=p.dtype)
            nn.init.zeros_(gate.weight)
        if tuple(gate.weight.shape) != (len(experts), self.hidden_size):
            raise ValueError(f"gate weight is {tuple(gate.weight.shape)}, expected ({len(experts)}, {self.hidden_size})")
        self.gate, self.top_k, self.policy = gate, top_k, get_routing(routing)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, routing={self.policy.name!r}"

    def run_expert(self, e: int, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Expert ``e`` on the rows ``x`` routed to it (compressed layers override this)."""
        return self.experts[e](x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        decision = getattr(self.gate, "decision", None)  # the prompt router's one choice for the batch
        e = decision(x.shape[0]) if decision is not None and self.top_k == 1 else None
        if e is not None:
            return self.run_expert(e, x, *args, **kwargs)
        logits = self.gate(pool(x).unsqueeze(1))  # (B, 1, E)
        idx = self.policy.choose(logits, self.top_k)  # (B, 1, k)
        weights = F.softmax(torch.gather(logits, -1, idx).float(), dim=-1).to(x.dtype)
        one = single_expert(idx, self.policy.scope)
        if one is not None:  # top-1 and one expert for the whole batch (a switch under guidance): weight 1
            return self.run_expert(one, x, *args, **kwargs)
        if self.policy.scope is Scope.BATCH or x.shape[0] == 1:
            out = None
            for j, e in enumerate(idx[0, 0].tolist()):
                y = self.run_expert(e, x, *args, **kwargs)
                y = y if self.top_k == 1 else y * weights[0, 0, j]
                out = y if out is None else out + y
            return out
        B = x.shape[0]
        dense = torch.zeros(B, self.num_experts, dtype=x.dtype, device=x.device).scatter_(-1, idx[:, 0], weights[:, 0])
        out = None
        for e in torch.unique(idx[:, 0]).tolist():
            rows = (idx[:, 0] == e).any(-1)
            y = self.run_expert(e, x[rows], *args, **kwargs)
            w = dense[rows, e].view(-1, *([1] * (y.dim() - 1)))
            if out is None:
                out = y.new_zeros((B, *y.shape[1:]))
            out[rows] += y * w
        return out


# Compressed experts (merge.lowrank) register a hook here instead of being imported (that would be
# a cycle): ``fn(experts, cfg, gate, base) -> SampleMoE | None`` (None: not its kind).
EXTRA_VARIANTS: list[Callable] = []


def register_extra_variant(fn: Callable) -> Callable:
    """Add a layer variant to :func:`extra_layer` (see :data:`EXTRA_VARIANTS`)."""
    EXTRA_VARIANTS.append(fn)
    return fn


def extra_layer(experts: Sequence[nn.Module], cfg, gate: nn.Linear | None = None,
                base: nn.Module | None = None) -> SampleMoE:
    """The :class:`SampleMoE` of one extra site for a merge config (its top-k and routing); the
    one factory for extra sites, used by build, load and estimate. ``base`` is the site's base
    module: with ``cfg.compress`` (or experts already compressed) the experts become ``base`` plus
    low-rank deltas (:mod:`segmoe_lab.merge.lowrank`).

    Example::

        layer = extra_layer([copy.deepcopy(conv) for _ in range(cfg.num_experts)], cfg)
    """
    return build_layer(EXTRA_VARIANTS, SampleMoE, experts, cfg, gate, base)


def iter_extra_layers(module: nn.Module):
    """Every :class:`SampleMoE` inside ``module``, with its dotted path."""
    for name, m in module.named_modules():
        if isinstance(m, SampleMoE):
            yield name, m
