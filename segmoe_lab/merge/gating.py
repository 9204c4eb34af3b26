"""Gate constructions: one ``[num_experts, hidden]`` matrix per MoE site, without training.

Every construction in :data:`GATE_INITS` (the config's ``init``) has one signature,
``init(ctx: GateContext) -> {site path: Tensor[E, hidden]}``, and is registered with
:func:`gate_init`: a new one is one decorated function in this file plus its test. ``hidden`` is SegMoE's method: each expert generates from its own
positive/negative prompt, the input of every MoE site is captured, reduced to one vector and
L2-normalised; row ``i`` of a site's gate is expert ``i``'s vector, so the gate scores a token
by its similarity to what each expert saw for its prompt.
With a list of positive prompts per expert, ``hidden`` averages over the list; ``discriminant``
fits an LDA-style gate (a weight and a per-expert bias) on every prompt's captured input, which
ignores what all experts share (a cosine to raw prototypes does not).

Example::

    rows = capture_hidden(pipe, sites, "a photo", "blurry", GateOptions(method="fast"))  # merge.capture
    gates = get_gate_init("hidden")(GateContext(sites, 2, hidden=[rows, rows_of_expert_1]))
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from segmoe_lab.merge.discovery import Site
from segmoe_lab.merge.moe import iter_moe_layers
from segmoe_lab.registry import Registry

# mergekit-moe warns when a gate matrix's condition number exceeds this: its rows are then
# nearly linearly dependent and the gate cannot tell the experts apart. We apply the threshold to
# the *centred* rows (see routing_condition): a component every row shares adds the same amount to
# every expert's logit, so it cannot change the softmax or the top-k, yet it inflates the plain
# condition number. Hidden-state rows share a large one (the layer's mean activation): on the
# default toy merge 6 of 63 gates had plain condition numbers up to 12 while their centred rows
# stayed below 3.8, i.e. the experts were well apart where it matters for routing.
DEGENERATE_CONDITION = 5.0


@dataclass
class GateContext:
    """What an initialiser may use.

    Args:
        sites (`Sequence[Site]`): the MoE sites, in order.
        num_experts (`int`): rows per gate.
        hidden (`list[dict]`, *optional*): per expert, ``{site.path: Tensor[hidden]}`` from
            :func:`capture_hidden` (averaged over the expert's prompts when it has a list).
        samples (`list[list[dict]]`, *optional*): per expert, one such dict per positive prompt
            (what ``discriminant`` fits on).
        shrinkage (`float`, *optional*, defaults to 0.5): for ``discriminant``.
        seed (`int`, *optional*, defaults to 0): for ``random``.
        dtype (`torch.dtype`, *optional*, defaults to float32).
    """

    sites: Sequence[Site]
    num_experts: int
    hidden: Optional[list[dict[str, torch.Tensor]]] = None
    seed: int = 0
    dtype: torch.dtype = torch.float32
    samples: Optional[list[list[dict[str, torch.Tensor]]]] = None
    shrinkage: float = 0.5


def _normalise(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


# An initialiser returns, per site, the gate's [E, hidden] rows, or (rows, per-expert bias [E]) where a
# bias is needed: a bias cannot fold into segmoe's bias-free gate, so the merge saves it beside.
GateInit = Callable[[GateContext], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class GateConstruction:
    """A registered gate construction (the config's ``init``).

    Args:
        name (`str`): the config value.
        build (`Callable`): ``(ctx: GateContext) -> {site path: Tensor[E, hidden]}``.
        needs_capture (`bool`): it reads each expert's captured site inputs (``ctx.hidden``), so the
            builder loads every expert's whole UNet and generates from its prompts
            (:func:`segmoe_lab.merge.capture.capture_hidden`).
    """

    name: str
    build: GateInit
    needs_capture: bool = False

    def __call__(self, ctx: GateContext) -> dict[str, torch.Tensor]:
        return self.build(ctx)

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.build) or ""


GATE_INITS: Registry[GateConstruction] = Registry("init", "a gate construction")


def gate_init(name: str, needs_capture: bool = False) -> Callable[[GateInit], GateInit]:
    """Register a gate construction as the config's ``init: <name>`` (a decorator)."""

    def register(fn: GateInit) -> GateInit:
        GATE_INITS.add(name, GateConstruction(name, fn, needs_capture))
        return fn

    return register


@gate_init("hidden", needs_capture=True)
def init_hidden(ctx: GateContext) -> dict[str, torch.Tensor]:
    """SegMoE's hidden-state gates: row i = expert i's L2-normalised reduced site input."""
    if not ctx.hidden or len(ctx.hidden) != ctx.num_experts:
        raise ValueError("init='hidden' needs one captured hidden-state dict per expert (see capture_hidden)")
    return {s.path: torch.stack([_normalise(h[s.path].float()) for h in ctx.hidden]).to(ctx.dtype) for s in ctx.sites}


@gate_init("random")
def init_random(ctx: GateContext) -> dict[str, torch.Tensor]:
    """Seeded random unit rows: a baseline with no information about the experts."""
    g = torch.Generator().manual_seed(ctx.seed)
    return {s.path: _normalise(torch.randn(ctx.num_experts, s.in_features, generator=g)).to(ctx.dtype) for s in ctx.sites}


@gate_init("uniform")
def init_uniform(ctx: GateContext) -> dict[str, torch.Tensor]:
    """All-zero gates: every expert gets the same weight, so with ``num_experts_per_tok`` equal
    to the number of experts the merge averages the experts' site outputs (ties in top-k go to
    the lowest expert indices)."""
    return {s.path: torch.zeros(ctx.num_experts, s.in_features, dtype=ctx.dtype) for s in ctx.sites}


def fit_discriminant(groups: Sequence[torch.Tensor], shrinkage: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """LDA with shrinkage: ``(W [E, D], b [E])`` such that ``x @ W.T + b`` scores class membership.

    ``groups[e]`` is ``(n_e, D)``: expert e's samples. With ``mu`` the mean of the class means, the
    score is ``(x - mu)^T S^-1 (mu_e - mu) - 1/2 (mu_e - mu)^T S^-1 (mu_e - mu)`` where ``S`` is the
    pooled within-class covariance shrunk towards ``tr(S)/D * I`` (identity alone when every expert
    has one sample: nearest prototype after subtracting the shared mean). A component shared by all
    experts (or varying within each) gets no weight, which a cosine to raw prototypes cannot do.
    Rows are scaled to unit mean norm (top-1 decisions don't depend on the scale).
    """
    groups = [g.float().reshape(-1, g.shape[-1]) for g in groups]
    means = torch.stack([g.mean(0) for g in groups])  # (E, D)
    mu = means.mean(0)
    resid = torch.cat([g - m for g, m in zip(groups, means)])
    dim = means.shape[1]
    scale = means.sub(mu).pow(2).sum(1).mean().clamp(min=1e-12) / dim
    if resid.shape[0] > len(groups):
        cov = resid.T @ resid / (resid.shape[0] - len(groups))
        scale = (torch.trace(cov) / dim).clamp(min=1e-12)
        cov = (1 - shrinkage) * cov + shrinkage * scale * torch.eye(dim)
    else:
        cov = scale * torch.eye(dim)
    diff = means - mu  # (E, D)
    w = torch.linalg.solve(cov, diff.T).T  # (E, D)
    b = -(w * mu).sum(1) - 0.5 * (w * diff).sum(1)
    norm = w.norm(dim=1).mean().clamp(min=1e-12)
    return w / norm, b / norm


@gate_init("discriminant", needs_capture=True)
def init_discriminant(ctx: GateContext) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per site, an LDA-style gate fitted on the captured inputs of every expert's prompts
    (:func:`fit_discriminant`): a weight and a per-expert bias (saved beside segmoe's gate). Needs
    several prompts per expert to estimate the within-expert spread; with one it is the nearest
    prototype after subtracting the experts' shared mean."""
    samples = ctx.samples or ([[h] for h in ctx.hidden] if ctx.hidden else None)
    if not samples or len(samples) != ctx.num_experts:
        raise ValueError("init='discriminant' needs captured site inputs for every expert's prompts (see capture_hidden)")
    out = {}
    for s in ctx.sites:
        w, b = fit_discriminant([torch.stack([d[s.path] for d in per]) for per in samples], ctx.shrinkage)
        out[s.path] = (w.to(ctx.dtype), b.to(ctx.dtype))
    return out


def get_gate_init(name: str) -> GateConstruction:
    """The construction registered as ``name``; unknown names list the choices."""
    return GATE_INITS.lookup(name)


# --- capturing site inputs -----------------------------------------------------------------


# --- inspecting gates ----------------------------------------------------------------------
def gate_report(unet) -> list[dict]:
    """One dict per MoE layer: site path, max off-diagonal cosine similarity between expert
    rows, the gate matrix's condition number (inf for an all-zero gate; mergekit-moe's measure),
    its :func:`routing_condition` and whether that makes the gate ``degenerate``."""
    report = []
    for path, layer in iter_moe_layers(unet):
        w = layer.gate.weight.detach().float().cpu()
        unit = F.normalize(w, dim=-1)
        cos = unit @ unit.T
        off = cos[~torch.eye(len(w), dtype=torch.bool)]
        sv = torch.linalg.svdvals(w)
        cond = float("inf") if sv[-1] <= 1e-12 else float(sv[0] / sv[-1])
        routing = routing_condition(w)
        report.append({
            "site": path,
            "max_cosine": float(off.max()) if off.numel() else 0.0,
            "condition_number": cond,
            "routing_condition": routing,
            "degenerate": routing > DEGENERATE_CONDITION,
        })
    return report


def routing_condition(weight: torch.Tensor) -> float:
    """Condition number of the gate rows that routing sees: ``weight`` (experts x hidden) minus its
    mean row, over its ``experts - 1`` non-zero singular values (inf when two rows coincide).

    Softmax and top-k depend only on differences between expert logits, so a direction all rows
    share cannot help or hurt routing; this ignores it, unlike the plain condition number. With
    two experts it is 1 unless the rows are (numerically) equal.
    """
    w = weight.detach().float().cpu()
    if len(w) < 2:
        return 1.0
    sv = torch.linalg.svdvals(w - w.mean(dim=0, keepdim=True))[: len(w) - 1]
    scale = float(torch.linalg.svdvals(w)[0]) or 1.0
    return float("inf") if sv[-1] <= 1e-6 * scale else float(sv[0] / sv[-1])


def warn_degenerate(report: list[dict]) -> list[str]:
    """Warn (once, naming the sites) where a gate cannot tell its experts apart."""
    bad = [r["site"] for r in report if r["degenerate"]]
    if bad:
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(
            f"{len(bad)} of {len(report)} gates have a routing condition number (of the expert rows minus "
            f"their mean) above {DEGENERATE_CONDITION:g} and cannot tell their experts apart: {names}. "
            "Give the experts more distinct positive prompts, or use another gate init.",
            stacklevel=2,
        )
    return bad
