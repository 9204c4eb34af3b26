"""Expert offload: a merge's experts stay in CPU memory; only the chosen ones go to the accelerator.

With ``segmoe`` and ``per_sample`` routing only k of a site's N experts run at a step, so the
other N - k need not sit in accelerator memory. :func:`enable_expert_offload` moves everything
except the experts to ``device`` and gives each MoE site a few device *slots* (by default
``top_k``): a call copies the experts it routes to into slots, least recently used first out,
so a merge whose routing is stable over the denoising steps copies almost nothing after its
first step. Where routing needs more experts than a site has slots (``per_token``, or
``per_sample`` over a batch), the extra ones are copied for that call only.

With ``max_bytes`` the slots of all sites together are bounded too: when a site needs slots and
the budget is spent, the site that ran most recently gives its slots back (the UNet calls its
sites in the same order every step, so that site is the one needed again furthest ahead), and
each site prefetches the next site's last-used experts before it computes, on a side CUDA
stream from pinned memory so the copy overlaps its compute (elsewhere, synchronously). Without
``max_bytes`` every site keeps its slots and, once routing is stable, nothing is left to fetch.

Accounting is by bookkeeping, so it works on any device, the meta device included: the bytes of
every tensor the merge keeps on ``device`` (the rest of the UNet, the gates, the slots, and the
largest one-call overflow) are counted as they are allocated (:class:`OffloadStats`).

Example::

    pipe = load_merge("merges/4x2")[0]          # on CPU
    with enable_expert_offload(pipe, "cuda") as off:
        image = pipe("a cat").images[0]
    print(off.stats())
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from segmoe_lab.merge.moe import MoELayer, iter_moe_layers
from segmoe_lab.merge.routing import Scope


def _nbytes(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> int:
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else t.element_size()
    return t.numel() * size


def _expert_tensors(layer: MoELayer) -> dict[str, torch.Tensor]:
    """The layer's ``(E, ...)`` expert stacks (views of which are its experts' parameters)."""
    if layer.stacks is None:
        raise TypeError(f"expert offload needs experts with the same parameters and no buffers; got {type(layer.experts[0]).__name__}")
    return layer.stacks


def non_expert_bytes(unet: nn.Module, dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of the UNet's parameters and buffers outside the experts (gates included)."""
    experts = set()
    for _, layer in iter_moe_layers(unet):
        experts |= {id(p) for p in layer.experts.parameters()}
    total = sum(_nbytes(p, dtype if p.is_floating_point() else None) for p in unet.parameters() if id(p) not in experts)
    return total + sum(_nbytes(b, dtype if b.is_floating_point() else None) for b in unet.buffers())


