"""The kit's main job on its embedded default, the toy world: build, look inside, judge.

``segmoe-lab demo`` (the README's first command) builds the toy merge, saves it in segmoe's folder
format, records its gates on one prompt per domain, generates the toy prompt set with the merge,
the base and every expert, scores them (tiny CLIP and ground truth) and writes a report folder::

    report/
      README.md            what was run, the headline numbers, what each file is
      merge/               the merge (segmoe's folder format; loads in segmoe 0.0.4 too)
      results.csv/.parquet one row per model x prompt x seed x scorer
      summary.csv, paired.csv, ...   per-model means with CIs; merge vs base and vs each expert
      grids/seed_0.png     prompts x models
      gates.png            sites x experts gate heatmaps, one per domain prompt
      gate_routing.csv     how often a domain's prompt routes to that domain's expert, per site

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


def _say(log: Optional[Callable[[str], None]], text: str) -> None:
    if log is not None:
        log(text)


def gate_figure(pipe, prompts: Sequence[str], steps: int = STEPS, guidance: float = GUIDANCE):
    """Record the merge's gates on ``prompts`` and return ``(figure, frame)``: one heatmap per prompt."""
    import matplotlib.pyplot as plt

    from segmoe_lab.observe.plots import site_heatmap
    from segmoe_lab.observe.recording import record_gates

    rec = record_gates(pipe, list(prompts), steps=steps, guidance_scale=guidance)
    frame = rec.frame()
    fig, axes = plt.subplots(1, len(prompts), figsize=(4.2 * len(prompts), 9), squeeze=False)
    for i, ax in enumerate(axes[0]):
        site_heatmap(frame, prompt=i, ax=ax)
    fig.tight_layout()
    return fig, frame


def run_demo(out_dir: Union[str, Path] = "report", n_prompts: Optional[int] = None, seeds: Sequence[int] = (0,),
             steps: int = STEPS, guidance_scale: float = GUIDANCE, overwrite: bool = True,
             progress: bool = True, log: Optional[Callable[[str], None]] = print) -> Path:
    """Build the toy merge, record its gates, compare it with its base and experts; write ``out_dir``.

    Args:
        out_dir: the report folder (replaced when ``overwrite``; the image cache inside it is kept,
            so a re-run only re-scores).
        n_prompts (`int`, *optional*): a shorter run over ``n`` prompts taken in turn from each domain
            (default: the whole toy set, 72 prompts).
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
                               device="cpu", progress=progress)
    if out.exists() and not out.is_dir():
        raise FolderError(f"{out} is a file; the demo writes a report folder, choose another path")
    if out.exists() and not overwrite:
        raise FolderError(f"{out} exists; pass overwrite=True (CLI: --overwrite) or choose another folder")
    created = not out.exists()
    try:
        return _run(out, cache, cfg_compare=compare, n_prompts=n_prompts, seeds=seeds, steps=steps,
                    guidance_scale=guidance_scale, progress=progress, log=log)
    except BaseException:
        if created:  # a failed first run leaves nothing behind; a re-run keeps the old merge and images
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run(out: Path, cache: Path, cfg_compare, n_prompts, seeds, steps, guidance_scale, progress, log) -> Path:
    import matplotlib.pyplot as plt
    import torch

    from segmoe_lab import toy
    from segmoe_lab.judge import stats
    from segmoe_lab.judge.compare import load_prompts, run_comparison
    from segmoe_lab.merge.pipeline import SegMoEPipeline
    from segmoe_lab.observe.diagnostics import describe_domain_routing, domain_experts, domain_routing

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

    _say(log, "2/4 recording gates on one held-out prompt per domain")
    t0 = time.perf_counter()
    # The first prompt of each domain in the toy set, not the experts' gate prompts: routing on the
    # very prompts the gates were built from would prove nothing.
    held_out = load_prompts("toy", n=len(toy.DOMAINS))
    fig, frame = gate_figure(merge, list(held_out.prompt), steps, guidance_scale)
    fig.savefig(out / "gates.png", dpi=110)
    plt.close(fig)  # a library call must not leave figures for a notebook's inline display
    routing = domain_routing(frame, dict(zip(held_out.prompt, held_out.category)), domain_experts(cfg, toy.DOMAINS))
    routing.to_csv(out / "gate_routing.csv", index=False)
    timings["gates_s"] = time.perf_counter() - t0
    del merge

    _say(log, "3/4 generating the toy prompt set with the merge, the base and each expert, and scoring it")
    t0 = time.perf_counter()
    result = run_comparison(cfg_compare)
    timings["compare_s"] = time.perf_counter() - t0

    _say(log, "4/4 writing the report")
    result.report(out)
    summary = stats.summary(result.table)
    paired = stats.paired(result.table)
    names = _model_names(cfg)
    text = _readme(cfg, sites, len(load_prompts("toy", n_prompts)), list(seeds), steps, guidance_scale, timings,
                   result.generated, summary, paired, describe_domain_routing(routing), names)
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
            names) -> str:
    from segmoe_lab.judge import stats

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
        "## Gates",
        routing_text,
        "",
        "## Files",
        "- `merge/`: the merge, in segmoe's folder format (`SegMoEPipeline('report/merge')`)",
        "- `results.csv` / `results.parquet`: one row per model x prompt x seed x scorer",
        "- `summary.csv`, `summary_by_category.csv`, `paired.csv`, `agreement.csv`: the statistics",
        "- `grids/seed_<s>.png`: prompts x models; `gates.png`: sites x experts per domain prompt",
        "- `gate_routing.csv`: per site, how often a domain's prompt routes to its own expert",
        "- `image_cache/`: every generated image; a re-run regenerates nothing",
    ]
    return "\n".join(lines) + "\n"
