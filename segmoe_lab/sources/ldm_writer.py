"""Write a diffusers pipeline as one original-LDM-layout ``.safetensors`` (the inverse of :mod:`.single_file`): how the kit ships and tests single-file sources."""
from __future__ import annotations

from pathlib import Path

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _unet_ldm_name(name: str, config: dict) -> str:
    """diffusers UNet tensor name -> original (LDM) name, without the ``model.diffusion_model.`` prefix."""
    stem, leaf = name.rsplit(".", 1)
    if stem in _UNET_TOP:
        return f"{_UNET_TOP[stem]}.{leaf}"
    n = config["layers_per_block"] + 1  # LDM numbers a down level's resnets and its downsampler together
    part, *rest = name.split(".")
    if part == "mid_block":
        kind, j, tail = rest[0], int(rest[1]), rest[2:]
        return f"middle_block.{2 * j}.{_resnet(tail)}" if kind == "resnets" else f"middle_block.1.{'.'.join(tail)}"
    b, kind, j, tail = int(rest[0]), rest[1], int(rest[2]), rest[3:]
    if part == "down_blocks":
        i = 1 + b * n + j
        if kind == "resnets":
            return f"input_blocks.{i}.0.{_resnet(tail)}"
        if kind == "attentions":
            return f"input_blocks.{i}.1.{'.'.join(tail)}"
        return f"input_blocks.{(b + 1) * n}.0.op.{tail[-1]}"  # downsamplers.0.conv.<leaf>
    i = b * n + j
    if kind == "resnets":
        return f"output_blocks.{i}.0.{_resnet(tail)}"
    if kind == "attentions":
        return f"output_blocks.{i}.1.{'.'.join(tail)}"
    slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1  # after the attention, if any
    return f"output_blocks.{b * n + n - 1}.{slot}.conv.{tail[-1]}"  # upsamplers.0.conv.<leaf>


def _resnet(tail: list[str]) -> str:
    return ".".join([_RESNET.get(tail[0], tail[0]), *tail[1:]])


def _vae_ldm(state: dict, config: dict) -> dict:
    out, n_up = {}, len(config["up_block_types"])
    for name, t in state.items():
        parts = name.split(".")
        where, block = parts[0], parts[1]
        if block in ("down_blocks", "up_blocks"):
            i = int(parts[2]) if block == "down_blocks" else n_up - 1 - int(parts[2])  # LDM decoder counts up
            level = f"{where}.{'down' if block == 'down_blocks' else 'up'}.{i}"
            if parts[3] == "resnets":
                new = f"{level}.block.{parts[4]}.{'.'.join(parts[5:])}".replace("conv_shortcut", "nin_shortcut")
            else:  # downsamplers.0.conv.x / upsamplers.0.conv.x
                new = f"{level}.{'downsample' if block == 'down_blocks' else 'upsample'}.conv.{parts[-1]}"
        elif block == "mid_block" and parts[2] == "resnets":
            new = f"{where}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}".replace("conv_shortcut", "nin_shortcut")
        elif block == "mid_block":  # attentions.0.<layer>.<leaf>: LDM uses 1x1 convolutions
            layer = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[parts[4]]
            new = f"{where}.mid.attn_1.{layer}.{parts[-1]}"
            t = t[:, :, None, None] if t.ndim == 2 else t
        else:
            new = name.replace("conv_norm_out", "norm_out")
        out[new] = t
    return out


def _clip_ldm(state: dict) -> dict:
    # transformers >= 5.6 flattened CLIPTextModel; the original layout keeps the text_model. level
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): t for k, t in state.items()}


def _open_clip_ldm(state: dict) -> dict:
    """CLIPTextModelWithProjection -> OpenCLIP names (fused q/k/v, transposed projection)."""
    out, layers = {}, {}
    for k, t in state.items():
        k = k.removeprefix("text_model.")
        if k.startswith("encoder.layers."):
            i, rest = k.split(".", 3)[2:]
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                layers.setdefault((i, rest.split(".")[-1]), {})[rest.split(".")[1]] = t
                continue
            rest = (rest.replace("self_attn.", "attn.").replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                    .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            out[f"transformer.resblocks.{i}.{rest}"] = t
        else:
            names = {"embeddings.token_embedding.weight": "token_embedding.weight",
                     "embeddings.position_embedding.weight": "positional_embedding",
                     "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
                     "text_projection.weight": "text_projection"}
            out[names[k]] = t.T if k == "text_projection.weight" else t
    for (i, leaf), qkv in layers.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = torch.cat([qkv["q_proj"], qkv["k_proj"], qkv["v_proj"]])
    return out


def ldm_state_dict(pipe, unet=None) -> dict[str, torch.Tensor]:
    """A pipeline's weights under original Stable Diffusion (LDM / SGM) key names."""
    unet = unet or pipe.unet
    cfg = dict(unet.config)
    sd = {f"model.diffusion_model.{_unet_ldm_name(k, cfg)}": t for k, t in unet.state_dict().items()}
    sd.update({f"first_stage_model.{k}": t for k, t in _vae_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)).items()})
    if getattr(pipe, "text_encoder_2", None) is None:
        sd.update({f"cond_stage_model.transformer.{k}": t for k, t in _clip_ldm(pipe.text_encoder.state_dict()).items()})
    else:
        sd.update({f"conditioner.embedders.0.transformer.{k}": t
                   for k, t in _clip_ldm(pipe.text_encoder.state_dict()).items()})
        sd.update({f"conditioner.embedders.1.model.{k}": t
                   for k, t in _open_clip_ldm(pipe.text_encoder_2.state_dict()).items()})
    return sd


def save_single_file(pipe, path, unet=None) -> Path:
    """Write ``pipe`` (with ``unet`` instead of ``pipe.unet`` if given) as one LDM-layout ``.safetensors``.

    The file loads with ``from_single_file(path, config=<a diffusers folder of the same layout>)``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in ldm_state_dict(pipe, unet).items()}
    save_file(tensors, str(path))
    return path
