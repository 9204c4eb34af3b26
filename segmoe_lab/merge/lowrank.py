"""Compressed experts: MoE layers whose experts are the base's weights plus low-rank deltas.

Fine-tunes of one base differ from it by little, and the difference's spectrum usually decays fast
(the observation behind LoRA, BitDelta and DARE); :mod:`segmoe_lab.merge.deltas` factors each
expert's weights as ``W_e = W_0 + B_e A_e``. This module runs them:

- :class:`LowRankMoELayer` is a :class:`~segmoe_lab.merge.moe.MoELayer` (segmoe's attention and
  feed-forward sites; same gate, routing policies, ``top_k``): a Linear site runs the base
  projection once for all experts and adds the chosen experts' ``B_e(A_e x)`` as one batched
  product; diffusers' GEGLU feed-forward shares its first base projection and runs its second once
  on the experts' mixed hidden states (routing weights sum to 1); any other module runs once per
  routed expert with its weights materialised. Expert offload works unchanged: the factors move.
- :class:`LowRankSampleMoE` is a :class:`~segmoe_lab.merge.kinds.SampleMoE` (the extra layer kinds:
  ResNet convolutions, ``proj_in``/``proj_out``, time embedding, ``conv_in``/``conv_out`` ...,
  routed once per sample): a Linear or convolution runs the base weight and adds ``B_e(A_e x)``
  (for a convolution ``A_e`` is an ``r``-channel convolution with the base's kernel and ``B_e`` a
  1x1 one). Norms have no matrix to factor and stay full :class:`SampleMoE` layers.

Both are made by the one factory of their kind (:func:`~segmoe_lab.merge.moe.moe_layer`,
:func:`~segmoe_lab.merge.kinds.extra_layer`), where this module registers itself.
State-dict names: ``<site>.gate.weight``, ``<site>.base.<param>`` (``W_0``; dots written ``__``),
``<site>.experts.<i>.{A,B,full}.<param>``.

Example::

    compress_unet(pipe.unet, cfg.updated(compress={"rank": 16}))   # every routed site, in place
    lowrank_bytes(pipe.unet)["experts"]
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segmoe_lab.merge.deltas import LowRankExpert, _key, _name, compress_experts, compressible
from segmoe_lab.merge.discovery import meta_copy, set_module
from segmoe_lab.merge.kinds import (
    SampleMoE,
    _in_features,
    extra_layer,
    iter_extra_layers,
    register_extra_variant,
)
from segmoe_lab.merge.moe import (
    MoELayer,
    Scope,
    _as_3d,
    _eager_cpu,
    _is_geglu_ff,
    check_experts,
    get_routing,
    iter_moe_layers,
    moe_layer,
    register_layer_variant,
    single_expert,
)


# --- the layer -----------------------------------------------------------------------------------
def _with_delta(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, positions: int) -> Optional[torch.Tensor]:
    """``W_0 + B A`` (one ``addmm``) when forming it costs fewer multiply-adds than applying the
    factors at ``positions`` rows, else None. One expert for a whole call (top-1, the switch) then
    runs as one plain product instead of three: on a CPU the dispatch, not the arithmetic, was what
    the low-rank terms cost."""
    out, flat = w0.shape[0], w0[0].numel()
    if out * flat > (out + flat) * positions:
        return None
    return torch.addmm(w0.reshape(out, flat), b, a).view(w0.shape)


def _expert_linear(x: torch.Tensor, w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One expert's Linear on ``x``: ``W_0 + B A`` formed once where that is cheaper, else the base
    projection plus ``B(A x)``."""
    w = _with_delta(w0, a, b, x.numel() // x.shape[-1])
    return F.linear(x, w, bias) if w is not None else F.linear(x, w0) + F.linear(F.linear(x, a), b, bias)

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
        object.__setattr__(self, "_template", meta_copy(base))
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
            return _expert_linear(h, self.base["weight"], ex.A["weight"], ex.B["weight"], bias)
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
        e = single_expert(idx, self.policy.scope) if _eager_cpu(x) else None
        if e is not None:  # top-1, one expert for every row: weight exactly 1; views of its rows (or slots)
            return _expert_linear(x, w0, a_all[e], b_all[e], None if bias is None else bias[e])
        y = F.linear(x, w0)  # the base projection, once for every expert
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
        e = single_expert(idx, self.policy.scope) if _eager_cpu(x) else None
        if e is not None:  # one expert for the call (top-1): its two projections, each run as is cheaper
            a, g = _expert_linear(x, w1, s[f"A.{k1}"][e], s[f"B.{k1}"][e], b1_all[e]).chunk(2, dim=-1)
            return _expert_linear(a * F.gelu(g), w2, s[f"A.{k2}"][e], s[f"B.{k2}"][e], b2_all[e])
        h0 = F.linear(x, w1)  # first base projection, shared by every expert
        rows, w = self._mixing(weights, idx, b1_all.shape[0])
        a1, b1 = s[f"A.{k1}"].index_select(0, rows), s[f"B.{k1}"].index_select(0, rows)
        a2, b2 = s[f"A.{k2}"].index_select(0, rows), s[f"B.{k2}"].index_select(0, rows)
        k, r1 = a1.shape[:2]
        low = torch.einsum("btkr,kor->btko", F.linear(x, a1.reshape(k * r1, -1)).unflatten(-1, (k, r1)), b1)
        a, g = (h0.unsqueeze(2) + low + b1_all.index_select(0, rows)).chunk(2, dim=-1)  # (B, T, k, I) each
        m = a * F.gelu(g) * w.unsqueeze(-1)  # routing weight folded into each expert's hidden state
        out = F.linear(m.sum(2), w2) + w @ b2_all.index_select(0, rows)  # second base projection once, on the mix
        return out + torch.einsum("btkr,kor->bto", torch.einsum("btki,kri->btkr", m, a2), b2)


class LowRankSampleMoE(SampleMoE):
    """An extra-kind site (see the module docstring) whose experts are ``base`` plus low-rank deltas.

    Args:
        base (`nn.Module`): the site's base module (a Linear, a convolution, ...); its weights of
            rank >= 2 become ``W_0``.
        experts (`Sequence[LowRankExpert]`): one per expert, all of the same ranks.
        gate, top_k, routing: as :class:`~segmoe_lab.merge.kinds.SampleMoE`.
    """

    def __init__(self, base: nn.Module, experts: Sequence[LowRankExpert], gate: nn.Linear | None = None,
                 top_k: int = 1, routing: str = "per_sample"):
        nn.Module.__init__(self)  # SampleMoE's __init__ expects full experts
        check_experts(experts, top_k)
        self.experts = nn.ModuleList(experts)
        self.base = nn.ParameterDict({_key(n): nn.Parameter(p.detach(), requires_grad=False)
                                      for n, p in base.named_parameters() if p.dim() >= 2})
        object.__setattr__(self, "_template", meta_copy(base))
        self.hidden_size = _in_features(self._template)
        if gate is None:
            p = next(iter(self.base.values()))
            gate = nn.Linear(self.hidden_size, len(experts), bias=False, device=p.device, dtype=p.dtype)
            nn.init.zeros_(gate.weight)
        if tuple(gate.weight.shape) != (len(experts), self.hidden_size):
            raise ValueError(f"gate weight is {tuple(gate.weight.shape)}, expected ({len(experts)}, {self.hidden_size})")
        self.gate, self.top_k, self.policy = gate, top_k, get_routing(routing)

    def base_weights(self) -> dict[str, torch.Tensor]:
        """``W_0`` by parameter name."""
        return {_name(k): p for k, p in self.base.items()}

    def run_expert(self, e: int, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ex, t = self.experts[e], self._template
        bias = ex.full["bias"] if "bias" in ex.full else None
        if isinstance(t, nn.Linear):
            return _expert_linear(x, self.base["weight"], ex.A["weight"], ex.B["weight"], bias)
        if type(t) is nn.Conv2d and t.groups == 1 and t.padding_mode == "zeros":
            w0 = self.base["weight"]
            positions = x.shape[0] * x[0, 0].numel() // (t.stride[0] * t.stride[1])
            w = _with_delta(w0, ex.A["weight"], ex.B["weight"], positions)
            if w is not None:
                return F.conv2d(x, w, bias, t.stride, t.padding, t.dilation)
            a = ex.A["weight"].view(-1, *w0.shape[1:])  # (r, in*kh*kw) -> an r-channel kernel like W_0's
            y = F.conv2d(x, w0, None, t.stride, t.padding, t.dilation)
            return y + F.conv2d(F.conv2d(x, a, None, t.stride, t.padding, t.dilation), ex.B["weight"][:, :, None, None], bias)
        from torch.func import functional_call

        params = ex.materialize({n: w.detach() for n, w in self.base_weights().items()})
        return functional_call(t, params, (x, *args), kwargs)


def decompress_layer(layer) -> list[nn.Module]:
    """Full expert modules (the template's class) rebuilt from a compressed layer of either kind."""
    base = {n: w.detach() for n, w in layer.base_weights().items()}
    out = []
    for e in layer.experts:
        m = copy.deepcopy(layer._template)
        m.load_state_dict(e.materialize(base), assign=True)
        out.append(m)
    return out


def _variant(cls):
    """A factory hook (``moe_layer``'s or ``extra_layer``'s) that builds ``cls`` for compressed
    experts, or for full ones under ``cfg.compress`` (sites with a matrix to factor)."""
    def hook(experts, cfg, gate, base):
        top_k = min(cfg.num_experts_per_tok, len(experts))
        if isinstance(experts[0], LowRankExpert):
            if base is None:
                raise ValueError("compressed experts need their site's base module (the factory's base=site)")
            return cls(base, experts, gate, top_k=top_k, routing=cfg.routing)
        target = getattr(cfg, "compress", None)
        if target is None or base is None or not compressible(base):
            return None
        return cls(base, compress_experts(base, experts, target), gate, top_k=top_k, routing=cfg.routing)

    return hook


register_layer_variant(_variant(LowRankMoELayer))
register_extra_variant(_variant(LowRankSampleMoE))
_COMPRESSED = (LowRankMoELayer, LowRankSampleMoE)


# --- whole UNets: compress a merged one, or give a compressed one back its full experts ---------
def routed_layers(unet: nn.Module):
    """``(path, layer)`` of every MoE layer of ``unet``: segmoe's sites and the extra kinds."""
    return [*iter_moe_layers(unet), *iter_extra_layers(unet)]


def _factory(layer):
    return extra_layer if isinstance(layer, SampleMoE) else moe_layer


def compress_unet(unet: nn.Module, cfg, base_tensors: Optional[dict[str, torch.Tensor]] = None) -> dict[str, int]:
    """Replace every full MoE layer of ``unet`` (segmoe's sites and extra kinds with a matrix to
    factor) by its compressed form (``cfg.compress``), in place.

    ``base_tensors`` (UNet tensor name -> ``W_0``) gives each site's base weights; a site missing
    from it uses the mean of its experts (the merge's own centre: exact at full rank, and often
    close to the base, since fine-tunes move little). Returns ``{"base": sites, "mean": sites}``.
    """
    used = {"base": 0, "mean": 0}
    for path, layer in routed_layers(unet):
        if isinstance(layer, _COMPRESSED) or not compressible(layer.experts[0]):
            continue
        base = copy.deepcopy(layer.experts[0])
        names = [n for n, _ in base.named_parameters()]
        if base_tensors is not None and all(f"{path}.{n}" in base_tensors for n in names):
            state, used["base"] = {n: base_tensors[f"{path}.{n}"] for n in names}, used["base"] + 1
        else:
            state = {n: torch.stack([e.get_parameter(n).detach() for e in layer.experts]).float().mean(0) for n in names}
            used["mean"] += 1
        base.load_state_dict({n: t.to(layer.gate.weight.dtype) for n, t in state.items()}, assign=True)
        experts = compress_experts(base, layer.experts, cfg.compress)
        set_module(unet, path, _factory(layer)(experts, cfg, layer.gate, base=base))
    return used


def decompress_unet(unet: nn.Module, cfg) -> None:
    """Replace every compressed layer of ``unet`` by its full form, in place."""
    plain = cfg.updated(compress=None)
    for path, layer in routed_layers(unet):
        if isinstance(layer, _COMPRESSED):
            set_module(unet, path, _factory(layer)(decompress_layer(layer), plain, layer.gate))


def lowrank_bytes(unet: nn.Module) -> dict[str, int]:
    """Bytes of a merged UNet: ``total``, its ``experts`` (factors, or full experts) and ``base_weights``
    (the compressed sites' ``W_0``)."""
    def nbytes(ps) -> int:
        return sum(p.numel() * p.element_size() for p in ps)

    layers = [layer for _, layer in routed_layers(unet)]
    return {"total": nbytes(unet.parameters()), "experts": sum(nbytes(l.experts.parameters()) for l in layers),
            "base_weights": sum(nbytes(l.base.parameters()) for l in layers if isinstance(l, _COMPRESSED))}
