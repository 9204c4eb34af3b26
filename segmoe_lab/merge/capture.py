"""Capturing what each MoE site sees while an expert generates from its own prompts: the data that gate constructions such as ``hidden`` are built from."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from segmoe_lab.merge.config import GateOptions
from segmoe_lab.merge.discovery import Site, get_module


def _reduce(h: torch.Tensor, how: str, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    # h: (B, T, C) -> (B, C); a convolution's or norm's (B, C, H, W) input: its H*W positions are the tokens
    h = h.flatten(2).transpose(1, 2) if h.dim() == 4 else h.reshape(h.shape[0], -1, h.shape[-1])
    if how == "real" and counts is not None and len(counts) == h.shape[0]:
        from segmoe_lab.merge.prompt_router import pool_text

        return pool_text(h, counts, "real")
    return h[:, -1] if how == "last" else h.mean(dim=1)


@contextmanager
def _capture_inputs(unet, sites: Sequence[Site], how: str, keep: str, counts: Optional[torch.Tensor] = None) -> Iterator[dict]:
    """Hook every site; store its reduced input per call: the last one or the running sum.
    ``counts``: real tokens per batch row, used by ``how="real"`` at cross-attention k/v sites."""
    store: dict[str, list] = {}
    kv = {s.path for s in sites if s.is_cross_kv}

    def make_hook(path):
        def hook(module, args, output):
            r = _reduce(args[0].detach(), how, counts if path in kv else None).float()  # (B, C)
            if keep == "last" or path not in store:
                store[path] = [r, 1]
            else:
                store[path][0] = store[path][0] + r
                store[path][1] += 1
        return hook

    handles = [get_module(unet, s.path).register_forward_hook(make_hook(s.path)) for s in sites]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_hidden(pipe, sites: Sequence[Site], positive: str, negative: str, options: GateOptions, seed: int = 0) -> dict[str, torch.Tensor]:
    """Generate once from ``positive``/``negative`` and return one vector per site.

    ``options.method == "exact"`` reproduces segmoe 0.0.4: a ``steps``-step generation whose
    last step's input is kept, the conditional half of the guidance batch, reduced over tokens.
    ``"fast"`` runs ``probe_steps`` steps and averages over them. With ``negative="subtract"``
    the unconditional (negative-prompt) half is subtracted from the conditional one.
    The UNet is run only by this one generation; the VAE decode is skipped.
    """
    exact = options.method == "exact"
    steps = options.steps if exact else options.probe_steps
    kwargs = {"num_inference_steps": steps, "output_type": "latent", "negative_prompt": negative}
    if options.guidance_scale is not None:
        kwargs["guidance_scale"] = options.guidance_scale
    if options.height:
        kwargs["height"] = options.height
    if options.width:
        kwargs["width"] = options.width
    generator = torch.Generator(device="cpu").manual_seed(seed)
    counts = None
    if options.reduce == "real":  # real tokens of [negative, positive], the guidance batch's order
        from segmoe_lab.merge.prompt_router import pipeline_text_encode

        _, both = pipeline_text_encode(pipe)([negative or "", positive])
        guided = (options.guidance_scale if options.guidance_scale is not None else 7.5) > 1
        counts = both if guided else both[1:]
    with _capture_inputs(pipe.unet, sites, options.reduce, "last" if exact else "sum", counts) as store:
        pipe(positive, generator=generator, **kwargs)
    rows = {}
    for s in sites:
        if s.path not in store:
            raise RuntimeError(f"site {s.path} was never called during the gate-initialisation generation")
        total, count = store[s.path]
        r = total / count  # (B, C): B == 2 under guidance (negative half first), else 1
        if options.negative == "subtract" and r.shape[0] > 1:
            rows[s.path] = r[-1] - r[0]
        else:
            rows[s.path] = r[-1]
    return rows
