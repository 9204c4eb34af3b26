"""The kit's main job on its embedded default, the toy world: build, look inside, judge.

``segmoe-lab demo`` (the README's first command) builds the toy merge, saves it in segmoe's folder
format, records its gates on the held-out toy prompts (``toy_heldout``, which no gate is built
from), generates the toy prompt set with the merge, the base, every expert and the oracle and
baseline variants (model oracle, site oracle, uniform, random gates), scores them (tiny CLIP and
ground truth) and writes a report folder::

    report/
      README.md            opens with the oracle table (% of the model oracle's gain, routing accuracy,
                           collapsed sites), then gate health, means, paired tests; what each file is
      oracle_table.csv     the same table, unrounded
      gate_health.txt      routing accuracy per site kind, collapsed sites, self-routing, warnings
      merge/               the merge (segmoe's folder format; loads in segmoe 0.0.4 too)
      results.csv/.parquet one row per model x prompt x seed x scorer
      summary.csv, paired.csv, ...   per-model means with CIs; merge vs base and vs each expert
      grids/seed_0.png     prompts x models
      gates.png            sites x experts gate heatmaps, one held-out prompt per domain
      gate_routing.csv     how often a held-out prompt routes to its domain's expert, per site

Example::

    from segmoe_lab.demo import run_demo
    run_demo("report", n_prompts=12)
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

# The toy models follow prompts best at low guidance (see toy/quality.py); 15 steps of the shipped
# DDIM sampler are enough for 32x32 scenes.
STEPS = 15
GUIDANCE = 3.0
# Held-out prompts the demo records gates on: 10 per domain give routing accuracy a CI of about
# +-0.1 and take ~30 s on one core (three prompts, as before, could not tell a good gate from a lucky one).
GATE_PROMPTS = 30
HELDOUT = "toy_heldout"


def _say(log: Optional[Callable[[str], None]], text: str) -> None:
    if log is not None:
        log(text)


def gate_figure(pipe, prompts: Sequence[str], steps: int = STEPS, guidance: float = GUIDANCE,
                show: Optional[Sequence[int]] = None):
    """Record the merge's gates on ``prompts`` and return ``(figure, frame)``: one heatmap per prompt of ``show``
    (indices into ``prompts``; default all)."""
    import matplotlib.pyplot as plt

    from segmoe_lab.observe.plots import site_heatmap
    from segmoe_lab.observe.recording import record_gates

    rec = record_gates(pipe, list(prompts), steps=steps, guidance_scale=guidance)
    frame = rec.frame()
    show = list(range(len(prompts))) if show is None else list(show)
    fig, axes = plt.subplots(1, len(show), figsize=(4.2 * len(show), 9), squeeze=False)
    for i, ax in zip(show, axes[0]):
        site_heatmap(frame, prompt=i, ax=ax)
    fig.tight_layout()
    return fig, frame


def run_demo(out_dir: Union[str, Path] = "report", n_prompts: Optional[int] = None, seeds: Sequence[int] = (0,),
             steps: int = STEPS, guidance_scale: float = GUIDANCE, overwrite: bool = True,
             progress: bool = True, log: Optional[Callable[[str], None]] = print,
             n_gate_prompts: Optional[int] = GATE_PROMPTS, variants: Optional[Sequence[str]] = None) -> Path:
    """Build the toy merge, record its gates, compare it with its base and experts; write ``out_dir``.

    Args:
        out_dir: the report folder (replaced when ``overwrite``; the image cache inside it is kept,
            so a re-run only re-scores).
        n_prompts (`int`, *optional*): a shorter run over ``n`` prompts taken in turn from each domain
            (default: the whole toy set, 72 prompts).
        n_gate_prompts (`int`, *optional*, defaults to :data:`GATE_PROMPTS`): held-out prompts the gates are
            recorded on (taken in turn from each domain; ``None``: all 120, about 2 min more).
        variants: the oracle and baseline rows (:mod:`segmoe_lab.judge.variants`; default: model
            oracle, site oracle, uniform, random; ``[]`` for none: a quicker run).
        seeds: one image per prompt and seed, the same seeds for every model.
        steps, guidance_scale: sampling settings, identical for every model.
        log: where progress lines go (``None`` for silence).

    Returns:
        The report folder.
    """
    import matplotlib

    matplotlib.use("Agg")  # the demo writes files; it never needs a window

    from segmoe_lab.errors import FolderError
    from segmoe_lab.judge.compare import CompareConfig

    if not progress:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    out = Path(out_dir)
    cache = out / "image_cache"
    # Every setting is checked before anything is written: a bad one must not cost the old report.
    compare = CompareConfig.of("demo settings", merge=str(out / "merge"), prompts="toy", n_prompts=n_prompts,
                               seeds=list(seeds), sampling={"steps": steps, "guidance_scale": guidance_scale},
                               scorers={"clip": {"model": "toy"}, "toy_truth": {}}, cache_dir=str(cache),
                               variants=None if variants is None else list(variants), device="cpu", progress=progress)
    if out.exists() and not out.is_dir():
        raise FolderError(f"{out} is a file; the demo writes a report folder, choose another path")
    if out.exists() and not overwrite:
        raise FolderError(f"{out} exists; pass overwrite=True (CLI: --overwrite) or choose another folder")
    created = not out.exists()
    try:
        return _run(out, cache, cfg_compare=compare, n_prompts=n_prompts, seeds=seeds, steps=steps,
                    guidance_scale=guidance_scale, progress=progress, log=log, n_gate_prompts=n_gate_prompts)
    except BaseException:
        if created:  # a failed first run leaves nothing behind; a re-run keeps the old merge and images
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run(out: Path, cache: Path, cfg_compare, n_prompts, seeds, steps, guidance_scale, progress, log,
         n_gate_prompts) -> Path:
    import matplotlib.pyplot as plt
    import torch

    from segmoe_lab import toy
    from segmoe_lab.judge import stats
    from segmoe_lab.judge.compare import load_prompts, run_comparison
    from segmoe_lab.judge.variants import prompt_labels
    from segmoe_lab.merge.pipeline import SegMoEPipeline
    from segmoe_lab.observe.diagnostics import describe_domain_routing, domain_experts, domain_routing
    from segmoe_lab.observe.gate_health import gate_health

    if out.exists():
        for child in out.iterdir():  # keep the image cache and the merge: a re-run regenerates nothing
            if child not in (cache, out / "merge"):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    _say(log, "1/4 building the toy merge (3 domain experts, moe_layers=all, gates from each expert's prompts)")
    cfg = toy.merge_config()
    t0 = time.perf_counter()
    if _same_merge(out / "merge", cfg):
        # Rebuilding would give the same weights but new file times, hence a new fingerprint and
        # every merge image generated again.
        merge = SegMoEPipeline(out / "merge", device="cpu", torch_dtype="float32")
        timings["reused"] = True
    else:
        torch.manual_seed(0)
        merge = SegMoEPipeline(cfg, device="cpu", torch_dtype="float32", progress=progress)
        merge.save_pretrained(out / "merge", overwrite=True)
    timings["build_s"] = time.perf_counter() - t0
    sites = len(merge.moe_layers)

    held_out = load_prompts(HELDOUT, n=n_gate_prompts)
    _say(log, f"2/4 recording gates on {len(held_out)} held-out prompts ({HELDOUT})")
    t0 = time.perf_counter()
    # Held-out prompts, never the experts' gate prompts: routing on the very prompts the gates were
    # built from would prove nothing. One heatmap per domain; the statistics use every prompt.
    first = [int(held_out.index[held_out.category == d][0]) for d in toy.DOMAINS if (held_out.category == d).any()]
    fig, frame = gate_figure(merge, list(held_out.prompt), steps, guidance_scale, show=first)
    fig.savefig(out / "gates.png", dpi=110)
    plt.close(fig)  # a library call must not leave figures for a notebook's inline display
    routing = domain_routing(frame, dict(zip(held_out.prompt, held_out.category)), domain_experts(cfg, toy.DOMAINS))
    routing.to_csv(out / "gate_routing.csv", index=False)
    labels = prompt_labels(held_out, cfg)
    health = gate_health(merge, list(held_out.prompt), list(labels), [e.prompts for e in cfg.experts], steps=steps,
                         guidance_scale=guidance_scale, source=HELDOUT, frame=frame)
    (out / "gate_health.txt").write_text(str(health) + "\n")
    timings["gates_s"] = time.perf_counter() - t0
    del merge

    _say(log, "3/4 generating the toy prompt set with the merge, the base, each expert and the oracle and baseline "
              "variants, and scoring it")
    t0 = time.perf_counter()
    result = run_comparison(cfg_compare)
    timings["compare_s"] = time.perf_counter() - t0

    _say(log, "4/4 writing the report")
    result.report(out)
    oracle = result.oracle_table() if "model_oracle" in set(result.table.model) else None  # report() wrote it too
    summary = stats.summary(result.table)
    paired = stats.paired(result.table)
    names = _model_names(cfg)
    text = _readme(cfg, sites, len(load_prompts("toy", n_prompts)), list(seeds), steps, guidance_scale, timings,
                   result.generated, summary, paired, describe_domain_routing(routing), names,
                   oracle=oracle, health=health, notes=list(result.notes))
    (out / "README.md").write_text(text)
    _say(log, text)
    return out


def _same_merge(folder: Path, cfg) -> bool:
    """Whether ``folder`` holds a complete merge built from ``cfg`` (by an earlier demo run)."""
    from segmoe_lab.merge.io import MergeFolderError, read_merge_config

    if not (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        return False
    try:
        if read_merge_config(folder)[1] != cfg:
            return False
    except (MergeFolderError, ValueError, OSError):
        return False
    built = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime
    sources = [Path(cfg.base_model), *(Path(e.source_model) for e in cfg.experts)]
    newest = max(f.stat().st_mtime for p in sources for f in ([p] if p.is_file() else p.rglob("*")))
    return newest < built  # retrained toy weights mean a new merge


def _model_names(cfg) -> dict[str, str]:
    """``expert_<i>`` -> the expert's folder name (its domain in the toy world)."""
    return {f"expert_{i}": Path(e.source_model).name for i, e in enumerate(cfg.experts)}


