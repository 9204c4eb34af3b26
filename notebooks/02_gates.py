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
# # Looking inside: which expert does each layer pick?
#
# A SegMoE merge puts a gate in front of every MoE layer, and the gate picks experts from the
# layer's input. This notebook records what every gate does while the merge generates a set of
# comparison prompts (per layer, prompt, denoising step and expert), draws it, lets you browse it,
# and checks it against the toy world's ground truth: each prompt belongs to a domain, and each
# domain has its own expert. Which layers send a prompt to its domain's expert?
#
# Defaults run the toy world on CPU in a minute or two. For a real merge set `config` (a YAML in
# `../experiments/` or a merge folder / hub id), `prompt_set` and `device="cuda"`; the domain
# check needs prompt categories that name the experts.

# %% tags=["parameters"]
config = "toy"             # "toy", a merge config ("../experiments/segmoe_sd_4x2.yaml") or a merge folder / hub id
moe_layers = None          # None: the config's; or "attn", "ff", "all" (not for a built merge)
num_experts_per_tok = None # None: the config's; or experts mixed per site (top-k)
routing = None             # None: the config's; or "segmoe", "per_sample", "per_token"
n_prompts = 6              # prompts from `prompt_set`, taken in turn from each category (toy: two per domain)
prompt_set = "toy"         # a set in data/prompts or a CSV with prompt and category columns
prompts = []               # or your own prompts (no domain check then)
steps = 8                  # real models: 25
guidance_scale = 7.5
seed = 0
spatial = True             # keep per-token routing for the routing maps
margin = 0.15              # a layer routes by domain when it beats chance by this much
device = "auto"            # "auto", "cpu", "cuda"
dtype = "auto"             # "auto", "float32", "float16", "bfloat16"
offload = "auto"           # "auto", "none", "model", "experts"
output_dir = None          # where results.csv goes (set by `segmoe-lab run`)

# %%
from segmoe_lab import notebook as nb
from segmoe_lab.observe import plots
from segmoe_lab.merge.config import summarize
from segmoe_lab.observe.explore import explore
from segmoe_lab.observe.diagnostics import describe_domain_routing, domain_experts, domain_routing
from segmoe_lab.observe.recording import record_gates

knobs = dict(moe_layers=moe_layers, num_experts_per_tok=num_experts_per_tok, routing=routing)
cfg = nb.merge_config(config, **knobs)
place = nb.Runtime.of(device=device, dtype=dtype, offload=offload).place(cfg)
gen = nb.Generation.of(steps=steps, guidance_scale=guidance_scale, seed=seed)
table = nb.prompt_table(prompts, n_prompts, prompt_set)
print(summarize(cfg), place, sep="\n")
table

# %% [markdown]
# ## Build the merge and record its gates
# `record_gates` hooks every MoE layer's gate while the merge generates each prompt (prompt `i`
# seeded with `seed + i`). Only reductions over the tokens are kept: per layer, step, batch
# sample and expert, the mean gate probability, the share of tokens that would pick the expert
# per token, and whether the layer's routing used it. With `spatial=True` each token's choice is
# kept too, on the latent grid.

# %%
pipe = nb.open_merge(config, place, **knobs)
recording = record_gates(pipe, list(table.prompt), spatial=spatial, steps=gen.steps, seed=gen.seed,
                         guidance_scale=gen.guidance_scale)
frame = recording.frame()
print(recording)
nb.show_images(recording.images, list(table.prompt), cols=len(table));
frame.head()

# %% [markdown]
# ## Layers × experts, per prompt
# Each row is one MoE layer (`down1.a0.t0 cross-k`: down block 1, attention 0, transformer
# block 0, cross-attention key), in the order the UNet runs them. Colour: the mean gate
# probability of each expert, averaged over the steps, for the prompt's own (conditional) half
# of classifier-free guidance.

# %%
for i in range(min(2, len(table))):
    plots.site_heatmap(frame, prompt=i);

