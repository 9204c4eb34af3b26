"""Stacked expert storage (performance): experts' parameters as rows of one (E, ...) tensor per name, and diffusers' GEGLU feed-forwards run from those stacks as two matmuls."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _rows_of_one_stack(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The ``(E, ...)`` tensor whose consecutive rows ``tensors`` already are (no copy needed), or None."""
    first = tensors[0]
    if first.device.type == "meta" or not first.is_contiguous():
        return None
    storage, n = first.untyped_storage(), first.numel()
    for i, t in enumerate(tensors):
        if (t.untyped_storage().data_ptr() != storage.data_ptr() or t.dtype != first.dtype or t.shape != first.shape
                or not t.is_contiguous() or t.storage_offset() != first.storage_offset() + i * n):
            return None
    return first.new_empty(0).set_(storage, first.storage_offset(), (len(tensors), *first.shape))


def _stackable(experts: Sequence[nn.Module]) -> bool:
    """Same parameter names and shapes in every expert (and no buffers), so they can share stacks."""
    first = [(n, p.shape) for n, p in experts[0].named_parameters()]
    if not first or any(True for _ in experts[0].buffers()):
        return False
    return all([(n, p.shape) for n, p in e.named_parameters()] == first for e in experts[1:])


# parameter names of diffusers' ``FeedForward(activation_fn="geglu")``: net = [GEGLU(proj), Dropout, Linear(, Dropout)]
GEGLU_NAMES = ("net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias")


def _is_geglu_ff(expert: nn.Module) -> bool:
    """diffusers' ``FeedForward`` with a GEGLU activation, biases and no active dropout (SD 1.5 / SDXL's ff)."""
    net = getattr(expert, "net", None)
    if not isinstance(net, nn.ModuleList) or len(net) not in (3, 4):
        return False
    return (type(net[0]).__name__ == "GEGLU" and isinstance(getattr(net[0], "proj", None), nn.Linear)
            and isinstance(net[2], nn.Linear)
            and all(isinstance(m, nn.Dropout) and m.p == 0 for i, m in enumerate(net) if i in (1, 3))
            and {n for n, _ in expert.named_parameters()} == set(GEGLU_NAMES))


def _forward_geglu(x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, stacks: dict) -> torch.Tensor:
    """The same k GEGLU feed-forwards for every token (``segmoe`` routing), as two matmuls.

    ``sum_j w_j * (geglu(x W1_j^T + b1_j) W2_j^T + b2_j)``: the first matmul runs the k experts'
    concatenated input projections; the routing weight is folded into the hidden activations so
    the second matmul sums over experts in its reduction dimension.
    """
    B, T, C = x.shape
    k = chosen.shape[0]
    w1_all, b1_all, w2_all, b2_all = (stacks[n] for n in GEGLU_NAMES)
    if _eager_cpu(x):  # the k experts one by one, on views of their rows (top-1: weight exactly 1)
        if k == 1:
            a, g = F.linear(x, w1_all[int(chosen[0])], b1_all[int(chosen[0])]).chunk(2, dim=-1)
            return F.linear(a * F.gelu(g), w2_all[int(chosen[0])], b2_all[int(chosen[0])])
        out = None
        for j, e in enumerate(chosen.tolist()):
            a, g = F.linear(x, w1_all[e], b1_all[e]).chunk(2, dim=-1)
            y = weights[..., j : j + 1] * F.linear(a * F.gelu(g), w2_all[e], b2_all[e])
            out = y if out is None else out + y
        return out
    w1, b1 = w1_all.index_select(0, chosen), b1_all.index_select(0, chosen)  # (k, 2I, C), (k, 2I)
    two_i = w1.shape[1]
    h = F.linear(x, w1.reshape(k * two_i, C), b1.reshape(k * two_i)).view(B, T, k, two_i)
    a, g = h.chunk(2, dim=-1)  # (B, T, k, I) each
    h = a * F.gelu(g) * weights.unsqueeze(-1)  # (B, T, k, I), routing weight folded in
    w2 = w2_all.index_select(0, chosen)  # (k, C, I)
    out = F.linear(h.reshape(B, T, k * (two_i // 2)), w2.transpose(0, 1).reshape(C, k * (two_i // 2)))  # (B, T, C)
    return out + weights @ b2_all.index_select(0, chosen)  # (B, T, k) @ (k, C)


def _eager_cpu(x: torch.Tensor) -> bool:
    """Whether to index expert stacks with Python ints (views) instead of copying the chosen rows.

    On CPU a host sync is free and copying the chosen weights costs more than one fused matmul
    saves (measured in ``benchmarks/inference.py``); on accelerators, and under ``torch.compile``,
    the tensor-indexed single-matmul path runs without a host sync or graph break.
    """
    return x.device.type == "cpu" and not torch.compiler.is_compiling()
