"""Reading experts' UNet tensors without a second UNet in memory.

Loading an expert's whole UNet as a state dict holds a second UNet in memory, plus the file's pages
when safetensors maps it (mapped pages count as resident memory). These read each tensor from disk
straight into its destination with plain file reads, so the transient is one tensor, or one group of
sites of about :data:`READ_CHUNK` bytes.

Example::

    for path, tensors in read_sites(res, "sdxl", dict(unet.config), site_paths, shapes, torch.bfloat16):
        ...   # one site's tensors (names relative to the site)
"""
from __future__ import annotations

import ctypes
import json
import math
import struct
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from segmoe_lab import sources

# Bytes of expert tensors read at once. Small groups matter: glibc keeps freed heap pages, so the
# larger the group, the more a build's peak grows (measured on the SD 1.5 whole-UNet switch at
# rank 16: 256 MiB groups peaked 0.5 GiB above 32 MiB ones).
READ_CHUNK = 32 * 2**20

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _read_safetensors_into(path, targets: list[tuple[str, torch.Tensor]]) -> None:
    """Copy tensors ``key`` of a safetensors file into ``dst`` (same shape), one at a time, without mmap."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header, start = json.loads(f.read(n)), 8 + n
        for key, dst in targets:
            info = header[key]
            lo, hi = info["data_offsets"]
            dtype = _ST_DTYPES[info["dtype"]]
            f.seek(start + lo)
            direct = dtype == dst.dtype and dst.is_contiguous() and dst.device.type == "cpu"
            buf = dst if direct else torch.empty(dst.shape, dtype=dtype)
            raw = buf.reshape(-1).view(torch.uint8)  # (nbytes,) view of buf
            if raw.numel() != hi - lo or f.readinto(memoryview(raw.numpy())) != hi - lo:
                raise sources.SourceError(f"{path}: tensor {key} is truncated or not {tuple(dst.shape)}")
            if not direct:
                dst.copy_(buf)


def _stream_unet_into(res, model_type: str, unet_config: dict, unet: nn.Module) -> bool:
    """Overwrite ``unet``'s tensors with a source's, streamed (see above). False where the source is
    not safetensors (pickles are read whole by :mod:`sources`); the caller then loads a state dict."""
    where = _file_index(res, model_type, unet_config)
    if where is None:
        return False
    by_file: dict = {}
    for name, dst in unet.state_dict().items():  # detached tensors sharing the parameters' storage
        file, key = where[name]
        by_file.setdefault(file, []).append((key, dst))
    for file, targets in by_file.items():
        _read_safetensors_into(file, targets)
    return True


def _file_index(res, model_type: str, unet_config: dict) -> Optional[dict]:
    """Diffusers tensor name -> (file, key) of a safetensors source (headers only), or None for
    sources :mod:`sources` reads whole (pickles)."""
    with sources.open_unet_tensors(res, model_type, unet_config) as t:
        where = getattr(t, "_where", None)
        return None if getattr(t, "_loaded", None) is not None or not where else where


def read_sites(res, model_type: str, unet_config: dict, site_names: Mapping[str, Sequence[str]], shapes: dict,
               dtype: torch.dtype) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``(site, {name within the site: tensor})`` for each site of ``site_names`` (site -> its UNet
    tensor names, :func:`~segmoe_lab.merge.discovery.tensors_by_site`) from a source's UNet, in
    ``dtype``, read in groups of about :data:`READ_CHUNK` bytes (``shapes``: tensor name -> shape).

    Sources that are not safetensors (pickles) are read whole by :mod:`sources`, then handed out by site.
    """
    where = _file_index(res, model_type, unet_config)
    if where is None:
        state = sources.read_unet_tensors(res, model_type, unet_config, names=[k for ks in site_names.values() for k in ks])
        for p, names in site_names.items():
            yield p, {k[len(p) + 1:]: state.pop(k).to(dtype) for k in names}
        return
    itemsize = torch.empty((), dtype=dtype).element_size()
    group, size = [], 0
    for j, p in enumerate(site_names):
        group.append(p)
        size += sum(math.prod(shapes[k]) for k in site_names[p]) * itemsize
        if size < READ_CHUNK and j + 1 < len(site_names):
            continue
        out: dict[str, dict] = {}
        by_file: dict = {}
        for q in group:
            out[q] = {}
            for k in site_names[q]:
                out[q][k[len(q) + 1:]] = dst = torch.empty(shapes[k], dtype=dtype)
                file, key = where[k]
                by_file.setdefault(file, []).append((key, dst))
        for file, targets in by_file.items():
            _read_safetensors_into(file, targets)
        del by_file
        for q in group:
            yield q, out.pop(q)
        group, size = [], 0


def release_freed_memory() -> None:
    """Hand freed heap pages back to the operating system (glibc's ``malloc_trim``); a no-op
    elsewhere. A build frees each expert's tensors before reading the next, but glibc keeps the
    pages, and the process's peak grows by what it keeps."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