# %% [markdown]
# The same for one layer across the denoising steps (first step at the top): does the gate change
# its mind while the image forms? Cross-attention keys and values see only the prompt, so they
# cannot; the others see the image as it forms.

# %%
site = recording.spatial_sites[len(recording.spatial_sites) // 2].label
plots.step_heatmap(frame, site, prompt=0);

# %% [markdown]
# ## Expert usage per prompt and agreement between prompts
# Left: which experts each prompt's layers used (share over all layers and steps). Right: how
# often two prompts have the same top expert at the same layer and step. Prompts of one domain
# should agree with each other more than with the rest if the gates see the domain.

# %%
plots.usage_bars(frame);
plots.agreement_matrix(frame);

# %% [markdown]
# ## Where in the image: routing maps
# For a few layers, the expert each image token would pick (its most probable expert) at the
# last step, over the generated image. Under `segmoe` routing the layer still uses one choice
# for the whole image; the map shows what the gate sees token by token.

# %%
if spatial:
    plots.routing_maps(recording, list(range(len(table))), plots.spread_sites(recording, 3));

# %% [markdown]
# ## Explore
# Choose a prompt, a step, a layer kind and a layer: the heatmaps, the routing map and the image
# update together. Where widgets cannot render (papermill runs, static viewers) this shows the
# same views as static figures.

# %%
explore(recording)

# %% [markdown]
# ## Which layers route by domain?
# Ground truth: every prompt's category is a domain, and the merge has one expert per domain.
# For each layer: how often the prompt's own domain expert is picked under each routing policy
# (`per_sample`: the sample's top-k of summed logits; `per_token`: share of tokens; `chosen`: the
# merge's own routing), against chance (k / number of experts).

# %%
experts = domain_experts(cfg, table.get("category", ()))
domains = dict(zip(table.prompt, table.get("category", ())))
by_site, by_kind = (domain_routing(frame, domains, experts, by=by) if experts else None for by in ("label", "kind"))
print("domain -> expert:", experts or "none (the prompts' categories name no expert)")
by_kind

# %% [markdown]
# ### The answer, from the table above
# Written from the numbers of this run (rerun with other parameters and it changes):

# %%
print(describe_domain_routing(by_site, routing=cfg.routing, margin=margin))
print()
print(describe_domain_routing(by_kind, routing=cfg.routing, margin=margin))

# %% [markdown]
# ## Gate health: does a gate route, or is it lucky or stuck?
# Three checks, each naming the sites it flags (`segmoe_lab.observe.gate_health`): **routing
# accuracy** on labelled prompts (top-1 decisions on the prompt's own expert) per site kind with a
# bootstrap CI over prompts, so a few prompts give an honestly wide interval (use
# `prompt_set = "toy_heldout"` and more prompts for a verdict); **collapse**: sites sending at least
# 90 % of the prompts to one expert, or with utilisation entropy under half its maximum;
# **self-routing**: each expert's own gate prompt should route to it.

# %%
from segmoe_lab.judge.variants import prompt_labels
from segmoe_lab.observe.gate_health import health_from_shares, self_routing, top1_shares

labels = prompt_labels(table, cfg) if cfg.experts else None
record = lambda ps: top1_shares(record_gates(pipe, list(ps), steps=gen.steps, seed=gen.seed,  # noqa: E731
                                             guidance_scale=gen.guidance_scale).frame())
own = self_routing(record, [[e.positive_prompt] for e in cfg.experts]) if cfg.experts else None
health = health_from_shares(top1_shares(frame), None if labels is None else list(labels), own, source=prompt_set)
print(health)
health.collapsed

# %%
results = by_kind if by_kind is not None else plots.usage(frame).reset_index(names="prompt_index")
settings = dict(routing=cfg.routing, num_experts_per_tok=cfg.num_experts_per_tok, steps=gen.steps)
nb.write_results(results.assign(**settings), output_dir)
by_site
