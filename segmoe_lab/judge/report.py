"""What a comparison leaves behind: image grids, a scorer-agreement plot and a report folder.

:func:`report` writes the tidy table (CSV + Parquet), per-model summaries, paired statistics
(overall and per category), the oracle table and routing accuracy / utilisation (when the
comparison has them, :mod:`segmoe_lab.judge.oracle`), scorer agreement, one prompts x models grid per seed, the settings
and model fingerprints (``config.json``) and a ``report.md`` with the tables. ``result`` is a
:class:`~segmoe_lab.judge.compare.Comparison` (compare calls this module, so it is not imported here).

Example::

    result = run_comparison(CompareConfig(merge="toy"))
    report(result, "reports/toy")
    grid(result, seed=0).save("grid.png")
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import pandas as pd

from segmoe_lab.atomic import disk_full, temp_folder
from segmoe_lab.errors import SettingsError
from segmoe_lab.judge import stats


def grid(result, seed: Optional[int] = None, prompts: Optional[list] = None, models: Optional[list] = None,
         cell: int = 128, label_width: int = 220):
    """Prompts (rows) x models (columns) for one seed (default: the first), as one labelled PIL image."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    seed = result.config.seeds[0] if seed is None else seed
    prompts = list(result.prompts.prompt) if prompts is None else list(prompts)
    # Columns are the table's models (oracle rows included); a model's image is found through the table,
    # since an oracle row shows another model's image and a site oracle's merges each cover some prompts.
    t = result.table[result.table.seed == seed].drop_duplicates(["model", "prompt"])
    names = [m for m in dict.fromkeys(t.model) if models is None or m in models]
    image_of = {(r.model, r.prompt): r.image for r in t.itertuples()}
    font, head = ImageFont.load_default(size=12), 22
    canvas = Image.new("RGB", (label_width + cell * len(names), head + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"seed {seed}", fill="gray", font=font)
    for j, name in enumerate(names):
        draw.text((label_width + j * cell + 4, 4), name, fill="black", font=font)
    for i, prompt in enumerate(prompts):
        y = head + i * cell
        draw.multiline_text((4, y + 4), _wrap(prompt, label_width // 7), fill="black", font=font)
        for j, name in enumerate(names):
            if (name, prompt) not in image_of:
                continue  # e.g. an oracle row for an unlabelled prompt
            with Image.open(result.cache.root / image_of[name, prompt]) as im:
                im = im.convert("RGB")
            method = Image.Resampling.LANCZOS if im.width > cell else Image.Resampling.NEAREST
            canvas.paste(ImageOps.pad(im, (cell, cell), method, color="white"), (label_width + j * cell, y))
    return canvas


def _wrap(text: str, width: int, lines: int = 6) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, max(width, 8))[:lines])


def plot_agreement(table: pd.DataFrame, x: str, y: str, ax=None, jitter: float = 0.03, seed: int = 0):
    """Scatter of scorer ``y`` against scorer ``x`` over the same images, one colour per model.

    A scorer with few distinct values (``toy_truth``: 0, 1/3, 2/3, 1) would stack its dots on a
    few lines, so ``y`` is jittered (seeded, by ``jitter`` of its range; the ticks mark the true
    levels) and each level's mean ``x`` is marked. Title with Spearman's rho; legend outside, right.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    wide = table.pivot_table(index=["model", "prompt_id", "seed"], columns="scorer", values="score").reset_index()
    if ax is None:
        _, ax = plt.subplots(figsize=(6.2, 3.8))
    levels = np.sort(wide[y].unique())
    discrete = len(levels) <= 12
    spread = jitter * (float(levels[-1] - levels[0]) or 1.0) if discrete else 0.0
    rng = np.random.default_rng(seed)
    for model, g in wide.groupby("model", sort=False):
        ax.scatter(g[x], g[y] + rng.uniform(-spread, spread, len(g)), label=model, alpha=0.6, s=16)
    if discrete:
        means = wide.groupby(y)[x].mean()
        ax.scatter(means.to_numpy(), means.index, marker="|", s=400, color="black", label=f"mean {x} per level")
        ax.set_yticks(levels, [f"{v:.2f}" for v in levels])
    rho = stats.agreement(table, x, y).spearman.iloc[0]
    ax.set_title(f"{x} vs {y}, one dot per image (Spearman rho = {rho:.2f})", fontsize=9)
    ax.set_xlabel(x)
    ax.set_ylabel(y + (" (jittered)" if discrete else ""))
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left", frameon=False, title="model", title_fontsize=7)
    ax.figure.tight_layout()
    return ax.figure


def report(result, out_dir: Union[str, Path], unit: str = "prompt", n_boot: int = 2000, seed: int = 0) -> Path:
    """Write the tables (CSV + Parquet), summaries, paired statistics, scorer agreement and grids to ``out_dir``.

    Everything is computed, then written to a temporary folder beside ``out_dir``, and only then
    moved in: a failure (or a full disk) leaves ``out_dir`` as it was, with no half-written files.
    """
    out = Path(out_dir)
    t = result.table
    if t.empty:
        raise SettingsError(f"{out}: the comparison scored no images, so there is nothing to report; "
                            "check its prompts, seeds and models")
    scored = t  # results.csv keeps every scorer's own rows
    t = stats.merge_identical_scorers(t)  # scorers wrapping one model: one set of rows, both names
    tables = {"summary": stats.summary(t, unit, n_boot, seed=seed),
              "summary_by_category": stats.summary(t, unit, n_boot, seed=seed, by_category=True),
              "paired": stats.paired(t, unit=unit, n_boot=n_boot, seed=seed)}
    csv_only = {}  # tables too long for report.md
    if result.routes:  # merges and their variants recorded their gates while generating
        tables["routing_accuracy"] = result.routing_accuracy(by=["group"], n_boot=n_boot, seed=seed)
        csv_only["routing_accuracy_by_site"] = result.routing_accuracy(by=["label"], n_boot=n_boot, seed=seed)
        csv_only["utilisation"] = result.utilisation()
    if "model_oracle" in set(t.model):
        tables["oracle_table"] = result.oracle_table(n_boot=n_boot, seed=seed)
    scorers = list(dict.fromkeys(t.scorer))
    if len(scorers) > 1:
        tables["agreement"] = pd.concat([stats.agreement(t, a, b) for i, a in enumerate(scorers) for b in scorers[i + 1:]])
    grids = {s: grid(result, seed=s) for s in result.config.seeds}
    tmp = temp_folder(out)
    try:
        _write(tmp, result, scored, tables, grids, unit, csv_only)
        out.mkdir(parents=True, exist_ok=True)
        for child in sorted(tmp.iterdir()):
            if child.is_dir() and (out / child.name).is_dir():
                shutil.rmtree(out / child.name)
            os.replace(child, out / child.name)
    except BaseException as err:
        friendly = disk_full(err, out)
        if friendly is err:
            raise
        raise friendly from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(out: Path, result, t: pd.DataFrame, tables: dict, grids: dict, unit: str, csv_only: dict) -> None:
    (out / "grids").mkdir()
    t.to_csv(out / "results.csv", index=False)
    t.to_parquet(out / "results.parquet", index=False)
    for name, df in {**tables, **csv_only}.items():
        df.to_csv(out / f"{name}.csv", index=False)
    for s, image in grids.items():
        image.save(out / "grids" / f"seed_{s}.png")
    meta = {"config": result.config.model_dump(mode="json"), "settings": result.settings, "generated": result.generated,
            "models": [{"name": r.name, "fingerprint": r.fingerprint, "detail": r.detail} for r in result.models]}
    (out / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    md = [f"# Comparison: {len(result.prompts)} prompts x {len(result.config.seeds)} seeds, unit={unit}"]
    md += [f"\n## {name}\n\n```\n{df.round(4).to_string(index=False)}\n```" for name, df in tables.items()]
    (out / "report.md").write_text("\n".join(md) + "\n")
