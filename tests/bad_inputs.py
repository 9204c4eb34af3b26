"""The bad-input corpus: over a hundred ways a user can get an input wrong, each with what the
kit's answer must name. Used by ``test_bad_inputs.py``.

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


# --- merge folders (spoiled copies of a good 3-expert merge) --------------------------------------

def _unet_cfg(folder: Path) -> dict:
    return json.loads((folder / "unet" / "config.json").read_text())


def _set_unet_cfg(folder: Path, cfg) -> None:
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))


def _edit_configs(fn):
    """Apply ``fn`` to both stored configs (segmoe's and segmoe-lab's)."""
    def spoil(folder):
        cfg = _unet_cfg(folder)
        for key in ("segmoe_config", "segmoe_lab_config"):
            fn(cfg[key])
        _set_unet_cfg(folder, cfg)
    return spoil


def _n_experts(n):
    def fn(c):
        c["experts"] = (c["experts"] * 2)[:n]
        c["num_experts"] = n
    return fn


def _rewrite_weights(fn):
    """Rewrite the merge's UNet safetensors with ``fn(tensors) -> tensors``."""
    def spoil(folder):
        from safetensors.torch import load_file, save_file

        f = folder / "unet" / "diffusion_pytorch_model.safetensors"
        tensors = {k: v.clone() for k, v in load_file(str(f)).items()}
        save_file(fn(tensors), str(f))
    return spoil


def _drop_site(tensors):
    site = sorted(k for k in tensors if k.endswith(".gate.weight"))[0][: -len(".gate.weight")]
    return {k: v for k, v in tensors.items() if not k.startswith(site + ".")}


def _reshape_one(tensors):
    key = sorted(k for k in tensors if k.endswith(".experts.0.weight"))[0]
    tensors[key] = tensors[key].reshape(-1)
    return tensors


def _renumber_expert(tensors):
    return {k.replace(".experts.2.", ".experts.7."): v for k, v in tensors.items()}


