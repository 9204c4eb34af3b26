"""The ``segmoe-lab`` command line: a thin layer over the public API.

Every command converts any failure at one place (:func:`friendly_errors`): the kit's own
errors (bad config, unreadable weights, bad settings, ...) and OS errors print one message and
exit 2; anything unexpected prints a one-line summary and exits 1. ``segmoe-lab --debug ...``
(or ``SEGMOE_LAB_DEBUG=1``) shows the traceback instead.
"""
from __future__ import annotations

import functools
import os
import traceback
from pathlib import Path
from typing import Optional

import click
import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Build, inspect and judge SegMoE (Mixture-of-Experts) merges of Stable Diffusion models.")

DEBUG_ENV = "SEGMOE_LAB_DEBUG"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


_debug = {"on": False}  # set by the --debug option of each invocation


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show the full traceback when a command fails")):
    """Build, inspect and judge SegMoE (Mixture-of-Experts) merges of Stable Diffusion models."""
    _debug["on"] = debug


def friendly_errors(fn):
    """Run a command and convert any failure: kit and OS errors -> message, exit 2; others -> one line, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from segmoe_lab.errors import explain

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            typer.secho("interrupted; finished outputs are kept, partial ones were removed", fg=typer.colors.RED, err=True)
            raise typer.Exit(130) from None
        except Exception as err:  # noqa: BLE001 - the one place every failure of a command is turned into a message
            if _debug["on"] or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                traceback.print_exc()
            message, expected = explain(err)
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2 if expected else 1) from None

    wrapper.friendly = True
    return wrapper


@app.command()
@friendly_errors
def build(config: Path = typer.Argument(..., help="merge config (YAML, segmoe's schema)"),
          out_dir: Path = typer.Argument(..., help="output folder (must not exist)"),
          device: Optional[str] = typer.Option(None, help="cpu / cuda (default: cuda if present)"),
          overwrite: bool = typer.Option(False, help="replace out_dir if it exists")):
    """Build a merge and save it in segmoe's folder format (drop-in for `segmoe config.yaml out_dir`)."""
    from segmoe_lab.merge.config import load_config
    from segmoe_lab.merge.pipeline import SegMoEPipeline

    from segmoe_lab.atomic import recover
    from segmoe_lab.errors import FolderError

    cfg = load_config(config)
    out_dir = Path(out_dir)
    for line in recover(out_dir):  # an earlier build killed mid-way: put back (or finish) first
        typer.echo(line)
    if out_dir.exists() and not out_dir.is_dir():
        raise FolderError(f"{out_dir} is a file; the output of build is a folder, choose another path")
    if out_dir.exists() and not overwrite:  # fail before the (long) build, not after it
        raise FolderError(f"{out_dir} exists already; choose a new output folder or pass --overwrite")
    pipe = SegMoEPipeline(cfg, device=device)
    pipe.save_pretrained(out_dir, overwrite=overwrite)
    typer.echo(f"saved {pipe!r} to {out_dir}")


@app.command()
@friendly_errors
def generate(merge: str = typer.Argument(..., help="merge folder, hub id, or merge config YAML"),
             prompt: str = typer.Argument(...),
             output: Path = typer.Option(Path("image.png"), "-o", "--output", help="image file (.png, .jpg, .webp ...)"),
             seed: int = typer.Option(0),
             steps: int = typer.Option(25, help="inference steps"),
             guidance: Optional[float] = typer.Option(None, help="guidance scale (pipeline default if unset)"),
             height: Optional[int] = typer.Option(None, help="image height, a multiple of 8 (default: the model's)"),
             width: Optional[int] = typer.Option(None, help="image width, a multiple of 8 (default: the model's)"),
             negative_prompt: Optional[str] = typer.Option(None),
             device: Optional[str] = typer.Option(None)):
    """Generate one image with a merge."""
    import torch

    from segmoe_lab.errors import SettingsError
    from segmoe_lab.merge.pipeline import SegMoEPipeline
    from segmoe_lab.merge.settings import GenerationSettings

    # every setting is checked before the merge is loaded
    settings = GenerationSettings.of("generate options", steps=steps, guidance_scale=guidance, height=height,
                                     width=width, seed=seed, negative_prompt=negative_prompt)
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise SettingsError(f"-o {output}: the image format comes from the extension; end it in one of "
                            f"{', '.join(IMAGE_SUFFIXES)}")
    if output.is_dir():
        raise SettingsError(f"-o {output} is a folder; give an image file name, e.g. {output / 'image.png'}")
    pipe = SegMoEPipeline(merge, device=device, progress=False)
    kwargs = settings.pipeline_kwargs()
    if guidance is None:
        kwargs.pop("guidance_scale")  # the pipeline's own default
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    image = pipe(prompt, generator=generator, **kwargs).images[0]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp{output.suffix}")
    try:
        image.save(tmp)
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    typer.echo(f"wrote {output}")


