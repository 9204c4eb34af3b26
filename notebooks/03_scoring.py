# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Judging a merge: the merge against its base and every expert
#
# Does the merge follow prompts better than the model it was built on, and than each expert on
# its own? Every prompt x seed is generated with the merge, the base and each expert (same seeds,
# sampler and settings), scored, and compared **paired**: the same prompt and seed for both
# models, so the prompt's difficulty cancels out.
#
# By default this runs the **toy world** on CPU in a minute or two: its prompts have ground truth
# (`toy_truth`: does the image show what the prompt asks for?), so we can also see how well the
# CLIP score tracks the truth. For a real merge: `merge = "../experiments/segmoe_sd_4x2.yaml"` (or
# a merge folder), `prompts = "adherence"` (100 prompts) or `"segmoe_examples"`, `steps = 25`,
# more seeds, CLIP weights in `scorers` (e.g. `{"clip": {"model": "ViT-L-14", "pretrained":
# "/path/open_clip_pytorch_model.bin"}, "torchmetrics": {"model": "/path/clip-vit-large-patch14"}}`)
# and a GPU. Images are cached, so a re-run only scores; for many GPUs use
# `accelerate launch -m segmoe_lab.cli compare ...`.

# %% tags=["parameters"]
merge = "toy"              # "toy", a merge config YAML, or a merge folder / hub id
prompts = "toy"            # a set in data/prompts ("toy", "segmoe_examples", "adherence") or a CSV file
n_prompts = 6              # None: the whole set (taken in turn from each category)
seeds = [0, 1]             # real models: [0, 1, 2, 3]
steps = 8                  # real models: 25
guidance_scale = 7.5
scheduler = None           # None: the merge's own (segmoe: ddpm), used for every model
scorers = {"clip": {"model": "toy"}, "torchmetrics": {"model": "toy"}, "toy_truth": {}}
truth = "toy_truth"        # the scorer CLIP is checked against (None to skip)
variants = None            # None: oracles and baselines when the prompts have expert labels; [] none; or a list
                           # of "model_oracle", "site_oracle", "uniform", "random", "per_sample", "per_token"
unit = "prompt"            # bootstrap over prompts (seeds averaged) or "image"
n_boot = 2000
device = "auto"            # real models: "cuda"
dtype = "auto"             # "auto": float16 on cuda, float32 on cpu
cache_dir = None           # None: $SEGMOE_LAB_CACHE/images
output_dir = None          # where results.csv and the report go (set by `segmoe-lab run`)

# %%
from pathlib import Path

import pandas as pd

from segmoe_lab import notebook as nb

from segmoe_lab.judge import stats
from segmoe_lab.judge.compare import CompareConfig, run_comparison
from segmoe_lab.judge.report import plot_agreement

config = CompareConfig.of(merge=merge, prompts=prompts, n_prompts=n_prompts, seeds=seeds, scorers=scorers,
                          sampling={"steps": steps, "guidance_scale": guidance_scale, "scheduler": scheduler},
                          variants=variants, device=device, dtype=dtype, cache_dir=cache_dir)
if truth is not None and truth not in config.scorers:
    raise ValueError(f"truth={truth!r} is not one of the scorers {list(config.scorers)}; set truth=None or add it")
config

# %% [markdown]
# ## Generate and score
# One row per model x prompt x seed x scorer. Cached images are reused; `result.generated` counts
# the images this run had to make.

# %%
result = run_comparison(config)
nb.write_results(result.table, output_dir)
print("generated:", result.generated)
result.table.head()

# %% [markdown]
# ## How far is the merge from its experts?
# Every model's gain over the base as a share of the **model oracle**'s (each prompt through its
# own expert's full model), with a paired bootstrap CI over prompts. The **site oracle** (each
# prompt through a one-expert merge of its own expert) is the most any routing over the merge's
# sites can keep; `uniform` and `random` are what no routing gets. Routing accuracy: top-1 gate
# decisions on the prompt's expert, recorded while generating; `collapsed`: sites that send
# nearly every prompt to one expert. Without expert labels there are no oracle rows.

# %%
from segmoe_lab.judge.oracle import format_oracle_table

print(*result.notes, sep="\n")
oracle = result.oracle_table(n_boot=n_boot) if "model_oracle" in set(result.table.model) else None
print(format_oracle_table(oracle) if oracle is not None else "no oracle rows")

# %% [markdown]
# ## Mean score per model
# With a 95% bootstrap confidence interval over prompts. Overlapping intervals here do not mean
# "no difference": the paired comparison below is the sharper test.

# %%
result.summary(unit=unit, n_boot=n_boot).round(3)

# %% [markdown]
# ## The merge against the base and each expert
# `diff` is the mean of (merge − other) over the same prompts and seeds, with its bootstrap CI
# (above 0: the merge scores higher); `win_rate` is the share of images where the merge scores
# higher (ties count half); `wilcoxon_p` is the signed-rank test over prompts. With few prompts
# the intervals are wide: that is the honest answer, not a failure.

# %%
paired = result.paired(unit=unit, n_boot=n_boot)
paired[paired.category == stats.ALL].round(3)

# %% [markdown]
# Per prompt category:

# %%
paired[paired.category != stats.ALL].round(3)

# %% [markdown]
# ## Prompts x models (first seed)

# %%
result.grid()

# %% [markdown]
# ## Does the CLIP score track the ground truth?
# Each dot is one image. A high rank correlation means CLIP score ranks images the way the truth
# does; on the toy world, with a tiny CLIP, expect it to be far from perfect.

# %%
if truth is not None:
    clip_like = [s for s in config.scorers if s != truth]
    display(pd.concat([stats.agreement(result.table, s, truth) for s in clip_like]).round(3))
    plot_agreement(result.table, clip_like[0], truth);

# %% [markdown]
# ## Save the report
# Tables (CSV + Parquet), summaries, paired statistics, scorer agreement and one grid per seed.

# %%
if output_dir:
    print("report:", result.report(Path(output_dir) / "report", unit=unit, n_boot=n_boot))
