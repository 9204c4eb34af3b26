"""What every toy training stage shares: the step budget (:class:`Plan`), the log, scene and caption sampling, the learning-rate schedule and augmentation."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from segmoe_lab.toy import world


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