def _readme(cfg, sites, n_prompts, seeds, steps, guidance, timings, generated, summary, paired, routing_text,
            names, oracle=None, health=None, notes=()) -> str:
    from segmoe_lab.judge import stats
    from segmoe_lab.judge.oracle import format_oracle_table

    def table(df):
        df = df.copy()
        for col in ("model", "model_b"):
            if col in df:
                df[col] = df[col].map(lambda m: f"{m} ({names[m]})" if m in names else m)
        return "```\n" + df.to_string(index=False, float_format=lambda v: f"{v:.3f}") + "\n```"

    overall = paired[paired.category == stats.ALL].drop(columns=["category", "model_a"])
    lines = [
        "# segmoe-lab demo: the toy world",
        "",
        f"Merge: {cfg.num_experts} experts ({', '.join(names.values())}), top-{cfg.num_experts_per_tok}, "
        f"moe_layers={cfg.moe_layers}, routing={cfg.routing}, {sites} MoE sites; "
        + (f"loaded from the previous run's merge/ in {timings['build_s']:.1f} s." if timings.get("reused")
           else f"built in {timings['build_s']:.1f} s."),
        f"Comparison: {n_prompts} toy prompts x seeds {seeds}, {steps} steps, guidance {guidance}; "
        f"images generated this run: {sum(generated.values())} (the rest came from the cache) in "
        f"{timings['compare_s']:.0f} s. Gates recorded in {timings['gates_s']:.1f} s.",
        "",
        "## How far the merge is from its experts (the `toy` prompt set)",
        "Each model's ground-truth gain over the base as a share of the **model oracle**'s (each prompt through "
        "its own domain's full expert), with a paired bootstrap 95% CI over prompts; the gain's CI and p against the base come from one sign-flip test. "
        "`site_oracle`: each prompt through a one-expert merge of its own expert (that expert at the MoE sites, "
        "the base elsewhere): the most any routing over these sites can keep. `uniform`: every expert averaged at "
        "every site; `random`: seeded random gates. Routing accuracy: share of top-1 gate decisions on the prompt's "
        "own domain expert, recorded while generating these images (chance 0.33), overall and per site kind; "
        "`collapsed`: sites sending at least 90% of the prompts to one expert.",
        "",
        ("```\n" + format_oracle_table(oracle) + "\n```") if oracle is not None else
        "No oracle rows: " + "; ".join(notes or ["no variants were asked for"]),
        "",
        f"## Gate health (the `{HELDOUT}` prompt set: prompts no gate was built from)",
        "```\n" + str(health) + "\n```" if health is not None else "(not recorded)",
        "",
        "## Mean score per model (95% bootstrap CI over prompts)",
        "`toy_truth` is the ground truth (1 = the image shows exactly what the prompt asks); `clip` the tiny CLIP's score.",
        "",
        table(summary),
        "",
        "## The merge against the base and each expert (paired over prompts and seeds)",
        "`diff` = merge - other (above 0: the merge is better); `win_rate` counts ties as half.",
        "",
        table(overall),
        "",
        f"## Gates (the `{HELDOUT}` prompt set)",
        routing_text,
        "",
        "## Files",
        "- `merge/`: the merge, in segmoe's folder format (`SegMoEPipeline('report/merge')`)",
        "- `results.csv` / `results.parquet`: one row per model x prompt x seed x scorer",
        "- `summary.csv`, `summary_by_category.csv`, `paired.csv`, `agreement.csv`: the statistics",
        "- `grids/seed_<s>.png`: prompts x models; `gates.png`: sites x experts per domain prompt",
        "- `oracle_table.csv`: the oracle table above, unrounded; `gate_health.txt`: the gate health above",
        "- `gate_routing.csv`: per site, how often a held-out prompt routes to its own domain's expert",
        "- `image_cache/`: every generated image; a re-run regenerates nothing",
    ]
    return "\n".join(lines) + "\n"
