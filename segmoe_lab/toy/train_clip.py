"""Training the toy world's tiny CLIP: on rendered scenes first, then on images the toy UNets generated."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from segmoe_lab.toy import models, world
from segmoe_lab.toy.plan import Log, Plan, _captions, _lr, _progress, _scenes, augment


def _description_key(s: world.Scene) -> tuple:
    return (s.domain, s.shape, s.colour, s.count)


def train_clip(plan: Plan, rng, log: Log, device, tokenizer, vae) -> torch.nn.Module:
    """Contrastive (InfoNCE) with every same-description pair in the batch counted as a positive."""
    clip = models.make_clip(tokenizer, int(rng.integers(1 << 30))).to(device).train()
    opt = torch.optim.AdamW(clip.parameters(), lr=2e-3, weight_decay=0.05)
    for step in _progress(plan.clip_steps, "clip"):
        scenes = _scenes(rng, plan.clip_batch, world.DOMAINS, 0.35)
        x = augment(torch.from_numpy(world.render_array(scenes)).to(device), rng, vae)
        ids = tokenizer(_captions(rng, scenes), padding="max_length", max_length=models.MAX_TOKENS,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out = clip(input_ids=ids, pixel_values=models.clip_pixels(x))
        keys = [_description_key(s) for s in scenes]
        same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.float32, device=device)  # (B, B)
        target = same / same.sum(1, keepdim=True)
        logits = out.logits_per_image  # (B, B)
        loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean())
        for g in opt.param_groups:
            g["lr"] = _lr(step, plan.clip_steps, 2e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        log.loss("clip", step, loss.item())
    return clip.eval().requires_grad_(False)


def all_captions() -> list[dict]:
    """Every caption the checker can read back: each domain x shape x colour x count."""
    return [{"domain": d, "shape": s, "colour": c, "count": n} for d in world.DOMAINS for s in world.SHAPES
            for c in world.COLOURS for n in world.COUNT_WORDS]


def read_back(image, asked: dict) -> Optional[dict]:
    """What a generated image shows, as a description (majority colour and shape, object count),
    or None when the checker finds no object or more than three."""
    from collections import Counter

    from .truth import check

    objects = check(image, asked)["objects"]
    if not 1 <= len(objects) <= 3:
        return None
    top = lambda key: Counter(o[key] for o in objects).most_common(1)[0][0]  # noqa: E731
    return {"domain": asked["domain"], "shape": top("shape"), "colour": top("colour"), "count": len(objects)}


def finetune_clip_on_generated(clip, tokenizer, pipe, unets: dict, plan: "Plan", log: "Log", seed: int,
                               device) -> torch.nn.Module:
    """Teach CLIP's image tower what *generated* images show: images from the SD models, each
    labelled with the caption the checker reads back from it, mixed half and half with augmented
    renders; cross-entropy over all 162 readable captions. The text tower (the pipelines' text
    encoder) stays frozen, so the pipelines are unchanged. Prompts and seeds are disjoint from
    the quality script's."""
    rng = np.random.default_rng([seed, 7])
    images, labels = [], []
    own_unet = pipe.unet
    with torch.no_grad():
        for name, unet in unets.items():
            pipe.unet = unet
            for d in world.DOMAINS:
                asked = [world.sample_description(rng, d, world.EXPERT_SPECIAL) for _ in range(plan.clip_gen_per_model)]
                seeds = rng.integers(1 << 30, size=len(asked))
                out = []
                for i in _progress((len(asked) + 49) // 50, f"generate {name}/{d}"):
                    gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i * 50:(i + 1) * 50]]
                    out += pipe([world.caption(a) for a in asked[i * 50:(i + 1) * 50]], num_inference_steps=15,
                                guidance_scale=3.0, generator=gens).images
                for im, a in zip(out, asked):
                    got = read_back(im, a)
                    if got is not None:
                        images.append(np.asarray(im, dtype=np.float32) / 127.5 - 1)
                        labels.append(got)
    pipe.unet = own_unet
    cands = all_captions()
    index = {tuple(sorted(c.items())): i for i, c in enumerate(cands)}
    gen_x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device)  # (N, 3, 32, 32)
    gen_y = torch.tensor([index[tuple(sorted(l.items()))] for l in labels], device=device)
    with torch.no_grad():
        ids = tokenizer([world.caption(c) for c in cands], padding="max_length", max_length=models.MAX_TOKENS,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        text = F.normalize(_feat(clip.get_text_features(input_ids=ids)), dim=-1)  # (C, E)
    clip.requires_grad_(False)
    trainable = list(clip.vision_model.parameters()) + list(clip.visual_projection.parameters())
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=5e-4, weight_decay=0.05)
    half = plan.clip_batch // 2
    for step in _progress(plan.clip_gen_steps, "clip on generated"):
        pick = torch.from_numpy(rng.integers(len(gen_y), size=half)).to(device)
        scenes = _scenes(rng, half, world.DOMAINS, 0.35)
        rendered = augment(torch.from_numpy(world.render_array(scenes)).to(device), rng)
        x = torch.cat([gen_x[pick], rendered])
        y = torch.cat([gen_y[pick], torch.tensor([index[tuple(sorted(s.description().items()))] for s in scenes], device=device)])
        img = F.normalize(_feat(clip.get_image_features(pixel_values=models.clip_pixels(x))), dim=-1)  # (B, E)
        loss = F.cross_entropy(clip.logit_scale.exp() * img @ text.T, y)
        for g in opt.param_groups:
            g["lr"] = _lr(step, plan.clip_gen_steps, 5e-4, warmup=20)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.loss("clip_generated", step, loss.item())
    log.stage("clip_generated_data", 0.0, images=len(gen_y), kept=round(len(gen_y) / max(1, len(unets) * 3 * plan.clip_gen_per_model), 3))
    return clip.eval().requires_grad_(False)


def _feat(out) -> torch.Tensor:
    """Projected CLIP features: transformers 5 returns an output object (``pooler_output``), 4 a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
