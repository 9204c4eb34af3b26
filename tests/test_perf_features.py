"""Performance features leave results unchanged: stacked experts, compile, K/V cache, dtypes,
model and expert offload, streamed builds; and the memory estimate (issue 9). No timings here:
speed is measured by the scripts in benchmarks/."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from segmoe_lab.merge import moe
from segmoe_lab.merge.build import build_merge
from segmoe_lab.merge.streaming import _read_safetensors_into
from segmoe_lab.merge.kvcache import cache_cross_kv, cross_kv_projections
from segmoe_lab.merge.moe import ROUTINGS, MoELayer, iter_moe_layers, route, set_routing
from segmoe_lab.merge.offload import enable_expert_offload, resident_bytes_plan
from segmoe_lab.testing import unet_inputs

ROUTING_NAMES = sorted(ROUTINGS)


def _geglu_experts(n=4, dim=8, seed=0):
    from diffusers.models.attention import FeedForward

    torch.manual_seed(seed)
    experts = [FeedForward(dim, activation_fn="geglu") for _ in range(n)]
    for e in experts:
        for p in e.parameters():
            nn.init.normal_(p)
    return experts


def _layer(experts, top_k, routing, seed=0):
    layer = MoELayer(copy.deepcopy(experts), top_k=top_k, routing=routing)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.randn(layer.gate.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return layer


def _reference(layer, experts, x):
    weights, idx = route(layer.gate(x), layer.top_k, layer.routing)
    B, T, _ = x.shape
    out = torch.zeros(B, T, x.shape[-1])
    for b in range(B):
        for j in range(idx.shape[-1]):
            for t in range(T):
                out[b, t] += weights[b, t, j] * experts[int(idx[b, t, j])](x[b, t : t + 1])[0]
    return out


@pytest.fixture(params=[True, False], ids=["cpu-views", "tensor-indexed"])
def both_paths(request, monkeypatch):
    """Run a test on the eager-CPU view path and on the accelerator/compile path."""
    monkeypatch.setattr(moe, "_eager_cpu", lambda x: request.param)
    return request.param


# --- stacked experts -------------------------------------------------------------------------
@pytest.mark.parametrize("routing", ROUTING_NAMES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_geglu_feed_forward_experts_are_stacked_and_mix_as_the_modules_do(both_paths, routing, top_k):
    experts = _geglu_experts()
    layer = _layer(experts, top_k, routing)
    assert layer._geglu and layer.experts[2].net[0].proj.weight.data_ptr() == layer.stacks["net.0.proj.weight"][2].data_ptr()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer, experts, x), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("routing", ROUTING_NAMES)
def test_linear_experts_give_the_same_mixture_on_both_paths(routing, monkeypatch):
    layer = _layer([nn.Linear(8, 6) for _ in range(4)], 2, routing)
    x = torch.randn(3, 5, 8)
    outs = []
    for flag in (True, False):
        monkeypatch.setattr(moe, "_eager_cpu", lambda x, flag=flag: flag)
        with torch.no_grad():
            outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1])


def test_stacks_follow_dtype_changes_and_state_dict_loads():
    a, b = _layer(_geglu_experts(seed=1), 2, "segmoe"), _layer(_geglu_experts(seed=2), 2, "segmoe")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    b = b.to(torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in b.stacks.values())
    assert b.experts[1].net[2].weight.data_ptr() == b.stacks["net.2.weight"][1].data_ptr()


# --- torch.compile ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "geglu"])
def test_moe_layer_compiles_with_segmoe_routing_without_graph_breaks(kind):
    experts = [nn.Linear(8, 6) for _ in range(3)] if kind == "linear" else _geglu_experts(3)
    layer = _layer(experts, 2, "segmoe")
    x = torch.randn(2, 5, 8)
    torch._dynamo.reset()
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-4)


def test_a_merged_transformer_block_compiles_without_graph_breaks(fixture_sets):
    pipe = build_merge(fixture_sets["sd15"].config(moe_layers="all", init="random", num_experts_per_tok=2), progress=False)
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    x, text = torch.randn(2, 16, block.norm1.normalized_shape[0]), torch.randn(2, 7, 24)
    torch._dynamo.reset()
    assert torch._dynamo.explain(block)(x, encoder_hidden_states=text).graph_break_count == 0


# --- cross-attention K/V cache -------------------------------------------------------------------
def _images(pipe, **kw):
    return pipe("a photo of a red cat", num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_kv_cache_leaves_images_unchanged_for_base_and_merge(fixture_sets, layout):
    from segmoe_lab.testing import make_pipeline

    merge = build_merge(fixture_sets[layout].config(moe_layers="all", init="random", num_experts_per_tok=2), progress=False)
    for pipe in (make_pipeline(layout), merge):
        ref = _images(pipe)
        with cache_cross_kv(pipe) as cache:
            out = _images(pipe)
        n = len(cross_kv_projections(pipe.unet))
        # computed once per projection, reused at every later UNet call (PNDM makes 4 calls of 3 steps)
        assert cache.misses == n and cache.hits >= 2 * n and cache.hits % n == 0
        np.testing.assert_array_equal(out, ref)
        assert all("forward" not in m.__dict__ for _, m in cross_kv_projections(pipe.unet))  # restored


def test_kv_cache_recomputes_for_a_new_or_edited_text_embedding():
    proj = nn.Linear(4, 3)
    holder = nn.Module()
    holder.attn2 = nn.Module()
    holder.attn2.to_k, holder.attn2.to_v = proj, nn.Linear(4, 3)
    text = torch.randn(1, 5, 4)
    with torch.no_grad(), cache_cross_kv(holder) as cache:
        first = holder.attn2.to_k(text)
        assert holder.attn2.to_k(text) is first
        text.mul_(2)  # in place: the version counter changes
        torch.testing.assert_close(holder.attn2.to_k(text), nn.functional.linear(text, proj.weight, proj.bias))
        holder.attn2.to_k(text.clone())
    assert (cache.hits, cache.misses) == (1, 3)


def test_kv_cache_and_model_cpu_offload_work_on_a_merge(fixture_sets):
    cfg = fixture_sets["sd15"].config(moe_layers="all", init="random", num_experts_per_tok=2)
    ref = _images(build_merge(cfg, progress=False))
    pipe = build_merge(cfg, progress=False)
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate's hooks; 'cpu' stands in for the accelerator
    with cache_cross_kv(pipe):
        out = _images(pipe)
    np.testing.assert_array_equal(out, ref)


# --- dtypes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_half_precision_merges_run_on_cpu_close_to_float32(fixture_sets, dtype, tol):
    cfg = fixture_sets["sd15"].config(moe_layers="all", init="random", num_experts_per_tok=2)
    ref, half = build_merge(cfg, progress=False), build_merge(cfg, progress=False, torch_dtype=dtype)
    assert all(t.dtype == dtype for _, layer in iter_moe_layers(half.unet) for t in layer.stacks.values())
    with torch.no_grad():
        a = ref.unet(**unet_inputs(ref.unet)).sample
        b = half.unet(**unet_inputs(half.unet)).sample
    assert b.dtype == dtype and torch.isfinite(b).all()
    torch.testing.assert_close(b.float(), a, rtol=tol, atol=tol * a.abs().max().item())
    assert np.isfinite(_images(half)).all()


# --- expert offload --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl_merge(fixture_sets):
    return build_merge(fixture_sets["sdxl"].config(moe_layers="all", init="random", num_experts_per_tok=1), progress=False)


@pytest.mark.parametrize("routing", ROUTING_NAMES)
def test_expert_offload_gives_the_same_outputs_and_counts_resident_bytes(sdxl_merge, routing):
    unet = copy.deepcopy(sdxl_merge.unet)
    set_routing(unet, routing, 1)
    inputs = unet_inputs(unet, batch=2)
    with torch.no_grad():
        ref = unet(**inputs).sample
        with enable_expert_offload(unet, "cpu") as off:
            for _ in range(2):
                torch.testing.assert_close(unet(**inputs).sample, ref, rtol=0, atol=0)
            st = off.stats()
        torch.testing.assert_close(unet(**inputs).sample, ref, rtol=0, atol=0)  # disabled again
    plan = resident_bytes_plan(unet)
    assert st.static_bytes == plan["static"] and st.slot_bytes <= plan["slots"] < plan["all_experts"]
    assert st.peak_bytes < plan["static"] + plan["all_experts"]
    if routing == "segmoe":  # one expert per site, the same at both steps: copied once, then found
        assert st.slot_bytes == plan["slots"] and st.hits == st.misses == len(list(iter_moe_layers(unet)))


def test_expert_offload_within_a_byte_budget_prefetches_and_stays_bounded(sdxl_merge):
    unet = copy.deepcopy(sdxl_merge.unet)
    set_routing(unet, "segmoe", 1)
    inputs = unet_inputs(unet, batch=2)
    plan = resident_bytes_plan(unet)
    budget = plan["slots"] // 4
    with torch.no_grad():
        ref = unet(**inputs).sample
        with enable_expert_offload(unet, "cpu", max_bytes=budget) as off:
            for _ in range(3):
                torch.testing.assert_close(unet(**inputs).sample, ref, rtol=0, atol=0)
            st = off.stats()
            largest_site = max(s.slot_nbytes for s in off.sites.values())
    assert st.evictions > 0 and st.prefetched > 0
    assert st.peak_bytes <= plan["static"] + budget + largest_site < plan["static"] + plan["slots"]


def test_expert_offload_with_fewer_slots_than_top_k_overflows_correctly(fixture_sets):
    pipe = build_merge(fixture_sets["sd15"].config(moe_layers="all", init="random", num_experts_per_tok=2), progress=False)
    inputs = unet_inputs(pipe.unet, batch=2)
    with torch.no_grad():
        ref = pipe.unet(**inputs).sample
        with enable_expert_offload(pipe, "cpu", slots=1) as off:
            torch.testing.assert_close(pipe.unet(**inputs).sample, ref, rtol=0, atol=0)
            assert off.stats().overflow_calls == len(off.sites)


def test_segmoe_4x2_sdxl_merge_fits_12_gb_with_expert_offload_by_meta_accounting():
    from segmoe_lab.sources import layouts
    from segmoe_lab.merge.config import parse_config
    from segmoe_lab.merge.estimate import meta_merge
    from segmoe_lab.merge.offload import ExpertOffload

    cfg = parse_config({"base_model": "x", "type": "sdxl", "moe_layers": "all", "num_experts_per_tok": 2,
                        "experts": [{"source_model": f"e{i}"} for i in range(4)]})
    _, unet, _ = meta_merge(layouts.unet_config("sdxl"), cfg)
    unet.half()
    off = ExpertOffload(unet, "meta", storage="meta")
    off.warm({path: [0, 3] for path in off.sites})
    st = off.stats()
    assert st.peak_bytes == resident_bytes_plan(unet)["total"]
    assert st.peak_bytes <= 12e9 < resident_bytes_plan(unet)["static"] + resident_bytes_plan(unet)["all_experts"]


# --- streamed build reads ---------------------------------------------------------------------------
def test_streamed_safetensors_reads_convert_dtype_and_check_sizes(tmp_path):
    from safetensors.torch import save_file

    from segmoe_lab.sources import SourceError

    tensors = {"a": torch.randn(3, 4).half(), "b": torch.arange(6, dtype=torch.float32).view(2, 3)}
    save_file(tensors, tmp_path / "w.safetensors")
    a, b = torch.empty(3, 4), torch.empty(2, 3)
    _read_safetensors_into(tmp_path / "w.safetensors", [("a", a), ("b", b)])
    torch.testing.assert_close(a, tensors["a"].float())
    torch.testing.assert_close(b, tensors["b"])
    with pytest.raises(SourceError, match="truncated or not"):
        _read_safetensors_into(tmp_path / "w.safetensors", [("b", torch.empty(3, 3))])


# --- estimate -------------------------------------------------------------------------------------
def test_estimate_counts_what_a_build_makes(fixture_sets):
    from segmoe_lab.merge.estimate import estimate

    cfg = fixture_sets["sd15"].config(moe_layers="all", num_experts_per_tok=2, init="random")
    est = estimate(cfg)
    pipe = build_merge(cfg, progress=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert est.merge_unet == count(pipe.unet)
    assert est.text_encoders == count(pipe.text_encoder) and est.vae == count(pipe.vae)
    assert "base model folder" in est.source


def test_estimate_of_segmoes_published_merges_known_answers():
    from pathlib import Path

    from segmoe_lab.merge.estimate import estimate

    root = Path(__file__).resolve().parents[1] / "experiments"
    e = estimate(root / "segmoe_4x2.yaml")
    assert (e.base_unet, e.merge_unet, e.offload_unet, e.sites) == (2567463684, 7565598724, 4235102724, 420)
    assert e.bytes("merged pipeline") == 2 * (7565598724 + 817720320 + 83653863)
    assert estimate(root / "segmoe_sd_4x2.yaml").merge_unet == 1427845124
    assert estimate(root / "segmoe_4x2.yaml", layout="vega").merge_unet == 1827567364
    with pytest.raises(ValueError, match="type: sd model"):
        estimate(root / "segmoe_4x2.yaml", layout="sd15")


def test_estimate_cli_prints_the_table_and_reads_merge_folders(fixture_sets, tmp_path):
    from typer.testing import CliRunner

    from segmoe_lab.cli import app
    from segmoe_lab.merge.io import save_merge

    cfg = fixture_sets["sd15"].config(moe_layers="attn", init="random")
    save_merge(build_merge(cfg, progress=False), tmp_path / "m", cfg)
    runner = CliRunner()
    result = runner.invoke(app, ["estimate", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "merged UNet (2 experts" in result.output and "float16" in result.output
    bad = runner.invoke(app, ["estimate", str(tmp_path / "m"), "--layout", "sdxl2"])
    assert bad.exit_code == 2 and "choose one of" in bad.output


def test_resident_estimate_is_the_weights_plus_the_measured_runtime(fixture_sets, tmp_path):
    from typer.testing import CliRunner

    from segmoe_lab.cli import app
    from segmoe_lab.merge.estimate import estimate

    cfg = fixture_sets["sd15"].config(moe_layers="attn", init="random")
    est = estimate(cfg, runtime=True)
    assert est.runtime > 50 * 2**20  # an interpreter with torch and diffusers imported holds far more than 50 MiB
    assert est.resident_bytes("float32") == (est.merge_unet + est.others) * 4 + est.runtime
    with pytest.raises(ValueError, match="runtime=True"):
        estimate(cfg).resident_bytes()
    config = tmp_path / "resident.yaml"
    config.write_text(json.dumps(cfg.model_dump()))  # JSON is YAML
    result = CliRunner().invoke(app, ["estimate", str(config), "--resident"])
    assert result.exit_code == 0, result.output
    assert "resident after loading (float16)" in result.output


# --- a build reads experts a group of sites at a time --------------------------------------------------
def test_reading_expert_sites_in_small_groups_builds_the_same_merge(fixture_sets, monkeypatch):
    from segmoe_lab.merge import streaming

    cfg = fixture_sets["sd15"].config(moe_layers="all", include_mid=True, moe_extra=["all"], init="random")
    torch.manual_seed(0)
    whole = build_merge(cfg, progress=False).unet.state_dict()
    groups, real = [], streaming._read_safetensors_into

    def spy(path, targets):
        groups.append(len(targets))
        real(path, targets)

    monkeypatch.setattr(streaming, "READ_CHUNK", 1)  # every site is its own group
    monkeypatch.setattr(streaming, "_read_safetensors_into", spy)
    torch.manual_seed(0)
    chunked = build_merge(cfg, progress=False).unet.state_dict()
    assert len(groups) > 10 * len(cfg.experts) and max(groups) <= 12  # one site's tensors per read, never a UNet
    assert chunked.keys() == whole.keys()
    assert all(torch.equal(chunked[k], whole[k]) for k in whole)


def test_a_failed_runtime_measurement_names_the_problem_and_the_fix(monkeypatch):
    import subprocess

    from segmoe_lab.errors import SettingsError
    from segmoe_lab.merge import estimate as est

    monkeypatch.setattr(est, "_RUNTIME", {})
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "FileNotFoundError: /proc/self/status"))
    with pytest.raises(SettingsError, match=r"failed \(FileNotFoundError: /proc/self/status\); it reads /proc .*leave out --resident"):
        est.runtime_bytes()
