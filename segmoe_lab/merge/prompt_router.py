"""The prompt-level router (config ``router: prompt``) and the gate module that can follow it.

segmoe's gates decide site by site from what each site sees; the image-token sites see mostly
shared content, and the cross-attention k/v sites see the text *with its padding* and follow content
words. The prompt router makes **one decision per sample for every site**: it pools the prompt's text embedding (over all positions, ``gate.router_pool: mean``, the default;
or over its real tokens only, ``real``) and scores it with a discriminant (:func:`~segmoe_lab.merge.gating.fit_discriminant`) fitted on
each expert's positive prompts. (Mask-aware pooling is the intuitive choice but measured worse on
the toy world, dev seed 3031: 0.84-0.93 routing accuracy against 1.0 for the mean over all 32
positions; CLIP's causal attention makes every position after the end-of-text token a summary of
the whole prompt, while the real tokens weigh content words as much as the style word.)
Every MoE layer's gate (a :class:`Gate`) then returns the router's
logits instead of its own. With ``moe_extra: [all]``, ``include_mid: true`` and top-1 this is the
**whole-UNet switch**: each sample runs exactly its chosen expert's full UNet.

The router scores exactly the text rows the UNet receives (``encoder_hidden_states``: CLIP's last
hidden state for SD 1.5; both encoders' penultimate states side by side, 2048 wide, for SDXL): it is
fitted on the pipeline's own ``encode_prompt`` output, and :func:`attach_router` wraps the
pipeline's ``encode_prompt`` to note each call's prompt rows, their real-token counts and their
negative rows. Under classifier-free guidance the unconditional half of the batch (diffusers
concatenates ``[negative, prompt]``) follows its prompt's decision, as the model oracle runs the
expert for both halves. Rows it cannot match (``prompt_embeds`` passed directly, a bare UNet call)
are pooled over every position and decide on their own.
"""
from __future__ import annotations

import copy

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_NAME = "segmoe_router"  # the router's submodule name in the UNet (its tensors go to the extras file)


class Gate(nn.Linear):
    """segmoe's gate ``Linear(hidden, E, bias=False)``, plus what segmoe cannot read: an optional
    per-expert ``offset`` (a bias; state-dict key ``gate.offset``, saved beside segmoe's file) and an
    optional prompt router whose per-sample logits replace the gate's own."""

    def __init__(self, in_features: int, num_experts: int, offset: Optional[torch.Tensor] = None, device=None, dtype=None):
        super().__init__(in_features, num_experts, bias=False, device=device, dtype=dtype)
        if offset is not None:
            self.register_buffer("offset", offset.detach().clone().to(device=self.weight.device, dtype=self.weight.dtype))
        else:
            self.offset = None
        self._router: list = []  # a list, so the router is not registered as a submodule here

    @classmethod
    def like(cls, gate: nn.Linear, offset: Optional[torch.Tensor] = None) -> "Gate":
        new = cls(gate.in_features, gate.out_features, offset, device=gate.weight.device, dtype=gate.weight.dtype)
        new.weight = gate.weight
        return new

    def follow(self, router: Optional["PromptRouter"]) -> None:
        self._router = [] if router is None else [router]

    def decision(self, batch: int) -> Optional[int]:
        """The router's one top-1 expert for every row of a ``batch``-row call, when it chose one for
        all (a switch under guidance), else None. A layer then runs that expert alone, skipping its
        gate: so never while hooks watch this gate (recording must see its logits)."""
        router = self._router[0] if self._router else None
        if router is None or router.only is None or router.logits.shape[0] != batch:
            return None
        return None if self._forward_hooks or self._forward_pre_hooks else router.only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._router and self._router[0].logits is not None:
            logits = self._router[0].logits.to(device=x.device, dtype=x.dtype)  # (N, E)
            if logits.shape[0] == x.shape[0]:
                return logits.view(x.shape[0], *([1] * (x.dim() - 2)), -1).expand(*x.shape[:-1], -1)
        y = F.linear(x, self.weight)
        return y if self.offset is None else y + self.offset