def expert_bytes(layer: MoELayer, dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of one expert of ``layer``."""
    return sum(_nbytes(p, dtype) for p in layer.experts[0].parameters())


def resident_bytes_plan(unet: nn.Module, slots: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> dict[str, int]:
    """Accelerator bytes of ``unet`` under expert offload, without running it (meta models work).

    Args:
        unet (`nn.Module`): a merged UNet.
        slots (`int`, *optional*): experts kept per site; defaults to each layer's ``top_k``.
        dtype (`torch.dtype`, *optional*): count floating tensors at this dtype's size.

    Returns:
        ``{"static": rest of the UNet, "slots": expert slots, "total": both, "all_experts": the
        experts' bytes if all were resident}``.
    """
    static = non_expert_bytes(unet, dtype)
    slot_bytes = all_experts = 0
    for _, layer in iter_moe_layers(unet):
        one = expert_bytes(layer, dtype)
        slot_bytes += min(slots or layer.top_k, layer.num_experts) * one
        all_experts += layer.num_experts * one
    return {"static": static, "slots": slot_bytes, "total": static + slot_bytes, "all_experts": all_experts}


@dataclass
class OffloadStats:
    """What expert offload kept on the accelerator and moved to it (bytes; counts)."""

    static_bytes: int  # the UNet outside the experts
    slot_bytes: int  # expert slots allocated so far
    peak_bytes: int  # static + slots + the largest one-call overflow seen
    transferred_bytes: int  # expert bytes copied to the device (loads and prefetches)
    hits: int  # routed experts found in their site's slots
    misses: int  # routed experts that had to be copied when needed
    prefetched: int  # experts copied ahead by prefetch
    overflow_calls: int  # calls that needed more experts than their site has slots
    evictions: int  # sites that gave their slots back to stay within max_bytes

    @property
    def resident_bytes(self) -> int:
        """Bytes held on the device now (static + slots)."""
        return self.static_bytes + self.slot_bytes


class SiteOffload:
    """One MoE site's device slots: up to ``capacity`` experts, least recently used evicted first."""

    def __init__(self, owner: "ExpertOffload", path: str, layer: MoELayer, capacity: int):
        self.owner, self.path, self.layer = owner, path, layer
        self.capacity = max(1, min(capacity, layer.num_experts))
        self.slot_of: "OrderedDict[int, int]" = OrderedDict()  # expert -> slot, least recently used first
        self.stacks: Optional[dict[str, torch.Tensor]] = None  # name -> (capacity, ...) on the device
        self.last_used: list[int] = []
        self.last_run = 0  # owner's tick when this site last ran
        self.ready = None  # CUDA event of a pending prefetch
        self.slot_nbytes = self.capacity * sum(_nbytes(t[0]) for t in _expert_tensors(layer).values())

    def _allocate(self) -> None:
        self.owner._make_room(self)
        dev = self.owner.device
        self.stacks = {n: torch.zeros((self.capacity, *t.shape[1:]), dtype=t.dtype, device=dev)
                       for n, t in _expert_tensors(self.layer).items()}
        self.owner._slot_bytes += self.slot_nbytes
        self.owner._note_peak()

    def release(self) -> None:
        """Give the device slots back (the experts stay on storage)."""
        if self.stacks is not None:
            self.stacks = None
            self.slot_of.clear()
            self.owner._slot_bytes -= self.slot_nbytes

    def _copy(self, e: int, s: int) -> None:
        for n, src in _expert_tensors(self.layer).items():
            self.stacks[n][s].copy_(src[e], non_blocking=self.owner.pinned)
            self.owner._transferred += _nbytes(src[e])

    def ensure(self, used: list[int], prefetch: bool = False) -> list[int]:
        """Slots holding ``used`` (at most ``capacity`` experts), copying in the missing ones."""
        if self.stacks is None:
            self._allocate()
        for e in used:
            if e in self.slot_of:
                self.slot_of.move_to_end(e)
                if not prefetch:
                    self.owner._hits += 1
        taken = set(self.slot_of.values())
        free = [s for s in range(self.capacity) if s not in taken]
        for e in used:
            if e in self.slot_of:
                continue
            s = free.pop(0) if free else self.slot_of.pop(next(v for v in self.slot_of if v not in used))
            self._copy(e, s)
            self.slot_of[e] = s
            if prefetch:
                self.owner._prefetched += 1
            else:
                self.owner._misses += 1
        return [self.slot_of[e] for e in used]

    def _overflow_stacks(self, used: list[int]) -> dict[str, torch.Tensor]:
        """Device copies of ``used`` for this call only (more experts than slots)."""
        ids = torch.tensor(used)
        stacks = {n: t.index_select(0, ids.to(t.device)).to(self.owner.device) for n, t in _expert_tensors(self.layer).items()}
        nbytes = sum(_nbytes(t) for t in stacks.values())
        self.owner._overflow_calls += 1
        self.owner._transferred += nbytes
        self.owner._note_peak(nbytes)
        return stacks

    def run(self, layer: MoELayer, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, args, kwargs) -> torch.Tensor:
        """The layer's mixture, with the routed experts served from device slots."""
        segmoe = layer.policy.scope is Scope.BATCH
        if segmoe:
            routed = idx[:1, :1]  # (1, 1, k): one choice for the whole batch
        elif layer.policy.scope is Scope.SAMPLE:
            routed = idx[:, :1]  # (B, 1, k)
        else:
            routed = idx
        # host sync: which experts to bring (segmoe: the k chosen, in routing order)
        used = routed.flatten().tolist() if segmoe else torch.unique(routed).tolist()
        self.owner._enter(self)
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)
            self.ready = None
        if len(used) <= self.capacity:
            slots, stacks = self.ensure(used), self.stacks
        else:
            slots, stacks = list(range(len(used))), self._overflow_stacks(used)
        self.last_used = used
        self.owner._prefetch_after(self)  # issued before this site's compute, so the copy overlaps it
        if segmoe:
            remapped = torch.tensor(slots, device=idx.device).view(1, 1, -1).expand_as(idx)  # (B, T, k) slot indices
        else:
            lut = torch.zeros(layer.num_experts, dtype=torch.long)
            lut[torch.tensor(used)] = torch.tensor(slots)
            remapped = lut.to(idx.device)[routed].expand_as(idx)  # expert index -> slot index
        return layer.run_experts(x, weights, remapped, args, kwargs, stacks=stacks)


def _move_except_experts(module: nn.Module, fn) -> None:
    """``module._apply(fn)`` for every tensor outside the MoE layers' experts."""
    if isinstance(module, MoELayer):
        module.gate._apply(fn)
        return
    nn.Module._apply(module, fn, recurse=False)
    for child in module.children():
        _move_except_experts(child, fn)


def _retie(layer: MoELayer, stacks: dict[str, torch.Tensor]) -> None:
    """Point every expert parameter at its row of ``stacks`` (new storage for the same values)."""
    with torch.no_grad():
        for name, stack in stacks.items():
            for i, e in enumerate(layer.experts):
                e.get_parameter(name).data = stack[i]
    layer.stacks = dict(stacks)
    if layer._linear:
        layer._w, layer._b = stacks["weight"], stacks.get("bias")


class ExpertOffload:
    """Expert offload over one merged UNet (see the module docstring); use :func:`enable_expert_offload`.

    Also a context manager: leaving the ``with`` block calls :meth:`disable`.
    """

    def __init__(self, unet: nn.Module, device, slots: Optional[int] = None, storage="cpu", prefetch: bool = True,
                 max_bytes: Optional[int] = None):
        self.unet, self.device, self.storage, self.prefetch = unet, torch.device(device), torch.device(storage), prefetch
        layers = list(iter_moe_layers(unet))
        if not layers:
            raise ValueError("expert offload needs a merged UNet; this one has no MoE layers")
        if slots is not None and slots < 1:
            raise ValueError(f"slots={slots} must be at least 1")
        self.pinned = self.device.type == "cuda" and self.storage.type == "cpu"
        self._stream = torch.cuda.Stream(self.device) if self.pinned and prefetch else None
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} must be positive (or None for no bound)")
        self.max_bytes = max_bytes
        self._hits = self._misses = self._prefetched = self._overflow_calls = self._transferred = self._evictions = 0
        self._slot_bytes = self._tick = 0
        self._next: dict[int, SiteOffload] = {}  # id(site) -> the site called after it (learnt on the first pass)
        self._last: Optional[SiteOffload] = None

        for _, layer in layers:
            _expert_tensors(layer)  # fail early on unstackable experts
        with torch.no_grad():
            _move_except_experts(unet, lambda t: t.to(self.device))
            for path, layer in layers:
                stacks = {n: t.to(self.storage) for n, t in layer.stacks.items()}
                if self.pinned:
                    stacks = {n: t.pin_memory() for n, t in stacks.items()}
                _retie(layer, stacks)
        self.static_bytes = non_expert_bytes(unet)
        self._peak = self.static_bytes
        self.sites = {path: SiteOffload(self, path, layer, slots or layer.top_k) for path, layer in layers}
        for path, layer in layers:
            layer._offload = self.sites[path]

    # --- call order, slot budget and prefetch ----------------------------------------------------
    def _enter(self, site: SiteOffload) -> None:
        prev = self._last
        if prev is not None and id(prev) not in self._next and site is not prev:
            self._next[id(prev)] = site  # learn "site follows prev"
        self._last = site
        self._tick += 1
        site.last_run = self._tick

    def _make_room(self, site: SiteOffload) -> None:
        """Free other sites' slots, most recently run first, until ``site``'s fit in ``max_bytes``."""
        if self.max_bytes is None:
            return
        keep = {id(site), id(self._last), id(self._next.get(id(site)))}
        holders = sorted((s for s in self.sites.values() if s.stacks is not None and id(s) not in keep),
                         key=lambda s: s.last_run, reverse=True)
        for victim in holders:
            if self._slot_bytes + site.slot_nbytes <= self.max_bytes:
                break
            victim.release()
            self._evictions += 1

    def _prefetch_after(self, site: SiteOffload) -> None:
        nxt = self._next.get(id(site))
        if not self.prefetch or nxt is None or not nxt.last_used or len(nxt.last_used) > nxt.capacity:
            return
        if nxt.stacks is not None and all(e in nxt.slot_of for e in nxt.last_used):
            return
        if self._stream is None:
            nxt.ensure(nxt.last_used, prefetch=True)
            return
        main = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(main)  # earlier reads of nxt's slots finish before they are overwritten
        with torch.cuda.stream(self._stream):
            nxt.ensure(nxt.last_used, prefetch=True)
            for t in nxt.stacks.values():
                t.record_stream(main)  # slots allocated on the side stream are read on the main one
            nxt.ready = torch.cuda.Event()
            nxt.ready.record(self._stream)

    def _note_peak(self, extra: int = 0) -> None:
        self._peak = max(self._peak, self.static_bytes + self._slot_bytes + extra)

    # --- public -----------------------------------------------------------------------------
    def warm(self, choices: dict[str, list[int]]) -> None:
        """Load recorded choices (site path -> expert indices) into the slots before generating."""
        for path, used in choices.items():
            site = self.sites[path]
            site.ensure(list(used)[: site.capacity], prefetch=True)
            site.last_used = list(used)
        self._note_peak()

    def stats(self) -> OffloadStats:
        """Bytes resident and moved so far (see :class:`OffloadStats`)."""
        self._note_peak()
        return OffloadStats(self.static_bytes, self._slot_bytes, self._peak, self._transferred, self._hits,
                            self._misses, self._prefetched, self._overflow_calls, self._evictions)

    def disable(self, device=None) -> None:
        """Free the slots and put the experts back on ``device`` (defaults to the offload device)."""
        dev = torch.device(device) if device is not None else self.device
        with torch.no_grad():
            for site in self.sites.values():
                site.layer._offload = None
                site.release()
                _retie(site.layer, {n: t.to(dev) for n, t in site.layer.stacks.items()})
            if dev != self.device:
                _move_except_experts(self.unet, lambda t: t.to(dev))
        self.sites = {}

    def __enter__(self) -> "ExpertOffload":
        return self

    def __exit__(self, *exc) -> None:
        if self.sites:
            self.disable()


