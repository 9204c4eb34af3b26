"""Record what the gates of a SegMoE merge do: per MoE layer, prompt, denoising step and expert.

:func:`record_gates` hooks every :class:`~segmoe_lab.moe.MoELayer` of a merge for the duration of a
``with`` block (the hooks go away on exit, also on an error) and returns a :class:`GateRecording`
whose :meth:`GateRecording.frame` is a tidy table. A forward hook on each ``layer.gate`` sees the
layer's logits ``(B, T, E)``; when the UNet call ends, the logits of all its sites are reduced over
the tokens together, on their device (:func:`call_stats`), and only the ``(B, E)`` reductions are
copied off it, in one transfer per UNet call. With ``spatial=True`` the recording also keeps, for
the sites that see image tokens, each token's routing on the latent grid.

Example::

    with record_gates(pipe) as rec:                       # a SegMoEPipeline or diffusers pipeline
        pipe(["two red circles", "a blue square"], num_inference_steps=8)
    frame = rec.frame()                                   # one row per (call, site, sample, expert)
    frame[frame.cfg_half == "cond"].groupby(["layer", "expert"]).prob_mean.mean()

    rec = record_gates(pipe, ["two red circles"], steps=8, spatial=True)   # generate and record
    rec.spatial("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", step=7)  # (h, w) experts

The frame's columns are :data:`FRAME_COLUMNS` (see :meth:`GateRecording.frame`).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from .discovery import KIND_LABELS, Site, block_name, site_from_path
from .moe import MoELayer, get_routing, iter_moe_layers

FRAME_COLUMNS = (
    "call", "generation", "step", "timestep", "sample", "prompt_index", "prompt", "cfg_half",
    "site", "block", "layer", "kind", "label", "expert",
    "prob_mean", "topk_share", "routed_share", "sample_topk", "chosen",
)
CROSS_KV = ("attn2.to_k", "attn2.to_v")  # inputs are the text embedding: no image grid
HALVES = ("uncond", "cond", "none")
_STATS = 4  # prob_mean, topk_share, routed_share, sample_topk: one (B, E) each per site and call


# --- what is kept ---------------------------------------------------------------------------------

@dataclass
class PipelineCall:
    """One pipeline call as the recorder saw it (through the pipeline's ``encode_prompt``).

    ``prompts`` are the call's prompts (``None`` when it was given embeddings only); ``first_prompt``
    is the index of its first prompt in :attr:`GateRecording.prompts`.
    """

    index: int
    prompts: Optional[list[str]]
    per_prompt: int = 1
    cfg: Optional[bool] = None
    first_prompt: int = 0
    steps: int = 0


@dataclass
class _Call:
    """One UNet forward: step, timestep, latent size and each site's reductions."""

    index: int
    generation: int
    step: int
    batch: int
    latent_hw: tuple[int, int]
    timestep: Any = None  # a device tensor until the call ends, then a float
    live: dict = field(default_factory=dict)  # slot -> (logits (B, T, E), top_k, routing), during the call
    stats: dict = field(default_factory=dict)  # slot -> (4, B, E) float32 numpy, after the call
    spatial: dict = field(default_factory=dict)  # slot -> {"argmax", "chosen": (B, h, w), "probs": (B, h, w, E)}


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
            registry (:func:`segmoe_lab.moe.get_routing`, the rule :func:`~segmoe_lab.moe.route` applies).
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
    chosen = torch.cat([get_routing(routing)(t, top_k) for t in logits], 1)  # (B, sum T, k): the layers' own choice
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


# --- the recording ---------------------------------------------------------------------------------

class GateRecording:
    """Gate activity of one merge, collected by :func:`record_gates`; a context manager.

    Attributes:
        sites (`list[Site]`): the MoE sites, in the order the UNet runs them (down, mid, up).
        prompts (`list[str]`): every prompt seen, in order; ``prompt_index`` in the frame indexes it.
        generations (`list[PipelineCall]`): the pipeline calls seen (the frame's ``generation`` indexes it).
        images (`list`): images generated by ``record_gates(pipe, prompts)`` (one per prompt).
        spatial_enabled (`bool`): whether per-token routing is kept.
    """

    def __init__(self, pipe_or_unet, spatial: bool = False, prompts: Optional[Sequence[str]] = None):
        self.pipe = getattr(pipe_or_unet, "pipe", pipe_or_unet)  # SegMoEPipeline -> diffusers pipeline
        self.unet = getattr(self.pipe, "unet", self.pipe)
        if not isinstance(self.unet, nn.Module):
            raise TypeError("record_gates needs a SegMoEPipeline, a diffusers pipeline or a UNet, "
                            f"not {type(pipe_or_unet).__name__}")
        layers = list(iter_moe_layers(self.unet))
        if not layers:
            raise ValueError(f"{type(self.unet).__name__} has no MoE layers: record a SegMoE merge "
                             "(build_merge / SegMoEPipeline)")
        self._layers = [layer for _, layer in layers]
        self._sites = [_site_of(path, layer) for path, layer in layers]
        self.spatial_enabled = spatial
        self.prompts: list[str] = []
        self.generations: list[PipelineCall] = []
        self.images: list = []
        self._given_prompts = list(prompts) if prompts is not None else None
        self._calls: list[_Call] = []
        self._current: Optional[_Call] = None
        self._order: list[int] = []  # slots in the order the first call ran them
        self._seen: set[int] = set()
        self._handles: list = []
        self._patched = None
        self._last_step_t: Optional[float] = None

    # -- public reading ------------------------------------------------------------------------
    def _slots(self) -> list[int]:
        """Site slots in the order the UNet ran them (sites never run last, in module order)."""
        return self._order + [i for i in range(len(self._sites)) if i not in self._seen]

    @property
    def sites(self) -> list[Site]:
        return [self._sites[i] for i in self._slots()]

    @property
    def num_experts(self) -> int:
        """The largest number of experts of any MoE layer."""
        return max(layer.num_experts for layer in self._layers)

    @property
    def calls(self) -> int:
        """Number of UNet calls recorded."""
        return len(self._calls)

    @property
    def nbytes(self) -> int:
        """Bytes of recorded data held (reductions and, with ``spatial=True``, token grids)."""
        total = 0
        for c in self._calls:
            total += sum(a.nbytes for a in c.stats.values())
            total += sum(a.nbytes for d in c.spatial.values() for a in d.values())
        return total

    def site(self, name: str) -> Site:
        """The site with this path or label (``"down1.a0.t0 cross-k"``)."""
        for s in self._sites:
            if name in (s.path, s.label):
                return s
        raise KeyError(f"no MoE site {name!r}; sites are e.g. {[s.label for s in self.sites[:4]]} (see .sites)")

    @property
    def spatial_sites(self) -> list[Site]:
        """Sites whose input is image tokens (all but cross-attention k/v)."""
        return [s for s in self.sites if s.kind not in CROSS_KV]

    def frame(self) -> pd.DataFrame:
        """A tidy table: one row per (UNet call, site, batch sample, expert).

        Columns:
            call: UNet call index within the recording (0, 1, ...).
            generation: pipeline call index; step: UNet call index within that generation
                (the denoising step; second-order schedulers count each evaluation).
            timestep: the timestep the UNet got.
            sample: row of the UNet batch; prompt_index / prompt: the prompt it belongs to
                (index into :attr:`prompts`; -1 and ``""`` when the pipeline got embeddings only).
            cfg_half: ``"uncond"`` (negative prompt, diffusers' first half), ``"cond"``, or ``"none"``
                without classifier-free guidance.
            site: module path; block: ``"down.1"``; layer: ``"down1.a0.t0"``; kind: ``self-q`` ...
                ``cross-v``, ``ff``; label: ``"down1.a0.t0 cross-k"``.
            expert: expert index.
            prob_mean: gate softmax probability of the expert over all experts, averaged over the
                sample's tokens (sums to 1 over experts).
            topk_share: share of the sample's tokens whose per-token top-k includes the expert
                (what ``per_token`` routing would pick).
            routed_share: share of the sample's tokens routed to the expert by the layer's routing.
            sample_topk: the expert is in the top-k of the sample's logits summed over its tokens
                (what ``per_sample`` routing would pick).
            chosen: the layer's routing used the expert for at least one token of the sample.

        Cross-attention k/v sites skipped by :func:`segmoe_lab.kvcache.cache_cross_kv` repeat their
        previous step's values (their input, the text embedding, does not change).
        """
        cols: dict[str, list] = {k: [] for k in ("call", "generation", "step", "timestep", "sample", "prompt_index",
                                                  "cfg_half", "slot", "expert", "stats")}
        rank = {slot: r for r, slot in enumerate(self._slots())}
        for c in self._calls:
            slots = sorted(c.stats, key=rank.__getitem__)
            for E in sorted({c.stats[s].shape[-1] for s in slots}):
                group = [s for s in slots if c.stats[s].shape[-1] == E]
                vals = np.stack([c.stats[s] for s in group])  # (S, 4, B, E)
                S, _, B, _ = vals.shape
                n = S * B * E
                prompt_index, half = self._samples(c)
                sample = np.tile(np.repeat(np.arange(B), E), S)
                for k, v in (("call", c.index), ("generation", c.generation), ("step", c.step), ("timestep", c.timestep)):
                    cols[k].append(np.full(n, v))
                cols["sample"].append(sample)
                cols["prompt_index"].append(prompt_index[sample])
                cols["cfg_half"].append(half[sample])
                cols["slot"].append(np.repeat(np.array([rank[s] for s in group]), B * E))
                cols["expert"].append(np.tile(np.arange(E), S * B))
                cols["stats"].append(vals.transpose(1, 0, 2, 3).reshape(_STATS, n))
        return self._assemble(cols, rank)

    def _assemble(self, cols: dict, rank: dict) -> pd.DataFrame:
        if not self._calls:
            return pd.DataFrame({c: [] for c in FRAME_COLUMNS})
        cat = {k: np.concatenate(v) for k, v in cols.items() if k != "stats"}
        stats = np.concatenate(cols["stats"], axis=1)
        ordered = sorted(rank, key=rank.__getitem__)
        sites = [self._sites[s] for s in ordered]
        df = pd.DataFrame({k: cat[k].astype(np.int64) for k in ("call", "generation", "step", "sample", "prompt_index")})
        df.insert(3, "timestep", cat["timestep"].astype(np.float64))
        known = np.where(df.prompt_index < 0, len(self.prompts), df.prompt_index)  # -1: unknown -> ""
        df.insert(6, "prompt", pd.Categorical(np.asarray(self.prompts + [""], dtype=object)[known]))
        df["cfg_half"] = pd.Categorical.from_codes(cat["cfg_half"], categories=list(HALVES))
        codes = cat["slot"]
        for col, values in (("site", [s.path for s in sites]), ("block", [s.block for s in sites]),
                            ("layer", [s.label.split(" ")[0] for s in sites]),
                            ("kind", [KIND_LABELS.get(s.kind, s.kind) for s in sites]), ("label", [s.label for s in sites])):
            uniq = list(dict.fromkeys(values))
            df[col] = pd.Categorical.from_codes(np.array([uniq.index(v) for v in values])[codes], categories=uniq)
        df["expert"] = cat["expert"].astype(np.int64)
        for i, name in enumerate(("prob_mean", "topk_share", "routed_share")):
            df[name] = stats[i].astype(np.float64)
        df["sample_topk"] = stats[3] > 0.5
        df["chosen"] = stats[2] > 0
        return df[list(FRAME_COLUMNS)]

    def _samples(self, c: _Call) -> tuple[np.ndarray, np.ndarray]:
        """Per batch row: prompt index (-1: unknown) and cfg half code (index into HALVES)."""
        g = self.generations[c.generation] if c.generation < len(self.generations) else None
        B = c.batch
        cfg = bool(g and g.cfg and B % 2 == 0)
        half_b = B // 2 if cfg else B
        j = np.arange(B) % half_b
        per = g.per_prompt if g else 1
        if g and g.prompts is not None and len(g.prompts) * per == half_b:
            prompt = g.first_prompt + j // per
        else:
            prompt = np.full(B, -1)
        half = np.where(np.arange(B) < half_b, 0, 1) if cfg else np.full(B, 2)
        return prompt, half

    def spatial(self, site: str, step: int = -1, sample: int = 0, generation: int = 0,
                value: str = "argmax") -> np.ndarray:
        """Per-token routing of one site at one step, on the latent grid of its resolution.

        Args:
            site (`str`): a site path or label (see :attr:`spatial_sites`).
            step (`int`, *optional*, defaults to -1): step within the generation (-1: the last).
            sample (`int`, *optional*, defaults to 0): batch row (under guidance the conditional
                half starts at ``batch // 2``; see :meth:`sample_of`).
            generation (`int`, *optional*, defaults to 0): which pipeline call.
            value (`str`, *optional*, defaults to ``"argmax"``): ``"argmax"`` (each token's most
                probable expert), ``"chosen"`` (the expert the layer's routing weighted most for
                the token) or ``"probs"`` (``(h, w, E)`` gate probabilities).

        Returns:
            ``np.ndarray`` of shape ``(h, w)`` (``(h, w, E)`` for ``"probs"``).
        """
        if not self.spatial_enabled:
            raise ValueError("this recording kept no per-token routing; record with record_gates(..., spatial=True)")
        if value not in ("argmax", "chosen", "probs"):
            raise ValueError(f"value={value!r}; choose one of ['argmax', 'chosen', 'probs']")
        s = self.site(site)
        if s.kind in CROSS_KV:
            raise ValueError(f"{s.label} projects the text embedding, which has no image grid; pick one of .spatial_sites")
        calls = [c for c in self._calls if c.generation == generation]
        if not calls:
            raise KeyError(f"generation={generation} was not recorded ({len(self.generations)} generations)")
        c = calls[step]
        grid = c.spatial.get(self._sites.index(s))
        if grid is None:
            raise KeyError(f"{s.label} has no token grid at step {c.step} (its tokens do not fit the latent grid)")
        return grid[value][sample]

    def sample_of(self, prompt_index: int, half: str = "cond", generation: Optional[int] = None) -> tuple[int, int]:
        """``(generation, sample)`` of a prompt's batch row in the given half (``"cond"`` / ``"uncond"`` / ``"none"``)."""
        for c in self._calls:
            if generation is not None and c.generation != generation:
                continue
            p, h = self._samples(c)
            rows = np.nonzero((p == prompt_index) & (h == HALVES.index(half)))[0]
            if len(rows) == 0 and half == "cond":
                rows = np.nonzero((p == prompt_index) & (h == HALVES.index("none")))[0]
            if len(rows):
                return c.generation, int(rows[0])
        raise KeyError(f"prompt {prompt_index} ({half}) was not recorded")

    def __repr__(self) -> str:
        return (f"GateRecording({len(self._sites)} sites, {len(self.generations)} generations, {self.calls} UNet calls, "
                f"{len(self.prompts)} prompts, spatial={self.spatial_enabled}, {self.nbytes / 2**10:.0f} KiB)")

    # -- hooks --------------------------------------------------------------------------------
    def __enter__(self) -> "GateRecording":
        if self._handles:
            raise RuntimeError("this GateRecording is already recording")
        try:
            self._handles.append(self.unet.register_forward_pre_hook(self._unet_pre, with_kwargs=True))
            self._handles.append(self.unet.register_forward_hook(self._unet_post, always_call=True))
            for slot, layer in enumerate(self._layers):
                self._handles.append(layer.gate.register_forward_hook(self._gate_hook(slot, layer)))
            self._patch_encode_prompt()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()
        if self._current is not None:  # an error inside a UNet call: keep what it recorded
            self._finish(self._current)

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._patched is not None:
            pipe, had, old = self._patched
            if had:
                pipe.encode_prompt = old
            else:
                pipe.__dict__.pop("encode_prompt", None)
            self._patched = None

    @property
    def hooked(self) -> bool:
        """Whether hooks are installed (inside the ``with`` block)."""
        return bool(self._handles)

    def _patch_encode_prompt(self) -> None:
        """Wrap the pipeline's ``encode_prompt`` (on this instance only) to learn each call's prompts."""
        pipe = self.pipe
        original = getattr(pipe, "encode_prompt", None)
        if pipe is self.unet or original is None:
            return
        signature = inspect.signature(original)
        had = "encode_prompt" in pipe.__dict__

        def encode_prompt(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                self._new_generation(bound.arguments)
            except TypeError:
                pass
            return original(*args, **kwargs)

        pipe.encode_prompt = encode_prompt
        self._patched = (pipe, had, original)

    def _new_generation(self, arguments: Mapping[str, Any]) -> None:
        prompt = arguments.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        if self._given_prompts is not None and prompts is None:
            prompts = self._given_prompts
        g = PipelineCall(len(self.generations), prompts, int(arguments.get("num_images_per_prompt") or 1),
                       arguments.get("do_classifier_free_guidance"), len(self.prompts))
        self.prompts.extend(prompts or [])
        self.generations.append(g)

    def _unet_pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        t = t.detach().flatten()[:1].float() if torch.is_tensor(t) else torch.tensor([float(t)])
        if self._starts_generation(t):
            self._new_generation({"prompt": self._given_prompts, "do_classifier_free_guidance": None})
        g = self.generations[-1]
        B, _, H, W = sample.shape  # (B, C, H, W) latents
        self._current = _Call(len(self._calls), g.index, g.steps, B, (H, W), t)
        g.steps += 1

    def _starts_generation(self, t: torch.Tensor) -> bool:
        """Pipeline calls are told apart by ``encode_prompt``; without it (a bare UNet, another
        pipeline sharing it) a timestep that goes up starts a new generation."""
        if not self.generations:
            return True
        if self.generations[-1].cfg is not None:  # opened by encode_prompt
            return False
        previous, self._last_step_t = self._last_step_t, float(t[0])  # a host sync, only on this path
        return previous is not None and self._last_step_t > previous

    def _unet_post(self, module, args, output):
        if self._current is not None:
            self._finish(self._current)

    def _gate_hook(self, slot: int, layer: MoELayer):
        def hook(module, args, logits):  # keep a reference only; reduced with the call's other sites in _finish
            c = self._current
            if c is None:
                return
            logits = logits.detach()
            c.live[slot] = (logits if logits.dim() == 3 else logits.reshape(logits.shape[0], -1, logits.shape[-1]),
                            layer.top_k, layer.routing)
            if not self._calls and slot not in self._seen:
                self._seen.add(slot)
                self._order.append(slot)
        return hook

    def _finish(self, c: _Call) -> None:
        """Reduce a call's sites together, copy the results off the device in one transfer, and
        fill in cross-attention k/v sites the K/V cache skipped."""
        self._current = None
        groups: dict[tuple, list[int]] = {}
        for s, (logits, k, routing) in c.live.items():
            groups.setdefault((logits.shape[-1], k, routing, logits.dtype), []).append(s)
        parts, layout = [], []
        for (_, k, routing, _), slots in groups.items():
            logits = [c.live[s][0] for s in slots]
            stats, tokens = call_stats(logits, k, routing, tokens=self.spatial_enabled)
            parts.append(stats.reshape(-1))
            layout.append((slots, tuple(stats.shape[1:])))
            if tokens is not None:
                self._keep_tokens(c, slots, [t.shape[1] for t in logits], tokens)
        c.live = {}
        device = parts[0].device if parts else c.timestep.device
        flat = torch.cat([c.timestep.reshape(1).float().to(device)] + parts).cpu().numpy()  # one transfer
        c.timestep, offset = float(flat[0]), 1
        for slots, shape in layout:
            size = int(np.prod(shape))
            for s in slots:
                c.stats[s] = flat[offset:offset + size].reshape(shape)  # (4, B, E)
                offset += size
        previous = next((p for p in reversed(self._calls) if p.generation == c.generation), None)
        if previous is not None:
            for s, vals in previous.stats.items():
                if s not in c.stats and self._sites[s].kind in CROSS_KV and vals.shape[1] == c.batch:
                    c.stats[s] = vals
        if c.stats:
            self._calls.append(c)

    def _keep_tokens(self, c: _Call, slots: list[int], sizes: list[int], tokens) -> None:
        """Per-token routing of the spatial sites, reshaped to their latent grids."""
        argmax, strongest, probs = (t.cpu().numpy() for t in tokens)  # (B, sum T) x2, (B, E, sum T)
        ends = np.cumsum(sizes)
        for s, size, end in zip(slots, sizes, ends):
            hw = grid_shape(size, c.latent_hw) if self._sites[s].kind not in CROSS_KV else None
            if hw is None:
                continue
            B, part = argmax.shape[0], slice(end - size, end)
            c.spatial[s] = {"argmax": argmax[:, part].reshape(B, *hw).astype(np.int16),
                            "chosen": strongest[:, part].reshape(B, *hw).astype(np.int16),
                            "probs": probs[:, :, part].transpose(0, 2, 1).reshape(B, *hw, -1)}


def record_gates(pipe, prompts: Optional[Union[str, Sequence[str]]] = None, *, spatial: bool = False, steps: int = 25,
                 seed: int = 0, guidance_scale: float = 7.5, negative_prompt: Optional[str] = None,
                 **pipe_kwargs) -> GateRecording:
    """Record the gates of a merge: as a context manager, or by generating ``prompts`` now.

    Args:
        pipe: a :class:`~segmoe_lab.SegMoEPipeline`, a diffusers pipeline with a merged UNet, or the UNet.
        prompts (`list[str]`, *optional*): generate one image per prompt now (prompt ``i`` seeded
            with ``seed + i``, as :func:`segmoe_lab.notebook.generate`) and return the finished
            recording with its ``images``. Without prompts, use the returned recording in a
            ``with`` block around your own pipeline calls.
        spatial (`bool`, *optional*, defaults to `False`): also keep per-token routing on the latent
            grid (see :meth:`GateRecording.spatial`).
        steps, seed, guidance_scale, negative_prompt, pipe_kwargs: generation settings (only with ``prompts``).

    Returns:
        :class:`GateRecording`.
    """
    rec = GateRecording(pipe, spatial=spatial)
    if prompts is None:
        return rec
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    target = getattr(pipe, "pipe", pipe)
    with rec:
        for i, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(seed + i)
            out = target(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                         guidance_scale=guidance_scale, generator=generator, **pipe_kwargs)
            rec.images.append(out.images[0])
    return rec


# --- ground truth on the toy world ---------------------------------------------------------------

def domain_routing(frame: pd.DataFrame, domain_of_prompt: Union[Mapping, pd.Series], expert_of_domain: Mapping[str, int],
                   by: Union[str, Sequence[str]] = "label", half: str = "cond") -> pd.DataFrame:
    """How often prompts of a domain route to that domain's expert, per site (or ``by`` columns) and overall.

    Args:
        frame (`pd.DataFrame`): :meth:`GateRecording.frame`.
        domain_of_prompt (`dict` or `pd.Series`): prompt text (or prompt index) -> domain; prompts
            without a domain, or whose domain has no expert, are left out.
        expert_of_domain (`dict`): domain -> expert index.
        by (`str` or `list[str]`, *optional*, defaults to ``"label"``): frame columns to group by
            (``"label"`` per site; ``"kind"``, ``"block"``, ``"step"``, ...).
        half (`str`, *optional*, defaults to ``"cond"``): which guidance half to judge (the
            unconditional half sees the negative prompt); ``"none"`` runs without guidance are
            always included.

    Returns:
        One row per group, then one ``"all"`` row, with ``n`` (prompt-steps judged), ``chance``
        (k / E), and the rate at which the domain's expert is: ``chosen`` (by the merge's own
        routing), ``per_sample`` (in the sample's top-k of summed logits), ``per_token`` (mean
        share of tokens with it in their top-k), ``top1`` (highest mean probability), and its mean
        probability ``prob``.
    """
    by = [by] if isinstance(by, str) else list(by)
    mapping = dict(domain_of_prompt.items()) if isinstance(domain_of_prompt, pd.Series) else dict(domain_of_prompt)
    key = "prompt_index" if mapping and all(isinstance(k, (int, np.integer)) for k in mapping) else "prompt"
    f = frame[frame.cfg_half.isin([half, "none"])]
    domain = f[key].astype(object).map(mapping)
    target = domain.map(dict(expert_of_domain))
    f = f.assign(domain=domain, target=target)
    f = f[f.target.notna()]
    if f.empty:
        raise ValueError("no recorded prompt has a domain with an expert: check domain_of_prompt's keys "
                         f"(prompt texts or indices) against the frame and expert_of_domain ({dict(expert_of_domain)})")
    keys = ["call", "site", "sample"]
    top1 = f.loc[f.groupby(keys, observed=True).prob_mean.idxmax(), keys + ["expert"]]
    top1 = top1.rename(columns={"expert": "top1_expert"})
    mine = f[f.expert == f.target.astype(int)].merge(top1, on=keys)
    mine = mine.assign(chosen=mine.chosen.astype(float), per_sample=mine.sample_topk.astype(float),
                       per_token=mine.topk_share, top1=(mine.top1_expert == mine.expert).astype(float))
    metrics = {"n": ("prob_mean", "size"), "chosen": ("chosen", "mean"), "per_sample": ("per_sample", "mean"),
               "per_token": ("per_token", "mean"), "top1": ("top1", "mean"), "prob": ("prob_mean", "mean")}
    table = mine.groupby(by, observed=True, sort=True).agg(**metrics).reset_index()
    overall = {c: "all" for c in by} | {name: mine[col].agg(fn) for name, (col, fn) in metrics.items()}
    table = pd.concat([table.astype({c: object for c in by}), pd.DataFrame([overall])], ignore_index=True)
    table.insert(len(by) + 1, "chance", _chance(f))
    return table


def _chance(f: pd.DataFrame) -> float:
    """k / E: how often a random pick of k experts out of E would hit the domain's expert."""
    per = f.groupby(["call", "site", "sample"], observed=True).agg(k=("sample_topk", "sum"), E=("expert", "size"))
    return float((per.k / per.E).mean())


def domain_experts(cfg, domains) -> dict[str, int]:
    """Each domain's expert in a merge config, matched by name: the domain appears in exactly one
    expert's ``source_model`` (else in exactly one ``positive_prompt``), case-insensitively.

    Args:
        cfg (`MergeConfig`): the merge (its ``experts`` list; the LoRA-only form has none).
        domains (iterable of `str`): e.g. the ``category`` column of the toy prompt set.

    Returns:
        ``{domain: expert index}`` for the domains that match one expert (others are left out).
    """
    experts = list(getattr(cfg, "experts", None) or [])
    found = {}
    for domain in dict.fromkeys(str(d) for d in domains):
        for field_ in ("source_model", "positive_prompt"):
            hits = [i for i, e in enumerate(experts) if domain.lower() in str(getattr(e, field_)).lower()]
            if len(hits) == 1:
                found[domain] = hits[0]
                break
    return found




def describe_domain_routing(table: Optional[pd.DataFrame], routing: str = "the merge's", margin: float = 0.15,
                            most: int = 8) -> str:
    """Which layers route by domain, in words, from a :func:`domain_routing` table.

    A group (site, kind, block, ... whatever the table is by) *routes by domain* when its domain's
    expert is in the per-sample top-k at least ``margin`` above chance. ``routing`` names the
    merge's own policy (the ``chosen`` column).
    """
    if table is None or table.empty:
        return ("No domain ground truth: the prompts' categories do not name the merge's experts "
                "(the toy world's prompt set and merge have it).")
    by = [c for c in table.columns if c not in ("n", "chance", "chosen", "per_sample", "per_token", "top1", "prob")]
    rows = table[table[by[0]] != "all"]
    overall = table[table[by[0]] == "all"].iloc[0]
    chance = float(overall.chance)
    names = rows[by].astype(str).agg(" ".join, axis=1)
    lifted = rows.per_sample - rows.chance
    routes = lifted >= margin
    groups = "sites" if by in (["label"], ["site"]) else "groups by " + " / ".join(by)
    lines = [
        f"Over {len(rows)} {groups}, a prompt's own domain expert is the gate's first choice "
        f"(highest mean probability) for {overall.top1:.0%} of prompt-steps, against {chance:.0%} by chance. "
        f"Per policy: per-sample top-k picks it {overall.per_sample:.0%} of the time, per-token top-k gives it "
        f"{overall.per_token:.0%} of the tokens, and {routing} routing used it {overall.chosen:.0%} of the time.",
    ]
    if routes.any():
        order = lifted[routes].sort_values(ascending=False).index
        shown = ", ".join(f"{names[i]} ({rows.per_sample[i]:.0%})" for i in order[:most])
        more = f" and {routes.sum() - most} more" if routes.sum() > most else ""
        lines.append(f"{int(routes.sum())} of {len(rows)} route by domain (per-sample rate at least {margin:.0%} above "
                     f"chance): {shown}{more}.")
    else:
        lines.append(f"No group routes by domain (none has a per-sample rate {margin:.0%} above chance).")
    flat = rows[~routes]
    if len(flat):
        lines.append(f"The other {len(flat)} stay below that (mean per-sample rate {flat.per_sample.mean():.0%}).")
    best = max(("per_sample", "per_token", "chosen"), key=lambda c: overall[c])
    label = {"per_sample": "per-sample routing", "per_token": "per-token routing", "chosen": f"{routing} routing"}[best]
    lines.append(f"Of the policies, {label} keeps the most domain information ({overall[best]:.0%}).")
    return "\n".join(lines)
