"""Train the toy world's models from scratch: ``segmoe-lab toy train [--quick] [--out DIR] [--seed N] [--workers N]``.

Order (each stage uses the ones before it): VAE -> CLIP (its text tower is every pipeline's text
encoder) -> SD base UNet, and beside it the SDXL-layout base + two experts -> one expert per
domain + the compute-matched control, two at a time -> LoRA and single-file forms -> CLIP's
image tower on generated images. Stages that do not depend on each other run in parallel
processes of one torch thread each (on a 2-core CPU one thread per process beat two threads in
one process); every stage draws from its own seeded stream, so the weights do not depend on how
many workers ran them. Stages pass models to each other as the saved folders. Data are drawn
fresh every step from the world's seeded sampler, so there is no dataset to store.

Data per model (see :mod:`.world`): the base sees every domain, each domain's own concept in
10% of its scenes; an expert sees its domain only, its concept in 50%; the compute-matched
control is the base trained for as many extra steps as one expert on the base's own data (all
domains, 10%): what the extra compute alone buys. (A stricter control tried once, the experts'
data pooled, learnt the concepts nearly as well as the experts: they led it by only flat +0.015,
neon +0.11, mosaic +0.03.) UNets are trained with v-prediction and min-SNR-5 weighting, 10%
caption dropout (for guidance), an EMA of the weights is what is saved.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import models, world

WEIGHTS = Path(__file__).parent / "weights"
LORA_DOMAIN = "mosaic"  # this expert is also shipped as a LoRA (extracted from its weights)
SINGLE_FILE_DOMAIN = "neon"  # ... and this one as a single-file checkpoint
SDXL_EXPERTS = ("flat", "neon")


@dataclass(frozen=True)
class Plan:
    """Steps and batch sizes of every stage."""

    vae_steps: int = 400
    clip_steps: int = 800
    clip_batch: int = 128
    base_steps: int = 1300
    # 900 rather than 300: the experts' lead over the control grew (flat +0.08 -> +0.13, neon +0.04 -> +0.07)
    expert_steps: int = 900
    expert_ema: float = 0.995
    sdxl_base_steps: int = 500
    sdxl_expert_steps: int = 150
    batch: int = 32
    lora_rank: int = 8
    clip_gen_per_model: int = 80  # generated images per SD model and domain, to fine-tune CLIP's image tower
    clip_gen_steps: int = 300


QUICK = Plan(vae_steps=2, clip_steps=2, clip_batch=8, base_steps=2, expert_steps=2, sdxl_base_steps=2,
             sdxl_expert_steps=2, batch=4, lora_rank=2, clip_gen_per_model=2, clip_gen_steps=2)


class Log:
    """Loss curves (``losses.csv``) and stage timings (``train_log.json``) in the output folder;
    with ``out`` None (a worker process) it only collects them, for the parent to merge."""

    def __init__(self, out: Optional[Path]):
        self.out, self.rows, self.stages = out, [], {}

    def loss(self, stage: str, step: int, value: float) -> None:
        self.rows.append((stage, step, value))

    def stage(self, name: str, seconds: float, **info) -> None:
        self.stages[name] = {"seconds": round(seconds, 1), **info}
        self.write()

    def merge(self, rows: list, stages: dict) -> None:
        self.rows += rows
        self.stages.update(stages)
        self.write()

    def write(self) -> None:
        if self.out is None:
            return
        with open(self.out / "losses.csv", "w") as f:
            f.write("stage,step,loss\n" + "".join(f"{s},{i},{v:.6f}\n" for s, i, v in self.rows))
        (self.out / "train_log.json").write_text(json.dumps(self.stages, indent=2))

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pandas as pd

        df = pd.DataFrame(self.rows, columns=["stage", "step", "loss"])
        stages = list(dict.fromkeys(df.stage))
        fig, axes = plt.subplots(1, len(stages), figsize=(2.6 * len(stages), 2.4), squeeze=False)
        for ax, s in zip(axes[0], stages):
            d = df[df.stage == s]
            ax.plot(d.step, d.loss.rolling(max(1, len(d) // 30), min_periods=1).mean())
            ax.set_title(s, fontsize=8)
            ax.set_yscale("log")
            ax.tick_params(labelsize=6)
        fig.tight_layout()
        fig.savefig(self.out / "losses.png", dpi=90)
        plt.close(fig)


def _progress(n: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, leave=False, mininterval=2.0)


def _scenes(rng: np.random.Generator, n: int, domains, special: float) -> list[world.Scene]:
    return [world.sample_scene(rng, domains[rng.integers(len(domains))], special) for _ in range(n)]


def _captions(rng: np.random.Generator, scenes) -> list[str]:
    """Template 0 three times in four (the prompt set's), else template 1."""
    return [world.caption(s, int(rng.random() < 0.25)) for s in scenes]


def _lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up then cosine decay to a tenth."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


# --- VAE ------------------------------------------------------------------------------------------

def train_vae(plan: Plan, rng, log: Log, device) -> torch.nn.Module:
    vae = models.make_vae(int(rng.integers(1 << 30))).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    for step in _progress(plan.vae_steps, "vae"):
        x = torch.from_numpy(world.render_array(_scenes(rng, plan.batch, world.DOMAINS, 0.3))).to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        for g in opt.param_groups:
            g["lr"] = _lr(step, plan.vae_steps, 2e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.loss("vae", step, loss.item())
    vae.eval()
    with torch.no_grad():  # unit-variance latents, as SD's scaling_factor does
        x = torch.from_numpy(world.render_array(_scenes(rng, 256, world.DOMAINS, 0.3))).to(device)
        std = vae.encode(x).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 4))
    return vae.requires_grad_(False)