MERGE_SPOILS = {
    "config-2-weights-3": (_edit_configs(_n_experts(2)), ["diffusion_pytorch_model.safetensors", "2 experts"]),
    "config-4-weights-3": (_edit_configs(_n_experts(4)), ["diffusion_pytorch_model.safetensors", "4 experts"]),
    "no-unet-config": (lambda f: (f / "unet" / "config.json").unlink(), ["config.json", "missing"]),
    "unet-config-not-json": (lambda f: _write(f / "unet" / "config.json", "{oops"), ["config.json", "JSON"]),
    "unet-config-list": (lambda f: _write(f / "unet" / "config.json", "[1, 2]"), ["config.json", "list"]),
    "no-segmoe-config": (lambda f: _set_unet_cfg(f, {k: v for k, v in _unet_cfg(f).items() if "segmoe" not in k}),
                         ["not a SegMoE merge"]),
    "segmoe-config-bad-moe-layers": (_edit_configs(lambda c: c.update(moe_layers="everything")),
                                     ["config.json", "moe_layers", "everything"]),
    "segmoe-config-string": (lambda f: _set_unet_cfg(f, {**_unet_cfg(f), "segmoe_lab_config": "x", "segmoe_config": "x"}),
                             ["segmoe_config"]),
    "moe-layers-attn-to-ff": (_edit_configs(lambda c: c.update(moe_layers="ff")), ["moe_layers=ff", "missing"]),
    "include-mid-flipped": (_edit_configs(lambda c: c.update(include_mid=True)), ["include_mid=True", "missing"]),
    "top-k-above-experts": (_edit_configs(lambda c: c.update(num_experts_per_tok=5)), ["num_experts_per_tok"]),
    "unet-weights-missing": (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(),
                             ["diffusion_pytorch_model.safetensors", "missing"]),
    "unet-weights-truncated": (lambda f: _write(f / "unet" / "diffusion_pytorch_model.safetensors",
                                                (f / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()[:5000]),
                               ["diffusion_pytorch_model.safetensors", "truncated"]),
    "unet-weights-random": (lambda f: _write(f / "unet" / "diffusion_pytorch_model.safetensors", os.urandom(5000)),
                            ["diffusion_pytorch_model.safetensors", "safetensors"]),
    "site-dropped": (_rewrite_weights(_drop_site), ["missing", "down_blocks"]),
    "tensor-reshaped": (_rewrite_weights(_reshape_one), ["wrong shape", "experts.0.weight"]),
    "expert-renumbered": (_rewrite_weights(_renumber_expert), ["experts.7"]),
    "extra-tensor": (_rewrite_weights(lambda t: {**t, "extra.weight": t[next(iter(t))].clone()}), ["unexpected extra.weight"]),
    "no-vae": (lambda f: shutil.rmtree(f / "vae"), ["vae"]),
    "vae-truncated": (lambda f: _write(f / "vae" / "diffusion_pytorch_model.safetensors", b"\x08" + bytes(20)),
                      ["vae", "diffusion_pytorch_model.safetensors"]),
    "no-text-encoder": (lambda f: shutil.rmtree(f / "text_encoder"), ["text_encoder"]),
    "no-model-index": (lambda f: (f / "model_index.json").unlink(), ["model_index.json"]),
    "model-index-garbage": (lambda f: _write(f / "model_index.json", "\x00garbage"), ["model_index.json"]),
    "interrupted-overwrite": (lambda f: f.rename(f.parent / f".{f.name}.backup"), ["interrupted", ".merge.backup"]),
}


def _spoiled(tmp, world, spoil) -> Path:
    dst = tmp / "merge"
    shutil.copytree(world.merge, dst)
    spoil(dst)
    return dst


for _id, (_spoil, _frag) in MERGE_SPOILS.items():
    CASES.append(Case(f"generate-{_id}", "merge folder", lambda tmp, world, s=_spoil, f=_frag: (
        "cli", ["generate", str(_spoiled(tmp, world, s)), "a cat", "--steps", "1", "-o", str(tmp / "x.png"),
                "--device", "cpu"], f)))
for _id in ("config-2-weights-3", "tensor-reshaped", "unet-weights-truncated", "site-dropped"):
    CASES.append(Case(f"api-load-{_id}", "merge folder", lambda tmp, world, s=MERGE_SPOILS[_id][0], f=MERGE_SPOILS[_id][1]: (
        "api", lambda folder=_spoiled(tmp, world, s): __import__("segmoe_lab.merge.pipeline", fromlist=["x"])
        .SegMoEPipeline(folder, device="cpu"), f)))
for _id in ("unet-config-not-json", "segmoe-config-bad-moe-layers"):
    CASES.append(Case(f"estimate-{_id}", "merge folder", lambda tmp, world, s=MERGE_SPOILS[_id][0], f=MERGE_SPOILS[_id][1]: (
        "cli", ["estimate", str(_spoiled(tmp, world, s))], f)))


# --- generation settings and other CLI options ------------------------------------------------------

def _generate(*opts, fragments):
    return lambda tmp, world: ("cli", ["generate", str(world.merge), "a cat", "-o", str(tmp / "x.png"), *opts],
                               fragments)


def _generate_out(name, fragments):
    return lambda tmp, world: ("cli", ["generate", str(world.merge), "a cat", "-o", str(tmp / name)], fragments)


for _id, _opts, _frag in (
        ("steps-0", ["--steps", "0"], ["steps", "0"]), ("steps-negative", ["--steps", "-3"], ["steps", "-3"]),
        ("steps-huge", ["--steps", "100000"], ["steps", "100000"]), ("guidance-nan", ["--guidance", "nan"], ["guidance", "nan"]),
        ("guidance-inf", ["--guidance", "inf"], ["guidance", "inf"]), ("guidance-negative", ["--guidance", "-1"], ["guidance", "-1"]),
        ("height-0", ["--height", "0"], ["height", "0"]), ("height-30", ["--height", "30"], ["height", "30"]),
        ("height-negative", ["--height", "-8"], ["height", "-8"]), ("width-huge", ["--width", "100000"], ["width", "100000"]),
        ("seed-negative", ["--seed", "-1"], ["seed", "-1"]), ("seed-text", ["--seed", "abc"], ["--seed", "integer"]),
        ("seed-float", ["--seed", "1.5"], ["--seed", "integer"]), ("device-gpu", ["--device", "gpu"], ["device", "gpu"])):
    CASES.append(Case(f"generate-{_id}", "settings", _generate(*_opts, fragments=_frag)))
CASES.append(Case("generate-output-no-extension", "settings", _generate_out("image", ["-o", "image", "extension"])))
CASES.append(Case("generate-output-txt", "settings", _generate_out("image.txt", ["image.txt", "extension"])))


@case("settings", "generate-output-folder")
def _(tmp, world):
    (tmp / "pics.png").mkdir()
    return "cli", ["generate", str(world.merge), "a cat", "-o", str(tmp / "pics.png")], ["pics.png", "folder"]


def _compare(*opts, fragments):
    return lambda tmp, world: ("cli", ["compare", "toy", "--out", str(tmp / "cmp"), "--cache-dir", str(tmp / "cache"),
                                       *opts], fragments)


for _id, _opts, _frag in (
        ("seeds-reversed", ["--seeds", "3-1"], ["--seeds", "3-1"]), ("seeds-letters", ["--seeds", "a,b"], ["--seeds", "a,b"]),
        ("seeds-repeat", ["--seeds", "0,0"], ["--seeds", "repeats"]), ("seeds-float", ["--seeds", "1.5"], ["--seeds", "1.5"]),
        ("seeds-negative", ["--seeds", "-1"], ["--seeds", "-1"]), ("seeds-empty", ["--seeds", ""], ["--seeds"]),
        ("seeds-huge-range", ["--seeds", "0-99999999"], ["--seeds", "at most"]),
        ("n-prompts-0", ["--n-prompts", "0"], ["n_prompts", "0"]), ("n-prompts-negative", ["--n-prompts", "-1"], ["n_prompts", "-1"]),
        ("models-merge-only", ["--models", "merge"], ["models", "merge", "at least one"]),
        ("models-bogus", ["--models", "merge,bogus"], ["models", "bogus"]),
        ("models-empty", ["--models", ""], ["models"]),
        ("scorers-bogus", ["--scorers", "clipp"], ["scorer", "clipp"]), ("device-gpu", ["--device", "gpu"], ["device", "gpu"]),
        ("dtype-float8", ["--dtype", "float8"], ["dtype", "float8"]), ("steps-0", ["--steps", "0"], ["steps", "0"]),
        ("guidance-nan", ["--guidance", "nan"], ["guidance_scale", "nan"]), ("scheduler-bogus", ["--scheduler", "heun9"], ["scheduler", "heun9"]),
        ("prompts-missing", ["--prompts", "no_such_set"], ["no_such_set"]),
        ("config-missing", ["--config", "nope.yaml"], ["nope.yaml"])):
    CASES.append(Case(f"compare-{_id}", "settings", _compare(*_opts, fragments=_frag)))

for _id, _args, _frag in (
        ("demo-n-prompts-0", ["--n-prompts", "0"], ["n_prompts", "0"]), ("demo-n-prompts-negative", ["--n-prompts", "-2"], ["n_prompts", "-2"]),
        ("demo-seeds-bad", ["--seeds", "x"], ["--seeds", "x"])):
    CASES.append(Case(_id, "settings", lambda tmp, world, a=_args, f=_frag: ("cli", ["demo", "--out", str(tmp / "report"), *a], f)))


@case("settings", "demo-out-is-file")
def _(tmp, world):
    f = _write(tmp / "report.txt", "x")
    return "cli", ["demo", "--out", str(f), "--n-prompts", "1"], ["report.txt", "is a file"]


@case("settings", "build-out-is-file")
def _(tmp, world):
    f = _write(tmp / "out.txt", "x")
    return "cli", ["build", str(world.config), str(f)], ["out.txt", "is a file"]


@case("settings", "build-out-exists")
def _(tmp, world):
    (tmp / "out").mkdir()
    return "cli", ["build", str(world.config), str(tmp / "out")], ["out", "--overwrite"]


for _id, _args, _frag in (
        ("estimate-layout-bogus", lambda w: ["estimate", str(w.config), "--layout", "sd9"], ["--layout", "sd9"]),
        ("toy-quality-n-0", lambda w: ["toy", "quality", "--n", "0"], ["--n", "greater than or equal to 1"]),
        ("toy-quality-steps-0", lambda w: ["toy", "quality", "--steps", "0"], ["--steps", "greater than or equal to 1"]),
        ("toy-train-quick-no-out", lambda w: ["toy", "train", "--quick"], ["--quick", "--out"]),
        ("toy-train-workers-0", lambda w: ["toy", "train", "--workers", "0"], ["--workers", "greater than or equal to 1"]),
        ("unknown-command", lambda w: ["frobnicate"], ["frobnicate"]),
        ("unknown-option", lambda w: ["validate", str(w.config), "--strict"], ["--strict"])):
    CASES.append(Case(_id, "cli options", lambda tmp, world, a=_args, f=_frag: ("cli", a(world), f)))


@case("cli options", "run-missing-experiment")
def _(tmp, world):
    return "cli", ["run", str(tmp / "exp.yaml"), "--out", str(tmp / "runs")], ["exp.yaml", "no such"]


@case("cli options", "runs-missing-folder")
def _(tmp, world):
    return "cli", ["runs", "--out", str(tmp / "runs")], ["runs", "no runs folder"]


def _api(id, category, call, fragments):
    CASES.append(Case(id, category, lambda tmp, world: ("api", call, fragments)))


def _settings_of(**kw):
    from segmoe_lab.merge.settings import GenerationSettings

    return GenerationSettings.of("api", **kw)


def _pipeline_kwargs(**kw):
    from segmoe_lab.merge.settings import check_pipeline_kwargs

    return check_pipeline_kwargs(kw)


def _model_of(module, name, **kw):
    return getattr(__import__(module, fromlist=[name]), name).of(**kw)


_api("api-settings-steps-0", "settings", lambda: _settings_of(steps=0), ["steps", "0"])
_api("api-settings-height-30", "settings", lambda: _settings_of(height=30), ["height", "30"])
_api("api-settings-seed-float", "settings", lambda: _settings_of(seed=1.5), ["seed", "1.5"])
_api("api-settings-seed-bool", "settings", lambda: _settings_of(seed=True), ["seed", "True"])
_api("api-settings-unknown", "settings", lambda: _settings_of(stpes=3), ["stpes", "unknown key"])
_api("api-pipeline-call-steps-0", "settings", lambda: _pipeline_kwargs(num_inference_steps=0), ["steps", "0"])
_api("api-pipeline-call-images-0", "settings", lambda: _pipeline_kwargs(num_images_per_prompt=0), ["num_images", "0"])
_api("api-notebook-generation-nan", "settings", lambda: _model_of("segmoe_lab.notebook", "Generation", guidance_scale=float("nan")),
     ["guidance_scale", "nan"])
_api("api-notebook-generation-images", "settings", lambda: _model_of("segmoe_lab.notebook", "Generation", num_images=2),
     ["num_images"])
_api("api-notebook-runtime", "settings", lambda: _model_of("segmoe_lab.notebook", "Runtime", device="tpu"), ["device", "tpu"])
_api("api-sweep-steps-0", "settings", lambda: _model_of("segmoe_lab.sweep", "Sweep", steps=[8, 0]), ["steps", "0"])
_api("api-compare-height-30", "settings", lambda: _model_of("segmoe_lab.judge.compare", "CompareConfig", sampling={"height": 30}),
     ["sampling.height", "30"])
_api("api-compare-seed-negative", "settings", lambda: _model_of("segmoe_lab.judge.compare", "CompareConfig", seeds=[-1]),
     ["seeds", "-1"])
_api("api-pipeline-device", "settings", lambda: __import__("segmoe_lab.merge.pipeline", fromlist=["x"]).SegMoEPipeline(
    "x", device="gpu"), ["device", "gpu"])


# --- prompt files ------------------------------------------------------------------------------

def _prompts(id, content, fragments, **kw):
    def make(tmp, world):
        from segmoe_lab.judge.prompts import load_prompts

        source = _write(tmp / f"{id}.csv", content) if content is not None else kw.pop("source", "toy")
        return "api", lambda: load_prompts(source, **kw), fragments
    CASES.append(Case(f"prompts-{id}", "prompts", make))


GOOD_CSV = "prompt,category\na cat,animals\na dog,animals\n"
_prompts("n-negative", None, ["n=-1"], n=-1)
_prompts("n-zero", None, ["n=0"], n=0)
_prompts("n-float", None, ["n=1.5"], n=1.5)
_prompts("n-bool", None, ["n=True"], n=True)
_prompts("categories-unknown", None, ["nope"], categories=["nope"])
_prompts("categories-string", None, ["categories='circles'"], categories="circles")
_prompts("missing-set", None, ["no_such_prompts"], source="no_such_prompts")
_prompts("empty", "", ["empty.csv", "empty"])
_prompts("header-only", "prompt,category\n", ["header-only.csv", "no prompts"])
_prompts("missing-column", "prompt\na cat\n", ["missing-column.csv", "category"])
_prompts("duplicates", GOOD_CSV + "a cat,animals\n", ["duplicates.csv", "a cat"])
_prompts("binary", os.urandom(2000) + b"\xff", ["binary.csv"])
_prompts("bad-quotes", 'prompt,category\n"a cat,animals\nx,y,z,w\n', ["bad-quotes.csv"])
_prompts("blank-prompt", "prompt,category\n,animals\n", ["blank-prompt.csv", "empty prompt"])
_prompts("latin1", "prompt,category\ncaf\xe9,x\n".encode("latin-1"), ["latin1.csv", "UTF-8"])
_prompts("huge", b"prompt,category\n" + b"x" * (17 << 20), ["huge.csv", "bytes"])


@case("prompts", "prompts-folder")
def _(tmp, world):
    from segmoe_lab.judge.prompts import load_prompts

    (tmp / "dir.csv").mkdir()
    return "api", lambda: load_prompts(tmp / "dir.csv"), ["dir.csv", "folder"]


for _id, _content, _frag in (("missing-column", "prompt\na\n", ["category"]), ("binary", os.urandom(500), ["bin"]),
                             ("header-only", "prompt,category\n", ["no prompts"])):
    CASES.append(Case(f"compare-prompts-{_id}", "prompts", lambda tmp, world, c=_content, f=_frag, i=_id: (
        "cli", ["compare", "toy", "--prompts", str(_write(tmp / f"p-{i}.csv", c)), "--out", str(tmp / "cmp"),
                "--cache-dir", str(tmp / "cache")], [f"p-{i}.csv", *f])))
