"""The bad-input corpus: over a hundred ways a user can get an input wrong, each with what the
kit's answer must name. Used by ``test_bad_inputs.py``. This part holds configs and weight files;
``bad_inputs_folders.py`` (merge folders) and ``bad_inputs_options.py`` (settings, CLI options,
prompt files) register into the same :data:`CASES`.

A case is ``Case(id, category, make)``; ``make(tmp, world)`` writes whatever bad file the case
needs under ``tmp`` and returns either ``("cli", [args], [fragments])`` (run in-process with
typer's CliRunner) or ``("api", callable, [fragments])`` (must raise a kit error).
``world`` holds good inputs to spoil: a merge config, a 3-expert merge folder, the fixture set.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@dataclass
class Case:
    id: str
    category: str
    make: Callable


CASES: list[Case] = []


def case(category: str, id: str):
    def register(fn):
        CASES.append(Case(id, category, fn))
        return fn
    return register


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def _st(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# --- configs ------------------------------------------------------------------------------------

def _cfg_case(id: str, text_of, fragments, command: str = "validate"):
    def make(tmp, world):
        text = text_of(world) if callable(text_of) else text_of
        path = _write(tmp / f"{id}.yaml", text)
        args = {"validate": ["validate", str(path)], "estimate": ["estimate", str(path)],
                "build": ["build", str(path), str(tmp / "out")],
                "compare": ["compare", "toy", "--config", str(path), "--out", str(tmp / "cmp"),
                            "--cache-dir", str(tmp / "cache")],
                "run": ["run", str(path), "--out", str(tmp / "runs")]}[command]
        return "cli", args, [f"{id}.yaml", *fragments]
    CASES.append(Case(f"{command}-{id}", "config", make))


def _with(extra: str):
    return lambda w: w.config_text + extra


def _replace(old: str, new: str):
    return lambda w: w.config_text.replace(old, new, 1)


for cmd in ("validate", "estimate", "build", "compare", "run"):
    _cfg_case("bomb", BOMB, ["alias"], cmd)
for cmd in ("validate", "build"):
    _cfg_case("huge", "# padding\n" * 200_000, ["bytes"], cmd)
_cfg_case("alias", _with("seed: &s 1\ninclude_mid: *s\n"), ["alias"])
_cfg_case("deep", "a: " + "[" * 5000 + "]" * 5000 + "\n", ["nests"])
_cfg_case("random-bytes", os.urandom(3000) + b"\xff\xfe", ["UTF-8"])
_cfg_case("latin1", "base_model: caf\xe9\n".encode("latin-1"), ["UTF-8"])
_cfg_case("empty", "", ["empty"])
_cfg_case("top-list", "- a\n- b\n", ["mapping", "list"])
_cfg_case("unknown-key", _with("foo: 1\n"), ["foo", "unknown key"])
for field, old, value in (("moe_layers", "attn", "xyz"), ("type", "sd", "sd3"), ("init", "random", "magic"),
                          ("routing", "segmoe", "topk"), ("dtype", "float32", "fp8"), ("scheduler", "ddpm", "heun2")):
    _cfg_case(f"bad-{field}", _replace(f"\n{field}: {old}\n", f"\n{field}: {value}\n"), [field, value])
_cfg_case("num-experts-mismatch", _replace("num_experts: 3", "num_experts: 5"), ["num_experts", "5"])
_cfg_case("top-k-too-big", _replace("num_experts_per_tok: 1", "num_experts_per_tok: 9"), ["num_experts_per_tok", "9"])
_cfg_case("num-experts-negative", _replace("num_experts: 3", "num_experts: -1"), ["num_experts", "-1"])
_cfg_case("no-base-model", lambda w: "\n".join(l for l in w.config_text.splitlines() if not l.startswith("base_model")),
          ["base_model", "required"])
_cfg_case("experts-string", "base_model: b\nexperts: just-one\n", ["experts"])
_cfg_case("expert-no-source", "base_model: b\nexperts:\n- positive_prompt: x\n", ["experts.0.source_model", "required"])
_cfg_case("expert-null", "base_model: b\nexperts: [null]\n", ["experts.0"])
_cfg_case("gate-steps-zero", _replace("  steps: 2\n", "  steps: 0\n"), ["gate.steps", "0"])
_cfg_case("gate-method", _replace("  method: exact", "  method: slow"), ["gate.method", "slow"])
_cfg_case("gate-unknown", _replace("  method: exact", "  method: exact\n  foo: 2"), ["gate.foo", "unknown key"])
_cfg_case("duplicate-key", _with("seed: 1\nseed: 2\n"), ["'seed' is given twice"])
_cfg_case("tab-indent", "base_model: b\nexperts:\n\t- source_model: x\n", ["not valid YAML"])
_cfg_case("seed-string", _replace("seed: 0", "seed: abc"), ["seed", "abc"])
_cfg_case("include-mid-maybe", _replace("include_mid: false", "include_mid: maybe"), ["include_mid", "maybe"])
_cfg_case("200-unknown-keys", _with("".join(f"k{i}: {i}\n" for i in range(200))), ["k0", "more problem(s)"])
_cfg_case("5000-unknown-keys", _with("".join(f"k{i}: {i}\n" for i in range(5000))), ["5000 unknown keys"])
_cfg_case("long-value", _replace("moe_layers: attn", "moe_layers: " + "z" * 20_000), ["moe_layers", "zzz..."])
_cfg_case("experiment-is-merge-config", lambda w: w.config_text, ["is a merge config"], "run")
_cfg_case("experiment-unknown-key", "notebok: x.ipynb\n", ["notebok", "unknown key"], "run")
_cfg_case("compare-list", "- steps: 3\n", ["mapping"], "compare")
_cfg_case("compare-unknown", "sampling: {step: 3}\n", ["sampling.step", "unknown key"], "compare")
_cfg_case("compare-steps-zero", "sampling: {steps: 0}\n", ["sampling.steps", "0"], "compare")
_cfg_case("compare-seed-in-sampling", "sampling: {seed: 3}\n", ["seed", "seeds"], "compare")
_cfg_case("compare-sampling-list", "sampling: [1, 2]\n", ["sampling"], "compare")


@case("config", "validate-folder")
def _(tmp, world):
    (tmp / "dir.yaml").mkdir()
    return "cli", ["validate", str(tmp / "dir.yaml")], ["dir.yaml", "folder"]


@case("config", "validate-missing")
def _(tmp, world):
    return "cli", ["validate", str(tmp / "nope.yaml")], ["nope.yaml", "no such"]


@case("config", "api-800k-unknown-keys")
def _(tmp, world):
    from segmoe_lab.merge.config import parse_config

    data = {**yaml.safe_load(world.config_text), **{f"k{i}": i for i in range(800_000)}}
    return "api", lambda: parse_config(data, source="big"), ["big", "800000 unknown keys"]


@case("config", "api-yaml-bomb-string")
def _(tmp, world):
    from segmoe_lab.safe_load import parse_yaml

    return "api", lambda: parse_yaml(BOMB, "bomb-string"), ["bomb-string", "alias"]


# --- weight files (as an expert or base of a build, or given where a merge is expected) --------

def _good_st() -> bytes:
    return _st({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, bytes(64))


BAD_FILES = {
    "truncated": lambda: _good_st()[:-20],
    "random-bytes": lambda: os.urandom(4096),
    "empty": lambda: b"",
    "shape-vs-data": lambda: _st({"w": {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, 64]}}, bytes(64)),
    "unknown-dtype": lambda: _st({"w": {"dtype": "Q9", "shape": [4, 4], "data_offsets": [0, 64]}}, bytes(64)),
    "header-not-json": lambda: struct.pack("<Q", 12) + b"not json!!!!" + bytes(8),
    "header-length-huge": lambda: struct.pack("<Q", 2**40) + b"{}",
}


def _build_with_expert(name: str, make_file, role: str = "expert"):
    def make(tmp, world):
        bad = _write(tmp / f"{role}_{name}.safetensors", make_file())
        cfg = yaml.safe_load(world.config_text)
        if role == "expert":
            cfg["experts"][1]["source_model"] = str(bad)
        else:
            cfg["base_model"] = str(bad)
        path = _write(tmp / "cfg.yaml", yaml.safe_dump(cfg))
        return "cli", ["build", str(path), str(tmp / "out"), "--device", "cpu"], [bad.name]
    return make


for _name, _make in BAD_FILES.items():
    CASES.append(Case(f"build-expert-{_name}", "weights", _build_with_expert(_name, _make)))
for _name in ("truncated", "random-bytes", "empty"):
    CASES.append(Case(f"build-base-{_name}", "weights", _build_with_expert(_name, BAD_FILES[_name], "base")))


def _build_with_expert_path(id: str, prepare, fragments):
    def make(tmp, world):
        source = prepare(tmp, world)
        cfg = yaml.safe_load(world.config_text)
        cfg["experts"][1]["source_model"] = str(source)
        path = _write(tmp / "cfg.yaml", yaml.safe_dump(cfg))
        return "cli", ["build", str(path), str(tmp / "out"), "--device", "cpu"], fragments
    CASES.append(Case(f"build-{id}", "weights", make))


def _copy_expert(tmp, world, name="expert"):
    dst = tmp / name
    shutil.copytree(world.fixtures.experts[0], dst)
    return dst


def _expert_unet_truncated(tmp, world):
    dst = _copy_expert(tmp, world)
    f = dst / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    return dst


def _expert_no_unet(tmp, world):
    dst = _copy_expert(tmp, world)
    for f in (dst / "unet").glob("*.safetensors"):
        f.unlink()
    return dst


def _expert_two_unets(tmp, world):
    dst = _copy_expert(tmp, world)
    shutil.copy(dst / "unet" / "diffusion_pytorch_model.safetensors", dst / "unet" / "other.safetensors")
    return dst


_build_with_expert_path("ckpt-expert", lambda t, w: _write(t / "model.ckpt", b"\x80\x02}q\x00."), ["model.ckpt", "pickled"])
_build_with_expert_path("txt-expert", lambda t, w: _write(t / "model.txt", "hello"), ["model.txt", "not a weights file"])
_build_with_expert_path("folder-unet-truncated", _expert_unet_truncated, ["diffusion_pytorch_model.safetensors", "truncated"])
_build_with_expert_path("folder-no-unet", _expert_no_unet, ["expert", "no UNet weights"])
_build_with_expert_path("folder-two-unets", _expert_two_unets, ["unet", "other.safetensors"])
_build_with_expert_path("wrong-architecture", lambda t, w: _write(t / "tiny.safetensors", _good_st()), ["tiny.safetensors"])
_build_with_expert_path("dangling-link", lambda t, w: (t / "gone").symlink_to(t / "nowhere") or t / "gone",
                        ["gone", "symbolic link"])
_build_with_expert_path("link-loop", lambda t, w: ((t / "l1").symlink_to(t / "l2"), (t / "l2").symlink_to(t / "l1"))
                        and t / "l1", ["l1", "symbolic link"])
_build_with_expert_path("missing-path", lambda t, w: t / "no_such_model", ["no_such_model"])


def _base_folder(tmp, world, spoil):
    dst = tmp / "base"
    shutil.copytree(world.fixtures.base, dst)
    spoil(dst)
    cfg = yaml.safe_load(world.config_text)
    cfg["base_model"] = str(dst)
    return _write(tmp / "cfg.yaml", yaml.safe_dump(cfg))


for _id, _spoil, _frag in (
        ("base-index-garbage", lambda d: _write(d / "model_index.json", "{nope"), ["model_index.json", "JSON"]),
        ("base-no-vae", lambda d: shutil.rmtree(d / "vae"), ["base", "vae"]),
        ("base-vae-truncated", lambda d: _write(d / "vae" / "diffusion_pytorch_model.safetensors", b"12345678"),
         ["vae", "diffusion_pytorch_model.safetensors"]),
        ("base-text-encoder-random", lambda d: _write(d / "text_encoder" / "model.safetensors", os.urandom(999)),
         ["text_encoder", "model.safetensors"])):
    CASES.append(Case(f"build-{_id}", "weights", lambda tmp, world, s=_spoil, f=_frag:
                      ("cli", ["build", str(_base_folder(tmp, world, s)), str(tmp / "out"), "--device", "cpu"], f)))


@case("weights", "generate-ckpt-as-merge")
def _(tmp, world):
    bad = _write(tmp / "model.ckpt", b"\x80\x02}q\x00.")
    return "cli", ["generate", str(bad), "a cat", "-o", str(tmp / "x.png")], ["model.ckpt", "not a merge"]


@case("weights", "generate-safetensors-as-merge")
def _(tmp, world):
    bad = _write(tmp / "model.safetensors", _good_st())
    return "cli", ["generate", str(bad), "a cat", "-o", str(tmp / "x.png")], ["model.safetensors", "not a merge"]


for _name in ("truncated", "random-bytes", "shape-vs-data"):
    @case("weights", f"api-check-weights-{_name}")
    def _(tmp, world, n=_name):
        from segmoe_lab.sources.weightfile import check_weights

        bad = _write(tmp / f"{n}.safetensors", BAD_FILES[n]())
        return "api", lambda: check_weights(bad), [f"{n}.safetensors"]


@case("weights", "api-resolve-random-bytes")
def _(tmp, world):
    from segmoe_lab.sources import resolve_source

    bad = _write(tmp / "rnd.safetensors", os.urandom(500))
    return "api", lambda: resolve_source(str(bad)), ["rnd.safetensors", "safetensors"]
