"""Per-call gate statistics: what one MoE layer's logits say about its routing, reduced per sample."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from segmoe_lab.merge.discovery import Site, block_name, site_from_path
from segmoe_lab.merge.moe import MoELayer
from segmoe_lab.merge.routing import get_routing


def _site_of(path: str, layer: MoELayer) -> Site:
    try:
        return site_from_path(path, layer.hidden_size, layer.out_dim)
    except ValueError:  # a MoE layer outside the usual transformer-block sites
        return Site(path, path.rsplit(".", 1)[-1], block_name(path), layer.hidden_size, layer.out_dim)


def grid_shape(tokens: int, latent_hw: tuple[int, int]) -> Optional[tuple[int, int]]:
    """``(h, w)`` of a site's token grid: the latent ``(H, W)`` downsampled by a power of two
    (stride-2 convolutions round up) so that ``h * w == tokens``; ``None`` if none fits."""
    H, W = latent_hw
    f = 1
    while f <= max(H, W):
        h, w = math.ceil(H / f), math.ceil(W / f)
        if h * w == tokens:
            return h, w
        f *= 2
    return None


def _segments(sizes: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(segment id per token (sum T,), tokens per segment (n,))`` for sites of ``sizes`` tokens laid end to end."""
    counts = torch.tensor(sizes, device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), counts), counts.float()


def _shares(idx: torch.Tensor, seg: torch.Tensor, n: int, E: int) -> torch.Tensor:
    """``(B, n, E)`` token counts per (sample, segment, expert) of expert indices ``idx`` ``(B, sum T, k)``."""
    B = idx.shape[0]
    key = (torch.arange(B, device=idx.device).view(B, 1, 1) * n + seg.view(1, -1, 1)) * E + idx
    return torch.bincount(key.reshape(-1), minlength=B * n * E).view(B, n, E).float()


def call_stats(logits: Sequence[torch.Tensor], top_k: int, routing: str, tokens: bool = False):
    """Reductions over the tokens for ``n`` sites of one UNet call, computed together on their device.

    Args:
        logits (list of `torch.Tensor`): each site's gate logits ``(B, T_i, E)`` (same ``B`` and ``E``).
        top_k (`int`), routing (`str`): the sites' routing; the choice comes from the routing
            registry (:func:`segmoe_lab.merge.routing.get_routing`, the rule :func:`~segmoe_lab.merge.moe.route` applies).
        tokens (`bool`, *optional*, defaults to `False`): also return per-token data.

    Returns:
        ``stats`` ``(n, 4, B, E)``: mean softmax probability, share of tokens with the expert in
        their top-k, share of tokens the routing sent to it, and whether it is in the sample's
        top-k of summed logits; with ``tokens``, also ``(argmax, strongest, probs)``: per token
        ``(B, sum T)`` the most probable expert and the routed expert with the largest mixing
        weight, and ``(B, E, sum T)`` float16 probabilities.
    """
    B, _, E = logits[0].shape
    n = len(logits)
    seg, counts = _segments([t.shape[1] for t in logits], logits[0].device)
    chosen = torch.cat([get_routing(routing).choose(t, top_k) for t in logits], 1)  # (B, sum T, k): the layers' own choice
    L = torch.cat(logits, 1).float()  # (B, sum T, E)
    probs = L.transpose(1, 2).contiguous().softmax(1)  # (B, E, sum T): CPUs reduce a short last dim slowly
    prob_mean = torch.zeros(B, E, n, device=L.device).index_add_(2, seg, probs) / counts  # (B, E, n)
    top = L.argmax(-1, keepdim=True) if top_k == 1 else L.topk(top_k, -1).indices  # (B, sum T, k)
    per_token = _shares(top, seg, n, E) / counts[:, None]  # (B, n, E)
    routed = _shares(chosen, seg, n, E) / counts[:, None]
    sums = torch.zeros(B, n, E, device=L.device).index_add_(1, seg, L)  # (B, n, E) logits summed over tokens
    in_sample = torch.zeros_like(sums).scatter_(-1, sums.topk(top_k, -1).indices, 1.0)
    stats = torch.stack([prob_mean.transpose(1, 2), per_token, routed, in_sample]).permute(2, 0, 1, 3)  # (n, 4, B, E)
    if not tokens:
        return stats, None
    argmax = top[..., 0] if top_k == 1 else L.argmax(-1)  # (B, sum T)
    strongest = chosen.gather(-1, L.gather(-1, chosen).argmax(-1, keepdim=True)).squeeze(-1)  # (B, sum T)
    return stats, (argmax, strongest, probs.half())
