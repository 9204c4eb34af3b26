"""Is the toy world worth studying? ``segmoe-lab toy quality`` (or ``python -m segmoe_lab.toy.quality``).

Measures, on the shipped weights:

1. ground-truth correctness (:func:`~segmoe_lab.toy.truth.check`) of the base, the
   compute-matched control and every expert, in each domain, on ``n`` held-out prompts per domain
   (half of them use the domain's own concept, as the experts' data do); each expert against the
   control (and the base) in its own domain with a paired test over the same prompts and seeds;
2. the tiny CLIP's caption retrieval accuracy on held-out rendered scenes (top-1 among every
   distinct caption of the world);
3. the Spearman correlation between CLIP score and ground truth over the *generated* images;
4. the LoRA form of the mosaic expert against the full expert, and the SDXL-layout models.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import models, paths, world
from .truth import check

EVAL_SEED = 10_000  # held-out: training draws from other seeds' streams
GUIDANCE = 3.0  # the tiny models are most faithful at low guidance (7.5 over-saturates)


def eval_prompts(domain: str, n: int, seed: int = EVAL_SEED) -> list[dict]:
    """``n`` held-out descriptions of ``domain``, half with its own concept (as the experts' data)."""
    rng = np.random.default_rng([seed, world.DOMAINS.index(domain)])
    return [world.sample_description(rng, domain, world.EXPERT_SPECIAL) for _ in range(n)]


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = 15, guidance: float = GUIDANCE,
             batch: int = 50) -> list:
    """One image per (prompt, seed); each image depends only on its own seed, not on the batching."""
    images = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch]]
        images += pipe(list(prompts[i:i + batch]), num_inference_steps=steps, guidance_scale=guidance,
                       generator=gens).images
    return images


def _features(out) -> torch.Tensor:
    """Projected CLIP features: transformers 5 returns an output object (``pooler_output``), 4 a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """Cosine similarity between the tiny CLIP's image and caption embeddings."""

    def __init__(self, folder: Optional[Path] = None):
        from transformers import CLIPModel, CLIPTokenizer

        folder = folder or paths()["clip"]
        self.model = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.tok = CLIPTokenizer.from_pretrained(folder)

    @torch.no_grad()
    def text(self, captions: Sequence[str]) -> torch.Tensor:
        ids = self.tok(list(captions), padding="max_length", max_length=models.MAX_TOKENS, truncation=True,
                       return_tensors="pt")
        return torch.nn.functional.normalize(_features(self.model.get_text_features(**ids)), dim=-1)  # (N, E)

    @torch.no_grad()
    def image(self, images) -> torch.Tensor:
        x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB").resize((world.SIZE,) * 2), dtype=np.float32)
                                       for im in images]) / 127.5 - 1).permute(0, 3, 1, 2)  # (N, 3, H, W)
        return torch.nn.functional.normalize(_features(self.model.get_image_features(pixel_values=models.clip_pixels(x))), dim=-1)

    def score(self, images, captions) -> np.ndarray:
        return (self.image(images) * self.text(captions)).sum(-1).numpy()


