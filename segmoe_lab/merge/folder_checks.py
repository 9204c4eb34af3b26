"""Checking a merge folder against its own config before it loads: expert count per site, the site list, tensor names and shapes. A mismatch is refused by name, never run."""
from __future__ import annotations

import itertools
from pathlib import Path

from segmoe_lab.errors import FolderError, format_problems
from segmoe_lab.merge.config import MergeConfig


class MergeFolderError(FolderError):
    """A folder that is not a loadable merge, or an output folder that cannot be written."""


def _moe_sites_from_keys(keys) -> dict[str, int]:
    """Site path -> number of experts, read from the tensor names of a merge."""
    sites: dict[str, set] = {}
    for k in keys:
        if k.endswith(".gate.weight"):
            sites.setdefault(k[: -len(".gate.weight")], set())
    for k in keys:
        head, sep, rest = k.partition(".experts.")
        index = rest.split(".")[0]
        if sep and head in sites and index.isdigit():  # other names are caught by the shape check
            sites[head].add(int(index))
    return {p: len(e) for p, e in sites.items()}


def _check_experts(sites: dict[str, int], cfg: MergeConfig, weights: Path) -> None:
    """Every site holds the config's number of experts (a folder saying 2 but holding 3 is refused)."""
    wrong = {p: n for p, n in sites.items() if n != cfg.num_experts}
    if wrong:
        header = (f"{weights} does not match its unet/config.json: the config says {cfg.num_experts} experts, "
                  f"but {len(wrong)} of {len(sites)} MoE sites hold another number; rebuild the merge")
        raise MergeFolderError(format_problems(header, (f"{p}: {n} experts" for p, n in wrong.items())))


def _check_sites(found: dict[str, int], expected: set[str], cfg: MergeConfig, weights: Path) -> None:
    """The MoE sites in the weights are the ones ``moe_layers`` / ``include_mid`` make on this UNet."""
    missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
    if missing or extra:
        header = (f"{weights} does not match its unet/config.json (moe_layers={cfg.moe_layers}, "
                  f"include_mid={cfg.include_mid}): {len(missing)} MoE site(s) missing, {len(extra)} unexpected; "
                  "rebuild the merge")
        problems = [*(f"missing {p}" for p in missing), *(f"unexpected {p}" for p in extra)]
        raise MergeFolderError(format_problems(header, problems))


def _check_shapes(expected: dict[str, tuple], stored: dict[str, tuple], weights: Path) -> None:
    """Tensor names and shapes in the file are exactly the merged UNet's (read from the header only)."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if missing or unexpected or wrong:
        header = (f"{weights} does not match its unet/config.json: {len(missing)} tensor(s) missing, "
                  f"{len(unexpected)} unexpected, {len(wrong)} of the wrong shape; rebuild the merge")
        kinds = [[f"{k}: shape {list(stored[k])}, expected {list(expected[k])}" for k in wrong],
                 [f"unexpected {k}" for k in unexpected], [f"missing {k}" for k in missing]]
        # taken in turn from each kind, so a few lines show every kind of mismatch
        problems = [p for group in itertools.zip_longest(*kinds) for p in group if p is not None]
        raise MergeFolderError(format_problems(header, problems))