# --- validate (config checks; imports no torch) -----------------------------------------------

@app.command()
@friendly_errors
def demo(out: Path = typer.Option(Path("report"), "--out", help="report folder (replaced; its image cache is kept)"),
         n_prompts: Optional[int] = typer.Option(None, "--n-prompts", help="fewer prompts, taken in turn from each domain"),
         seeds: str = typer.Option("0", help="comma-separated seeds, e.g. 0,1,2"),
         gate_prompts: int = typer.Option(30, "--gate-prompts", help="held-out prompts the gates are recorded on"),
         no_variants: bool = typer.Option(False, "--no-variants", help="skip the oracle and baseline rows (quicker)"),
         quiet: bool = typer.Option(False, "--quiet", help="no progress bars")):
    """The main job on the toy world: build, record gates, judge against base, experts and oracles; write a report (~8 min on 2 cores)."""
    from segmoe_lab.demo import run_demo

    run_demo(out, n_prompts=n_prompts, seeds=parse_seeds(seeds), progress=not quiet, log=typer.echo,
             n_gate_prompts=gate_prompts, variants=[] if no_variants else None)


@app.command()
@friendly_errors
def validate(config: Path = typer.Argument(..., help="merge config (YAML, segmoe's schema)")):
    """Check a merge config without loading any model: print its summary, or every problem in it."""
    from segmoe_lab.merge.config import load_config, summarize

    typer.echo(summarize(load_config(config)))


# --- run / runs (experiments: notebooks executed with papermill; see segmoe_lab.runner) -----------

@app.command("run")
@friendly_errors
def run_cmd(experiment: Path = typer.Argument(..., help="experiment YAML (notebook + parameters [+ grid])"),
            grid: bool = typer.Option(False, "--grid", help="one run per point of the experiment's grid"),
            out: Path = typer.Option(Path("runs"), "--out", help="runs folder")):
    """Execute an experiment's notebook into OUT/NAME/<timestamp>/ (with --grid, once per grid point)."""
    from segmoe_lab.runner import run_experiment

    def started(i, n, point):
        typer.echo(f"[{i + 1}/{n}] " + (" ".join(f"{k}={v}" for k, v in point.items()) or "parameters"), nl=False)

    def done(r):
        color = typer.colors.GREEN if r.status == "ok" else typer.colors.RED
        typer.secho(f"  {r.status} ({r.seconds:.0f} s) -> {r.path}" + (f"\n    {r.error}" if r.error else ""), fg=color)

    results = run_experiment(experiment, grid=grid, out=out, on_run=started, on_done=done)
    failed = sum(r.status != "ok" for r in results)
    typer.echo(f"{len(results) - failed} ok, {failed} failed; collect them with `segmoe-lab runs --out {out}`")
    if failed:
        raise SystemExit(1)  # not typer.Exit: click's Exit is a RuntimeError, which friendly_errors catches


@app.command("runs")
@friendly_errors
def runs_cmd(out: Path = typer.Option(Path("runs"), "--out", help="runs folder"),
             output: Optional[Path] = typer.Option(None, "-o", "--output", help="write the collected table (CSV)")):
    """Collect every run's results.csv into one table (with run, status and grid point)."""
    from segmoe_lab.runner import collect_runs

    table = collect_runs(out)
    per_run = table.groupby("run", sort=False).agg(status=("run_status", "first"), rows=("run", "size"),
                                                  seconds=("run_seconds", "first"), error=("run_error", "first"))
    typer.echo(per_run.fillna("").to_string() if len(per_run) else f"no runs under {out}")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(output, index=False)
        typer.echo(f"wrote {len(table)} rows to {output}")


# --- estimate (memory planning without weights; issue 9) -------------------------------------

@app.command()
@friendly_errors
def estimate(config: Path = typer.Argument(..., help="merge config (YAML) or merge folder"),
             layout: Optional[str] = typer.Option(None, help="UNet layout to assume: sd15, sdxl, vega or ssd1b "
                                                             "(default: from the base model, else by type)"),
             rank: Optional[int] = typer.Option(None, help="count experts as base + rank-R deltas (a config file only)"),
             resident: bool = typer.Option(False, help="also predict resident memory after loading on this machine "
                                                       "(weights + the runtime's memory, measured in a child process)")):
    """Print parameter counts and float16/float32 weight memory of the base and the merge, loading no weights."""
    from segmoe_lab.errors import SettingsError
    from segmoe_lab.merge.config import load_config
    from segmoe_lab.merge.estimate import estimate as run_estimate
    from segmoe_lab.sources.layouts import LAYOUTS

    if layout is not None and layout not in LAYOUTS:
        raise SettingsError(f"--layout {layout!r} is not known; choose one of {', '.join(LAYOUTS)}")
    if rank is not None and config.is_dir():
        raise SettingsError("--rank applies to a config file; a compressed merge folder's ranks are read from it")
    target = config if rank is None else load_config(config).updated(compress={"rank": rank})
    typer.echo(run_estimate(target, layout=layout, runtime=resident).table())