def enable_expert_offload(pipe_or_unet, device: Union[str, torch.device], *, slots: Optional[int] = None,
                          max_bytes: Optional[int] = None, storage: Union[str, torch.device] = "cpu",
                          prefetch: bool = True) -> ExpertOffload:
    """Keep a merge's experts on ``storage`` and only the routed ones (LRU slots) on ``device``.

    Args:
        pipe_or_unet: a diffusers pipeline with a merged UNet (its other components are moved to
            ``device`` whole), or the merged UNet itself.
        device (`str` or `torch.device`): the accelerator, e.g. ``"cuda"`` (``"cpu"`` or ``"meta"``
            simulate one: copies and byte accounting happen all the same).
        slots (`int`, *optional*): experts kept on the device per site; defaults to each layer's
            ``top_k``. More slots: fewer copies when routing changes, more memory.
        max_bytes (`int`, *optional*): bound on all sites' slots together (bytes); sites then take
            turns, prefetched one site ahead. ``None``: every site keeps its slots.
        storage (`str`, *optional*, defaults to ``"cpu"``): where all experts live (pinned on CUDA).
        prefetch (`bool`, *optional*, defaults to `True`): load the next site's last-used experts
            ahead when they are not on the device (only happens under ``max_bytes``).

    Returns:
        :class:`ExpertOffload` (``.stats()``, ``.disable()``; also a context manager).
    """
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if unet is not pipe_or_unet:
        for name, comp in pipe_or_unet.components.items():
            if isinstance(comp, nn.Module) and name != "unet":
                comp.to(device)
    return ExpertOffload(unet, device, slots=slots, storage=storage, prefetch=prefetch, max_bytes=max_bytes)
