"""Site discovery walks the module tree: every layout works without block indices."""
import pytest

from segmoe_lab.merge.discovery import find_sites, site_from_path, transformer_blocks
from segmoe_lab.testing import LAYOUTS, make_pipeline


@pytest.fixture(scope="module")
def unets():
    return {layout: make_pipeline(layout).unet for layout in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sites_are_every_down_and_up_transformer_block_times_the_layer_kinds(unets, layout):
    unet = unets[layout]
    blocks = [p for p, _ in transformer_blocks(unet) if not p.startswith("mid_block")]
    assert len(find_sites(unet, "attn")) == 6 * len(blocks)
    assert len(find_sites(unet, "ff")) == len(blocks)
    assert len(find_sites(unet, "all")) == 7 * len(blocks)


# Vega and SSD-1B reduce the mid block to ResNets: no transformer block to find there.
@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_mid_block_sites_come_only_with_include_mid(unets, layout):
    unet = unets[layout]
    assert not any(s.block == "mid" for s in find_sites(unet, "ff"))
    assert any(s.block == "mid" for s in find_sites(unet, "ff", include_mid=True))


@pytest.mark.parametrize("layout", ["vega", "ssd1b"])
def test_include_mid_adds_nothing_where_the_mid_block_has_no_attention(unets, layout):
    unet = unets[layout]
    assert find_sites(unet, "all", include_mid=True) == find_sites(unet, "all")


def test_segmoes_block_ranges_for_sd15_and_sdxl(unets):
    sd_blocks = {s.block for s in find_sites(unets["sd15"], "ff")}
    xl_blocks = {s.block for s in find_sites(unets["sdxl"], "ff")}
    assert sd_blocks == {"down.0", "down.1", "down.2", "up.1", "up.2", "up.3"}
    assert xl_blocks == {"down.1", "down.2", "up.0", "up.1"}


def test_cross_attention_key_value_sites_take_the_text_width(unets):
    unet = unets["sd15"]
    kv = [s for s in find_sites(unet, "attn") if s.is_cross_kv]
    assert kv and all(s.in_features == unet.config.cross_attention_dim for s in kv)


def test_unknown_layer_type_names_the_choices(unets):
    with pytest.raises(ValueError, match=r"'attn', 'ff', 'all'"):
        find_sites(unets["sd15"], "conv")


def test_site_labels_read_as_block_and_layer_names():
    site = site_from_path("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k")
    assert (site.block, site.kind, site.label) == ("up.1", "attn2.to_k", "up1.a2.t0 cross-k")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensors_by_site_groups_each_key_under_its_site_as_prefix_matching_would(unets, layout):
    from segmoe_lab.merge.discovery import tensors_by_site
    from segmoe_lab.merge.kinds import find_extra_sites

    unet = unets[layout]
    paths = [s.path for s in (*find_sites(unet, "all", True), *find_extra_sites(unet, ["all"]))]
    keys = list(unet.state_dict())
    assert tensors_by_site(keys, paths) == {p: [k for k in keys if k.startswith(p + ".")] for p in paths}