# --- compress / export (experts as low-rank deltas; issue 18) -------------------------------------

@app.command()
@friendly_errors
def compress(merge: Path = typer.Argument(..., help="saved merge folder (segmoe's form or ours)"),
             out: Path = typer.Argument(..., help="output folder (must not exist)"),
             rank: Optional[int] = typer.Option(None, help="the same rank for every expert weight"),
             energy: Optional[float] = typer.Option(None, help="per weight, the smallest rank keeping this share of the delta's energy"),
             reference: str = typer.Option("auto", help="W_0: base (the config's base model), mean (of the experts), auto")):
    """Store each expert's site weights as W_0 + B A (truncated SVD of the delta); only segmoe-lab reads the result."""
    from segmoe_lab.merge.compressed_io import compress_merge

    used = compress_merge(merge, out, {"rank": rank, "energy": energy}, reference=reference)
    typer.echo(f"wrote {out}: {used['base']} site(s) against the base model, {used['mean']} against the experts' mean")


@app.command()
@friendly_errors
def export(merge: Path = typer.Argument(..., help="merge folder, compressed or not"),
           out: Path = typer.Argument(..., help="output folder (must not exist)")):
    """Write a merge in segmoe 0.0.4's own folder form (full experts), e.g. from a compressed merge."""
    from segmoe_lab.merge.compressed_io import export_merge

    typer.echo(f"wrote {export_merge(merge, out)} (segmoe's form)")


# --- compare (merge vs base vs each expert, scored; issue 7) ----------------------------------

def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-3"`` (inclusive) -> a list of distinct seeds (see :func:`segmoe_lab.merge.settings.parse_seeds`)."""
    from segmoe_lab.merge.settings import parse_seeds as parse

    return parse(text, "--seeds")


_int_list = parse_seeds  # the old name


@app.command("compare")
@friendly_errors
def compare_cmd(merge: str = typer.Argument("toy", help="merge config YAML, merge folder, hub id, or 'toy'"),
                prompts: Optional[str] = typer.Option(None, help="prompt set in data/prompts (toy, segmoe_examples, adherence) or a CSV"),
                n_prompts: Optional[int] = typer.Option(None, help="use this many prompts (taken in turn from each category)"),
                seeds: Optional[str] = typer.Option(None, help="seeds: 0,1,2 or 0-3 (default 0)"),
                steps: Optional[int] = typer.Option(None, help="inference steps (default 25)"),
                guidance: Optional[float] = typer.Option(None, help="guidance scale (default 7.5)"),
                scheduler: Optional[str] = typer.Option(None, help="sampler for every model (default: the merge's)"),
                scorers: Optional[str] = typer.Option(None, help="comma-separated: clip, torchmetrics, toy_truth"),
                clip_model: Optional[str] = typer.Option(None, help="open_clip model, open_clip/transformers CLIP folder, or toy"),
                clip_pretrained: Optional[str] = typer.Option(None, help="open_clip tag or weights file (default openai)"),
                torchmetrics_model: Optional[str] = typer.Option(None, help="transformers CLIP folder or hub id for torchmetrics"),
                models: Optional[str] = typer.Option(None, help="comma-separated: merge, base, experts, expert_<i>"),
                config: Optional[Path] = typer.Option(None, help="YAML of comparison settings (segmoe_lab.judge.compare.CompareConfig); flags override it"),
                cache_dir: Optional[Path] = typer.Option(None, help="image cache (default $SEGMOE_LAB_CACHE/images)"),
                out: Path = typer.Option(Path("comparison"), "--out", help="report folder"),
                device: Optional[str] = typer.Option(None, help="auto / cpu / cuda"),
                dtype: Optional[str] = typer.Option(None, help="auto / float32 / float16 / bfloat16")):
    """Generate every prompt x seed with the merge, its base and each expert; score them and write a report.

    Shard across processes with `accelerate launch --num_processes N -m segmoe_lab.cli compare ...`
    (or `torchrun --nproc_per_node N -m segmoe_lab.cli compare ...`).
    """
    from segmoe_lab.errors import ConfigError
    from segmoe_lab.judge.compare import CompareConfig, run_comparison
    from segmoe_lab.judge.report import report
    from segmoe_lab.safe_load import load_yaml

    values = (load_yaml(config, ConfigError, "comparison config (YAML)") or {}) if config else {}
    if not isinstance(values, dict):
        raise ConfigError(f"{config}: a comparison config must be a mapping of CompareConfig fields")
    values["merge"] = merge
    flags = {"prompts": prompts, "n_prompts": n_prompts, "device": device, "dtype": dtype,
             "cache_dir": str(cache_dir) if cache_dir else None,
             "seeds": parse_seeds(seeds) if seeds is not None else None,
             "models": models.split(",") if models is not None else None}
    values.update({k: v for k, v in flags.items() if v is not None})
    sampling = {"steps": steps, "guidance_scale": guidance, "scheduler": scheduler}
    if not isinstance(values.get("sampling", {}), dict):
        raise ConfigError(f"{config}: sampling must be a mapping of settings (steps, guidance_scale, ...)")
    values["sampling"] = {**values.get("sampling", {}), **{k: v for k, v in sampling.items() if v is not None}}
    if isinstance(values.get("scorers"), list) and all(isinstance(s, str) for s in values["scorers"]):
        values["scorers"] = {name: {} for name in values["scorers"]}
    if not isinstance(values.get("scorers") or {}, dict):
        raise ConfigError(f"{config}: scorers must be a list of names or a mapping of name to options")
    if scorers is not None:
        values["scorers"] = {name: dict((values.get("scorers") or {}).get(name) or {}) for name in scorers.split(",")}
    for name, opts in (("clip", {"model": clip_model, "pretrained": clip_pretrained}), ("torchmetrics", {"model": torchmetrics_model})):
        given = {k: v for k, v in opts.items() if v is not None}
        if given:
            values.setdefault("scorers", {name: {}})
            values["scorers"] = {**values["scorers"], name: {**(values["scorers"].get(name) or {}), **given}}
    result = run_comparison(CompareConfig.of(str(config) if config else "compare options", **values))
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        folder = report(result, out)
        overall = result.paired(by_category=False)
        cols = ["scorer", "model_a", "model_b", "diff", "ci_low", "ci_high", "win_rate", "p_value", "note"]
        typer.echo(result.summary().round(3).to_string(index=False))
        typer.echo(overall[cols].round(3).to_string(index=False))
        typer.echo(f"generated {sum(result.generated.values())} image(s); report in {folder}")
    state.wait_for_everyone()
    if state.num_processes > 1:
        state.destroy_process_group()


