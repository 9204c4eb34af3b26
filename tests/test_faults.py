"""Faults: a kill at every step of `build --overwrite`, a kill during `compare`, a full disk,
two runs sharing one image cache, damaged cached images, stale temporaries, and how the CLI
reports what it did not expect."""
import errno
import os
import threading
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from segmoe_lab import atomic
from segmoe_lab.cli import app
from segmoe_lab.errors import DEBUG_HINT, FolderError, SegMoELabError, SettingsError
from segmoe_lab.judge import compare
from segmoe_lab.judge.images import ImageCache, ModelRef, image_key


class Killed(BaseException):
    """Stands for SIGKILL / Ctrl-C: not an Exception, so no `except Exception` handles it."""


def _folder(path: Path, marker: str) -> Path:
    path.mkdir(parents=True)
    (path / "marker.txt").write_text(marker)
    return path


def _kill_at(monkeypatch, step: int):
    """Make step ``step`` of :func:`atomic.replace_folder` (1, 2: renames; 3: deleting the backup) die."""
    calls = {"replace": 0}
    real_replace = os.replace

    def replace(src, dst):
        calls["replace"] += 1
        if calls["replace"] == step:
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    if step == 3:
        monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(Killed))


@pytest.mark.parametrize("step", [1, 2, 3])
def test_overwrite_killed_at_any_step_never_leaves_the_target_empty(tmp_path, monkeypatch, step):
    target = _folder(tmp_path / "merge", "old")
    tmp = _folder(tmp_path / f".merge.{os.getpid()}.x.tmp", "new")
    with monkeypatch.context() as m:
        _kill_at(m, step)
        with pytest.raises(Killed):
            atomic.replace_folder(tmp, target)
    assert target.is_dir() or atomic.backup_path(target).is_dir()
    monkeypatch.setattr(atomic, "_alive", lambda pid: False)  # the killed run's process is gone
    atomic.recover(target)
    assert (target / "marker.txt").read_text() == ("old" if step == 1 or step == 2 else "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge"]


def test_recover_restores_a_backup_when_the_target_is_missing(tmp_path):
    _folder(atomic.backup_path(tmp_path / "merge"), "old")
    with pytest.warns(UserWarning, match="restored"):
        atomic.recover(tmp_path / "merge")
    assert (tmp_path / "merge" / "marker.txt").read_text() == "old"


def test_stale_temporary_folders_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = _folder(tmp_path / ".merge.999999999.abc.tmp", "partial")
    alive = _folder(tmp_path / f".merge.{os.getpid()}.def.tmp", "in progress")
    with pytest.warns(UserWarning, match="crashed"):
        atomic.recover(tmp_path / "merge")
    assert not dead.exists() and alive.exists()


