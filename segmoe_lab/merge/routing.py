"""Routing policies: which experts a MoE layer runs, chosen from its gate logits.

Every policy is one function ``choose(logits (B, T, E), top_k) -> idx (B, T, k)`` registered with
:func:`routing_policy`, plus its :class:`Scope`: how far one choice reaches. The scope is all that
the MoE layer and expert offload need to know to run a policy fast (one matmul over the chosen
experts for the whole batch, one per sample, or every expert on its own tokens), so a new policy
is one decorated function in this file plus its test; nothing else compares policy names.

The config's ``routing`` choices are the keys of :data:`ROUTINGS`.

Example::

    @routing_policy("per_sample_last", Scope.SAMPLE)
    def per_sample_last(logits, top_k):
        \"\"\"Each sample's top-k from its last token's logits.\"\"\"
        return logits[:, -1:].topk(top_k, dim=-1).indices.expand(-1, logits.shape[1], -1)
"""
from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

from segmoe_lab.registry import Registry

# This module imports no torch (it only calls tensor methods), so the config can read the
# registry's names on a machine that only validates configs.


class Scope(enum.Enum):
    """How far one routing decision reaches."""

    BATCH = "batch"  # one choice of k experts for every token of the whole batch
    SAMPLE = "sample"  # one choice per batch item, shared by its tokens
    TOKEN = "token"  # a choice per token


@dataclass(frozen=True)
class RoutingPolicy:
    """A registered routing policy.

    Args:
        name (`str`): the config's ``routing`` value.
        choose (`Callable`): ``(logits (B, T, E), top_k) -> idx (B, T, k)``; for ``BATCH`` and
            ``SAMPLE`` scopes ``idx`` may be a broadcast view.
        scope (`Scope`): how far one choice reaches.
    """

    name: str
    choose: Callable
    scope: Scope
    # the dims ``choose`` sums the logits over before choosing (a bias-free gate commutes with that
    # sum, so MoELayer may choose from the gate of the summed input); None: it needs every logit
    sums_over: Optional[tuple] = None

    @property
    def doc(self) -> str:
        """The policy's docstring: what a user reads in ``segmoe-lab validate`` and the README."""
        return inspect.getdoc(self.choose) or ""


ROUTINGS: Registry[RoutingPolicy] = Registry("routing", "a routing policy")


def routing_policy(name: str, scope: Scope, sums_over: Optional[tuple] = None) -> Callable:
    """Register ``choose`` as the routing policy ``name`` (a decorator)."""

    def register(choose: Callable) -> Callable:
        ROUTINGS.add(name, RoutingPolicy(name, choose, scope, sums_over))
        return choose

    return register


def get_routing(name: str) -> RoutingPolicy:
    """The policy registered as ``name``; an unknown name lists the choices."""
    return ROUTINGS.lookup(name)


@routing_policy("segmoe", Scope.BATCH, sums_over=(0, 1))
def choose_segmoe(logits, top_k: int):
    """segmoe 0.0.4's rule: the top-k experts of the gate logits summed over every token of the
    whole batch (both halves of classifier-free guidance included), shared by all tokens."""
    B, T, E = logits.shape
    idx = logits.sum(dim=(0, 1)).topk(top_k).indices  # (k,)
    return idx.view(1, 1, top_k).expand(B, T, top_k)


@routing_policy("per_sample", Scope.SAMPLE, sums_over=(1,))
def choose_per_sample(logits, top_k: int):
    """Each batch item chooses its own top-k from its logits summed over its tokens."""
    B, T, E = logits.shape
    idx = logits.sum(dim=1).topk(top_k, dim=-1).indices  # (B, k)
    return idx.unsqueeze(1).expand(B, T, top_k)


@routing_policy("per_token", Scope.TOKEN)
def choose_per_token(logits, top_k: int):
    """Mixtral-style: every token chooses its own top-k."""
    return logits.topk(top_k, dim=-1).indices  # (B, T, k)


def single_expert(idx: "torch.Tensor", scope: Scope) -> Optional[int]:
    """The one expert every row and token chose, when top-1 routing chose only one (its softmax
    weight is then exactly 1), else None. A whole-UNet switch under guidance is the common case:
    both halves of the batch follow their prompt's decision. Not checked for per-sample or
    per-token policies while ``torch.compile`` traces (the check reads the indices back)."""
    if idx.shape[-1] != 1:
        return None
    if scope is Scope.BATCH:
        return int(idx[0, 0, 0])
    import torch  # here, not at the top: the config reads this module's registry without torch

    if torch.compiler.is_compiling():
        return None
    first = idx.reshape(-1)[0]
    return int(first) if bool((idx == first).all()) else None
