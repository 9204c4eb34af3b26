"""Prompt sets: CSV files of prompts with a category (and optionally the expert that should win), looked up by name in ``data/prompts``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import pandas as pd

PROMPT_COLUMNS = ("prompt", "category")


def prompt_dirs() -> list[Path]:
    """Where prompt set names are looked up: the kit's ``data/prompts`` and ``./data/prompts``, ``../data/prompts``."""
    here = Path(__file__).resolve().parent.parent  # the package folder
    dirs = [here.parent / "data" / "prompts", here / "data" / "prompts", Path("data/prompts"), Path("../data/prompts")]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def prompt_sets() -> list[str]:
    """Names of the prompt sets found in :func:`prompt_dirs`."""
    return sorted({p.stem for d in prompt_dirs() for p in d.glob("*.csv")})


def _prompt_file(source: Union[str, Path]) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    for d in prompt_dirs():
        if (d / f"{source}.csv").is_file():
            return d / f"{source}.csv"
    raise FileNotFoundError(f"prompt set {str(source)!r}: no such CSV file or set name; choose one of {prompt_sets()} "
                            "or give the path of a CSV with prompt and category columns")


def load_prompts(source: Union[str, Path] = "toy", n: Optional[int] = None, categories=None) -> pd.DataFrame:
    """A prompt set as a table with ``prompt``, ``category`` (and any other columns, e.g. ``description``).

    Args:
        source (`str` or `Path`, *optional*, defaults to ``"toy"``): a set name from ``data/prompts``
            (``toy``, ``segmoe_examples``, ``adherence``) or a CSV path.
        n (`int`, *optional*): keep ``n`` prompts, taken in turn from each category (file order), so a
            short run still covers every category.
        categories (`list[str]`, *optional*): keep only these categories.
    """
    path = _prompt_file(source)
    table = pd.read_csv(path, keep_default_na=False)
    missing = [c for c in PROMPT_COLUMNS if c not in table]
    if missing:
        raise ValueError(f"{path}: prompt sets need columns {list(PROMPT_COLUMNS)}; missing {missing}")
    dup = table.prompt[table.prompt.duplicated()].tolist()
    if dup:
        raise ValueError(f"{path}: prompts must be unique (they key the results); repeated: {dup[:3]}")
    if categories:
        unknown = sorted(set(categories) - set(table.category))
        if unknown:
            raise ValueError(f"categories {unknown} are not in {path.name}; choose from {sorted(set(table.category))}")
        table = table[table.category.isin(categories)]
    if n is not None:
        rank = table.groupby("category", sort=False).cumcount()  # round-robin over categories
        table = table.assign(_r=rank).sort_values("_r", kind="stable").head(n).sort_index().drop(columns="_r")
    return table.reset_index(drop=True)
