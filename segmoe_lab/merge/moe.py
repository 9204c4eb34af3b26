"""The sparse Mixture-of-Experts layer, and the one factory that makes it from a site and a config.

:class:`MoELayer` wraps the experts of one site (see :mod:`segmoe_lab.merge.discovery`) and a gate
``Linear(hidden, n_experts, bias=False)``; its state-dict names are segmoe's
(``gate.weight``, ``experts.<i>.<param>``), so merges load in both packages. Which experts run is
its routing policy's choice (:mod:`segmoe_lab.merge.routing`); each token then mixes the chosen k
with a softmax over their logits. The layer runs a policy by its :class:`~segmoe_lab.merge.routing.Scope`
alone, never by its name. Build, load, estimate and the benchmarks all make layers with
:func:`moe_layer`.

Every expert's parameters are views into per-name ``(E, ...)`` stacks (:attr:`MoELayer.stacks`). On
accelerators and under ``torch.compile`` the chosen experts of a Linear site run as one matmul over
the stacked rows, and diffusers' GEGLU feed-forwards under ``segmoe`` routing as two (tensor
indices, no ``.tolist()``: the layer compiles without graph breaks). In eager mode on CPU, where a
host sync is free and copying the chosen rows is not, each chosen expert runs on a view of its row.
:mod:`segmoe_lab.merge.offload` swaps in device copies of only the chosen experts' rows.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segmoe_lab.merge.routing import ROUTINGS, RoutingPolicy, Scope, get_routing, single_expert  # noqa: F401  (re-exported)
from segmoe_lab.merge.stacks import (
    _eager_cpu,
    _forward_geglu,
    _is_geglu_ff,
    _rows_of_one_stack,
    _stackable,
)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    # (B, T, C) as every transformer-block site sees it; other ranks are folded into tokens.
    if x.dim() == 3:
        return x
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def route(logits: torch.Tensor, top_k: int, routing: str | RoutingPolicy = "segmoe") -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts and their mixing weights from gate logits.

    Args:
        logits (`torch.Tensor`): ``(B, T, E)`` gate outputs.
        top_k (`int`): experts per token.
        routing (`str` or `RoutingPolicy`, *optional*, defaults to ``"segmoe"``): a policy or a key of
            :data:`~segmoe_lab.merge.routing.ROUTINGS`.

    Returns:
        ``(weights, idx)``, both ``(B, T, k)``: softmax over the chosen experts' logits (float32)
        and their indices. For ``segmoe`` / ``per_sample`` ``idx`` is a broadcast view of a
        ``(k,)`` / ``(B, k)`` choice.
    """
    policy = get_routing(routing) if isinstance(routing, str) else routing
    idx = policy.choose(logits, top_k)
    weights = F.softmax(torch.gather(logits, -1, idx).float(), dim=-1)
    return weights, idx


# --- stacked expert storage (performance; issue 9) -------------------------------------------


def check_experts(experts: Sequence[nn.Module], top_k: int) -> None:
    """At least one expert, and ``1 <= top_k <= len(experts)`` (every MoE layer class checks this)."""
    if not experts:
        raise ValueError("a MoE layer needs at least one expert")
    if not 1 <= top_k <= len(experts):
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({len(experts)})")


def _decided(gate: nn.Module, top_k: int, batch: int) -> Optional[int]:
    """The expert a gate following the prompt router has already chosen for every row of the batch
    (top-1 only), else None (:meth:`~segmoe_lab.merge.prompt_router.Gate.decision`)."""
    decision = getattr(gate, "decision", None)
    return decision(batch) if decision is not None and top_k == 1 else None


def _plain_gate(gate: nn.Module) -> bool:
    """segmoe's bias-free ``nn.Linear`` gate with no hooks: only then do the logits commute with a sum
    over tokens (a gate with an offset, a prompt router or a recording hook must see every token)."""
    return (type(gate) is nn.Linear and gate.bias is None and not gate._forward_hooks
            and not gate._forward_pre_hooks)


