"""The kit's own calls raise no library warnings, and the gate warning fires only where routing suffers."""
import warnings

import torch

from segmoe_lab.merge.gating import DEGENERATE_CONDITION, routing_condition


def test_torchmetrics_scorer_tokenizes_without_the_max_length_warning():
    from PIL import Image

    from segmoe_lab.judge.scorers import get_scorer

    scorer = get_scorer("torchmetrics", model="toy", device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = scorer.score([Image.new("RGB", (32, 32))] * 2, ["two red circles, flat style", "a " * 60])
    assert len(scores) == 2
    assert not [w for w in caught if "max_length" in str(w.message)]


def test_a_component_all_gate_rows_share_does_not_make_a_gate_degenerate():
    torch.manual_seed(0)
    shared = 10 * torch.nn.functional.normalize(torch.randn(1, 32), dim=-1)
    rows = shared + torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)  # distinct, on a large common part
    plain = torch.linalg.svdvals(rows)
    assert plain[0] / plain[-1] > DEGENERATE_CONDITION  # the plain condition number would warn
    assert routing_condition(rows) < DEGENERATE_CONDITION


def test_gate_rows_that_nearly_coincide_are_degenerate():
    torch.manual_seed(0)
    a, b = torch.randn(2, 32)
    rows = torch.stack([a, b, a + 1e-3 * b])  # experts 0 and 2 are the same up to noise
    assert routing_condition(rows) > DEGENERATE_CONDITION


def test_identical_gate_rows_have_an_infinite_routing_condition():
    assert routing_condition(torch.ones(3, 8)) == float("inf")
