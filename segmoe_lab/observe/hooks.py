"""The hooks behind :class:`~segmoe_lab.observe.recording.GateRecording`: what is kept per UNet call,
and how the gate logits of one call are caught and reduced.

A forward hook on each ``layer.gate`` keeps a reference to the layer's logits ``(B, T, E)``; when
the UNet call ends, the logits of all its sites are reduced over the tokens together, on their
device (:func:`~segmoe_lab.observe.gate_stats.call_stats`), and only the ``(B, E)`` reductions are
copied off it, in one transfer per UNet call.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
import torch

from segmoe_lab.merge.discovery import CROSS_KV_KINDS
from segmoe_lab.merge.moe import MoELayer
from segmoe_lab.observe.gate_stats import call_stats, grid_shape

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


# --- the recording ---------------------------------------------------------------------------------


class RecorderHooks:
    """The recording half of :class:`GateRecording` (hooks on, hooks off, per-call reduction)."""

    # -- hooks --------------------------------------------------------------------------------
    def __enter__(self) -> "RecorderHooks":
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
                if s not in c.stats and self._sites[s].kind in CROSS_KV_KINDS and vals.shape[1] == c.batch:
                    c.stats[s] = vals
        if c.stats:
            self._calls.append(c)

    def _keep_tokens(self, c: _Call, slots: list[int], sizes: list[int], tokens) -> None:
        """Per-token routing of the spatial sites, reshaped to their latent grids."""
        argmax, strongest, probs = (t.cpu().numpy() for t in tokens)  # (B, sum T) x2, (B, E, sum T)
        ends = np.cumsum(sizes)
        for s, size, end in zip(slots, sizes, ends):
            hw = grid_shape(size, c.latent_hw) if self._sites[s].kind not in CROSS_KV_KINDS else None
            if hw is None:
                continue
            B, part = argmax.shape[0], slice(end - size, end)
            c.spatial[s] = {"argmax": argmax[:, part].reshape(B, *hw).astype(np.int16),
                            "chosen": strongest[:, part].reshape(B, *hw).astype(np.int16),
                            "probs": probs[:, :, part].transpose(0, 2, 1).reshape(B, *hw, -1)}
