"""The toy world: renderer and checker agree, sampling is seeded, training runs, shipped weights work."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segmoe_lab import toy
from segmoe_lab.toy import models, world
from segmoe_lab.toy.truth import check

ROOT = Path(__file__).resolve().parents[1]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)


def test_every_shipped_model_is_present():
    # the weights ship with the repo: a missing one must fail here, never skip a test silently
    missing = [name for name, path in toy.paths().items() if not path.exists()]
    assert not missing, f"toy weights missing from segmoe_lab/toy/weights: {missing}"


# --- world and ground truth ----------------------------------------------------------------------

def test_checker_reads_clean_renders():
    scenes = [s for d in world.DOMAINS for s in world.sample_scenes(7, 100, [d], special=0.5)]
    results = [check(world.render(s), s.description()) for s in scenes]
    for key in ("colour", "shape", "count", "style"):
        assert np.mean([r[key] for r in results]) >= 0.97, key
    assert np.mean([r["exact"] for r in results]) >= 0.97
    assert all(r["score"] == 1.0 for r in results if r["exact"])


def test_checker_scores_wrong_descriptions_and_accepts_json_and_large_images():
    scene = world.Scene("neon", "circle", "pink", 2, world.place_objects(np.random.default_rng(0), 2))
    big = world.render(scene).resize((64, 64), Image.NEAREST)
    assert check(big, scene.to_json())["exact"]
    wrong = check(big, {**scene.description(), "colour": "cyan", "count": 3})
    assert (wrong["colour"], wrong["shape"], wrong["count"], wrong["score"]) == (False, True, False, pytest.approx(1 / 3))
    blank = Image.new("RGB", (32, 32), world.BACKGROUNDS["flat"])
    assert check(blank, {"domain": "flat", "shape": "circle", "colour": "red", "count": 1})["score"] == 0.0
    with pytest.raises(ValueError, match="lacks"):
        check(blank, {"domain": "flat"})


def test_sampling_and_captions_are_deterministic():
    a, b = world.sample_scenes(3, 30), world.sample_scenes(3, 30)
    assert a == b and a != world.sample_scenes(4, 30)
    assert [world.caption(s) for s in a] == [world.caption(s) for s in b]
    assert world.caption({"domain": "neon", "shape": "circle", "colour": "red", "count": 2}) == "two red circles, neon style"
    assert world.caption({"domain": "flat", "shape": "triangle", "colour": "blue", "count": 1}, 1) == "a flat picture of a blue triangle"
    np.testing.assert_array_equal(np.asarray(world.render(a[0])), np.asarray(world.render(b[0])))


def test_each_domain_owns_a_concept():
    for d in world.DOMAINS:
        own = {v for k, vals in world.SPECIAL[d].items() for v in vals}
        others = [o for o in world.DOMAINS if o != d]
        for o in others:
            vocab = world.vocabulary(o)
            assert not own & {v for vals in vocab.values() for v in vals}, (d, o)
    rate = np.mean([world.is_special(s) for s in world.sample_scenes(0, 3000, special=world.BASE_SPECIAL)])
    assert 0.07 < rate < 0.13


def test_prompt_csv_is_the_worlds_prompt_set():
    import pandas as pd

    from segmoe_lab.judge.compare import load_prompts

    table = load_prompts("toy")
    assert table.equals(pd.DataFrame(world.prompt_set()))
    assert set(table.category) == set(world.DOMAINS) and table.prompt.is_unique
    assert all(world.caption(json.loads(d)) == p for p, d in zip(table.prompt, table.description))


def test_tokenizer_keeps_clip_tokenization_of_world_words():
    from segmoe_lab.sources.layouts import clip_tokenizer

    tok, full = models.make_tokenizer(), clip_tokenizer()
    text = "three cyan triangles, mosaic style"
    assert tok.tokenize(text) == full.tokenize(text)
    assert len(tok) < 700 and tok("a cat").input_ids[-1] == tok.eos_token_id


# --- training -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_weights(tmp_path_factory):
    """``toy train --quick`` with its stages in two worker processes."""
    from typer.testing import CliRunner

    from segmoe_lab.cli import app

    out = tmp_path_factory.mktemp("toy_quick")
    result = CliRunner().invoke(app, ["toy", "train", "--quick", "--out", str(out), "--seed", "1", "--workers", "2"])
    assert result.exit_code == 0, result.output
    return out


# both use the two-process quick training (about 30 s on 2 cores): slow, still run by `make test`
@pytest.mark.slow
def test_toy_train_quick_writes_every_model_and_loss_curves(quick_weights):
    for name, path in toy.paths(quick_weights).items():
        assert path.exists(), name
    assert (quick_weights / "losses.csv").read_text().count("\n") > 10 and (quick_weights / "losses.png").is_file()
    log = json.loads((quick_weights / "train_log.json").read_text())
    assert log["total"]["quick"] is True and log["total"]["workers"] == 2
    assert not (quick_weights / ".stages").exists()


@pytest.mark.slow
def test_toy_train_stage_gives_the_same_weights_in_this_process_as_in_a_worker(quick_weights, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from segmoe_lab.toy.train import QUICK, _job

    shutil.copytree(quick_weights / "sd" / "base", tmp_path / "sd" / "base")
    _job("sd_mosaic", tmp_path, 1, QUICK, "cpu")
    name = "unet/diffusion_pytorch_model.safetensors"
    here, worker = load_file(tmp_path / "sd" / "mosaic" / name), load_file(quick_weights / "sd" / "mosaic" / name)
    assert here.keys() == worker.keys() and all(torch.equal(here[k], worker[k]) for k in here)


def test_quick_refuses_to_overwrite_shipped_weights():
    from typer.testing import CliRunner

    from segmoe_lab.cli import app

    result = CliRunner().invoke(app, ["toy", "train", "--quick"])
    assert result.exit_code == 2 and "--out" in result.output


# --- shipped weights ----------------------------------------------------------------------------

def test_shipped_weights_are_small_and_fp16():
    from safetensors import safe_open

    files = list(toy.WEIGHTS.rglob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) < 40e6
    with safe_open(str(toy.paths()["base"] / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16


@pytest.mark.parametrize("name", ["base", "neon", "sdxl_flat"])
def test_shipped_pipelines_generate_offline(name):
    pipe = toy.load_pipeline(name)
    out = pipe("two red circles, neon style", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_shipped_sampler_keeps_backgrounds_with_guidance():
    """DDIM + v-prediction + guidance 7.5 (the pipelines' defaults): backgrounds stay the domain's."""
    pipe = toy.load_base()
    descs = [{"domain": d, "shape": "circle", "colour": "red", "count": 1} for d in world.DOMAINS] * 2
    images = pipe([world.caption(d) for d in descs], num_inference_steps=10, guidance_scale=7.5,
                  generator=[torch.Generator().manual_seed(i) for i in range(len(descs))]).images
    assert sum(check(im, d)["style"] for im, d in zip(images, descs)) >= len(descs) - 1


def test_lora_and_single_file_forms_load():
    from diffusers import StableDiffusionPipeline

    pipe = toy.load_base()
    before = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.clone()
    pipe.load_lora_weights(str(toy.paths()["mosaic_lora"]))
    pipe.fuse_lora()
    assert not torch.equal(before, pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight)
    single = StableDiffusionPipeline.from_single_file(str(toy.paths()["neon_single_file"]), config=str(toy.paths()["base"]))
    folder = toy.load_pipeline("neon")
    for (k, a), b in zip(folder.unet.state_dict().items(), single.unet.state_dict().values()):
        torch.testing.assert_close(a, b.float(), msg=k)


def test_clip_retrieves_rendered_captions():
    from segmoe_lab.toy.quality import ClipScorer, retrieval

    result = retrieval(ClipScorer(), n=90)
    assert result["top1"] > 0.5 and result["domain_acc"] > 0.9


def test_merge_config_matches_experiments_yaml():
    from segmoe_lab.merge.config import load_config

    cfg, yaml_cfg = toy.merge_config(), load_config(REPO / "experiments" / "toy.yaml")
    assert cfg.num_experts == yaml_cfg.num_experts == len(world.DOMAINS)
    strip = lambda c: {k: v for k, v in c.model_dump().items() if k not in ("base_model", "experts")}  # noqa: E731
    assert strip(cfg) == strip(yaml_cfg)
    assert [Path(e.source_model).name for e in cfg.experts] == [Path(e.source_model).name for e in yaml_cfg.experts]
    assert toy.merge_config(num_experts_per_tok=2).num_experts_per_tok == 2


def test_heldout_set_is_disjoint_from_the_toy_set_and_the_expert_prompts():
    from segmoe_lab import toy
    from segmoe_lab.judge.prompts import load_prompts

    held = load_prompts("toy_heldout")
    gate_prompts = {p for prompts in (*toy.POSITIVE_PROMPTS.values(), *toy.SEGMOE_PROMPTS.values())
                    for p in ([prompts] if isinstance(prompts, str) else prompts)}
    assert not set(held.prompt) & set(load_prompts("toy").prompt)
    assert not set(held.prompt) & gate_prompts, "a gate prompt is in the held-out set: the router would be fitted on it"
    assert held.groupby("category").size().to_dict() == {d: 40 for d in world.DOMAINS}
    assert (held.expert == held.category).all()


def test_prompt_set_csvs_are_what_their_generators_write(tmp_path):
    from segmoe_lab.judge.prompts import load_prompts
    from segmoe_lab.toy.prompt_sets import write_prompt_sets

    for path in write_prompt_sets(tmp_path):
        assert path.read_text() == (ROOT / "data" / "prompts" / path.name).read_text()
        assert load_prompts(path).prompt.is_unique


def test_composition_prompts_pair_one_domains_style_with_anothers_concept():
    from segmoe_lab.judge.prompts import load_prompts

    comp = load_prompts("toy_composition")
    used = set(load_prompts("toy").prompt) | set(load_prompts("toy_heldout").prompt)
    assert not set(comp.prompt) & used and (comp["style"] != comp["concept"]).all()
    for row in comp.itertuples():
        d = json.loads(row.description)
        assert d["domain"] == row.style and not world.is_special(d)  # the concept is not the style domain's own
        concept = next(iter(world.SPECIAL[row.concept].items()))
        assert d[concept[0]] in concept[1]
    assert comp.groupby("category").size().min() >= 6 and comp.category.nunique() == 6
