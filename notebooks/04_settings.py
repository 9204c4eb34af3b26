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
# # Sampling settings: prompt adherence and latency, base model vs merge
#
# How do inference steps, guidance scale, a negative prompt, the seed and the scheduler change
# how well images follow their prompts, and how long they take? The sweep changes one setting at
# a time away from a reference (the first value of each list), for the base model and the merge.
# On the toy world the score is ground truth (`toy_truth`: does the image show what the prompt
# asks for?); for a real merge use `score = "clip"` (needs CLIP weights), `device="cuda"`,
# `dtype="float16"`.

# %% tags=["parameters"]
config = "toy"                                 # "toy" or a merge config, e.g. "../experiments/segmoe_sd_4x2.yaml"
n_prompts = 3                                  # prompts from `prompt_set`
prompt_set = "toy"                             # a set in data/prompts ("toy", "segmoe_examples") or a CSV file
steps = [8, 4, 16]                             # first value of each list: the reference; real models: [25, 10, 50]
guidance_scale = [7.5, 1.0, 3.0]
negative_prompt = ["", "blurry, low quality"]
seed = [0, 1]
scheduler = ["ddpm", "euler_a", "dpm"]         # Turbo merges: ["euler_a", "dpm"] with steps [4, 8] and guidance [1.0, 2.0]
score = "toy_truth"                            # a scorer: "toy_truth" (toy ground truth); real models: "clip"
score_options = {}                             # the scorer's options, e.g. {"model": "toy"} for the toy CLIP
device = "auto"                                # real models: "cuda"
dtype = "auto"                                 # real models: "float16"
output_dir = None                              # where results.csv goes (set by `segmoe-lab run`)

# %%
from segmoe_lab import notebook as nb
from segmoe_lab.sweep import Sweep, plot_sweep, run_sweep, summarize_sweep

cfg = nb.merge_config(config)
place = nb.Runtime.of(device=device, dtype=dtype).place(cfg)
sweep = Sweep.of(steps=steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt, seed=seed,
                 scheduler=scheduler)
judge = nb.judge(score, **score_options)
table = nb.prompt_table([], n_prompts, prompt_set)
print(f"{len(sweep.points())} settings x 2 models x {len(table)} prompts; {place}")

# %% [markdown]
# ## Run the sweep

# %%
models = {"base": nb.open_base(cfg, place), "merge": nb.open_merge(cfg, place)}
results = run_sweep(models, table, sweep, judge)
nb.write_results(results, output_dir)
summarize_sweep(results)

# %% [markdown]
# ## Plots
# Top: mean score per image; bottom: seconds per image (on this machine). Each panel starts
# from the reference point.

# %%
plot_sweep(results, score_label=score);

# %% [markdown]
# What to look for: adherence usually rises with steps and flattens; guidance 1.0 switches
# classifier-free guidance off (one UNet pass per step: about half the latency); the merge costs
# latency per step in proportion to the experts it runs (`num_experts_per_tok`), not to how many
# it has; a different seed shows how noisy a single-seed comparison is.
