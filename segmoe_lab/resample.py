"""The seeded percentile bootstrap every stage reports its intervals with.

It sits at stage 0 so that observing (gate health), the toy world's studies and judging (paired
statistics) draw the same interval from the same data: they are one function, not three copies.

Example::

    lo, hi = bootstrap_ci(score_differences)          # 95 % CI of the mean, seed 0
"""
from __future__ import annotations

import numpy as np


def bootstrap_ci(values, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (seeded: the same data give the same interval)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # (n_boot,)
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)