def retrieval(clip: ClipScorer, n: int = 600, seed: int = EVAL_SEED + 1) -> dict:
    """Top-1 caption retrieval on held-out rendered scenes, among all distinct captions."""
    candidates = world.all_descriptions()
    text = clip.text([world.caption(d) for d in candidates])
    scenes = world.sample_scenes(seed, n, special=world.EXPERT_SPECIAL)
    sims = clip.image([world.render(s) for s in scenes]) @ text.T  # (n, C)
    pick = [candidates[i] for i in sims.argmax(1).tolist()]
    truth = [s.description() for s in scenes]
    same_domain = [[j for j, c in enumerate(candidates) if c["domain"] == t["domain"]] for t in truth]
    in_domain = [candidates[idx[int(sims[i, idx].argmax())]] for i, idx in enumerate(same_domain)]
    return {"n": n, "candidates": len(candidates), "top1": float(np.mean([p == t for p, t in zip(pick, truth)])),
            "top1_within_domain": float(np.mean([p == t for p, t in zip(in_domain, truth)])),
            **{f"{k}_acc": float(np.mean([p[k] == t[k] for p, t in zip(pick, truth)])) for k in ("domain", "shape", "colour", "count")}}


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean difference a - b, its 95% t-interval, and the Wilcoxon signed-rank p-value."""
    from scipy import stats

    d = np.asarray(a, float) - np.asarray(b, float)
    se = d.std(ddof=1) / np.sqrt(len(d))
    p = float(stats.wilcoxon(d, zero_method="wilcox").pvalue) if np.any(d != 0) else 1.0
    return {"diff": float(d.mean()), "ci95": [float(d.mean() - 1.96 * se), float(d.mean() + 1.96 * se)],
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "wilcoxon_p": p}


def _row(model: str, domain: str, results: list[dict], descs: list[dict]) -> dict:
    special = np.array([world.is_special(d) for d in descs])
    score = np.array([r["score"] for r in results])
    return {"model": model, "domain": domain, "n": len(results),
            **{k: float(np.mean([r[k] for r in results])) for k in ("score", "exact", "colour", "shape", "count", "style")},
            "score_own_concept": float(score[special].mean()) if special.any() else None,
            "score_common": float(score[~special].mean()) if (~special).any() else None}


def evaluate(n: int = 200, steps: int = 15, guidance: float = GUIDANCE, sdxl_n: Optional[int] = None,
             progress: bool = True, weights: Optional[Path] = None) -> dict:
    """Generate and score; returns the tables and tests (see the module docstring). ``weights``: a
    weights folder other than the shipped one (as ``toy train --out`` writes)."""
    torch.set_num_threads(1)
    clip = ClipScorer(paths(weights)["clip"])
    prompts = {d: eval_prompts(d, n) for d in world.DOMAINS}
    runs = [(m, d) for m in ("base", "control", *world.DOMAINS) for d in world.DOMAINS] + [("mosaic_lora", "mosaic")]
    sdxl_n = n // 4 if sdxl_n is None else sdxl_n
    if sdxl_n:
        runs += [(m, d) for m in ("sdxl_base", "sdxl_flat", "sdxl_neon") for d in ("flat", "neon")]
    truth, clip_scores, rows, cache = {}, {}, [], {}
    t0 = time.perf_counter()
    for model, domain in runs:
        if model not in cache:
            cache.clear()
            cache[model] = _load(model, weights)
        descs = prompts[domain][: sdxl_n if model.startswith("sdxl") else n]
        caps = [world.caption(d) for d in descs]
        images = generate(cache[model], caps, range(len(caps)), steps, guidance)
        results = [check(im, d) for im, d in zip(images, descs)]
        truth[(model, domain)] = np.array([r["score"] for r in results])
        clip_scores[(model, domain)] = clip.score(images, caps)
        rows.append(_row(model, domain, results, descs))
        if progress:
            print(f"[{time.perf_counter() - t0:6.0f}s] {model:>12} on {domain:<6} score {rows[-1]['score']:.3f} "
                  f"exact {rows[-1]['exact']:.3f}", flush=True)
    tests = []
    for d in world.DOMAINS:
        for ref in ("control", "base"):
            tests.append({"expert": d, "vs": ref, "domain": d, **paired(truth[(d, d)], truth[(ref, d)])})
    tests.append({"expert": "mosaic_lora", "vs": "mosaic", "domain": "mosaic",
                  **paired(truth[("mosaic_lora", "mosaic")], truth[("mosaic", "mosaic")])})
    if sdxl_n:
        for d in ("flat", "neon"):
            tests.append({"expert": f"sdxl_{d}", "vs": "sdxl_base", "domain": d,
                          **paired(truth[(f"sdxl_{d}", d)], truth[("sdxl_base", d)])})
    return {"settings": {"n": n, "steps": steps, "guidance": guidance, "sdxl_n": sdxl_n, "eval_seed": EVAL_SEED},
            "table": rows, "tests": tests, "retrieval": retrieval(clip), "spearman": _spearman(truth, clip_scores),
            "seconds": round(time.perf_counter() - t0, 1)}


def _load(model: str, weights: Optional[Path] = None):
    from . import load_pipeline

    if model == "mosaic_lora":
        pipe = load_pipeline("base", weights=weights)
        pipe.load_lora_weights(str(paths(weights)["mosaic_lora"]))
        pipe.fuse_lora()
        return pipe
    return load_pipeline(model, weights=weights)


def _spearman(truth: dict, clip_scores: dict) -> dict:
    from scipy import stats

    keys = [k for k in truth if not k[0].startswith("sdxl")]
    t = np.concatenate([truth[k] for k in keys])
    c = np.concatenate([clip_scores[k] for k in keys])
    per_domain = {}
    for d in world.DOMAINS:
        ks = [k for k in keys if k[1] == d]
        per_domain[d] = float(stats.spearmanr(np.concatenate([clip_scores[k] for k in ks]),
                                              np.concatenate([truth[k] for k in ks])).statistic)
    return {"n_images": int(len(t)), "all": float(stats.spearmanr(c, t).statistic), "per_domain": per_domain}


def summary(result: dict) -> str:
    """The numbers as text tables."""
    import pandas as pd

    table = pd.DataFrame(result["table"])
    wide = table.pivot(index="model", columns="domain", values="score")
    tests = pd.DataFrame(result["tests"])
    lines = ["Ground-truth score (mean of colour, shape, count correct) by model and prompt domain:",
             wide.round(3).to_string(), "", "Paired tests (same prompts and seeds; Wilcoxon signed-rank):",
             tests.assign(ci95=tests.ci95.map(lambda c: f"[{c[0]:+.3f}, {c[1]:+.3f}]")).round(4).to_string(index=False),
             "", f"CLIP retrieval on held-out renders: {json.dumps(result['retrieval'])}",
             f"Spearman(CLIP score, truth) over generated images: {json.dumps(result['spearman'])}"]
    return "\n".join(lines)


def sample_grid(path, models_: Sequence[str] = ("base", "control", *world.DOMAINS), per_domain: int = 4,
                steps: int = 20, guidance: float = GUIDANCE, scale: int = 3, weights: Optional[Path] = None):
    """A picture of the world: one row per model, ``per_domain`` prompts of each domain (half
    with the domain's own concept) as columns; the first row renders the prompts' scenes."""
    from PIL import Image, ImageDraw

    from . import load_pipeline

    rng = np.random.default_rng(EVAL_SEED + 2)
    descs = []
    for d in world.DOMAINS:
        descs += [world.sample_description(rng, d, float(i % 2 == 0)) for i in range(per_domain)]
    caps = [world.caption(d) for d in descs]
    rows = {"render": [world.render(world.Scene(objects=world.place_objects(rng, d["count"]), **d)) for d in descs]}
    for m in models_:
        rows[m] = generate(load_pipeline(m, weights=weights), caps, range(len(caps)), steps, guidance)
    cell, label = world.SIZE * scale, 70
    out = Image.new("RGB", (label + cell * len(descs), cell * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for r, (name, images) in enumerate(rows.items()):
        draw.text((4, r * cell + cell // 2 - 5), name, fill=(0, 0, 0))
        for c, im in enumerate(images):
            out.paste(im.resize((cell, cell), Image.NEAREST), (label + c * cell, r * cell))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return caps


def main(n: int = 200, steps: int = 15, out: Optional[Path] = None, weights: Optional[Path] = None,
         guidance: float = GUIDANCE) -> dict:
    result = evaluate(n=n, steps=steps, guidance=guidance, weights=weights)
    text = summary(result)
    print(text)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(result, indent=1))
        (out / "quality.md").write_text(text + "\n")
    return result


if __name__ == "__main__":
    import typer

    typer.run(main)
