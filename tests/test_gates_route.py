"""Gates that route: prompt lists, the discriminant gate, mask-aware pooling and the prompt router."""

import pytest
import torch

from segmoe_lab.merge.config import ConfigError
from segmoe_lab.merge.discovery import Site
from segmoe_lab.merge.gating import GateContext, fit_discriminant, get_gate_init
from segmoe_lab.merge.prompt_router import Gate, PromptRouter, pool_text, real_token_counts

SITE = Site("down_blocks.0.attentions.0.transformer_blocks.0.ff", "ff", "down.0", 16, 16)


def _shared_component_data(seed=0, n=6):
    """Two experts whose inputs share a large component that varies in size (as image content
    does); what tells them apart is small. Expert 0's own direction is longer than expert 1's."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.zeros(16)
    shared[0] = 30.0
    own = [torch.zeros(16), torch.zeros(16)]
    own[0][1], own[1][2] = 6.0, 2.0

    def draw(e, scale):
        return scale * shared + own[e] + 0.1 * torch.randn(16, generator=g)

    train = [[{SITE.path: draw(e, 1.0 + 0.5 * i / n)} for i in range(n)] for e in range(2)]
    test = [(draw(e, s), e) for e in range(2) for s in (3.0, 4.0, 5.0)]  # content grows: hidden follows the shared part
    return train, test


def _routes(rows, bias, test):
    bias = torch.zeros(rows.shape[0]) if bias is None else bias
    return [int((x @ rows.T + bias).argmax()) == e for x, e in test]


def test_discriminant_routes_inputs_with_a_large_shared_component_where_hidden_does_not():
    train, test = _shared_component_data()
    means = [{SITE.path: torch.stack([d[SITE.path] for d in per]).mean(0)} for per in train]
    ctx = GateContext([SITE], 2, hidden=means, samples=train)
    hidden = get_gate_init("hidden")(ctx)[SITE.path]
    rows, bias = get_gate_init("discriminant")(ctx)[SITE.path]
    assert all(_routes(rows, bias, test))
    assert not all(_routes(hidden, None, test))


def test_identical_expert_prompts_give_identical_gate_rows():
    same = {SITE.path: torch.randn(16)}
    ctx = GateContext([SITE], 3, hidden=[same] * 3, samples=[[same, same]] * 3)
    hidden = get_gate_init("hidden")(ctx)[SITE.path]
    rows, bias = get_gate_init("discriminant")(ctx)[SITE.path]
    assert torch.equal(hidden[0], hidden[1]) and torch.equal(hidden[1], hidden[2])
    assert torch.allclose(rows[0], rows[1]) and torch.allclose(rows[1], rows[2]) and torch.allclose(bias, bias[0])


def test_a_common_shift_of_all_inputs_changes_no_discriminant_decision():
    train, test = _shared_component_data()
    groups = [torch.stack([d[SITE.path] for d in per]) for per in train]
    w, b = fit_discriminant(groups)
    shift = torch.randn(16)
    w2, b2 = fit_discriminant([g + shift for g in groups])
    for x, _ in test:
        assert int((x @ w.T + b).argmax()) == int(((x + shift) @ w2.T + b2).argmax())


def test_a_gate_offset_is_added_to_the_gate_logits():
    gate = Gate(4, 2, offset=torch.tensor([0.0, 3.0]))
    torch.nn.init.zeros_(gate.weight)
    assert torch.equal(gate(torch.ones(1, 5, 4)), torch.tensor([0.0, 3.0]).expand(1, 5, 2))


def test_positive_prompt_may_be_a_list_and_segmoe_reads_its_first(sd15_set):
    cfg = sd15_set.config(experts=[{"source_model": str(e), "positive_prompt": ["a", "b"]} for e in sd15_set.experts])
    assert cfg.experts[0].prompts == ["a", "b"]
    assert cfg.to_segmoe_dict()["experts"][0]["positive_prompt"] == "a"


def test_an_empty_prompt_list_is_refused(sd15_set):
    with pytest.raises(ConfigError, match="positive_prompt"):
        sd15_set.config(experts=[{"source_model": str(e), "positive_prompt": []} for e in sd15_set.experts])


def test_an_unknown_router_names_the_choices(sd15_set):
    with pytest.raises(ConfigError, match="router.*'prompt'"):
        sd15_set.config(router="prompts")


def test_real_token_counts_stop_at_the_first_end_of_text():
    ids = torch.tensor([[5, 6, 9, 9, 9], [5, 9, 9, 9, 9], [5, 6, 7, 8, 4]])
    assert real_token_counts(ids, 9).tolist() == [3, 2, 5]


def test_real_token_pooling_ignores_padding():
    emb = torch.tensor([[[1.0], [3.0], [100.0], [100.0]]])
    assert pool_text(emb, torch.tensor([2]), "real").item() == 2.0
    assert pool_text(emb, torch.tensor([2]), "mean").item() == 51.0


def test_the_unconditional_half_follows_its_prompts_decision():
    router = PromptRouter(torch.eye(2), torch.zeros(2), pool="mean")
    prompts = torch.tensor([[[5.0, 0.0]], [[0.0, 5.0]]])  # sample 0 -> expert 0, sample 1 -> expert 1
    negative = torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]])  # on its own the negative prompt prefers expert 1
    router.note(prompts, torch.tensor([1, 1]), negative)
    router._before_unet(None, (), {"encoder_hidden_states": torch.cat([negative, prompts])})
    assert router.logits.argmax(-1).tolist() == [0, 1, 0, 1]


def test_rows_no_encode_prompt_call_produced_decide_on_their_own():
    router = PromptRouter(torch.eye(2), torch.zeros(2), pool="mean")
    negative = torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]])
    prompts = torch.tensor([[[5.0, 0.0]], [[0.0, 5.0]]])
    router._before_unet(None, (), {"encoder_hidden_states": torch.cat([negative, prompts])})
    assert router.logits.argmax(-1).tolist() == [1, 1, 0, 1]


def test_an_sdxl_whole_unet_switch_routes_each_expert_prompt_to_its_expert(sdxl_set):
    from segmoe_lab.merge.pipeline import SegMoEPipeline

    cfg = sdxl_set.config(init="random", moe_layers="all", include_mid=True, moe_extra=["all"], router="prompt",
                          routing="per_sample")
    merge = SegMoEPipeline(cfg, device="cpu", progress=False)
    router = merge.unet.segmoe_router
    assert router.weight.shape[1] == merge.unet.config.cross_attention_dim  # both encoders' rows, as the UNet sees them
    seen = []
    merge.unet.register_forward_pre_hook(lambda m, a, k: seen.append(router.logits.argmax(-1).tolist()), with_kwargs=True)
    merge([e.positive_prompt for e in cfg.experts], num_inference_steps=1, guidance_scale=5.0, height=64, width=64)
    assert seen[0] == [0, 1, 0, 1]