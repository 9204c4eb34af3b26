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
import os
import shutil
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from segmoe_lab.toy.lora import extract_lora, save_lora
from segmoe_lab.toy.plan import QUICK, Log, Plan, _captions, _lr, _progress, _scenes
from segmoe_lab.toy.train_clip import finetune_clip_on_generated, train_clip

from . import models, world

WEIGHTS = Path(__file__).parent / "weights"
LORA_DOMAIN = "mosaic"  # this expert is also shipped as a LoRA (extracted from its weights)
SINGLE_FILE_DOMAIN = "neon"  # ... and this one as a single-file checkpoint
SDXL_EXPERTS = ("flat", "neon")


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
    from segmoe_lab.sources.ldm_writer import save_single_file

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
