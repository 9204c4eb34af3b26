"""Paired statistics that cannot mislead: no CI below MIN_UNITS, CI and p-value that agree at any n,
and scorers that wrap the same model shown once."""
import numpy as np
import pandas as pd
import pytest

from segmoe_lab.judge import stats


def _table(diffs, scorers=("clip",)) -> pd.DataFrame:
    rows = []
    for p, d in enumerate(diffs):
        for model, score in (("merge", 10.0 + d), ("base", 10.0)):
            for s in scorers:
                rows.append({"model": model, "prompt_id": p, "category": "c", "seed": 0, "scorer": s, "score": score})
    return pd.DataFrame(rows)


def test_two_units_that_look_decisive_get_no_ci_and_a_note():
    row = stats.paired(_table([-2.3, -0.5]), by_category=False).iloc[0]  # the flat, merge vs base case
    assert np.isnan(row.ci_low) and np.isnan(row.ci_high) and "n too small" in row.note
    assert row.p_value == 0.5  # exact: 2 of the 4 sign patterns are as extreme


def test_summary_gives_no_ci_below_the_minimum_number_of_units():
    out = stats.summary(_table([1.0] * (stats.MIN_UNITS - 1)))
    assert out.ci_low.isna().all() and out.note.str.contains("n too small").all()


@pytest.mark.parametrize("n", [6, 7, 9, 13, 25])
def test_ci_excludes_zero_exactly_when_p_is_below_five_percent(n):
    rng = np.random.default_rng(n)
    for shift in np.linspace(0.0, 1.2, 13):  # from no effect to a clear one, crossing the boundary
        d = rng.normal(shift, 1.0, size=n)
        row = stats.paired(_table(d), by_category=False, n_boot=500).iloc[0]
        assert (row.ci_low > 0 or row.ci_high < 0) == (row.p_value < 0.05), (n, shift, row.to_dict())


def test_ci_contains_the_mean_difference():
    d = np.random.default_rng(1).normal(0.5, 1.0, size=10)
    row = stats.paired(_table(d), by_category=False).iloc[0]
    assert row.ci_low < d.mean() < row.ci_high


def test_exact_sign_flip_p_of_six_units_all_positive_is_two_in_64():
    assert stats.sign_flip_p(np.arange(1.0, 7.0)) == pytest.approx(2 / 64)


def test_scorers_with_identical_scores_are_shown_once_under_both_names():
    table = _table([0.1, 0.2, 0.3], scorers=("clip", "torchmetrics", "toy_truth"))
    table.loc[table.scorer == "toy_truth", "score"] *= 0.01  # a different scorer
    merged = stats.merge_identical_scorers(table)
    assert stats.identical_scorers(table) == [["clip", "torchmetrics"]]
    assert list(dict.fromkeys(merged.scorer)) == ["clip = torchmetrics", "toy_truth"]
    assert len(merged) == len(table) * 2 // 3
