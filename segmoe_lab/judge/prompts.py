"""Prompt sets: CSV files of prompts with a category (and optionally the expert that should win), looked up by name in ``data/prompts``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import pandas as pd

from segmoe_lab.errors import PromptsError, short

PROMPT_COLUMNS = ("prompt", "category")
MAX_PROMPT_FILE_BYTES = 16 << 20  # 16 MiB: ~100,000 prompts


class PromptSetNotFound(PromptsError, FileNotFoundError):
    """A prompt set name or CSV path that does not exist."""


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
    if path.is_dir():
        raise PromptsError(f"prompt set {str(source)!r} is a folder; give the path of a CSV file or a set name")
    raise PromptSetNotFound(f"prompt set {str(source)!r}: no such CSV file or set name; choose one of {prompt_sets()} "
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
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise PromptsError(f"n={short(n)}: give a whole number of prompts, 1 or more (None: all of them)")
    if categories is not None and (isinstance(categories, str) or not all(isinstance(c, str) for c in categories)):
        raise PromptsError(f"categories={short(categories)}: give a list of category names, e.g. [{short(str(categories))}]")
    path = _prompt_file(source)
    table = _read_csv(path)
    missing = [c for c in PROMPT_COLUMNS if c not in table]
    if missing:
        raise PromptsError(f"{path}: prompt sets need columns {list(PROMPT_COLUMNS)}; missing {missing} "
                           f"(found {[str(c)[:30] for c in table.columns[:6]]})")
    if table.empty:
        raise PromptsError(f"{path}: holds no prompts, only a header; add rows of prompt,category")
    blank = table.index[table.prompt.astype(str).str.strip() == ""].tolist()
    if blank:
        raise PromptsError(f"{path}: row {blank[0] + 2} has an empty prompt ({len(blank)} such row(s)); fill or remove it")
    dup = table.prompt[table.prompt.duplicated()].tolist()
    if dup:
        raise PromptsError(f"{path}: prompts must be unique (they key the results); repeated: "
                           f"{[str(d)[:40] for d in dup[:3]]}")
    if categories:
        unknown = sorted(set(categories) - set(table.category))
        if unknown:
            raise PromptsError(f"categories {[str(u)[:30] for u in unknown[:5]]} are not in {path.name}; "
                               f"choose from {sorted(set(table.category))[:20]}")
        table = table[table.category.isin(categories)]
    if n is not None:
        rank = table.groupby("category", sort=False).cumcount()  # round-robin over categories
        table = table.assign(_r=rank).sort_values("_r", kind="stable").head(n).sort_index().drop(columns="_r")
    return table.reset_index(drop=True)


def _read_csv(path: Path) -> pd.DataFrame:
    """The CSV at ``path``; a huge, binary or malformed file is a :class:`PromptsError` naming it."""
    size = path.stat().st_size
    if size > MAX_PROMPT_FILE_BYTES:
        raise PromptsError(f"{path}: is {size:,} bytes, more than a prompt set may be ({MAX_PROMPT_FILE_BYTES:,})")
    try:
        table = pd.read_csv(path, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise PromptsError(f"{path}: the file is empty; a prompt set is a CSV with prompt and category columns") from None
    except UnicodeDecodeError as err:
        raise PromptsError(f"{path}: is not UTF-8 text (byte {err.start}); save it as a UTF-8 CSV") from None
    except (pd.errors.ParserError, ValueError) as err:
        raise PromptsError(f"{path}: not a readable CSV ({str(err).strip()[:160]}); check its quotes and commas") from None
    return table
