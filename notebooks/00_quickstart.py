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
# # SegMoE quickstart
#
# Build a Mixture-of-Experts merge of Stable Diffusion UNets (the [SegMoE](https://github.com/segmind/segmoe)
# method, no training), generate with it, see which expert each layer picked and score the images.
#
# By default this runs the **toy world** on CPU in about a minute: a tiny base model and experts
# trained on simple shapes, with ground truth for every prompt. For a real merge set `config` to
# one of `../experiments/segmoe_*.yaml` (or a merge folder / hub id such as `segmind/SegMoE-4x2-v0`)
# and run on a GPU.
#
# **Colab**: the next cell installs the kit from `REPO_URL` (only inside Colab; elsewhere it
# assumes `pip install -e .` was done). `REPO_URL` is a placeholder: set it to the repository
# you cloned this notebook from. On a T4 (15 GB) the notebook uses float16 and, when a merge
# would not fit on the GPU, model CPU offload (or, for the largest, expert offload): the
# validation cell prints which and why.

# %%
import os
import subprocess
import sys

REPO_URL = "https://github.com/segmoe-lab/segmoe-lab"  # placeholder: the repository this notebook comes from
if "google.colab" in sys.modules:  # Colab only: clone and install the kit, then work where the notebook lives
    subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, "/content/segmoe-lab"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "/content/segmoe-lab"], check=True)
    os.chdir("/content/segmoe-lab/notebooks")

# %% tags=["parameters"]
config = "toy"             # "toy", a merge config ("../experiments/segmoe_sd_4x2.yaml") or a merge folder / hub id
moe_layers = None          # None: the config's; or "attn", "ff", "all" (not for a built merge)
num_experts_per_tok = None # None: the config's; or how many experts each site mixes (top-k)
routing = None             # None: the config's; or "segmoe", "per_sample", "per_token"
n_prompts = 4              # prompts taken from `prompt_set` (the toy world's have ground truth)
prompt_set = "toy"         # a set in data/prompts ("toy", "segmoe_examples") or a CSV file
prompts = []               # or your own prompts, e.g. ["a cinematic photo of a fox"]
scorers = {"toy_truth": {}, "clip": {"model": "toy"}}  # real models: {"clip": {}} (CLIP ViT-L-14)
device = "auto"            # "auto" (cuda when present), "cpu", "cuda"; real models: "cuda"
dtype = "auto"             # "auto" (float16 on cuda, float32 on cpu), "float32", "float16", "bfloat16"
offload = "auto"           # "auto" (only if the merge would not fit), "none", "model", "experts"
steps = 8                  # real models: 25 (Turbo merges: 4-8)
guidance_scale = 7.5       # Turbo merges: 1-2
seed = 0
output_dir = None          # where results.csv goes (set by `segmoe-lab run`)

# %%
from segmoe_lab import notebook as nb
from segmoe_lab.merge.config import summarize

knobs = dict(moe_layers=moe_layers, num_experts_per_tok=num_experts_per_tok, routing=routing)
cfg = nb.merge_config(config, **knobs)
place = nb.Runtime.of(device=device, dtype=dtype, offload=offload).place(cfg)
gen = nb.Generation.of(steps=steps, guidance_scale=guidance_scale, seed=seed)
table = nb.prompt_table(prompts, n_prompts, prompt_set)
judges = nb.judges(scorers)
print(summarize(cfg), place, sep="\n")

# %% [markdown]
# ## Build the merge
# The base model's UNet gets MoE layers at the config's `moe_layers` sites; each expert's gate
# row comes from the hidden states its positive prompt produces (`init: hidden`, as segmoe).

# %%
pipe = nb.open_merge(config, place, **knobs)
pipe

# %% [markdown]
# ## Generate, recording the gates
# One image per prompt (prompt `i` seeded with `seed + i`); while it generates, a hook on every
# gate records which experts it weighted, at every layer and denoising step.

# %%
from segmoe_lab.observe import plots
from segmoe_lab.observe.recording import record_gates

recording = record_gates(pipe, list(table.prompt), steps=gen.steps, seed=gen.seed, guidance_scale=gen.guidance_scale)
images = recording.images
nb.show_images(images, table.prompt);

# %% [markdown]
# ## Which expert did each layer use?
# First: one row per MoE layer (down → mid → up), one column per prompt, coloured by the expert
# the layer used most. Then: each expert's share of the layers' choices, per prompt.

# %%
plots.plot_choices(recording);
plots.usage_bars(recording);

# %% [markdown]
# ## Scores
# On the toy world `toy_truth` is ground truth (does the image show what the prompt asks for?);
# `clip` is the CLIP score (here with the toy world's tiny CLIP; real merges use ViT-L-14).

# %%
scores = nb.score_table(images, table, judges)
nb.write_results(scores.assign(**cfg.model_dump(include=set(knobs))), output_dir)
scores