@pytest.fixture(scope="module")
def built(sd15_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    config = root / "cfg.yaml"
    config.write_text(sd15_set.config(init="random").to_yaml())
    result = CliRunner().invoke(app, ["build", str(config), str(root / "merge"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root


def test_cli_build_overwrite_killed_between_renames_keeps_the_old_merge_and_the_next_build_recovers(built, monkeypatch):
    target, before = built / "merge", (built / "merge" / "unet" / "config.json").read_text()
    with monkeypatch.context() as m:
        _kill_at(m, 2)
        with pytest.raises(Killed):
            CliRunner().invoke(app, ["build", str(built / "cfg.yaml"), str(target), "--overwrite", "--device", "cpu"],
                               catch_exceptions=False)
    assert not target.exists() and atomic.backup_path(target).is_dir()
    refused = CliRunner().invoke(app, ["generate", str(target), "x", "-o", str(built / "x.png")])
    assert refused.exit_code == 2 and "interrupted" in refused.output
    monkeypatch.setattr(atomic, "_alive", lambda pid: False)
    result = CliRunner().invoke(app, ["build", str(built / "cfg.yaml"), str(target), "--overwrite", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (target / "unet" / "config.json").read_text() == before
    assert sorted(p.name for p in built.iterdir() if p.name.startswith(".merge")) == []


def test_full_disk_during_build_names_the_output_and_leaves_the_old_merge(built, monkeypatch):
    from segmoe_lab.merge import io

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = sorted(p.name for p in built.rglob("*"))
    monkeypatch.setattr(io, "write_safetensors", full)
    result = CliRunner().invoke(app, ["build", str(built / "cfg.yaml"), str(built / "merge"), "--overwrite", "--device", "cpu"])
    assert result.exit_code == 2 and "disk is full" in result.output and "merge" in result.output
    assert sorted(p.name for p in built.rglob("*")) == before


# --- compare: kills, concurrency, damaged images, full disk ------------------------------------------

REF = ModelRef("merge", "merge", "f" * 40)
SETTINGS = {"steps": 1}


def _image(value: int):
    return Image.new("RGB", (8, 8), (value, 0, 0))


class _Loader:
    def get(self, ref):
        return "pipe"

    def release(self):
        pass


class _State:
    is_local_main_process = False


def test_compare_killed_mid_run_keeps_whole_images_only_and_resumes_with_the_rest(tmp_path, monkeypatch):
    cache = ImageCache(tmp_path)
    prompts = pd.DataFrame({"prompt": [f"p{i}" for i in range(5)], "category": "c"})
    cfg = compare.CompareConfig.of(seeds=[0], progress=False)
    made = []

    def generate(pipe, prompt, seed, settings):
        if len(made) == 3:
            raise Killed
        made.append(prompt)
        return _image(len(made))

    monkeypatch.setattr(compare, "generate_image", generate)
    with pytest.raises(Killed):
        compare._generate([REF], prompts, cfg, SETTINGS, cache, _Loader(), _State())
    assert len(list(tmp_path.rglob("*.png"))) == 3 and not list(tmp_path.rglob(".*.tmp*"))
    made.clear()
    monkeypatch.setattr(compare, "generate_image", lambda *a: _image(9))
    generated = compare._generate([REF], prompts, cfg, SETTINGS, cache, _Loader(), _State())
    assert generated == {"merge": 2}


def test_two_runs_writing_one_cache_at_once_leave_only_whole_images(tmp_path):
    cache = ImageCache(tmp_path)
    keys = [image_key(f"p{i}", 0, SETTINGS) for i in range(20)]

    def run():
        for key in keys:
            cache.save(REF, key, _image(7))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(cache.has(REF, k) and cache.load(REF, k).getpixel((0, 0)) == (7, 0, 0) for k in keys)
    assert not list(tmp_path.rglob(".*.tmp*"))


def test_a_damaged_cached_image_is_discarded_so_it_is_generated_again(tmp_path):
    cache = ImageCache(tmp_path)
    key = image_key("p", 0, SETTINGS)
    path = cache.save(REF, key, _image(1))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.warns(UserWarning, match="damaged cached image"):
        assert not cache.has(REF, key)
    assert not path.exists()


def test_loading_a_damaged_cached_image_names_the_file(tmp_path):
    cache = ImageCache(tmp_path)
    path = cache.save(REF, image_key("p", 0, SETTINGS), _image(1))
    path.write_bytes(b"not a png")
    with pytest.raises(FolderError, match=path.name):
        cache.load(REF, image_key("p", 0, SETTINGS))


def test_a_full_disk_while_caching_an_image_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OSError):
        ImageCache(tmp_path).save(REF, image_key("p", 0, SETTINGS), _image(1))
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".png"]


def test_stale_cache_temporaries_of_dead_runs_are_cleaned(tmp_path):
    (tmp_path / "model").mkdir()
    stale = tmp_path / "model" / ".abc.999999999.xyz.tmp.png"
    stale.write_bytes(b"partial")
    assert ImageCache(tmp_path).clean() == [stale] and not stale.exists()


def test_a_report_that_fails_to_write_leaves_no_folder(tmp_path, monkeypatch):
    from segmoe_lab.judge import report as report_mod

    def full(out, *args):
        (out / "results.csv").write_text("model,score\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_mod, "_write", full)
    monkeypatch.setattr(report_mod, "grid", lambda result, seed: None)
    table = pd.DataFrame({"model": ["merge", "base"], "kind": ["merge", "base"], "prompt_id": [0, 0], "prompt": ["p", "p"],
                          "category": ["c", "c"], "seed": [0, 0], "scorer": ["s", "s"], "score": [1.0, 0.5], "image": ["a", "b"]})
    result = compare.Comparison(table, None, [], compare.CompareConfig.of(), {}, None, {})
    with pytest.raises(FolderError, match="disk is full"):
        report_mod.report(result, tmp_path / "report", n_boot=10)
    assert list(tmp_path.iterdir()) == []


# --- how the CLI reports the unexpected -------------------------------------------------------------

def _boom(monkeypatch):
    from segmoe_lab.merge import config

    monkeypatch.setattr(config, "summarize", lambda cfg: 1 / 0)


def test_an_unexpected_error_is_one_line_with_the_debug_hint_and_exit_1(built, monkeypatch):
    _boom(monkeypatch)
    result = CliRunner().invoke(app, ["validate", str(built / "cfg.yaml")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "unexpected ZeroDivisionError" in result.output and DEBUG_HINT in result.output


def test_debug_shows_the_traceback(built, monkeypatch, capsys):
    _boom(monkeypatch)
    result = CliRunner().invoke(app, ["--debug", "validate", str(built / "cfg.yaml")])
    assert result.exit_code == 1 and "Traceback" in result.output and "ZeroDivisionError" in result.output


def test_every_cli_command_converts_its_failures():
    import typer.main

    commands = typer.main.get_command(app).commands
    toy = commands.pop("toy").commands
    for name, command in {**commands, **toy}.items():
        assert getattr(command.callback, "friendly", False), name


def test_notebook_helpers_turn_any_failure_below_them_into_a_kit_error(monkeypatch):
    from segmoe_lab import notebook

    monkeypatch.setattr("segmoe_lab.judge.compare.load_prompts", lambda *a, **k: {}["missing"])
    with pytest.raises(SettingsError, match="prompt_table: unexpected KeyError") as info:
        notebook.prompt_table(n=2)
    assert isinstance(info.value.__cause__, KeyError) and isinstance(info.value, SegMoELabError)
