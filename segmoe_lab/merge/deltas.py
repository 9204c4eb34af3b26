"""The decomposition behind compressed experts: an expert's weights as the base's plus a low-rank delta.

Every weight of rank >= 2 in an expert's site (Linear ``(out, in)``; a convolution's
``(out, in, kh, kw)`` folded to ``(out, in*kh*kw)``) is stored as ``W_e = W_0 + B_e A_e`` with
``B_e A_e`` the truncated SVD of ``W_e - W_0``; the rank per weight is a fixed ``rank`` or the
smallest that keeps an ``energy`` share of the delta's squared singular values
(:class:`~segmoe_lab.merge.config.CompressOptions`), the same for all experts of a site (the
largest any expert needs; the others' extra columns are zero). Vectors (biases, norm scales) stay
full per expert. The layers that run these experts are in :mod:`segmoe_lab.merge.lowrank`.

Example::

    A, B = delta_factors(w0, w_expert, CompressOptions(rank=16))   # w_expert ~ w0 + B @ A
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from segmoe_lab.merge.config import CompressOptions


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


def _name(key: str) -> str:
    return key.replace("__", ".")


# --- the decomposition -------------------------------------------------------------------------
def choose_rank(s: torch.Tensor, target: CompressOptions) -> int:
    """The rank ``target`` asks for, given the delta's singular values ``s`` (descending), at least 1."""
    if target.rank is not None:
        return max(1, min(target.rank, s.numel()))
    energy = s.double().pow(2)
    total = float(energy.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(energy, 0) / total
    return max(1, min(int(torch.searchsorted(kept, torch.tensor(target.energy, dtype=kept.dtype) - 1e-12)) + 1, s.numel()))


def delta_factors(w0: torch.Tensor, we: torch.Tensor, target: CompressOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` the truncated SVD of ``we - w0`` (folded to 2-D), in ``we``'s dtype.

    The singular values are split evenly (``B = U sqrt(S)``, ``A = sqrt(S) V^T``) so neither factor
    carries the whole scale, which keeps bfloat16 factors accurate. A fixed rank well below the
    matrix's size uses a randomised SVD (``torch.svd_lowrank``): at SDXL's 10240 x 1280 that is
    seconds instead of minutes per expert; an energy target needs the whole spectrum.
    """
    d = (we.detach().float() - w0.detach().float()).reshape(we.shape[0], -1)
    full = min(d.shape)
    if target.rank is not None and 4 * target.rank < full:
        u, s, v = torch.svd_lowrank(d, q=min(full, target.rank + 8), niter=4)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = choose_rank(s, target)
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]).to(we.dtype).contiguous(), (u[:, :r] * root).to(we.dtype).contiguous()


class LowRankExpert(nn.Module):
    """One expert of a compressed site: ``A``/``B`` factors per weight and its full vectors.

    Not callable on its own (its layer holds ``W_0``); :meth:`materialize` gives its full weights.
    """

    def __init__(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], full: dict[str, torch.Tensor]):
        super().__init__()
        self.A = nn.ParameterDict({_key(n): nn.Parameter(a, requires_grad=False) for n, (a, _) in factors.items()})
        self.B = nn.ParameterDict({_key(n): nn.Parameter(b, requires_grad=False) for n, (_, b) in factors.items()})
        self.full = nn.ParameterDict({_key(n): nn.Parameter(t, requires_grad=False) for n, t in full.items()})

    def ranks(self) -> dict[str, int]:
        """Weight name -> rank of its delta."""
        return {_name(k): a.shape[0] for k, a in self.A.items()}

    def materialize(self, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The expert's full site tensors, given the base's weights ``W_0`` by name."""
        out = {_name(k): t.detach() for k, t in self.full.items()}
        for k, a in self.A.items():
            w0 = base[_name(k)]
            out[_name(k)] = (w0.float() + (self.B[k].float() @ a.float()).view(w0.shape)).to(w0.dtype)
        return out


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)  # zero rows/columns: the product is unchanged


class SiteCompressor:
    """Compress one site's experts as they arrive (a build streams experts one at a time).

    Example::

        c = SiteCompressor(base_tensors, CompressOptions(rank=16))
        for tensors in expert_site_tensors:
            c.add(tensors)
        experts = c.experts()
    """

    def __init__(self, base: dict[str, torch.Tensor], target: CompressOptions):
        self.base, self.target = base, target
        self._factors: list[dict] = []
        self._full: list[dict] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        factors, full = {}, {}
        for name, t in tensors.items():
            if t.dim() >= 2:
                factors[name] = delta_factors(self.base[name], t, self.target)
            else:
                full[name] = t.detach().clone()
        self._factors.append(factors)
        self._full.append(full)

    def experts(self) -> list[LowRankExpert]:
        """The experts, every weight's rank padded to the largest any expert needed (so they stack)."""
        ranks = {n: max(f[n][0].shape[0] for f in self._factors) for n in self._factors[0]} if self._factors else {}
        out = []
        for factors, full in zip(self._factors, self._full):
            padded = {n: (_pad(a, 0, ranks[n]), _pad(b, 1, ranks[n])) for n, (a, b) in factors.items()}
            out.append(LowRankExpert(padded, full))
        self._factors, self._full = [], []
        return out


def compress_experts(base_site: nn.Module, experts: Sequence[nn.Module], target: CompressOptions) -> list[LowRankExpert]:
    """The compressed form of full ``experts`` of a site whose base module is ``base_site``."""
    c = SiteCompressor({n: p.detach() for n, p in base_site.named_parameters()}, target)
    for e in experts:
        c.add({n: p.detach() for n, p in e.named_parameters()})
    return c.experts()


def skeleton_experts(base_site: nn.Module, n: int, ranks: dict[str, int], device="meta") -> list[LowRankExpert]:
    """``n`` empty experts of the given ranks (to load a saved state dict into, or count on meta)."""
    out = []
    for _ in range(n):
        factors, full = {}, {}
        for name, p in base_site.named_parameters():
            if p.dim() >= 2:
                r = ranks[name]
                factors[name] = (torch.empty(r, p[0].numel(), dtype=p.dtype, device=device),
                                 torch.empty(p.shape[0], r, dtype=p.dtype, device=device))
            else:
                full[name] = torch.empty(p.shape, dtype=p.dtype, device=device)
        out.append(LowRankExpert(factors, full))
    return out


def compressible(module: nn.Module) -> bool:
    """Whether a site has a weight to factor (rank >= 2); a norm's scale and shift do not."""
    return any(p.dim() >= 2 for p in module.parameters())


def planned_ranks(base_site: nn.Module, target: CompressOptions) -> dict[str, int]:
    """The ranks a fixed-``rank`` target gives each weight of a site (for estimates, before any SVD)."""
    if target.rank is None:
        raise ValueError("compress.energy: the ranks are known only after the SVD; estimate a saved compressed "
                         "merge folder, or give compress.rank")
    return {n: min(target.rank, p.shape[0], p[0].numel()) for n, p in base_site.named_parameters() if p.dim() >= 2}
