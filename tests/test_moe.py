"""The MoE layer and its routing policies, on hand-made Linear and feed-forward experts."""
import copy

import pytest
import torch
from torch import nn

from segmoe_lab.merge.moe import ROUTINGS, MoELayer, route, set_routing

ROUTING_NAMES = sorted(ROUTINGS)


def _gate(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.randn(layer.gate.weight.shape, generator=g))
    return layer


def _reference(x, experts, weights, idx):
    """Token by token: the sum over the chosen experts of weight * expert(token)."""
    B, T, _ = x.shape
    rows = []
    for b in range(B):
        for t in range(T):
            rows.append(sum(weights[b, t, j] * experts[int(idx[b, t, j])](x[b, t]) for j in range(idx.shape[-1])))
    return torch.stack(rows).view(B, T, -1)


@pytest.mark.parametrize("routing", ROUTING_NAMES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_identical_linear_experts_reproduce_the_single_expert(routing, top_k):
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    layer = _gate(MoELayer([copy.deepcopy(lin) for _ in range(3)], top_k=top_k, routing=routing))
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x), lin(x))


@pytest.mark.parametrize("routing", ROUTING_NAMES)
def test_linear_experts_mix_the_chosen_experts_token_by_token(routing):
    torch.manual_seed(1)
    experts = [nn.Linear(8, 6) for _ in range(4)]
    layer = _gate(MoELayer(experts, top_k=2, routing=routing))
    x = torch.randn(3, 5, 8)
    weights, idx = route(layer.gate(x), 2, routing)
    torch.testing.assert_close(layer(x), _reference(x, experts, weights, idx))


@pytest.mark.parametrize("routing", ROUTING_NAMES)
def test_feed_forward_experts_mix_the_chosen_experts_token_by_token(routing):
    torch.manual_seed(2)
    experts = [nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)) for _ in range(3)]
    layer = _gate(MoELayer(experts, top_k=2, routing=routing))
    x = torch.randn(2, 4, 8)
    weights, idx = route(layer.gate(x), 2, routing)
    torch.testing.assert_close(layer(x), _reference(x, experts, weights, idx))


def test_segmoe_routing_chooses_top_k_of_logits_summed_over_the_whole_batch():
    logits = torch.tensor([[[5.0, 0.0, 1.0]], [[-9.0, 3.0, 1.0]]])  # sums: -4, 3, 2
    weights, idx = route(logits, 2, "segmoe")
    assert idx[0, 0].tolist() == [1, 2] and idx[1, 0].tolist() == [1, 2]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 1))


def test_per_sample_routing_lets_each_batch_item_choose():
    logits = torch.tensor([[[5.0, 0.0, 1.0]], [[-9.0, 3.0, 1.0]]])
    _, idx = route(logits, 1, "per_sample")
    assert idx[:, 0, 0].tolist() == [0, 1]


def test_per_token_routing_chooses_per_token():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0]]])
    _, idx = route(logits, 1, "per_token")
    assert idx[0, :, 0].tolist() == [0, 1]


def test_unknown_routing_names_the_choices():
    with pytest.raises(ValueError, match="per_sample"):
        MoELayer([nn.Linear(2, 2)], routing="mixtral")


def test_state_dict_uses_segmoe_key_names():
    layer = MoELayer([nn.Linear(4, 3), nn.Linear(4, 3)])
    assert set(layer.state_dict()) == {"gate.weight", "experts.0.weight", "experts.0.bias", "experts.1.weight", "experts.1.bias"}


def test_linear_experts_stay_stacked_views_after_a_dtype_change():
    layer = MoELayer([nn.Linear(4, 3), nn.Linear(4, 3)]).to(torch.bfloat16)
    assert layer._w.dtype == torch.bfloat16
    assert layer.experts[1].weight.data_ptr() == layer._w[1].data_ptr()


def test_loading_a_state_dict_updates_the_stacked_weights():
    a, b = MoELayer([nn.Linear(4, 3), nn.Linear(4, 3)]), MoELayer([nn.Linear(4, 3), nn.Linear(4, 3)])
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 2, 4)
    torch.testing.assert_close(a(x), b(x))


def test_set_routing_changes_every_layer_and_checks_top_k():
    model = nn.Sequential(MoELayer([nn.Linear(2, 2)] * 2), MoELayer([nn.Linear(2, 2)] * 2))
    set_routing(model, "per_token", 2)
    assert all(m.routing == "per_token" and m.top_k == 2 for m in model)
    with pytest.raises(ValueError, match="between 1 and 2"):
        set_routing(model, top_k=3)


@pytest.mark.parametrize("routing", ["segmoe", "per_sample"])
def test_a_hooked_gate_sees_every_tokens_logits(routing):
    layer = _gate(MoELayer([nn.Linear(8, 6) for _ in range(3)], top_k=1, routing=routing))
    seen = []
    layer.gate.register_forward_hook(lambda m, a, o: seen.append(tuple(o.shape)))
    layer(torch.randn(2, 5, 8))
    assert seen == [(2, 5, 3)]


@pytest.mark.parametrize("routing", ["segmoe", "per_sample"])
def test_summed_gate_input_routes_as_summed_logits_do(routing):
    torch.manual_seed(3)
    experts = [nn.Linear(8, 6) for _ in range(4)]
    layer = _gate(MoELayer(experts, top_k=2, routing=routing))
    x = torch.randn(3, 5, 8)
    weights, idx = route(layer.gate(x), 2, routing)
    torch.testing.assert_close(layer(x), _reference(x, experts, weights, idx))


@pytest.mark.parametrize("routing", ["per_sample", "per_token"])
def test_a_batch_routed_to_one_expert_runs_that_expert_alone(routing):
    from segmoe_lab.merge.kinds import SampleMoE
    from segmoe_lab.merge.routing import Scope, single_expert

    torch.manual_seed(0)
    experts = [nn.Linear(4, 3) for _ in range(3)]
    gate = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[0.0] * 4, [10.0] * 4, [0.0] * 4]))  # positive inputs -> expert 1
    x = torch.rand(2, 5, 4) + 0.1
    for layer in (MoELayer(experts, copy.deepcopy(gate), top_k=1, routing=routing),
                  SampleMoE(experts, copy.deepcopy(gate), top_k=1, routing=routing)):
        with torch.no_grad():
            torch.testing.assert_close(layer(x), experts[1](x), atol=0, rtol=0)
    assert single_expert(torch.tensor([[[1], [1]], [[1], [1]]]), Scope.SAMPLE) == 1
    assert single_expert(torch.tensor([[[1], [1]], [[0], [0]]]), Scope.SAMPLE) is None
    assert single_expert(torch.tensor([[[1, 0]]]), Scope.SAMPLE) is None  # top-2 mixes