# --- toy world (segmoe_lab/toy) ----------------------------------------------------------------------

toy_app = typer.Typer(no_args_is_help=True, help="The toy world: train its tiny models, measure it.")
app.add_typer(toy_app, name="toy")


@toy_app.command("train")
@friendly_errors
def toy_train(quick: bool = typer.Option(False, "--quick", help="a few steps per stage: runs the code path in seconds"),
              out: Optional[Path] = typer.Option(None, "--out", help="output folder (default: the shipped segmoe_lab/toy/weights)"),
              seed: int = typer.Option(0, "--seed"),
              device: Optional[str] = typer.Option(None, help="cpu / cuda (default: cuda if present)"),
              workers: Optional[int] = typer.Option(None, min=1, help="parallel stage processes (default: 2 on a CPU with 2+ cores, 1 on a GPU)")):
    """Train the toy VAE, CLIP, SD base, domain experts, control and SDXL models from scratch."""
    from segmoe_lab.toy.train import WEIGHTS, train_all

    if out is None and quick:
        from segmoe_lab.errors import SettingsError

        raise SettingsError("--quick would overwrite the shipped weights with untrained ones; give --out DIR")
    stages = train_all(out or WEIGHTS, seed=seed, quick=quick, device=device, workers=workers)
    typer.echo(f"trained in {stages['total']['seconds']:.0f} s; weights, losses.csv and losses.png in {out or WEIGHTS}")


@toy_app.command("quality")
@friendly_errors
def toy_quality(n: int = typer.Option(200, min=1, help="generated prompts per domain"),
                steps: int = typer.Option(15, min=1, max=1000, help="sampling steps"),
                out: Optional[Path] = typer.Option(None, "--out", help="write quality.json here"),
                weights: Optional[Path] = typer.Option(None, help="weights folder (default: the shipped ones)")):
    """Measure the world: experts vs base vs control on ground truth, CLIP retrieval, CLIP-truth Spearman."""
    from segmoe_lab.toy.quality import main as quality_main

    quality_main(n=n, steps=steps, out=out, weights=weights)


@toy_app.command("ablation")
@friendly_errors
def toy_ablation(n: int = typer.Option(40, help="held-out prompts per domain"),
                 seed: int = typer.Option(2027, help="the held-out stream (not the prompt set's nor any gate prompt's)"),
                 out: Optional[str] = typer.Option(None, "--out", help="write the rows as CSV here")):
    """How much of the experts' gain merges keep: site oracle by layer kind and the merge presets, held out."""
    from segmoe_lab.toy.ablation import main as ablation_main

    ablation_main(n=n, seed=seed, out=out)


def main():  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
