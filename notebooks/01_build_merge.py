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
# # Build a merge, step by step
#
# From a config to a saved SegMoE merge, looking at each step: the config and its checks, the
# sites that become MoE layers, the model's size before and after, the build, the gates (and the
# warnings for gates that cannot tell their experts apart), generation, saving and reloading.
# Defaults run the toy world on CPU; for a real merge set `config` to one of
# `../experiments/segmoe_*.yaml`, `device="cuda"` and `dtype="float16"`.

# %% tags=["parameters"]
config = "toy"             # "toy" or a merge config, e.g. "../experiments/segmoe_sd_4x2.yaml"
moe_layers = "attn"        # which linear layers become MoE layers: "attn", "ff" or "all"
num_experts_per_tok = 1    # experts mixed at each site (top-k)
routing = "segmoe"         # "segmoe" (one choice per image, as segmoe), "per_sample", "per_token"
init = "hidden"            # gate rows: "hidden" (from the experts' prompts, as segmoe), "random", "uniform"
n_prompts = 2              # prompts from `prompt_set`, taken in turn from each category
prompt_set = "toy"         # a set in data/prompts ("toy", "segmoe_examples") or a CSV file
scorers = {"toy_truth": {}}  # real models: {"clip": {}}
steps = 8                  # real models: 25
seed = 0
rank = 8                   # section 7: experts stored as base + rank-8 deltas
device = "auto"            # real models: "cuda"
dtype = "auto"             # real models: "float16"
save_dir = None            # where the merge is saved (None: output_dir, else a temporary folder)
output_dir = None          # where results.csv goes (set by `segmoe-lab run`)

# %%
from segmoe_lab import notebook as nb

cfg = nb.merge_config(config, moe_layers=moe_layers, num_experts_per_tok=num_experts_per_tok,
                      routing=routing, init=init)
place = nb.Runtime.of(device=device, dtype=dtype).place(cfg)
gen = nb.Generation.of(steps=steps, seed=seed)
table = nb.prompt_table([], n_prompts, prompt_set)
judges = nb.judges(scorers)
work = nb.work_dir(save_dir or output_dir)  # the merge is saved here
print(place)

# %% [markdown]
# ## 1. Write and validate the config
# A merge config is segmoe's YAML schema plus a few fields of ours, all with defaults. It is
# written back with every default spelt out, and reads back as the same config.

# %%
from segmoe_lab.merge.config import ConfigError, load_config, parse_config

path = work / "merge.yaml"
path.write_text(cfg.to_yaml())
assert load_config(path) == cfg
print(path.read_text())

# %% [markdown]
# A misspelt key or a bad value fails before anything loads, with every problem named:

# %%
try:
    parse_config({**cfg.model_dump(), "moe_layer": "ff", "routing": "top1"}, source="a config with two mistakes")
except ConfigError as err:
    print(err)

# %% [markdown]
# ## 2. Which sites become MoE layers, and the model's size
# A *site* is one linear layer (or feed-forward block) of the UNet's transformer blocks that
# becomes an MoE layer: the experts' copies of it plus a gate. Counted on an empty (meta) model.

# %%
from segmoe_lab.merge.estimate import estimate

sites = nb.site_table(cfg)
print(f"{len(sites)} sites for moe_layers={cfg.moe_layers!r}")
print(estimate(cfg).table())
sites.pivot_table(index="block", columns="kind", values="path", aggfunc="count", fill_value=0)

# %% [markdown]
# ## 3. Build
# With `init: hidden` each expert generates from its positive prompt once, and each site's gate
# row for that expert is the hidden state the site saw.

# %%
import warnings

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pipe, build_seconds = nb.timed(nb.open_merge, cfg, place)
print(f"built in {build_seconds:.1f} s: {pipe!r}")
print(f"UNet parameters: {nb.parameter_count(pipe.unet):,}")

# %% [markdown]
# ## 4. The gates
# One row per site: how alike the experts' gate rows are (`max_cosine`) and the gate matrix's
# condition number. A *degenerate* gate (huge condition number) routes almost at random; the
# build warns about those.

# %%
report = pipe.gate_report()
print(*[str(w.message) for w in caught if "gate" in str(w.message)] or ["no degenerate-gate warnings"], sep="\n")
nb.plot_gates(pipe, report);
report.sort_values("condition_number", ascending=False).head(8)

# %% [markdown]
# ## 5. Generate: base model and merge

# %%
base = nb.open_base(cfg, place)
images = {"base": nb.generate(base, table.prompt, gen), "merge": nb.generate(pipe, table.prompt, gen)}
nb.show_images(images["base"] + images["merge"],
               [f"base: {p}" for p in table.prompt] + [f"merge: {p}" for p in table.prompt], cols=len(table));

# %% [markdown]
# ## 6. Save and reload
# The folder is in segmoe's format (segmoe 0.0.4 loads it too). The reloaded merge makes the
# same image.

# %%
folder = pipe.save_pretrained(work / "merge", overwrite=True)
again = nb.open_merge(folder, place)
diff = nb.max_pixel_difference(nb.generate(pipe, table.prompt[:1], gen), nb.generate(again, table.prompt[:1], gen))
print(f"saved to {folder}; the reloaded merge's image differs by at most {diff} of 255")

# %% [markdown]
# ## 7. Compressed experts
# Each expert's site weights as a shared `W_0` plus a rank-`rank` delta (truncated SVD; `compress:`
# in a config, or `segmoe-lab compress`; `W_0` here is the experts' mean). Bytes, the image
# difference, and on the toy world ground truth at two ranks (the full study: docs/rank_quality.png).

# %%
from segmoe_lab.merge.lowrank import compress_unet, lowrank_bytes
from segmoe_lab.toy.compression import plot_rank_quality, rank_quality

small = nb.open_merge(folder, place)
compress_unet(small.unet, small.config.updated(compress={"rank": rank}))
full_mb, small_mb = (lowrank_bytes(p.unet)["total"] / 2**20 for p in (pipe, small))
diff_c = nb.max_pixel_difference(nb.generate(pipe, table.prompt[:1], gen), nb.generate(small, table.prompt[:1], gen))
print(f"UNet {full_mb:.1f} MB -> {small_mb:.1f} MB at rank {rank}; image differs by at most {diff_c} of 255")
if config == "toy":
    plot_rank_quality(rank_quality(ranks=(2, rank), n=n_prompts, progress=False));

# %%
scores = {f"{model}_{label}": j(imgs, table) for model, imgs in images.items() for label, j in judges.items()}
results = nb.merge_summary(cfg, sites, report, build_seconds, diff, scores)
nb.write_results(results, output_dir)
results.T
