"""Compressed experts: each expert's site weights as the base's plus a truncated-SVD low-rank delta.

Fine-tunes of one base differ from it by little, and the difference's spectrum usually decays fast
(the observation behind LoRA, BitDelta and DARE). Every weight of rank >= 2 in an expert's site
(Linear ``(out, in)``; a convolution's ``(out, in, kh, kw)`` folded to ``(out, in*kh*kw)``) is stored
as ``W_e = W_0 + B_e A_e`` with ``B_e A_e`` the truncated SVD of ``W_e - W_0``; the rank per weight
is a fixed ``rank`` or the smallest that keeps an ``energy`` share of the delta's squared
singular values (:class:`~segmoe_lab.merge.config.CompressOptions`), the same for all experts of a
site (the largest any expert needs; the others' extra columns are zero). Vectors (biases, norm
scales) stay full per expert: they are small, and keeping them exact costs nothing at run time.

:class:`LowRankMoELayer` is a :class:`~segmoe_lab.merge.moe.MoELayer` (same gate, routing
policies, ``top_k``): a Linear site runs the base projection once for all experts and adds the
chosen experts' ``B_e(A_e x)`` as one batched product; diffusers' GEGLU feed-forward shares its first
base projection and runs its second once on the experts' mixed hidden states (routing weights sum to
1); any other module (ResNet blocks, norms, ...) runs once per routed expert with its weights
materialised. Expert offload works unchanged: the experts' factors are what moves.

Layers are made by :func:`~segmoe_lab.merge.moe.moe_layer` (this module registers itself there).
State-dict names: ``<site>.gate.weight``, ``<site>.base.<param>`` (``W_0``; dots written ``__``),
``<site>.experts.<i>.{A,B,full}.<param>``.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segmoe_lab.merge.config import CompressOptions
from segmoe_lab.merge.moe import (
    MoELayer,
    Scope,
    _as_3d,
    _eager_cpu,
    _is_geglu_ff,
    check_experts,
    get_routing,
    register_layer_variant,
)


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


def planned_ranks(base_site: nn.Module, target: CompressOptions) -> dict[str, int]:
    """The ranks a fixed-``rank`` target gives each weight of a site (for estimates, before any SVD)."""
    if target.rank is None:
        raise ValueError("compress.energy: the ranks are known only after the SVD; estimate a saved compressed "
                         "merge folder, or give compress.rank")
    return {n: min(target.rank, p.shape[0], p[0].numel()) for n, p in base_site.named_parameters() if p.dim() >= 2}


# --- the layer -----------------------------------------------------------------------------------
GEGLU = ("net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias")


class LowRankMoELayer(MoELayer):
    """A MoE site whose experts are the base's weights plus low-rank deltas (see the module docstring).

    Args:
        base (`nn.Module`): the site's base module; its weights of rank >= 2 become ``W_0`` (its
            vectors are not kept: every expert has its own).
        experts (`Sequence[LowRankExpert]`): one per expert, all of the same ranks.
        gate, top_k, routing: as :class:`~segmoe_lab.merge.moe.MoELayer`.
    """

    def __init__(self, base: nn.Module, experts: Sequence[LowRankExpert], gate: nn.Linear | None = None,
                 top_k: int = 1, routing: str = "segmoe"):
        nn.Module.__init__(self)  # MoELayer's __init__ expects full experts; the shared state is set here
        check_experts(experts, top_k)
        self.policy = get_routing(routing)
        self.experts = nn.ModuleList(experts)
        weights = {n: p for n, p in base.named_parameters() if p.dim() >= 2}
        self.base = nn.ParameterDict({_key(n): nn.Parameter(p.detach(), requires_grad=False) for n, p in weights.items()})
        # the module the weights belong to, on the meta device: its code and shapes, not its weights
        object.__setattr__(self, "_template", copy.deepcopy(base).to("meta"))
        t = self._template
        self.hidden_size = t.in_features if isinstance(t, nn.Linear) else next(t.parameters()).shape[-1]
        self.out_dim = t.out_features if isinstance(t, nn.Linear) else self.hidden_size
        self.kind = "linear" if isinstance(t, nn.Linear) else "geglu" if _is_geglu_ff(t) else "module"
        if gate is None:
            p = next(iter(self.base.values()))
            gate = nn.Linear(self.hidden_size, len(experts), bias=False, device=p.device, dtype=p.dtype)
            nn.init.zeros_(gate.weight)
        self.gate, self.top_k = gate, top_k
        self._linear = self._geglu = False
        self._offload = None
        self.restack()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind}, ranks={self.experts[0].ranks()}"

    def base_weights(self) -> dict[str, torch.Tensor]:
        """``W_0`` by parameter name."""
        return {_name(k): p for k, p in self.base.items()}

    # --- forward -------------------------------------------------------------------------
    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, args: tuple = (),
                    kwargs: Optional[dict] = None, stacks: Optional[dict] = None) -> torch.Tensor:
        s = self.stacks if stacks is None else stacks  # "A.<key>" -> (n, r, in), "B.<key>" -> (n, out, r), "full.<key>"
        if self.kind == "linear":
            return self._run_linear(x, weights, idx, s)
        if self.kind == "geglu":
            return self._run_geglu(x, weights, idx, s)
        from torch.func import functional_call

        def call(e: int, h: torch.Tensor) -> torch.Tensor:
            params = {_name(k[5:]): t[e] for k, t in s.items() if k.startswith("full.")}
            for k, w0 in self.base.items():
                params[_name(k)] = w0 + (s[f"B.{k}"][e] @ s[f"A.{k}"][e]).view(w0.shape)
            return functional_call(self._template, params, (h, *args), kwargs or {})

        return self._forward_modules(x, weights, idx, call, next(iter(s.values())).shape[0])

    def run_one(self, e: int, h: torch.Tensor, args: tuple = (), kwargs: Optional[dict] = None) -> torch.Tensor:
        """Expert ``e`` alone (``segmoe`` top-1 on CPU): base projection plus its low-rank term."""
        ex = self.experts[e]
        if self.kind == "linear":
            bias = ex.full["bias"] if "bias" in ex.full else None
            return F.linear(h, self.base["weight"]) + F.linear(F.linear(h, ex.A["weight"]), ex.B["weight"], bias)
        x = _as_3d(h)
        idx = torch.full((x.shape[0], x.shape[1], 1), e, dtype=torch.long, device=x.device)
        out = self.run_experts(x, x.new_ones(1, 1, 1).expand(*x.shape[:2], 1), idx, args, kwargs)
        return out.reshape(*h.shape[:-1], out.shape[-1])

    def _mixing(self, weights: torch.Tensor, idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, w)``: the factor rows to run and their ``(B, T, len(rows))`` weights. ``segmoe``
        routing runs its k chosen rows; per-sample / per-token routing runs all rows with dense
        weights (zero where not chosen): low-rank terms are cheap enough that gathering costs more."""
        if self.policy.scope is Scope.BATCH:
            return idx[0, 0], weights
        dense = torch.zeros(*idx.shape[:2], n, dtype=weights.dtype, device=weights.device)
        return torch.arange(n, device=idx.device), dense.scatter_(-1, idx, weights)

    def _run_linear(self, x, weights, idx, s):
        w0 = self.base["weight"]
        a_all, b_all, bias = s["A.weight"], s["B.weight"], s.get("full.bias")
        y = F.linear(x, w0)  # the base projection, once for every expert
        if self.policy.scope is Scope.BATCH and idx.shape[-1] == 1 and _eager_cpu(x):
            e = int(idx[0, 0, 0])  # top-1: weight exactly 1; views of the chosen rows, no copy
            return y + F.linear(F.linear(x, a_all[e]), b_all[e], None if bias is None else bias[e])
        rows, w = self._mixing(weights, idx, a_all.shape[0])
        a, b = a_all.index_select(0, rows), b_all.index_select(0, rows)  # (k, r, in), (k, out, r): small
        k, r = a.shape[:2]
        h = F.linear(x, a.reshape(k * r, -1)).unflatten(-1, (k, r)) * w.unsqueeze(-1)  # (B, T, k, r)
        y = y + F.linear(h.flatten(-2), b.transpose(0, 1).reshape(b.shape[1], k * r))
        return y if bias is None else y + w @ bias.index_select(0, rows)

    def _run_geglu(self, x, weights, idx, s):
        w1, w2 = self.base[_key(GEGLU[0])], self.base[_key(GEGLU[2])]
        k1, k2 = _key(GEGLU[0]), _key(GEGLU[2])
        b1_all, b2_all = s[f"full.{_key(GEGLU[1])}"], s[f"full.{_key(GEGLU[3])}"]
        h0 = F.linear(x, w1)  # first base projection, shared by every expert
        if self.policy.scope is Scope.BATCH and idx.shape[-1] == 1 and _eager_cpu(x):
            e = int(idx[0, 0, 0])
            a, g = (h0 + F.linear(F.linear(x, s[f"A.{k1}"][e]), s[f"B.{k1}"][e], b1_all[e])).chunk(2, dim=-1)
            m = a * F.gelu(g)
            return F.linear(m, w2, b2_all[e]) + F.linear(F.linear(m, s[f"A.{k2}"][e]), s[f"B.{k2}"][e])
        rows, w = self._mixing(weights, idx, b1_all.shape[0])
        a1, b1 = s[f"A.{k1}"].index_select(0, rows), s[f"B.{k1}"].index_select(0, rows)
        a2, b2 = s[f"A.{k2}"].index_select(0, rows), s[f"B.{k2}"].index_select(0, rows)
        k, r1 = a1.shape[:2]
        low = torch.einsum("btkr,kor->btko", F.linear(x, a1.reshape(k * r1, -1)).unflatten(-1, (k, r1)), b1)
        a, g = (h0.unsqueeze(2) + low + b1_all.index_select(0, rows)).chunk(2, dim=-1)  # (B, T, k, I) each
        m = a * F.gelu(g) * w.unsqueeze(-1)  # routing weight folded into each expert's hidden state
        out = F.linear(m.sum(2), w2) + w @ b2_all.index_select(0, rows)  # second base projection once, on the mix
        return out + torch.einsum("btkr,kor->bto", torch.einsum("btki,kri->btkr", m, a2), b2)


