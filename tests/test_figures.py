"""Figures a reader takes in at a glance, on the toy merge's recording: every plot function has a
sane size, a title, labelled axes and the experts' names; the explorer starts on real values and
keeps a static snapshot of its view; the scatter of 03 is titled with its legend outside."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from segmoe_lab import toy  # noqa: E402
from segmoe_lab.observe import plots  # noqa: E402
from segmoe_lab.observe.explore import MEAN_VALUE, GateExplorer  # noqa: E402
from segmoe_lab.observe.recording import record_gates  # noqa: E402

NAMES = ["flat", "neon", "mosaic"]
PROMPTS = ["three green squares, flat style", "two pink circles, neon style"]


@pytest.fixture(scope="module")
def recording():
    from segmoe_lab.merge.pipeline import SegMoEPipeline

    # random gates: the build needs no expert generations; names and layout are the toy merge's
    pipe = SegMoEPipeline(toy.merge_config(init="random"), device="cpu", progress=False)
    pipe.pipe.set_progress_bar_config(disable=True)
    return record_gates(pipe, PROMPTS, steps=2, spatial=True)


def _figures(rec):
    frame, site = rec.frame(), rec.spatial_sites[0].label
    return {
        "block_heatmap": plots.block_heatmap(frame),
        "site_heatmap": plots.site_heatmap(frame, 0),
        "site_heatmap(block)": plots.site_heatmap(frame, 1, block="up1"),
        "step_heatmap": plots.step_heatmap(frame, site, 0),
        "usage_bars": plots.usage_bars(frame),
        "agreement_matrix": plots.agreement_matrix(frame),
        "plot_choices": plots.plot_choices(rec),
        "routing_map": plots.routing_map(rec, site, 0),
        "routing_maps": plots.routing_maps(rec, [0, 1], plots.spread_sites(rec, 2)),
    }


def _texts(fig) -> str:
    """Every piece of text a figure shows: titles, axis and tick labels, legends, annotations."""
    fig.canvas.draw()
    return " ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))


def test_recording_names_the_experts_from_the_config(recording):
    assert recording.expert_names == NAMES and recording.frame().attrs["expert_names"] == NAMES


def test_every_plot_has_a_sane_size_a_title_labelled_axes_and_expert_names(recording):
    for name, fig in _figures(recording).items():
        w, h = fig.get_size_inches()
        assert 2 <= w <= 20 and 2 <= h <= 24, f"{name}: {w:.1f} x {h:.1f} in"
        titled = fig._suptitle is not None or any(ax.get_title() for ax in fig.axes)
        labelled = any(ax.get_xlabel() or ax.get_ylabel() for ax in fig.axes)
        text = _texts(fig)
        assert titled and labelled, f"{name}: title {titled}, axis labels {labelled}"
        if name != "agreement_matrix":  # prompts x prompts: no experts in it
            assert all(n in text for n in NAMES), f"{name} does not name the experts {NAMES}"
        assert "expert 0" not in text
        plt.close(fig)


def test_site_heatmap_labels_are_readable_and_grouped_by_block(recording):
    fig = plots.site_heatmap(recording.frame(), 0)
    ax = fig.axes[0]
    sizes = {t.get_fontsize() for t in ax.get_yticklabels()}
    assert min(sizes) >= 8 and len(ax.get_yticklabels()) == len(recording.sites)  # every row labelled, 8 pt
    blocks = {t.get_text() for t in ax.texts}
    assert {"down0", "up3"} <= blocks
    plt.close(fig)


def test_legends_sit_outside_the_data(recording):
    for name in ("usage_bars", "plot_choices", "routing_map"):
        fig = _figures(recording)[name]
        fig.canvas.draw()
        ax = fig.axes[0]
        legend = ax.get_legend()
        assert legend is not None, name
        assert legend.get_window_extent().x0 >= ax.get_window_extent().x1 - 1, f"{name}: legend overlaps the axes"
        plt.close("all")


def test_expert_palette_cannot_be_mistaken_for_a_toy_colour():
    from matplotlib.colors import to_rgb

    from segmoe_lab.toy.world import BACKGROUNDS, COLOURS

    palette = np.array([to_rgb(c) for c in plots.EXPERT_PALETTE]) * 255  # (P, 3)
    toy_colours = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), dtype=float)  # (T, 3)
    assert np.linalg.norm(palette[:, None] - toy_colours[None], axis=-1).min() >= 80
    apart = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
    assert apart[~np.eye(len(palette), dtype=bool)].min() >= 55


def test_routing_map_keeps_the_image_out_of_the_map_panel(recording):
    fig = plots.routing_maps(recording, [0], [recording.spatial_sites[0].label])
    image_ax, map_ax = fig.axes[:2]
    assert len(image_ax.images) == 1 and len(map_ax.images) == 1  # the image beside, not under, the map
    assert map_ax.collections, "objects are outlined on the map"
    plt.close(fig)


def test_explorer_starts_with_a_real_value_in_every_control(recording):
    ex = GateExplorer(recording)
    values = {name: c.value for name, c in ex.controls.items()}
    assert all(v is not None for v in values.values()), values
    assert ex.controls["step"].value == MEAN_VALUE and ex.controls["step"].label == "mean over steps"
    for name, c in ex.controls.items():
        assert c.value in [o[1] if isinstance(o, tuple) else o for o in c.options], name
    plt.close("all")


def test_explorer_snapshot_is_one_image_that_follows_the_controls(recording):
    ex = GateExplorer(recording)
    first = ex.snapshot().data
    ex.controls["prompt"].value = 1
    second = ex.snapshot().data
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and first != second
    plt.close("all")


def test_clip_vs_truth_scatter_is_titled_jittered_with_its_legend_outside():
    from segmoe_lab.judge.report import plot_agreement

    rows = [{"model": m, "prompt_id": p, "seed": 0, "scorer": s, "score": v}
            for m in ("merge", "base") for p in range(8)
            for s, v in (("clip", 20.0 + p), ("toy_truth", [0.0, 0.25, 0.5, 1.0][p % 4]))]
    fig = plot_agreement(pd.DataFrame(rows), "clip", "toy_truth")
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    y = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections])
    assert len(np.unique(np.round(y, 6))) > 4  # four truth levels, jittered apart
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1 - 1
    plt.close(fig)
