"""Bad-input corpus, part 3: generation settings, other CLI options and prompt files; see ``bad_inputs.py``."""
import os

from bad_inputs import CASES, Case, _write, case

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
