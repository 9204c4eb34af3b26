"""The mosaic expert as a LoRA: extracted from the full expert's weights by truncated SVD."""
from __future__ import annotations

import json
from pathlib import Path

import torch

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj")


@torch.no_grad()
def extract_lora(base_unet, expert_unet, rank: int) -> dict:
    """The expert's weight difference from the base, truncated to rank ``rank`` by SVD, as a peft
    LoRA state dict (``...lora_A.weight`` / ``lora_B.weight``) for :func:`save_lora`.

    Only Linear/Conv weights of :data:`LORA_TARGETS` are carried; norms and biases stay the base's
    (what a LoRA can hold)."""
    base = dict(base_unet.named_modules())
    out = {}
    for name, mod in expert_unet.named_modules():
        if not any(name.endswith(t) for t in LORA_TARGETS) or not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        delta = (mod.weight - base[name].weight).float()  # (out, in[, k, k])
        flat = delta.reshape(delta.shape[0], -1)  # (out, in * k * k)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]  # (out, r), (r, in * k * k)
        if delta.dim() == 4:
            a, b = a.reshape(r, *delta.shape[1:]), b[:, :, None, None]
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a.contiguous(), b.contiguous()
    return out


def save_lora(state: dict, folder: Path, rank: int) -> Path:
    """Write a LoRA in diffusers' format (``pytorch_lora_weights.safetensors``, ``unet.`` keys)."""
    from diffusers import StableDiffusionPipeline

    folder.mkdir(parents=True, exist_ok=True)
    layers = {k: v.to(torch.float16) for k, v in state.items()}
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    (folder / "lora_info.json").write_text(json.dumps({"rank": rank, "alpha": rank, "targets": list(LORA_TARGETS)}))
    return folder
