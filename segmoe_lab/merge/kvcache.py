"""Cross-attention key/value caching: project the text embedding once per generation.

A UNet's cross-attention (``attn2``) keys and values are ``to_k`` / ``to_v`` of the text
embedding, which is the same tensor at every denoising step, so :func:`cache_cross_kv`
memoises their outputs for the duration of a ``with`` block. It works for plain UNets and for
merges, where those projections may be :class:`~segmoe_lab.merge.moe.MoELayer` s (whose routing
depends on that same input, so their output is constant too).

A cached output is reused only when the projection is called with the very same tensor object,
unmodified since (checked by identity and its in-place version counter), so a new prompt, a new
batch size or an edited embedding recomputes. Each projection keeps one entry; leaving the block
restores the modules and frees the cache.

Example::

    with cache_cross_kv(pipe) as cache:
        image = pipe("a cat", num_inference_steps=25).images[0]
    cache.hits, cache.misses        # (2 * n_attn2 * 24, 2 * n_attn2)

Not for use inside ``torch.compile``: the lookup is Python-side (compile the UNet without it).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from segmoe_lab.merge.discovery import CROSS_KV_KINDS


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors keep no version counter (and cannot be edited in place)
        return None


@dataclass
class CrossKVCache:
    """Counters and the memo of :func:`cache_cross_kv` (one entry per projection)."""

    entries: dict = field(default_factory=dict)  # id(module) -> (input, version, output)
    hits: int = 0
    misses: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached outputs."""
        return sum(out.numel() * out.element_size() for _, _, out in self.entries.values())

    def call(self, module: nn.Module, forward, x: torch.Tensor, *args, **kwargs):
        key = id(module)
        entry = self.entries.get(key)
        if entry is not None and entry[0] is x and entry[1] == _version(x) and not args and not kwargs:
            self.hits += 1
            return entry[2]
        out = forward(x, *args, **kwargs)
        if not args and not kwargs and not torch.is_grad_enabled():
            self.entries[key] = (x, _version(x), out)  # holding x keeps its id from being reused
        self.misses += 1
        return out


def cross_kv_projections(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every cross-attention ``to_k`` / ``to_v`` of ``unet``."""
    found = []
    for name, module in unet.named_modules():
        for kind in CROSS_KV_KINDS:
            attn, proj = kind.split(".")
            if name.split(".")[-1] == attn and getattr(module, "is_cross_attention", True):
                sub = getattr(module, proj, None)
                if sub is not None:
                    found.append((f"{name}.{proj}", sub))
    return found


@contextmanager
def cache_cross_kv(pipe_or_unet) -> Iterator[CrossKVCache]:
    """Within the block, compute each cross-attention key/value projection once per text embedding.

    Args:
        pipe_or_unet: a diffusers pipeline (its ``unet`` is used) or a ``UNet2DConditionModel``,
            plain or merged.

    Yields:
        :class:`CrossKVCache` with ``hits`` / ``misses`` / ``nbytes``.

    Outputs equal the uncached ones exactly (the same modules run on the same inputs, once).
    Only calls made without gradients are cached.
    """
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    cache = CrossKVCache()
    patched = []
    for _, module in cross_kv_projections(unet):
        previous = module.__dict__.get("forward")  # e.g. an accelerate hook's forward
        inner = module.forward

        def forward(x, *args, _m=module, _f=inner, **kwargs):
            return cache.call(_m, _f, x, *args, **kwargs)

        module.forward = forward
        patched.append((module, previous))
    try:
        yield cache
    finally:
        for module, previous in patched:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        cache.entries.clear()