# --- CLIP -----------------------------------------------------------------------------------------

def augment(x: torch.Tensor, rng: np.random.Generator, vae=None) -> torch.Tensor:
    """What generated images look like: some through the VAE, blurred, noisy, colour-shifted. (B, 3, H, W) in [-1, 1]."""
    b = x.shape[0]
    if vae is not None:
        pick = torch.from_numpy(rng.random(b) < 0.4).to(x.device)
        if pick.any():
            with torch.no_grad():
                x = x.clone()
                x[pick] = vae.decode(vae.encode(x[pick]).latent_dist.sample()).sample.clamp(-1, 1)
    sigma = rng.uniform(0.0, 1.2)
    if sigma > 0.3:
        r = 2
        k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2 / (2 * sigma ** 2))
        k = (k / k.sum()).view(1, 1, 1, -1)
        blur = x.reshape(b * 3, 1, *x.shape[2:])
        blur = F.conv2d(F.pad(blur, (r, r, 0, 0), mode="replicate"), k)
        blur = F.conv2d(F.pad(blur, (0, 0, r, r), mode="replicate"), k.transpose(-1, -2))
        x = blur.view_as(x)
    gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(1 << 30)))
    noise = torch.randn(x.shape, generator=gen).to(x.device) * torch.from_numpy(rng.uniform(0, 0.15, (b, 1, 1, 1))).float().to(x.device)
    shift = torch.from_numpy(rng.normal(0, 0.05, (b, 3, 1, 1))).float().to(x.device)
    return (x + noise + shift).clamp(-1, 1)


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


# --- UNets ----------------------------------------------------------------------------------------

class Conditioner:
    """Caption -> the UNet's conditioning, exactly as the pipeline computes it (cached per caption)."""

    def __init__(self, pipe, sdxl: bool):
        self.pipe, self.sdxl, self.cache = pipe, sdxl, {}

    def _one(self, caption: str):
        if caption not in self.cache:
            with torch.no_grad():
                if self.sdxl:
                    emb, _, pooled, _ = self.pipe.encode_prompt(caption, do_classifier_free_guidance=False)
                    if caption == "":  # force_zeros_for_empty_prompt: the pipeline's unconditional input
                        emb, pooled = torch.zeros_like(emb), torch.zeros_like(pooled)
                    self.cache[caption] = (emb[0], pooled[0])
                else:
                    emb, _ = self.pipe.encode_prompt(caption, self.pipe.device, 1, False)
                    self.cache[caption] = (emb[0], None)
        return self.cache[caption]

    def __call__(self, captions: list[str]) -> dict:
        parts = [self._one(c) for c in captions]
        cond = {"encoder_hidden_states": torch.stack([p[0] for p in parts])}  # (B, T, D)
        if self.sdxl:
            size = world.SIZE
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(len(captions), 1)
            cond["added_cond_kwargs"] = {"text_embeds": torch.stack([p[1] for p in parts]),
                                         "time_ids": time_ids.to(cond["encoder_hidden_states"].device)}
        return cond