def decompress_layer(layer: LowRankMoELayer) -> list[nn.Module]:
    """Full expert modules (the template's class) rebuilt from a compressed layer."""
    base = {n: w.detach() for n, w in layer.base_weights().items()}
    out = []
    for e in layer.experts:
        m = copy.deepcopy(layer._template)
        m.load_state_dict(e.materialize(base), assign=True)
        out.append(m)
    return out


def _variant(experts, cfg, gate, base) -> Optional[MoELayer]:
    """:func:`~segmoe_lab.merge.moe.moe_layer`'s hook: compressed experts, or full ones to compress."""
    top_k = min(cfg.num_experts_per_tok, len(experts))
    if isinstance(experts[0], LowRankExpert):
        if base is None:
            raise ValueError("compressed experts need their site's base module (moe_layer(..., base=site))")
        return LowRankMoELayer(base, experts, gate, top_k=top_k, routing=cfg.routing)
    target = getattr(cfg, "compress", None)
    if target is None or base is None:
        return None
    return LowRankMoELayer(base, compress_experts(base, experts, target), gate, top_k=top_k, routing=cfg.routing)


register_layer_variant(_variant)


# --- whole UNets: compress a merged one, or give a compressed one back its full experts ---------
def compress_unet(unet: nn.Module, cfg, base_tensors: Optional[dict[str, torch.Tensor]] = None) -> dict[str, int]:
    """Replace every full :class:`MoELayer` of ``unet`` by its compressed form (``cfg.compress``), in place.

    ``base_tensors`` (UNet tensor name -> ``W_0``) gives each site's base weights; a site missing
    from it uses the mean of its experts (the merge's own centre: exact at full rank, and often
    close to the base, since fine-tunes move little). Returns ``{"base": sites, "mean": sites}``.
    """
    from segmoe_lab.merge.discovery import set_module
    from segmoe_lab.merge.moe import iter_moe_layers, moe_layer

    used = {"base": 0, "mean": 0}
    for path, layer in list(iter_moe_layers(unet)):
        if isinstance(layer, LowRankMoELayer):
            continue
        base = copy.deepcopy(layer.experts[0])
        names = [n for n, _ in base.named_parameters()]
        if base_tensors is not None and all(f"{path}.{n}" in base_tensors for n in names):
            state, used["base"] = {n: base_tensors[f"{path}.{n}"] for n in names}, used["base"] + 1
        else:
            state = {n: torch.stack([e.get_parameter(n).detach() for e in layer.experts]).float().mean(0) for n in names}
            used["mean"] += 1
        base.load_state_dict({n: t.to(layer.gate.weight.dtype) for n, t in state.items()}, assign=True)
        set_module(unet, path, moe_layer(compress_experts(base, layer.experts, cfg.compress), cfg, layer.gate, base=base))
    return used


def decompress_unet(unet: nn.Module, cfg) -> None:
    """Replace every :class:`LowRankMoELayer` of ``unet`` by a full :class:`MoELayer`, in place."""
    from segmoe_lab.merge.discovery import set_module
    from segmoe_lab.merge.moe import iter_moe_layers, moe_layer

    plain = cfg.updated(compress=None)
    for path, layer in list(iter_moe_layers(unet)):
        if isinstance(layer, LowRankMoELayer):
            set_module(unet, path, moe_layer(decompress_layer(layer), plain, layer.gate))


def lowrank_bytes(unet: nn.Module) -> dict[str, int]:
    """Bytes of a merged UNet: ``total``, its ``experts`` (factors, or full experts) and ``base_weights``
    (the compressed sites' ``W_0``)."""
    from segmoe_lab.merge.moe import iter_moe_layers

    def nbytes(ps) -> int:
        return sum(p.numel() * p.element_size() for p in ps)

    layers = [layer for _, layer in iter_moe_layers(unet)]
    return {"total": nbytes(unet.parameters()), "experts": sum(nbytes(l.experts.parameters()) for l in layers),
            "base_weights": sum(nbytes(l.base.parameters()) for l in layers if isinstance(l, LowRankMoELayer))}