def real_token_counts(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Tokens up to and including the first end-of-text token, per row (all when there is none)."""
    is_eos = input_ids == eos_token_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], input_ids.shape[1] - 1, dtype=torch.long))
    return first + 1


def pool_text(emb: torch.Tensor, counts: Optional[torch.Tensor], how: str = "real") -> torch.Tensor:
    """(N, T, D) -> (N, D): mean over each row's first ``counts`` tokens (``real``), or over all (``mean``)."""
    if how == "mean" or counts is None:
        return emb.float().mean(1)
    mask = torch.arange(emb.shape[1], device=emb.device)[None, :] < counts.to(emb.device)[:, None]
    return (emb.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


class PromptRouter(nn.Module):
    """Scores a pooled text embedding against the experts: ``logits = pooled @ weight.T + bias``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, pool: str = "real"):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())
        self.pool = pool
        self.logits: Optional[torch.Tensor] = None  # (N, E) for the UNet call in progress
        self.only: Optional[int] = None  # the top-1 expert of every row of that call, when they agree
        # recent encode_prompt calls: (prompt rows, their real-token counts or None, negative rows or None)
        self._calls: list[tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]] = []

    def score(self, emb: torch.Tensor, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        # in float32 whatever the pipeline's dtype: the decision must not depend on it
        return pool_text(emb, counts, self.pool) @ self.weight.float().T.to(emb.device) + self.bias.float().to(emb.device)

    # --- hooks ---------------------------------------------------------------------------
    def note(self, prompt_rows: torch.Tensor, counts: Optional[torch.Tensor], negative_rows: Optional[torch.Tensor]) -> None:
        """Remember one ``encode_prompt`` call (installed by :func:`attach_router`)."""
        neg = None if negative_rows is None else negative_rows.detach()
        self._calls = (self._calls + [(prompt_rows.detach(), counts, neg)])[-4:]

    def _find(self, row: torch.Tensor) -> tuple[int, int, Optional[torch.Tensor]]:
        for c in range(len(self._calls) - 1, -1, -1):
            emb, counts, _ = self._calls[c]
            if emb.shape[1:] == row.shape:
                for i in range(emb.shape[0]):
                    if torch.equal(emb[i].to(row.device, row.dtype), row):
                        return c, i, None if counts is None else counts[i]
        return -1, -1, None

    def _negatives_of(self, found: list, rows: torch.Tensor) -> bool:
        """Whether ``rows`` are the negatives noted with the prompts ``found`` (one call, same order)."""
        calls = {c for c, _, _ in found}
        if len(calls) != 1 or -1 in calls:
            return False
        neg = self._calls[found[0][0]][2]
        return neg is not None and all(torch.equal(neg[i].to(rows.device, rows.dtype), rows[j])
                                       for j, (_, i, _) in enumerate(found))

    def _before_unet(self, module, args, kwargs) -> None:
        text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if text is None:
            self.logits, self.only = None, None
            return
        n = text.shape[0]
        half = n // 2 if n % 2 == 0 and n > 1 else 0
        found = [self._find(text[i]) for i in range(n)]
        guided = half and self._negatives_of(found[half:], text[:half])  # [negative; prompt]
        if guided:
            found = found[half:] + found[half:]
        counts = torch.stack([c if c is not None else torch.tensor(text.shape[1]) for _, _, c in found])
        logits = self.score(text, counts)
        self.logits = torch.cat([logits[half:], logits[half:]]) if guided else logits
        top = self.logits.argmax(-1)
        self.only = int(top[0]) if bool((top == top[0]).all()) else None

    def _after_unet(self, module, args, kwargs, output) -> None:
        self.logits, self.only = None, None


def fit_router(text_encode, prompts: Sequence[Sequence[str]], shrinkage: float = 0.5, pool: str = "real") -> PromptRouter:
    """A :class:`PromptRouter` fitted on each expert's prompts (``prompts[e]``); ``text_encode(list)``
    returns ``(embeddings (N, T, D), real-token counts (N,))``."""
    from segmoe_lab.merge.gating import fit_discriminant

    groups = []
    for ps in prompts:
        emb, counts = text_encode(list(ps))
        groups.append(pool_text(emb, counts, pool))
    w, b = fit_discriminant(groups, shrinkage)
    return PromptRouter(w, b, pool)


def prompt_counts(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Real-token counts of ``prompts`` under the pipeline's (first) tokenizer."""
    tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return real_token_counts(tok.input_ids, pipe.text_encoder.config.eos_token_id)


def pipeline_text_encode(pipe):
    """``text_encode`` for :func:`fit_router`: the pipeline's own ``encode_prompt`` rows (what its
    UNet receives, for SD and SDXL alike) and their real-token counts."""

    @torch.no_grad()
    def encode(prompts: list[str]):
        out = _encode_prompt(pipe)(prompt=list(prompts), device=pipe.text_encoder.device, num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)
        return out[0], prompt_counts(pipe, prompts)

    return encode


def _encode_prompt(pipe):
    """The pipeline's own ``encode_prompt`` (not the router's wrapper, when installed)."""
    return getattr(pipe.encode_prompt, "__wrapped__", pipe.encode_prompt)


def _watch_encode_prompt(pipe, router: "PromptRouter") -> None:
    """Wrap ``pipe.encode_prompt`` (on this instance) so ``router`` notes every call's rows."""
    import functools
    import inspect

    original = _encode_prompt(pipe)
    signature = inspect.signature(original)

    @functools.wraps(original)
    def encode_prompt(*args, **kwargs):
        out = original(*args, **kwargs)
        try:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            prompt, per = a.get("prompt"), int(a.get("num_images_per_prompt") or 1)
            counts = None
            if prompt is not None and a.get("prompt_embeds") is None:
                counts = prompt_counts(pipe, [prompt] if isinstance(prompt, str) else prompt).repeat_interleave(per)
            negatives = out[1] if a.get("do_classifier_free_guidance") else None
            router.note(out[0], counts, negatives)
        except TypeError:  # an encode_prompt of another signature: its rows route on their own, unmatched
            pass
        return out

    pipe.encode_prompt = encode_prompt


def copy_unet(unet: nn.Module) -> nn.Module:
    """A deep copy of a merged UNet for the same pipeline (e.g. to compress or edit a twin).

    A plain ``copy.deepcopy`` also copies the prompt router, but the pipeline's ``encode_prompt``
    keeps feeding the original, so the copy's router cannot find the prompts' token counts or pair
    each negative with its prompt, and routes differently. Here the router is shared; every
    weight is copied.

    Example::

        twin = copy.copy(pipe); twin.register_modules(unet=copy_unet(pipe.unet))
    """
    router = getattr(unet, ROUTER_NAME, None)
    return copy.deepcopy(unet, {} if router is None else {id(router): router})


def iter_gates(unet) -> list[tuple[str, nn.Module]]:
    """``(layer path, layer)`` for every MoE layer (segmoe sites and extra kinds) of ``unet``."""
    return [(n, m) for n, m in unet.named_modules() if isinstance(getattr(m, "gate", None), nn.Linear) and hasattr(m, "experts")]


def attach_router(pipe, router: PromptRouter) -> None:
    """Install ``router`` as ``pipe.unet.segmoe_router``: watch the pipeline's ``encode_prompt``, hook
    the UNet, and make every MoE layer's gate follow it."""
    _watch_encode_prompt(pipe, router)
    route_unet(pipe.unet, router)


def route_unet(unet, router: PromptRouter) -> None:
    """The UNet half of :func:`attach_router`, for a bare UNet (benchmarks, tests): each call's rows
    of ``encoder_hidden_states`` decide on their own (there is no ``encode_prompt`` to pair them)."""
    setattr(unet, ROUTER_NAME, router)
    router.to(unet.device)
    unet.register_forward_pre_hook(router._before_unet, with_kwargs=True)
    unet.register_forward_hook(router._after_unet, with_kwargs=True)
    for _, layer in iter_gates(unet):
        if not isinstance(layer.gate, Gate):
            layer.gate = Gate.like(layer.gate)
        layer.gate.follow(router)
