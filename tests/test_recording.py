"""Gate recording, its plots and the explorer, on tiny SD 1.5 and SDXL-layout merges (2-3 steps)."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from segmoe_lab.observe import plots  # noqa: E402
from segmoe_lab.merge.build import build_merge  # noqa: E402
from segmoe_lab.observe.explore import GateExplorer, explore, is_interactive  # noqa: E402
from segmoe_lab.merge.kvcache import cache_cross_kv  # noqa: E402
from segmoe_lab.merge.moe import iter_moe_layers, set_routing  # noqa: E402
from segmoe_lab.observe.diagnostics import describe_domain_routing, domain_experts, domain_routing
from segmoe_lab.observe.gate_stats import grid_shape
from segmoe_lab.observe.recording import FRAME_COLUMNS, record_gates

PROMPTS = ["a photo of a red cat", "a pencil sketch of a green car"]
KEY = ["call", "site", "sample", "expert"]


@pytest.fixture(scope="module")
def sd_merge(sd15_set):
    pipe = build_merge(sd15_set.config(moe_layers="all", init="random"), progress=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_merge(sdxl_set):
    pipe = build_merge(sdxl_set.config(moe_layers="attn", init="random", num_experts_per_tok=2), progress=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts=PROMPTS, steps=2, **kwargs):
    return pipe(list(prompts), num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def sd_recording(sd_merge):
    return record_gates(sd_merge, PROMPTS, steps=2, spatial=True)


def hook_count(pipe):
    unet = pipe.unet
    gates = sum(len(layer.gate._forward_hooks) for _, layer in iter_moe_layers(unet))
    return gates + len(unet._forward_hooks) + len(unet._forward_pre_hooks) + ("encode_prompt" in pipe.__dict__)


# --- the frame -------------------------------------------------------------------------------------

def test_frame_has_documented_columns_and_one_row_per_key(sd_merge):
    with record_gates(sd_merge) as rec:
        generate(sd_merge)
    frame = rec.frame()
    assert list(frame.columns) == list(FRAME_COLUMNS)
    n_sites, n_experts = len(list(iter_moe_layers(sd_merge.unet))), 2
    assert len(frame) == 2 * n_sites * 4 * n_experts  # 2 steps x sites x (2 prompts x 2 halves) x experts
    assert not frame.duplicated(KEY).any()
    assert frame.groupby(KEY[:3], observed=True).size().eq(n_experts).all()
    assert set(frame.block) <= {"down.0", "down.1", "down.2", "up.1", "up.2", "up.3"}
    assert set(frame.kind) == {"self-q", "self-k", "self-v", "cross-q", "cross-k", "cross-v", "ff"}
    assert frame.label.iloc[0] == "down0.a0.t0 self-q" and frame.layer.iloc[0] == "down0.a0.t0"
    assert list(frame.step.unique()) == [0, 1] and frame.timestep.is_monotonic_decreasing


def test_probabilities_sum_to_one_and_choices_follow_the_routing(sd_merge):
    with record_gates(sd_merge) as rec:
        generate(sd_merge)
    frame = rec.frame()
    per = frame.groupby(KEY[:3], observed=True)
    np.testing.assert_allclose(per.prob_mean.sum(), 1.0, atol=1e-5)
    np.testing.assert_allclose(per.topk_share.sum(), 1.0, atol=1e-5)  # top-1: every token picks one expert
    assert per.chosen.sum().eq(1).all() and per.sample_topk.sum().eq(1).all()
    # segmoe routing: one choice per site for the whole batch
    assert frame[frame.chosen].groupby(["call", "site"], observed=True).expert.nunique().eq(1).all()
    assert frame.routed_share.isin([0.0, 1.0]).all()


def test_per_token_routing_matches_top_k_share(sd_merge):
    set_routing(sd_merge.unet, "per_token", 2)
    try:
        with record_gates(sd_merge) as rec:
            generate(sd_merge, steps=1)
    finally:
        set_routing(sd_merge.unet, "segmoe", 1)
    frame = rec.frame()
    np.testing.assert_allclose(frame.routed_share, frame.topk_share, atol=1e-6)
    assert frame.chosen.all()  # top-2 of 2 experts: both used everywhere


def test_guidance_halves_and_prompts(sd_merge):
    with record_gates(sd_merge) as rec:
        generate(sd_merge, steps=1, num_images_per_prompt=2)
    frame = rec.frame()
    rows = frame[(frame.site == frame.site.iloc[0]) & (frame.expert == 0)].sort_values("sample")
    assert list(rows.cfg_half) == ["uncond"] * 4 + ["cond"] * 4  # diffusers: negative half first
    assert list(rows.prompt_index) == [0, 0, 1, 1] * 2
    assert list(rows.prompt) == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 + [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert rec.prompts == PROMPTS and len(rec.generations) == 1


def test_without_guidance_samples_are_marked_none(sd_merge):
    with record_gates(sd_merge) as rec:
        generate(sd_merge, steps=1, guidance_scale=1.0)
    frame = rec.frame()
    assert set(frame.cfg_half) == {"none"} and frame["sample"].max() == 1


def test_convenience_call_generates_each_prompt_and_counts_generations(sd_recording):
    rec = sd_recording
    assert len(rec.images) == 2 and len(rec.generations) == 2 and rec.prompts == PROMPTS
    frame = rec.frame()
    assert sorted(frame.generation.unique()) == [0, 1] and sorted(frame.prompt_index.unique()) == [0, 1]
    assert frame.groupby("generation").step.max().eq(1).all()


def test_bare_unet_calls_split_into_generations_by_timestep(sd_merge):
    unet = sd_merge.unet
    x = torch.randn(1, 4, 32, 32)
    text = torch.randn(1, 77, 24)
    with record_gates(unet) as rec, torch.no_grad():
        for _ in range(2):
            for t in (900, 500):
                unet(x, t, encoder_hidden_states=text)
    frame = rec.frame()
    assert list(frame.drop_duplicates("call")[["generation", "step"]].itertuples(index=False, name=None)) == [
        (0, 0), (0, 1), (1, 0), (1, 1)]
    assert set(frame.cfg_half) == {"none"} and set(frame.prompt) == {""}


def test_cross_kv_cache_keeps_one_row_per_site(sd_merge):
    with cache_cross_kv(sd_merge) as cache, record_gates(sd_merge) as rec:
        generate(sd_merge, steps=2)
    assert cache.hits > 0
    frame = rec.frame()
    assert frame.groupby("call").site.nunique().eq(len(rec.sites)).all()


# --- the recording changes nothing, and cleans up -------------------------------------------------

def test_recording_does_not_change_the_image(sd_merge):
    before = generate(sd_merge)
    with record_gates(sd_merge, spatial=True):
        during = generate(sd_merge)
    np.testing.assert_allclose(during, before, atol=1e-6)


def test_hooks_are_removed_after_the_block_and_after_an_error(sd_merge):
    n = hook_count(sd_merge)
    with record_gates(sd_merge) as rec:
        assert hook_count(sd_merge) > n and rec.hooked
    assert hook_count(sd_merge) == n and not rec.hooked
    with pytest.raises(RuntimeError, match="boom"):
        with record_gates(sd_merge) as rec:
            generate(sd_merge, steps=1)
            raise RuntimeError("boom")
    assert hook_count(sd_merge) == n
    assert len(rec.frame()) > 0  # what was recorded before the error stays


def test_an_error_inside_a_unet_call_removes_hooks(sd_merge):
    n = hook_count(sd_merge)
    with pytest.raises(RuntimeError):
        with record_gates(sd_merge):
            sd_merge.unet(torch.randn(1, 4, 32, 32), 10, encoder_hidden_states=torch.randn(1, 77, 5))  # wrong width
    assert hook_count(sd_merge) == n


def test_a_pipeline_without_moe_layers_is_refused(sd15_set):
    from segmoe_lab.testing import make_pipeline

    with pytest.raises(ValueError, match="no MoE layers"):
        record_gates(make_pipeline("sd15"))


# --- spatial --------------------------------------------------------------------------------------

def test_spatial_grids_follow_the_latent_resolution(sd_recording):
    rec = sd_recording
    sizes = {}
    for site in rec.spatial_sites:
        grid = rec.spatial(site.path, step=1, sample=1)
        sizes[site.block] = grid.shape
        assert grid.dtype == np.int16 and grid.min() >= 0 and grid.max() < 2
    assert sizes == {"down.0": (32, 32), "down.1": (16, 16), "down.2": (8, 8), "up.1": (8, 8), "up.2": (16, 16),
                     "up.3": (32, 32)}
    probs = rec.spatial("down1.a0.t0 self-q", value="probs")
    assert probs.shape == (16, 16, 2)
    np.testing.assert_allclose(probs.astype(np.float32).sum(-1), 1.0, atol=2e-3)
    np.testing.assert_array_equal(probs.argmax(-1), rec.spatial("down1.a0.t0 self-q"))
    with pytest.raises(ValueError, match="text embedding"):
        rec.spatial("down1.a0.t0 cross-k")


def test_spatial_argmax_matches_the_frame(sd_recording):
    rec, frame = sd_recording, sd_recording.frame()
    site = rec.spatial_sites[3]
    g, sample = rec.sample_of(1)
    grid = rec.spatial(site.path, step=0, sample=sample, generation=g)
    share = np.bincount(grid.ravel(), minlength=2) / grid.size
    rows = frame[(frame.site == site.path) & (frame.generation == g) & (frame.step == 0) & (frame["sample"] == sample)]
    np.testing.assert_allclose(rows.sort_values("expert").topk_share, share, atol=1e-6)


def test_grid_shape():
    assert grid_shape(64 * 64, (64, 64)) == (64, 64)
    assert grid_shape(16 * 12, (64, 48)) == (16, 12)
    assert grid_shape(8 * 7, (30, 25)) == (8, 7)  # stride-2 convolutions round up
    assert grid_shape(77, (64, 64)) is None


# --- domain routing -------------------------------------------------------------------------------

def synthetic_frame():
    """Two sites, two prompts of two domains, 2 steps: site A routes by domain, site B always picks expert 0."""
    rows = []
    for step in range(2):
        for p, dom_expert in ((0, 0), (1, 1)):
            for site, best in (("A", dom_expert), ("B", 0)):
                for e in range(2):
                    rows.append(dict(call=step, generation=0, step=step, timestep=0.0, sample=p, prompt_index=p,
                                     prompt=f"p{p}", cfg_half="cond", site=site, block="down.0", layer=site, kind="ff",
                                     label=site, expert=e, prob_mean=0.8 if e == best else 0.2,
                                     topk_share=0.9 if e == best else 0.1, routed_share=float(e == best),
                                     sample_topk=e == best, chosen=e == best))
    return pd.DataFrame(rows).astype({"cfg_half": "category", "site": "category"})


def test_domain_routing_known_answer():
    table = domain_routing(synthetic_frame(), {"p0": "cats", "p1": "cars"}, {"cats": 0, "cars": 1})
    rows = table.set_index("label")
    assert list(rows.index) == ["A", "B", "all"]
    assert rows.loc["A", "chosen"] == 1.0 and rows.loc["B", "chosen"] == 0.5 and rows.loc["all", "chosen"] == 0.75
    assert rows.loc["A", "top1"] == 1.0 and rows.loc["A", "per_token"] == pytest.approx(0.9)
    assert rows.loc["B", "per_token"] == pytest.approx(0.5) and rows.loc["A", "prob"] == pytest.approx(0.8)
    assert (rows.n == [4, 4, 8]).all() and (rows.chance == 0.5).all()
    by_index = domain_routing(synthetic_frame(), pd.Series({0: "cats", 1: "cars"}), {"cats": 0, "cars": 1})
    pd.testing.assert_frame_equal(by_index, table)
    with pytest.raises(ValueError, match="no recorded prompt"):
        domain_routing(synthetic_frame(), {"other": "cats"}, {"cats": 0})


def test_domain_experts_are_matched_by_name(sd15_set):
    cfg = sd15_set.config()  # experts' positive prompts: "a photo of a red cat", "a watercolor painting of a blue dog"
    assert domain_experts(cfg, ["photo", "watercolor", "photo", "neon"]) == {"photo": 0, "watercolor": 1}
    assert domain_experts(cfg, ["expert_1"]) == {"expert_1": 1}  # source_model folder names count first
    assert domain_experts(cfg, ["a "]) == {}  # in both: ambiguous, left out


def test_domain_routing_is_described_in_words():
    table = domain_routing(synthetic_frame(), {"p0": "cats", "p1": "cars"}, {"cats": 0, "cars": 1})
    text = describe_domain_routing(table, routing="segmoe")
    assert "Over 2 sites" in text and "1 of 2 route by domain" in text and "A (100%)" in text
    assert "segmoe routing used it 75%" in text
    assert describe_domain_routing(None).startswith("No domain ground truth")


def test_domain_routing_on_a_recording(sd_recording):
    table = domain_routing(sd_recording.frame(), {PROMPTS[0]: "cat", PROMPTS[1]: "car"}, {"cat": 0, "car": 1}, by="kind")
    assert table.kind.iloc[-1] == "all" and len(table) == 8
    assert table[["chosen", "per_sample", "per_token", "top1", "prob"]].apply(lambda c: c.between(0, 1)).all().all()


# --- plots and explorer ---------------------------------------------------------------------------

def check_figures(figs):
    for fig in figs:
        assert isinstance(fig, matplotlib.figure.Figure)
        fig.canvas.draw()  # renders headless (Agg) without error
        plt.close(fig)


def test_plots_render_headless_sd(sd_recording):
    rec, frame = sd_recording, sd_recording.frame()
    site = "up1.a0.t0 cross-q"
    figs = [plots.site_heatmap(frame, 0), plots.site_heatmap(rec, PROMPTS[1], step=1, kind="ff"),
            plots.step_heatmap(frame, site, prompt=1), plots.usage_bars(frame), plots.usage_bars(frame, "prob_mean"),
            plots.agreement_matrix(frame), plots.plot_choices(rec), plots.routing_map(rec, site, prompt=1),
            plots.routing_maps(rec, [0, 1], [site, "down0.a0.t0 ff"], value="chosen")]
    heat = figs[0].axes[0]
    labels = [t.get_text() for t in heat.get_yticklabels()]
    assert labels[0] == "a0.t0 self-q" and not any("transformer_blocks" in lab for lab in labels)  # block: beside
    check_figures(figs)


def test_plots_render_headless_sdxl(sdxl_merge):
    rec = record_gates(sdxl_merge, PROMPTS, steps=2, spatial=True)
    frame = rec.frame()
    assert frame.groupby(KEY[:3], observed=True).chosen.sum().eq(2).all()  # top-2
    site = rec.spatial_sites[-1].label
    check_figures([plots.site_heatmap(frame, 1), plots.step_heatmap(frame, site), plots.usage_bars(frame),
                   plots.agreement_matrix(frame, kind="cross-q"), plots.plot_choices(frame),
                   plots.routing_map(rec, site, prompt=0)])


def test_plot_arguments_are_checked(sd_recording):
    frame = sd_recording.frame()
    with pytest.raises(ValueError, match="choose one of"):
        plots.site_heatmap(frame, value="weight")
    with pytest.raises(KeyError, match="not in the frame"):
        plots.site_heatmap(frame, prompt=7)
    with pytest.raises(KeyError, match="no site"):
        plots.step_heatmap(frame, "nowhere")


def test_explorer_builds_and_updates_when_controls_change(sd_recording):
    open_before = plt.get_fignums()
    ex = explore(sd_recording, static=False)
    assert isinstance(ex, GateExplorer) and ex.updates == 1
    assert set(ex.figures) == {"heatmap", "steps", "map", "image"} and ex.figures["map"] is not None
    first = dict(ex.figures)
    ex.controls["prompt"].value = 1
    assert ex.updates == 2 and ex.figures["heatmap"] is not first["heatmap"]
    assert PROMPTS[1] in ex.figures["heatmap"].axes[0].get_title()
    ex.controls["step"].value = 0
    assert "step 0" in ex.figures["heatmap"].axes[0].get_title()
    ex.controls["kind"].value = "cross-k"  # site list follows the kind; cross-k has no image tokens
    assert ex.updates == 4
    assert all(opt.endswith("cross-k") for opt in ex.controls["site"].options)
    assert ex.figures["map"] is None and ex.controls["site"].value in ex.figures["steps"].axes[0].get_title()
    assert plt.get_fignums() == open_before  # the explorer's figures never reach pyplot's inline display


def test_explore_is_static_outside_a_live_frontend(sd_recording, monkeypatch):
    assert not is_interactive()  # pytest: no kernel
    monkeypatch.setenv("SEGMOE_LAB_STATIC", "0")
    assert is_interactive()
    monkeypatch.delenv("SEGMOE_LAB_STATIC")
    figs = explore(sd_recording)
    assert "routing maps" in figs and any(k.startswith("heatmap") for k in figs)
    check_figures(figs.values())