class MoELayer(nn.Module):
    """A sparse MoE layer replacing one UNet site.

    Args:
        experts (`Sequence[nn.Module]`): one module per expert, all of one architecture
            (taken as they are, not copied).
        gate (`nn.Linear`, *optional*): ``Linear(hidden, n_experts, bias=False)``; a zero gate
            (uniform routing) when omitted.
        top_k (`int`, *optional*, defaults to 1): experts mixed per token.
        routing (`str`, *optional*, defaults to ``"segmoe"``): a key of :data:`~segmoe_lab.merge.routing.ROUTINGS`.

    Linear experts are held as views into one ``(E, out, in)`` stack, so the chosen k run as a
    single matmul (on CPU in eager mode: one by one on views of their rows); other experts
    (feed-forwards) run once each on the tokens routed to them, except diffusers' GEGLU
    feed-forwards under ``segmoe`` routing, which run from their stacks too.
    """

    def __init__(self, experts: Sequence[nn.Module], gate: nn.Linear | None = None, top_k: int = 1, routing: str = "segmoe"):
        super().__init__()
        check_experts(experts, top_k)
        self.policy = get_routing(routing)
        self.experts = nn.ModuleList(experts)
        first = experts[0]
        self.hidden_size = first.in_features if isinstance(first, nn.Linear) else next(first.parameters()).shape[-1]
        self.out_dim = first.out_features if isinstance(first, nn.Linear) else self.hidden_size
        if gate is None:
            p = next(first.parameters())
            gate = nn.Linear(self.hidden_size, len(experts), bias=False, device=p.device, dtype=p.dtype)
            nn.init.zeros_(gate.weight)
        if tuple(gate.weight.shape) != (len(experts), self.hidden_size):
            raise ValueError(f"gate weight is {tuple(gate.weight.shape)}, expected ({len(experts)}, {self.hidden_size})")
        self.gate = gate
        self.top_k = top_k
        self._linear = all(isinstance(e, nn.Linear) for e in experts)
        self._geglu = not self._linear and all(_is_geglu_ff(e) for e in experts)
        self._offload = None  # an offload.SiteOffload while expert offload is on (segmoe_lab.merge.offload)
        self.restack()

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def routing(self) -> str:
        """The name of the layer's routing policy (set it to switch policy)."""
        return self.policy.name

    @routing.setter
    def routing(self, name: str) -> None:
        self.policy = get_routing(name)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, routing={self.routing!r}"

    # --- stacked storage for the experts -------------------------------------------------
    def restack(self) -> None:
        """Make every expert parameter a view into one ``(E, ...)`` stack per parameter name.

        Linear experts always stack (``_w`` is ``(E, out, in)``, ``_b`` ``(E, out)``); other experts
        stack when all have the same parameters and no buffers (``stacks`` is ``None`` otherwise).
        Parameters that already are consecutive rows of one tensor (a builder that filled a stack,
        or a restack after a no-op ``.to()``) are adopted without a copy.
        """
        self._w = self._b = None
        self.stacks: Optional[dict[str, torch.Tensor]] = None
        if not (self._linear or _stackable(self.experts)):
            return
        stacks = {}
        with torch.no_grad():
            for name, _ in self.experts[0].named_parameters():
                params = [e.get_parameter(name) for e in self.experts]
                stack = _rows_of_one_stack([p.data for p in params])
                if stack is None:
                    stack = torch.stack([p.data for p in params])
                for i, p in enumerate(params):
                    p.data = stack[i]
                stacks[name] = stack  # not registered: the experts' views carry the state dict
        self.stacks = stacks
        if self._linear:
            self._w = stacks["weight"]  # (E, out, in)
            self._b = stacks.get("bias")  # (E, out) or None

    def _apply(self, fn, recurse=True):
        # .to() / .half() replace each parameter separately, which unties the stacked views.
        super()._apply(fn, recurse)
        self.restack()
        return self

    # --- forward -----------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        e = _decided(self.gate, self.top_k, hidden_states.shape[0]) if self._offload is None else None
        if e is not None:  # the prompt router chose one expert for the whole batch (top-1): run it alone
            return self.run_one(e, hidden_states, args, kwargs)
        e = self._the_one_expert(hidden_states)
        if e is not None:  # segmoe top-1 on CPU: the chosen expert alone, as a plain module call
            return self.run_one(e, hidden_states, args, kwargs)
        shape = hidden_states.shape
        x = _as_3d(hidden_states)  # (B, T, C)
        weights, idx = self._route(x)
        if self._offload is not None:  # expert offload: device copies of the chosen experts only
            out = self._offload.run(self, x, weights, idx, args, kwargs)
        else:
            out = self.run_experts(x, weights, idx, args, kwargs)
        return out.reshape(*shape[:-1], out.shape[-1])

    def _the_one_expert(self, h: torch.Tensor) -> Optional[int]:
        """The expert a ``segmoe`` top-1 layer runs for the whole batch (eager CPU, no offload, no gate
        hooks), or None. Per-call dispatch, not arithmetic, is what a small site spends its time
        on there: this path adds four small ops to the expert's own (sum, matvec, top-1, item)."""
        gate = self.gate
        if (self.top_k != 1 or self.policy.sums_over != (0, 1) or self._offload is not None or not _eager_cpu(h)
                or not _plain_gate(gate)):
            return None
        return int(torch.mv(gate.weight, h.reshape(-1, h.shape[-1]).sum(0)).topk(1).indices)

    def run_one(self, e: int, h: torch.Tensor, args: tuple = (), kwargs: Optional[dict] = None) -> torch.Tensor:
        """Expert ``e`` alone on ``h`` (any shape), with routing weight 1."""
        return self.experts[e](h, *args, **(kwargs or {}))

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights in x's dtype, idx)``, both ``(B, T, k)``, as :func:`route` gives them.

        A policy that sums logits over tokens (``segmoe``, ``per_sample``) chooses from the gate of
        the summed input instead: a bias-free gate commutes with the sum, so one ``(E, C)`` product
        replaces a ``(B*T, C) x (C, E)`` one (a skinny matmul that cost more than its multiply-adds
        on CPU); only the k chosen rows then run per token, and top-1 needs none (its weight is 1).
        Hooks on the gate (recording) see every token's logits: the full path runs for them.
        """
        dims, gate = self.policy.sums_over, self.gate
        if dims is None or not _plain_gate(gate):
            weights, idx = route(gate(x), self.top_k, self.policy)
            return weights.to(x.dtype), idx
        B, T, _ = x.shape
        idx = self.policy.choose(gate(x.sum(dim=dims, keepdim=True)), self.top_k).expand(B, T, self.top_k)
        if self.top_k == 1:
            return x.new_ones(1, 1, 1).expand(B, T, 1), idx
        logits = torch.bmm(x, gate.weight[idx[:, 0]].transpose(1, 2))  # (B, T, k): the chosen experts' rows only
        return F.softmax(logits.float(), dim=-1).to(x.dtype), idx

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, args: tuple = (),
                    kwargs: Optional[dict] = None, stacks: Optional[dict] = None) -> torch.Tensor:
        """Mix the routed experts on ``x`` (B, T, C).

        ``stacks`` (name -> ``(S, ...)`` tensors) replaces the layer's own expert stacks, with
        ``idx`` indexing its rows (expert offload passes device slots here).
        """
        kwargs = kwargs or {}
        if self._linear:
            w, b = (self._w, self._b) if stacks is None else (stacks["weight"], stacks.get("bias"))
            return self._forward_linear(x, weights, idx, w, b)
        if self._geglu and self.policy.scope is Scope.BATCH:
            return _forward_geglu(x, weights, idx[0, 0], self.stacks if stacks is None else stacks)
        if stacks is None:
            return self._forward_modules(x, weights, idx, lambda e, h: self.experts[e](h, *args, **kwargs), self.num_experts)
        from torch.func import functional_call

        template, rows = self.experts[0], next(iter(stacks.values())).shape[0]
        return self._forward_modules(
            x, weights, idx, lambda e, h: functional_call(template, {n: t[e] for n, t in stacks.items()}, (h, *args), kwargs),
            rows)

    def _forward_linear(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                        w_all: Optional[torch.Tensor] = None, b_all: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, C = x.shape
        if w_all is None:
            w_all, b_all = self._w, self._b
        k, E, out_dim = self.top_k, w_all.shape[0], w_all.shape[1]
        if _eager_cpu(x):  # each routed expert once, on views of its rows (per_token: on its tokens only)
            def call(e: int, h: torch.Tensor) -> torch.Tensor:
                return F.linear(h, w_all[e], None if b_all is None else b_all[e])

            return self._forward_modules(x, weights, idx, call, E)
        scope = self.policy.scope
        if scope is Scope.BATCH:
            chosen = idx[0, 0]  # (k,)
            w = w_all.index_select(0, chosen).reshape(k * out_dim, C)
            y = F.linear(x, w).view(B, T, k, out_dim)
            b = None if b_all is None else b_all.index_select(0, chosen)  # (k, out)
        elif scope is Scope.SAMPLE:
            chosen = idx[:, 0]  # (B, k)
            w = w_all[chosen].reshape(B, k * out_dim, C)
            y = torch.bmm(x, w.transpose(1, 2)).view(B, T, k, out_dim)
            b = None if b_all is None else b_all[chosen]  # (B, k, out)
        else:  # Scope.TOKEN: every expert on every token, then keep each token's chosen k
            y_all = F.linear(x, w_all.reshape(E * out_dim, C)).view(B, T, E, out_dim)
            y = torch.gather(y_all, 2, idx.unsqueeze(-1).expand(B, T, k, out_dim))
            b = None if b_all is None else b_all[idx]  # (B, T, k, out)
        out = torch.einsum("btk,btko->bto", weights, y)
        if b is not None:
            if b.dim() == 2:
                out = out + weights @ b
            elif b.dim() == 3:
                out = out + torch.bmm(weights, b)
            else:
                out = out + torch.einsum("btk,btko->bto", weights, b)
        return out

    def _forward_modules(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                         call: Callable[[int, torch.Tensor], torch.Tensor], n: int) -> torch.Tensor:
        # call(e, h): expert e (a row of idx's index space, of size n) on tokens h
        B, T, C = x.shape
        e = single_expert(idx, self.policy.scope)
        if e is not None:  # top-1, one expert for every row: its weight is exactly 1, no gather or scatter
            return call(e, x)
        if self.policy.scope is Scope.BATCH:
            out = None
            for j, e in enumerate(idx[0, 0].tolist()):
                y = weights[..., j : j + 1] * call(e, x)
                out = y if out is None else out + y
            return out
        # SAMPLE / TOKEN scope: dense (B, T, E) mixing weights, each expert runs on its rows only
        dense = torch.zeros(B, T, n, dtype=x.dtype, device=x.device).scatter_(-1, idx, weights)
        member = torch.zeros(B, T, n, dtype=torch.bool, device=x.device).scatter_(-1, idx, True)
        out = None
        if self.policy.scope is Scope.SAMPLE:
            used = member[:, 0, :]  # (B, E)
            for e in torch.nonzero(used.any(0)).flatten().tolist():
                rows = used[:, e]
                y = call(e, x[rows]) * dense[rows, :, e : e + 1]
                if out is None:
                    out = x.new_zeros(B, T, y.shape[-1])
                out[rows] += y
            return out
        flat_x, flat_w, flat_m = x.reshape(B * T, C), dense.reshape(B * T, -1), member.reshape(B * T, -1)
        for e in torch.nonzero(flat_m.any(0)).flatten().tolist():
            rows = torch.nonzero(flat_m[:, e]).flatten()
            y = call(e, flat_x[rows].unsqueeze(0)).squeeze(0) * flat_w[rows, e : e + 1]
            if out is None:
                out = x.new_zeros(B * T, y.shape[-1])
            out.index_add_(0, rows, y)
        return out.view(B, T, -1)


def iter_moe_layers(module: nn.Module) -> Iterator[tuple[str, MoELayer]]:
    """Every :class:`MoELayer` inside ``module``, with its dotted path."""
    for name, m in module.named_modules():
        if isinstance(m, MoELayer):
            yield name, m


def set_routing(module: nn.Module, routing: str | None = None, top_k: int | None = None) -> None:
    """Change the routing policy and/or ``top_k`` of every MoE layer in ``module`` in place."""
    policy = None if routing is None else get_routing(routing)
    for _, layer in iter_moe_layers(module):
        if policy is not None:
            layer.policy = policy
        if top_k is not None:
            if not 1 <= top_k <= layer.num_experts:
                raise ValueError(f"top_k={top_k} must be between 1 and {layer.num_experts}")
            layer.top_k = top_k


# Other layer kinds a config can ask for (merge.lowrank: compressed experts) register a hook here
# rather than being imported by this module, so they can build on MoELayer without an import cycle.
# A hook is ``fn(experts, cfg, gate, base) -> MoELayer | None`` (None: not its kind).
LAYER_VARIANTS: list[Callable] = []


def register_layer_variant(fn: Callable) -> Callable:
    """Add a layer kind to :func:`moe_layer` (see :data:`LAYER_VARIANTS`)."""
    LAYER_VARIANTS.append(fn)
    return fn


def moe_layer(experts: Sequence[nn.Module], cfg, gate: nn.Linear | None = None, base: nn.Module | None = None) -> MoELayer:
    """The MoE layer of one site for a merge config: its experts, ``cfg``'s ``num_experts_per_tok``
    and ``routing``, and ``gate`` (a zero gate when omitted, to be loaded or initialised later).

    ``base`` is the site's base module: with ``cfg.compress`` set (or experts already compressed),
    :mod:`segmoe_lab.merge.lowrank` stores the experts as ``base`` + low-rank deltas.

    The one place a config becomes a layer: build, load, estimate and the benchmarks call it.

    Example::

        layer = moe_layer([copy.deepcopy(site) for _ in range(cfg.num_experts)], cfg)
    """
    return build_layer(LAYER_VARIANTS, MoELayer, experts, cfg, gate, base)


def build_layer(variants: Sequence[Callable], plain: type, experts, cfg, gate, base) -> nn.Module:
    """The first registered variant's layer for these experts, else ``plain(experts, gate, top_k,
    routing)`` (the body of both layer factories: :func:`moe_layer` and ``kinds.extra_layer``)."""
    if getattr(cfg, "compress", None) is not None and not variants:
        raise RuntimeError("cfg.compress needs segmoe_lab.merge.lowrank imported (it registers compressed layers)")
    for variant in variants:
        layer = variant(experts, cfg, gate, base)
        if layer is not None:
            return layer
    # a saved merge may hold fewer experts at a site than the config's top-k (segmoe clips too)
    return plain(experts, gate, top_k=min(cfg.num_experts_per_tok, len(experts)), routing=cfg.routing)
