"""Scorers: the registry, determinism, open_clip vs torchmetrics agreement, offline failures.

``tiny_clip`` is a seeded random transformers CLIPModel (the toy tokenizer, 32 px images) saved
to a temp folder: both CLIP scorers load it, open_clip through the converted ``local-dir:`` folder.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from segmoe_lab.judge import clip_weights, scorers
from segmoe_lab.judge.scorers import ScorerError, get_scorer

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow star", "a photo of a cat", "a black dog"]


def make_tiny_clip(folder, seed: int = 0):
    """A random tiny transformers CLIP folder (model, tokenizer, image processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from segmoe_lab.sources.layouts import clip_tokenizer

    tok = clip_tokenizer(2000)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(tower, vocab_size=len(tok), max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                                      bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
                     vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg).eval()
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(folder)
    return folder


def images(n: int = 6, seed: int = 0, size: int = 64):
    """Seeded images: smooth colour gradients (not noise, so CLIP features vary between them)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
        t = np.linspace(0, 1, size)[None, :, None]  # (1, W, 1)
        row = (a * (1 - t) + b * t).astype(np.uint8)  # (1, W, 3)
        out.append(Image.fromarray(np.repeat(row, size, axis=0)))  # (H, W, 3)
    return out


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """Converted open_clip folders go to a temp cache, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEGMOE_LAB_CACHE", str(tmp_path_factory.mktemp("segmoe_cache")))
        yield


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def clip_scorers(tiny_clip):
    return {"clip": get_scorer("clip", model=str(tiny_clip), device="cpu", clamp=False),
            "torchmetrics": get_scorer("torchmetrics", model=str(tiny_clip), device="cpu")}


def test_registry_names_and_options():
    assert set(scorers.SCORERS) == {"clip", "torchmetrics", "toy_truth"}
    with pytest.raises(ValueError, match=r"scorer 'clipp' is not known; choose one of \['clip', 'torchmetrics', 'toy_truth'\]"):
        get_scorer("clipp")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['modle'\]; valid options: \['model', 'pretrained'"):
        get_scorer("clip", modle="toy")


def test_open_clip_conversion_matches_transformers(tiny_clip):
    """Known answer: open_clip's features of the converted model equal transformers' on the same inputs."""
    import open_clip
    from transformers import CLIPModel, CLIPProcessor

    folder = clip_weights.openclip_from_transformers(tiny_clip)
    assert clip_weights.openclip_from_transformers(tiny_clip) == folder  # converted once, then reused
    oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    hf, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    unwrap = lambda out: out if torch.is_tensor(out) else out.pooler_output  # noqa: E731 (transformers >= 5)
    with torch.no_grad():
        text = unwrap(hf.get_text_features(**proc(text=PROMPTS, return_tensors="pt", padding=True)))
        torch.testing.assert_close(oc.encode_text(tokenizer(PROMPTS)), text, atol=1e-5, rtol=1e-5)
        pixels = proc(images=images(3), return_tensors="pt")["pixel_values"]  # (3, 3, 32, 32)
        torch.testing.assert_close(oc.encode_image(pixels), unwrap(hf.get_image_features(pixel_values=pixels)),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["clip", "torchmetrics"])
def test_identical_images_give_identical_scores(clip_scorers, name):
    ims = images(4)
    first = clip_scorers[name].score(ims, PROMPTS[:4])
    again = clip_scorers[name].score([im.copy() for im in ims], PROMPTS[:4])
    assert first.shape == (4,) and first.dtype == np.float64
    np.testing.assert_array_equal(first, again)


def test_torchmetrics_is_clipscore_on_the_0_100_scale(tiny_clip, clip_scorers):
    """Known answer: 100 * max(cos, 0) from transformers' own features, as the papers report."""
    from transformers import CLIPModel, CLIPProcessor

    hf, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    ims = images(3)
    with torch.no_grad():
        out = hf(**proc(text=PROMPTS[:3], images=ims, return_tensors="pt", padding=True))
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).numpy()
    np.testing.assert_allclose(clip_scorers["torchmetrics"].score(ims, PROMPTS[:3]), 100 * np.maximum(cos, 0), atol=1e-3)


def test_open_clip_and_torchmetrics_agree_in_ranking(clip_scorers):
    ims = images(8, seed=1)
    prompts = (PROMPTS * 2)[:8]
    a = clip_scorers["clip"].score(ims, prompts)
    b = clip_scorers["torchmetrics"].score(ims, prompts)
    assert (b > 0).all(), "the fixture should give positive cosines, so clamping cannot create ties"
    assert spearmanr(a, b).statistic > 0.95
    np.testing.assert_allclose(a, b, atol=1.0)  # same model; only image resizing differs slightly


def test_scores_need_one_prompt_per_image(clip_scorers):
    with pytest.raises(ValueError, match="one prompt per image; got 2 images, 1 prompts"):
        clip_scorers["clip"].score(images(2), PROMPTS[:1])


def test_offline_real_scorers_fail_at_once_naming_the_model(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ScorerError) as err:
        get_scorer("clip", model="ViT-L-14", pretrained="openai")
    msg = str(err.value)
    assert "ViT-L-14" in msg and "openai" in msg and 'pretrained="/path/open_clip_pytorch_model.bin"' in msg
    with pytest.raises(ScorerError, match=r"openai/clip-vit-large-patch14.*hf download openai/clip-vit-large-patch14"):
        get_scorer("torchmetrics", model="openai/clip-vit-large-patch14")
    with pytest.raises(ScorerError, match=r"not a tag of open_clip model 'ViT-L-14'"):
        get_scorer("clip", model="ViT-L-14", pretrained="no-such-tag")
    with pytest.raises(ScorerError, match=r"'ViT-Q-99' not found"):
        get_scorer("clip", model="ViT-Q-99")


# --- the toy world (its tiny trained CLIP and ground-truth checker) -------------------------------

@pytest.fixture(scope="module")
def toy():
    from segmoe_lab import toy

    assert toy.clip_path().is_dir(), "the toy CLIP ships with the repo (segmoe_lab/toy/weights/clip)"
    return toy


def test_toy_truth_is_deterministic_and_finds_descriptions(toy):
    from segmoe_lab.judge.compare import load_prompts

    table = load_prompts("toy", n=4)
    scorer = get_scorer("toy_truth")
    ims = images(4)
    by_lookup = scorer.score(ims, list(table.prompt))
    given = scorer.score([im.copy() for im in ims], list(table.prompt), list(table.description))
    np.testing.assert_array_equal(by_lookup, given)
    with pytest.raises(ValueError, match="no description for prompts"):
        scorer.score(ims[:1], ["a prompt that is not in the toy set"])


def test_toy_clip_loads_in_both_scorers_and_they_agree(toy):
    from segmoe_lab.judge.compare import load_prompts

    prompts = list(load_prompts("toy", n=8).prompt)
    ims = images(len(prompts), seed=2)
    a = get_scorer("clip", model="toy", device="cpu").score(ims, prompts)
    b = get_scorer("torchmetrics", model="toy", device="cpu").score(ims, prompts)
    np.testing.assert_array_equal(a, get_scorer("clip", model="toy", device="cpu").score(ims, prompts))
    assert spearmanr(a, b).statistic > 0.9
