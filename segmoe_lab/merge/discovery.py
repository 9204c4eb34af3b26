"""Find the MoE sites of a UNet by walking its module tree.

A *site* is one layer that becomes a Mixture-of-Experts layer: a ``to_q``/``to_k``/``to_v``
projection of a transformer block's self- (``attn1``) or cross-attention (``attn2``), or its
feed-forward (``ff``). Sites are keyed by dotted module path, so any ``UNet2DConditionModel``
layout (SD 1.5, SDXL, Vega, SSD-1B, ...) works without block indices written in code.

segmoe 0.0.4 mixes the transformer blocks of the down and up paths and leaves the mid block
alone; that is the default here too (``include_mid=True`` adds the mid block).

Example::

    >>> sites = find_sites(pipe.unet, "attn")
    >>> sites[0].path, sites[0].label
    ('down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q', 'down0.a0.t0 self-q')
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

from torch import nn

ATTN_KINDS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v")
# cross-attention keys and values: their input is the text embedding alone (constant over the
# denoising steps, no image grid), which the recorder and the K/V cache both rely on
CROSS_KV_KINDS = ("attn2.to_k", "attn2.to_v")
FF_KINDS = ("ff",)
KINDS_FOR = {"attn": ATTN_KINDS, "ff": FF_KINDS, "all": FF_KINDS + ATTN_KINDS}
KIND_LABELS = {
    "attn1.to_q": "self-q", "attn1.to_k": "self-k", "attn1.to_v": "self-v",
    "attn2.to_q": "cross-q", "attn2.to_k": "cross-k", "attn2.to_v": "cross-v", "ff": "ff",
}
_BLOCK_RE = re.compile(r"^(down_blocks|up_blocks|mid_block)\.?(\d*)")
_PATH_RE = re.compile(
    r"^(?P<block>down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.(?P<a>\d+)"
    r"\.transformer_blocks\.(?P<t>\d+)\.(?P<kind>ff|attn[12]\.to_[qkv])$"
)


@dataclass(frozen=True)
class Site:
    """One MoE position in a UNet.

    Args:
        path (`str`): dotted module path, e.g. ``"up_blocks.1.attentions.2.transformer_blocks.0.ff"``.
        kind (`str`): one of ``"attn1.to_q"`` ... ``"attn2.to_v"``, ``"ff"``.
        block (`str`): ``"down.<i>"``, ``"mid"`` or ``"up.<i>"``.
        in_features (`int`): width of the site's input (the gate's input width).
        out_features (`int`): width of its output.
    """

    path: str
    kind: str
    block: str
    in_features: int
    out_features: int

    @property
    def label(self) -> str:
        """A short human name: ``"down1.a0.t0 cross-k"``."""
        m = _PATH_RE.match(self.path)
        if m is None:
            return self.path
        return f"{self.block.replace('.', '')}.a{m['a']}.t{m['t']} {KIND_LABELS[self.kind]}"

    @property
    def is_cross_kv(self) -> bool:
        """Input is the text embedding (constant over denoising steps), not the image tokens."""
        return self.kind in CROSS_KV_KINDS


def block_name(path: str) -> str:
    """``"down_blocks.1.attentions..."`` -> ``"down.1"``; ``"mid_block..."`` -> ``"mid"``."""
    m = _BLOCK_RE.match(path)
    if m is None:
        return "other"
    return "mid" if m[1] == "mid_block" else f"{m[1].split('_')[0]}.{m[2]}"


def site_from_path(path: str, in_features: int = 0, out_features: int = 0) -> Site:
    """Rebuild a :class:`Site` from its dotted path (e.g. a key of a saved merge)."""
    m = _PATH_RE.match(path)
    if m is None:
        raise ValueError(f"{path!r} is not a MoE site path (expected ...attentions.<j>.transformer_blocks.<k>.ff|attn1.to_q|...)")
    return Site(path, m["kind"], block_name(path), in_features, out_features)


def _widths(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"cannot find the width of {type(module).__name__}: it holds no nn.Linear")
    return linears[0].in_features, linears[-1].out_features


def transformer_blocks(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every ``BasicTransformerBlock``-like module (has ``attn1`` and ``ff``), by dotted path."""
    for name, module in unet.named_modules():
        if name.split(".")[-2:-1] == ["transformer_blocks"] and hasattr(module, "attn1") and hasattr(module, "ff"):
            yield name, module


def find_sites(unet: nn.Module, moe_layers: str = "attn", include_mid: bool = False) -> list[Site]:
    """List the MoE sites of ``unet`` in module order.

    Args:
        unet (`nn.Module`): a ``UNet2DConditionModel`` (plain, not yet merged).
        moe_layers (`str`, *optional*, defaults to ``"attn"``): ``"attn"``, ``"ff"`` or ``"all"``.
        include_mid (`bool`, *optional*, defaults to `False`): also mix the mid block (segmoe doesn't).
    """
    if moe_layers not in KINDS_FOR:
        raise ValueError(f"moe_layers={moe_layers!r} is not a layer type; choose one of {list(KINDS_FOR)}")
    kinds = KINDS_FOR[moe_layers]
    sites = []
    for block_path, block in transformer_blocks(unet):
        where = block_name(block_path)
        if where == "other" or (where == "mid" and not include_mid):
            continue
        for kind in kinds:
            module = get_module(block, kind, missing_ok=True)
            if module is None:
                continue
            i, o = _widths(module)
            sites.append(Site(f"{block_path}.{kind}", kind, where, i, o))
    if not sites:
        raise ValueError(
            f"found no {moe_layers!r} sites in {type(unet).__name__}: it has no transformer blocks "
            "in its down/up blocks (is this a UNet2DConditionModel?)"
        )
    return sites


def get_module(root: nn.Module, path: str, missing_ok: bool = False):
    """The submodule at a dotted ``path`` (``None`` when missing and ``missing_ok``)."""
    module = root
    for part in path.split("."):
        module = getattr(module, part, None) if not part.isdigit() else module[int(part)]
        if module is None:
            if missing_ok:
                return None
            raise KeyError(f"{type(root).__name__} has no submodule {path!r}")
    return module


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at ``path`` with ``new``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    if leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` on the meta device (its code and shapes), made without reading its weights.

    ``copy.deepcopy(m).to("meta")`` copies every weight first, and a weight mapped from a file is
    read from disk to be copied: a whole-UNet build did that for every site, holding the base UNet
    beside the experts for nothing.
    """
    import torch

    memo = {id(t): nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
            for t in module.parameters()}
    memo.update({id(t): torch.empty_like(t, device="meta") for t in module.buffers()})
    return copy.deepcopy(module, memo)


def tensors_by_site(keys, paths: Sequence[str]) -> dict[str, list[str]]:
    """Site path -> the state-dict ``keys`` under it (in ``keys``' order), in one pass over the keys.

    Example::

        tensors_by_site(unet.state_dict(), ["mid_block.attentions.0.proj_in"])
        # {'mid_block.attentions.0.proj_in': ['mid_block.attentions.0.proj_in.weight', '... .bias']}
    """
    out: dict[str, list[str]] = {p: [] for p in paths}
    for k in keys:
        head = k
        while "." in head:  # a key's nearest enclosing site (sites do not nest)
            head = head.rpartition(".")[0]
            if head in out:
                out[head].append(k)
                break
    return out


def site_prefixes(sites: Sequence[Site]) -> tuple[str, ...]:
    """State-dict key prefixes (``path + "."``) of the sites, for filtering tensors."""
    return tuple(s.path + "." for s in sites)