def _ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_unet(unet, steps: int, sample: Callable, cond: Conditioner, vae, rng, log: Log, stage: str, device,
               batch: int, lr: float, ema_decay: float) -> torch.nn.Module:
    """v-prediction with min-SNR-5 weights; returns the EMA copy (eval mode)."""
    sched = models.train_scheduler()
    alphas = sched.alphas_cumprod.to(device)
    unet = unet.to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(1 << 30)))
    for step in _progress(steps, stage):
        scenes = sample(rng, batch)
        caps = [c if rng.random() > 0.1 else "" for c in _captions(rng, scenes)]  # caption dropout, for guidance
        with torch.no_grad():
            x = torch.from_numpy(world.render_array(scenes)).to(device)
            z = vae.encode(x).latent_dist.sample(generator=None) * vae.config.scaling_factor
        noise = torch.randn(z.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen).to(device)
        noisy = sched.add_noise(z, noise, t)
        target = sched.get_velocity(z, noise, t)
        pred = unet(noisy, t, **cond(caps)).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = snr.clamp(max=5.0) / (snr + 1)  # min-SNR-5 for v-prediction
        loss = (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=min(50, steps // 5 + 1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        _ema_update(ema, unet, min(ema_decay, (1 + step) / (10 + step)))
        log.loss(stage, step, loss.item())
    return ema


def _sampler(domains, special: float):
    return lambda rng, n: _scenes(rng, n, domains, special)


# --- LoRA and single-file forms -------------------------------------------------------------------

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


# --- everything -----------------------------------------------------------------------------------

def _stage_rng(seed: int, stage: str) -> np.random.Generator:
    """The stage's own random stream (numpy, and torch's global one): its data and initialisation
    depend on the seed and the stage's name only, not on which stages ran before it or where."""
    key = zlib.crc32(stage.encode())
    torch.manual_seed(seed * 2**32 + key)
    return np.random.default_rng([seed, key])


class _Models:
    """The saved models a stage starts from, read from the output folder."""

    def __init__(self, out: Path, device):
        self.out, self.device = out, device
        self.tokenizer = models.make_tokenizer()

    def vae(self):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(self.out / ".stages" / "vae").to(self.device).requires_grad_(False)

    def clip(self):
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(self.out / "clip", dtype=torch.float32).to(self.device).eval().requires_grad_(False)

    def sd(self, name: str):
        from . import load_pipeline

        return load_pipeline(name, self.device, weights=self.out)

    def unet(self, name: str):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(self.out / "sd" / name, subfolder="unet", dtype=torch.float32).to(self.device)


def _job(stage: str, out: Path, seed: int, plan: Plan, device) -> tuple[list, dict]:
    """Run one stage (in this process or a worker); returns its loss rows and timings."""
    from ..testing import save_single_file

    torch.set_num_threads(1)
    log, saved = Log(None), _Models(out, device)
    rng = _stage_rng(seed, stage)
    t0 = time.perf_counter()
    if stage == "sd_base":
        pipe = models.sd_pipeline(models.make_unet("sd", seed), saved.vae(), saved.clip(), saved.tokenizer).to(device)
        pipe.unet = train_unet(pipe.unet, plan.base_steps, _sampler(world.DOMAINS, world.BASE_SPECIAL),
                               Conditioner(pipe, sdxl=False), pipe.vae, rng, log, stage, device, plan.batch, 1e-3, 0.995)
        models.save_pipeline(pipe, out / "sd" / "base")
        log.stage(stage, time.perf_counter() - t0, steps=plan.base_steps)
    elif stage == "sdxl":  # base and two experts (shorter): the SDXL code paths on trained weights
        xl = models.sdxl_pipeline(models.make_unet("sdxl", seed), saved.vae(), saved.clip(), saved.tokenizer).to(device)
        cond = Conditioner(xl, sdxl=True)
        xbase = train_unet(xl.unet, plan.sdxl_base_steps, _sampler(world.DOMAINS, world.BASE_SPECIAL), cond, xl.vae,
                           rng, log, "sdxl_base", device, plan.batch, 1e-3, 0.99)
        xl.unet = xbase
        models.save_pipeline(xl, out / "sdxl" / "base")
        log.stage("sdxl_base", time.perf_counter() - t0, steps=plan.sdxl_base_steps)
        for d in SDXL_EXPERTS:
            t1 = time.perf_counter()
            unet = copy.deepcopy(xbase).requires_grad_(True)
            xl.unet = train_unet(unet, plan.sdxl_expert_steps, _sampler([d], world.EXPERT_SPECIAL), cond, xl.vae,
                                 _stage_rng(seed, f"sdxl_{d}"), log, f"sdxl_{d}", device, plan.batch, 3e-4, 0.98)
            models.save_pipeline(xl, out / "sdxl" / d)
            log.stage(f"sdxl_{d}", time.perf_counter() - t1, steps=plan.sdxl_expert_steps)
    else:  # a fine-tune of the saved base: an expert (its domain) or the control (all domains)
        name = stage.removeprefix("sd_")
        domains, special = (world.DOMAINS, world.BASE_SPECIAL) if name == "control" else ([name], world.EXPERT_SPECIAL)
        pipe = saved.sd("base")
        pipe.unet = train_unet(pipe.unet.requires_grad_(True), plan.expert_steps, _sampler(domains, special),
                               Conditioner(pipe, sdxl=False), pipe.vae, rng, log, stage, device, plan.batch, 3e-4,
                               plan.expert_ema)
        models.save_pipeline(pipe, out / "sd" / name)
        if name == SINGLE_FILE_DOMAIN:
            save_single_file(pipe.to(torch.float16), out / "sd" / f"{name}.safetensors")
        log.stage(stage, time.perf_counter() - t0, steps=plan.expert_steps, domains=list(domains))
    return log.rows, log.stages


def default_workers(device: str) -> int:
    """Parallel stage processes: one per CPU core (at most 2: no phase has more than 2 long stages
    at once but the fine-tunes, and 4 of them on 2 cores balance); 1 on a GPU."""
    return 1 if device != "cpu" else max(1, min(2, os.cpu_count() or 1))


def train_all(out: Path = WEIGHTS, seed: int = 0, quick: bool = False, device: Optional[str] = None,
              plan: Optional[Plan] = None, workers: Optional[int] = None) -> dict:
    """Train every toy model into ``out`` (diffusers folders); returns the stage timings.

    ``workers`` processes (default :func:`default_workers`) run independent stages side by side;
    the weights are the same for any number of workers."""
    torch.set_num_threads(1)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = plan or (QUICK if quick else Plan())
    workers = workers or default_workers(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out)
    start = time.perf_counter()

    def timed(name, fn, **info):
        t0 = time.perf_counter()
        result = fn()
        log.stage(name, time.perf_counter() - t0, **info)
        return result

    tokenizer = models.make_tokenizer()
    vae = timed("vae", lambda: train_vae(plan, _stage_rng(seed, "vae"), log, device), steps=plan.vae_steps)
    vae.save_pretrained(out / ".stages" / "vae")
    clip = timed("clip", lambda: train_clip(plan, _stage_rng(seed, "clip"), log, device, tokenizer, vae), steps=plan.clip_steps)
    models.save_clip(clip.to("cpu"), tokenizer, out / "clip")
    clip = clip.to(device)

    phases = [["sd_base", "sdxl"], [f"sd_{d}" for d in (*world.DOMAINS, "control")]]
    pool = None
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: a forked child inherits torch's thread pools and can hang in them
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for i, phase in enumerate(phases):
            t0 = time.perf_counter()
            args = [phase] + [[x] * len(phase) for x in (out, seed, plan, device)]
            for rows, stages in (pool.map if pool else map)(_job, *args):
                log.merge(rows, stages)
            log.stage(f"phase_{i + 1}_wall", time.perf_counter() - t0, stages=phase, workers=workers)
    finally:
        if pool:
            pool.shutdown()

    saved = _Models(out, device)
    pipe = saved.sd("base")
    tuned = {name: saved.unet(name) for name in (*world.DOMAINS, "control")}
    lora = extract_lora(pipe.unet, tuned[LORA_DOMAIN], plan.lora_rank)
    save_lora(lora, out / "sd" / f"{LORA_DOMAIN}_lora", plan.lora_rank)
    unets = {"base": pipe.unet, **tuned}
    clip = timed("clip_generated", lambda: finetune_clip_on_generated(clip, tokenizer, pipe, unets, plan, log, seed, device),
                 steps=plan.clip_gen_steps)
    models.save_clip(clip.to("cpu"), tokenizer, out / "clip")
    shutil.rmtree(out / ".stages")
    log.stage("total", time.perf_counter() - start, seed=seed, quick=quick, device=device, plan=asdict(plan),
              threads_per_process=1, workers=workers)
    log.plot()
    return log.stages
