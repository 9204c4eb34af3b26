"""Comparison runs: the image cache, resuming, sharding over 2 processes, statistics and the report.

The models are the SD 1.5 fixture set (a random-gate merge of 2 perturbed experts, 2 steps) and
the scorer is CLIP on the tiny random CLIP of ``test_scoring``.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from segmoe_lab.judge import compare

from segmoe_lab.judge import stats
from segmoe_lab.judge.compare import CompareConfig, load_prompts, run_comparison
from test_scoring import make_tiny_clip

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = pd.DataFrame({"prompt": ["a red cat", "a blue dog", "a green car"], "category": ["animal", "animal", "thing"]})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sd15_set):
    """(merge config YAML, prompt CSV, tiny CLIP folder, SEGMOE_LAB_CACHE) for every test here."""
    root = tmp_path_factory.mktemp("compare")
    config = root / "merge.yaml"
    config.write_text(sd15_set.config(init="random").to_yaml())
    PROMPTS.to_csv(root / "prompts.csv", index=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEGMOE_LAB_CACHE", str(root / "segmoe_cache"))
        yield {"merge": str(config), "prompts": str(root / "prompts.csv"), "clip": str(make_tiny_clip(root / "clip")),
               "env": str(root / "segmoe_cache")}


def cfg(setup, cache_dir, **overrides) -> CompareConfig:
    values = dict(merge=setup["merge"], prompts=setup["prompts"], seeds=[0, 1], sampling={"steps": 2},
                  scorers={"clip": {"model": setup["clip"]}}, cache_dir=str(cache_dir), device="cpu", progress=False)
    return CompareConfig.of(**{**values, **overrides})


@pytest.fixture
def count_generations(monkeypatch):
    """Counts calls of compare.generate_image; ``fail_after`` makes call k+1 raise (an interrupted run)."""
    calls = {"n": 0, "fail_after": None}
    real = compare.generate_image

    def counting(*args, **kwargs):
        if calls["fail_after"] is not None and calls["n"] >= calls["fail_after"]:
            raise KeyboardInterrupt("simulated interruption")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "generate_image", counting)
    return calls


def test_second_run_regenerates_nothing(setup, tmp_path, count_generations):
    first = run_comparison(cfg(setup, tmp_path))
    n_images = 4 * 3 * 2  # merge, base, 2 experts x 3 prompts x 2 seeds
    assert count_generations["n"] == n_images and sum(first.generated.values()) == n_images
    assert len(first.table) == n_images and list(first.table.columns[:3]) == ["model", "kind", "prompt_id"]
    assert len(list(tmp_path.rglob("*.png"))) == n_images and not list(tmp_path.rglob("*.tmp*"))

    count_generations["n"] = 0
    again = run_comparison(cfg(setup, tmp_path, scorers={"clip": {"model": setup["clip"]}, "tm": {"scorer": "torchmetrics", "model": setup["clip"]}}))
    assert count_generations["n"] == 0 and set(again.generated.values()) == {0}  # a new scorer regenerates nothing
    pd.testing.assert_frame_equal(again.table[again.table.scorer == "clip"].reset_index(drop=True), first.table)
    image = first.image("expert_1", "a blue dog", 1)
    assert image.size == (64, 64)


def test_interrupted_run_resumes(setup, tmp_path, count_generations):
    count_generations["fail_after"] = 5
    with pytest.raises(KeyboardInterrupt):
        run_comparison(cfg(setup, tmp_path, seeds=[0]))
    assert len(list(tmp_path.rglob("*.png"))) == 5  # each image was saved as it was made
    count_generations.update(n=0, fail_after=None)
    result = run_comparison(cfg(setup, tmp_path, seeds=[0]))
    assert count_generations["n"] == 4 * 3 - 5
    assert result.generated["merge"] == 0 and result.generated["expert_1"] == 3


def test_fingerprints_and_keys(setup):
    merge_cfg, folder = compare.resolve_merge(setup["merge"])
    refs = compare.model_refs(merge_cfg, folder)
    assert [r.name for r in refs] == ["merge", "base", "expert_0", "expert_1"]
    assert len({r.fingerprint for r in refs}) == 4
    assert [r.fingerprint for r in compare.model_refs(merge_cfg, folder)] == [r.fingerprint for r in refs]
    other = compare.model_refs(merge_cfg.model_copy(update={"num_experts_per_tok": 2}), folder)
    assert other[0].fingerprint != refs[0].fingerprint and other[1].fingerprint == refs[1].fingerprint
    only = compare.model_refs(merge_cfg, folder, models=["merge", "expert_1"])
    assert [r.name for r in only] == ["merge", "expert_1"]


def test_two_processes_give_the_same_table(setup, tmp_path):
    single = run_comparison(cfg(setup, tmp_path / "single", seeds=[0], models=["merge", "base", "expert_0"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "segmoe_lab.cli", "compare", setup["merge"], "--prompts", setup["prompts"], "--seeds", "0",
           "--steps", "2", "--models", "merge,base,expert_0", "--scorers", "clip", "--clip-model", setup["clip"],
           "--cache-dir", str(tmp_path / "sharded"), "--out", str(tmp_path / "report"), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "SEGMOE_LAB_CACHE": setup["env"]}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = pd.read_csv(tmp_path / "report" / "results.csv", keep_default_na=False)
    expected = single.table
    pd.testing.assert_frame_equal(sharded.drop(columns="score"), expected.drop(columns="score"), check_dtype=False)
    np.testing.assert_allclose(sharded.score, expected.score, atol=1e-4)
    from PIL import Image

    for rel in expected.image:  # each process generated its share of the very same images
        a, b = (np.asarray(Image.open(tmp_path / d / rel)) for d in ("single", "sharded"))
        np.testing.assert_array_equal(a, b)
    assert len(list((tmp_path / "sharded").rglob("*.png"))) == 3 * 3


def synthetic_table(models=("merge", "copy"), n_prompts=6, seeds=(0, 1), shift=0.0) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    base = rng.normal(30, 3, size=(n_prompts, len(seeds)))
    rows = []
    for m, model in enumerate(models):
        for p in range(n_prompts):
            for s, seed in enumerate(seeds):
                rows.append({"model": model, "kind": "merge" if m == 0 else "base", "prompt_id": p, "prompt": f"p{p}",
                             "category": "a" if p % 2 else "b", "seed": seed, "scorer": "clip",
                             "score": base[p, s] + (shift if m == 0 else 0.0), "image": ""})
    return pd.DataFrame(rows)


def test_paired_comparison_of_a_model_with_itself_is_zero():
    out = stats.paired(synthetic_table())
    assert list(out.category) == ["(all)", "b", "a"]
    overall = out[out.category == "(all)"]  # 6 prompts; each category has 3, too few for a CI
    assert (out["diff"] == 0).all() and (overall.ci_low <= 0).all() and (overall.ci_high >= 0).all()
    assert (out.win_rate == 0.5).all() and (out.p_value == 1.0).all()


def test_paired_comparison_finds_a_real_difference():
    out = stats.paired(synthetic_table(shift=2.0), by_category=False).iloc[0]
    assert out["diff"] == pytest.approx(2.0) and out.ci_low > 0 and out.win_rate == 1.0 and out.p_value < 0.05
    assert out.n_units == 6 and out.n_images == 12
    assert stats.paired(synthetic_table(shift=2.0), unit="image", by_category=False).iloc[0].n_units == 12


def test_summary_bootstrap_is_seeded_and_covers_the_mean():
    table = synthetic_table()
    a, b = stats.summary(table), stats.summary(table)
    pd.testing.assert_frame_equal(a, b)
    assert ((a.ci_low <= a["mean"]) & (a["mean"] <= a.ci_high)).all() and (a.n == 6).all()
    with pytest.raises(ValueError, match="unit='seed' is not valid"):
        stats.summary(table, unit="seed")


def test_report_writes_tables_and_grids(setup, tmp_path):
    result = run_comparison(cfg(setup, tmp_path / "cache", seeds=[0], scorers={
        "clip": {"model": setup["clip"]}, "tm": {"scorer": "torchmetrics", "model": setup["clip"]}}))
    out = result.report(tmp_path / "report", n_boot=200)
    names = {p.name for p in out.iterdir()}
    assert {"results.csv", "results.parquet", "summary.csv", "summary_by_category.csv", "paired.csv",
            "agreement.csv", "config.json", "report.md", "grids"} <= names
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), result.table)
    from PIL import Image

    with Image.open(out / "grids" / "seed_0.png") as grid:
        assert grid.width == 220 + 4 * 128 and grid.height == 22 + 3 * 128
    agreement = pd.read_csv(out / "agreement.csv")
    assert agreement.spearman.iloc[0] > 0.9  # open_clip and torchmetrics on the same CLIP


def test_prompt_sets():
    for name, n in (("segmoe_examples", 3), ("adherence", 100)):
        table = load_prompts(name)
        assert len(table) == n and table.prompt.is_unique
    some = load_prompts("adherence", n=7)
    assert some.category.nunique() == 7  # taken in turn from each category
    assert "three green glass bottles" in set(load_prompts("segmoe_examples").prompt)
    with pytest.raises(FileNotFoundError, match="choose one of .*adherence"):
        load_prompts("no_such_set")
    with pytest.raises(ValueError, match=r"categories \['nope'\] are not in"):
        load_prompts("adherence", categories=["nope"])


def test_bad_settings_fail_with_the_field_named():
    with pytest.raises(ValueError, match="device: 'gpu' is not a valid choice"):
        CompareConfig.of(device="gpu")
    with pytest.raises(ValueError, match="sampling.step: unknown key.*valid keys here: steps"):
        CompareConfig.of(sampling={"step": 3})
    with pytest.raises(ValueError, match="scorer 'clipp' is not known"):
        CompareConfig.of(scorers=["clipp"])
    assert CompareConfig.of().scorers == {"clip": {"model": "toy"}, "toy_truth": {}}  # the toy world's CLIP
