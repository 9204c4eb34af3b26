"""Model sources: local folders and files, the Hugging Face cache, CivitAI links; all offline and fast."""
import hashlib
import http.server
import json
import re
import shutil
import socket
import threading
from pathlib import Path

import pytest

from segmoe_lab import sources
from segmoe_lab.sources import hub
from segmoe_lab.sources.downloads import download_url
from segmoe_lab.sources import SourceError, resolve_source

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No real caches, tokens or hub endpoint leak into a test."""
    monkeypatch.setenv("SEGMOE_LAB_CACHE", str(tmp_path / "segmoe_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv(sources.CIVITAI_TOKEN_ENV, raising=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- local paths ---------------------------------------------------------------------------------

EMPTY_SAFETENSORS = b"\x02\x00\x00\x00\x00\x00\x00\x00{}"  # a valid file holding no tensors (resolving reads headers)


def _fake_diffusers_folder(root: Path, unet_files=("diffusion_pytorch_model.safetensors",)) -> Path:
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for name in unet_files:
        (root / "unet" / name).write_bytes(EMPTY_SAFETENSORS)
    return root


def test_local_folder_resolves(tmp_path):
    folder = _fake_diffusers_folder(tmp_path / "model")
    res = resolve_source(str(folder))
    assert (res.path, res.form, res.origin) == (folder, "folder", "local")


def test_local_single_file_resolves(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(EMPTY_SAFETENSORS)
    res = resolve_source(f"  {file}  ")  # YAML values can carry stray spaces
    assert (res.path, res.form, res.origin) == (file, "single_file", "local")


def test_folder_with_one_safetensors_file_is_that_file(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(EMPTY_SAFETENSORS)
    res = resolve_source(str(tmp_path / "lora"))
    assert res.form == "single_file" and res.path.name == "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_pickled_checkpoint_refused_without_opt_in(tmp_path, suffix):
    file = tmp_path / f"model{suffix}"
    file.write_bytes(b"")
    with pytest.raises(SourceError, match=r"pickled checkpoint.*arbitrary code.*allow_ckpt=True"):
        resolve_source(str(file))
    assert resolve_source(str(file), allow_ckpt=True).allow_pickle


def test_folder_with_only_pickled_unet_refused(tmp_path):
    folder = _fake_diffusers_folder(tmp_path / "m", unet_files=("diffusion_pytorch_model.bin",))
    with pytest.raises(SourceError, match=r"only pickled weights.*allow_ckpt=True"):
        resolve_source(str(folder))
    assert resolve_source(str(folder), allow_ckpt=True).form == "folder"


def test_folder_without_weights_says_so(tmp_path):
    folder = _fake_diffusers_folder(tmp_path / "m", unet_files=())
    with pytest.raises(SourceError, match=r"no UNet weights"):
        resolve_source(str(folder))


def test_nonsense_source_names_what_was_tried(tmp_path):
    with pytest.raises(SourceError, match=r"neither an existing path.*does not exist.*repo id.*download link"):
        resolve_source("not a model at all")


def test_fp16_variant_folder_is_detected(tmp_path):
    folder = _fake_diffusers_folder(tmp_path / "m", unet_files=("diffusion_pytorch_model.fp16.safetensors",))
    assert sources.folder_variant(folder) == "fp16"
    both = _fake_diffusers_folder(tmp_path / "b", unet_files=("diffusion_pytorch_model.fp16.safetensors",
                                                              "diffusion_pytorch_model.safetensors"))
    assert sources.folder_variant(both) == "fp16"  # as segmoe, which asks for variant="fp16" first
    plain = _fake_diffusers_folder(tmp_path / "p")
    assert sources.folder_variant(plain) is None


# --- Hugging Face Hub ----------------------------------------------------------------------------

def populate_hf_cache(cache: Path, repo: str, folder: Path, commit: str = COMMIT) -> Path:
    """Put ``folder`` into a Hugging Face cache as huggingface_hub lays it out.

    ``refs/main`` holds the commit; ``snapshots/<commit>/<path>`` are symlinks into ``blobs/<hash>``.
    """
    from huggingface_hub.file_download import repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo, repo_type="model")
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    (storage / "blobs").mkdir(exist_ok=True)
    snapshot = storage / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return snapshot


def test_hub_id_resolves_from_the_cache_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = populate_hf_cache(tmp_path / "hf_cache", "someorg/somemodel",
                                 _fake_diffusers_folder(tmp_path / "src"))
    res = resolve_source("someorg/somemodel")
    assert (res.path, res.form, res.origin) == (snapshot, "folder", "hub")


def test_hub_file_in_repo_resolves_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.safetensors").write_bytes(EMPTY_SAFETENSORS)
    (tmp_path / "src" / "b.safetensors").write_bytes(EMPTY_SAFETENSORS)
    populate_hf_cache(tmp_path / "my_cache", "org/loras", tmp_path / "src")
    res = resolve_source("org/loras/b.safetensors", cache_dir=tmp_path / "my_cache")
    assert res.form == "single_file" and res.path.name == "b.safetensors" and res.origin == "hub"


def test_hub_offline_and_not_cached_fails_at_once_with_the_fix(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError) as info:
        resolve_source("someorg/not-cached")
    msg = str(info.value)
    for part in ("'someorg/not-cached'", "HF_HUB_OFFLINE", "hf download someorg/not-cached", "HF_HOME"):
        assert part in msg, msg


def test_hub_unreachable_fails_without_hanging(monkeypatch, hang_guard):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(SourceError, match=r"someorg/x is not in .*could not be reached.*hf download someorg/x"):
        hang_guard(lambda: resolve_source("someorg/x"))


def test_hub_that_never_answers_times_out(monkeypatch, hang_guard):
    """A server that accepts connections but never replies (a black hole) costs only ``timeout``."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(SourceError, match=r"could not be reached"):
            hang_guard(lambda: resolve_source("someorg/x", timeout=1.0))


def test_hub_patterns_fetch_only_one_safetensors_set():
    """Configs, tokenizers and one weights set per part (fp16 where there is one, as segmoe): no .ckpt, .bin, safety checker."""
    files = ["model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "scheduler/scheduler_config.json",
             "safety_checker/model.safetensors", "safety_checker/config.json", "feature_extractor/preprocessor_config.json",
             "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
             "text_encoder/pytorch_model.bin", "tokenizer/vocab.json", "tokenizer/merges.txt",
             "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
             "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors"]
    from huggingface_hub.utils import filter_repo_objects

    picked = set(filter_repo_objects(files, allow_patterns=hub._hub_patterns("r/x", files, allow_ckpt=False)))
    assert picked == {"model_index.json", "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
                      "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "tokenizer/vocab.json",
                      "tokenizer/merges.txt", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
                      "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors"}


def test_partly_cached_repo_serves_experts_but_not_a_base(tmp_path, monkeypatch):
    """A snapshot holding only the UNet (an expert's download) is enough for unet_only, not for a pipeline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = _fake_diffusers_folder(tmp_path / "src")
    (src / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "safety_checker": [None, None]}))
    populate_hf_cache(tmp_path / "hf_cache", "org/expert", src)
    assert resolve_source("org/expert", unet_only=True).form == "folder"
    with pytest.raises(SourceError, match=r"only partly: .*lacks the pipeline parts text_encoder.*HF_HUB_OFFLINE"):
        resolve_source("org/expert")


def test_hub_download_fetches_only_the_chosen_files(sd15_set, tmp_path, monkeypatch):
    """The online path, with the Hub replaced by the fixture folder: list, filter, download, resolve."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    repo_files = sorted(str(p.relative_to(sd15_set.base)) for p in sd15_set.base.rglob("*") if p.is_file())
    repo_files += ["unet/diffusion_pytorch_model.bin", "model.ckpt"]  # never fetched
    calls = []

    def fake_snapshot_download(repo_id, *, cache_dir=None, local_files_only=False, allow_patterns=None, **kw):
        calls.append((local_files_only, allow_patterns))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        chosen = [f for f in filter_repo_objects(repo_files, allow_patterns=allow_patterns) if (sd15_set.base / f).exists()]
        subset = tmp_path / "subset"
        for f in chosen:
            (subset / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sd15_set.base / f, subset / f)
        return str(populate_hf_cache(Path(cache_dir), repo_id, subset))

    monkeypatch.setattr(hub, "_list_repo", lambda repo, timeout, where: repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    res = resolve_source("tiny-org/tiny-sd", cache_dir=tmp_path / "hf")
    assert (res.form, res.origin) == ("folder", "hub")
    assert not (res.path / "unet" / "diffusion_pytorch_model.bin").exists() and not (res.path / "model.ckpt").exists()
    assert [c[0] for c in calls] == [True, False]  # the cache first, then one download
    assert type(sources.load_pipeline(res, "sd")).__name__ == "StableDiffusionPipeline"


def test_hub_patterns_unet_only():
    files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json"]
    from huggingface_hub.utils import filter_repo_objects

    patterns = hub._hub_patterns("r/x", files, allow_ckpt=False, unet_only=True)
    assert set(filter_repo_objects(files, allow_patterns=patterns)) == {
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"}


def test_hub_patterns_single_file_repos():
    assert hub._hub_patterns("r/lora", ["README.md", "lora.safetensors"], False) == ["lora.safetensors"]
    with pytest.raises(SourceError, match=r"several weights files.*source_model: r/x/a.safetensors"):
        hub._hub_patterns("r/x", ["a.safetensors", "b.safetensors"], False)
    with pytest.raises(SourceError, match=r"no UNet weights in safetensors"):
        hub._hub_patterns("r/x", ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"], False)


# --- CivitAI links (a local HTTP server) -----------------------------------------------------------

def _payload() -> bytes:
    import safetensors.torch
    import torch

    return safetensors.torch.save({"w": torch.arange(256 * 1024, dtype=torch.float32)})  # a 1 MiB "model"


PAYLOAD = _payload()
DROP_AT = 512 * 1024  # where a dropped connection breaks off (a multiple of the download chunk size)


class _Handler(http.server.BaseHTTPRequestHandler):
    log: list = []
    drops_left = 0  # how many responses to cut off half-way

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        type(self).log.append((self.path, dict(self.headers)))
        m = re.match(r"/api/download/models/(\w+)", self.path)
        kind = m.group(1) if m else "404"
        if kind == "401" and self.headers.get("Authorization") != "Bearer good-token":
            return self._send_error(401)
        if kind == "404":
            return self._send_error(404)
        if kind == "html":
            return self._send_error(200, "text/html")
        name = "model.ckpt" if kind == "99" else "tiny model.safetensors"
        start = int(re.match(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if "Range" in self.headers else 0
        body = b'{"error": "not a model"}' if kind == "junk" else PAYLOAD[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Disposition", f'attachment; filename="{name}"')
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.end_headers()
        if type(self).drops_left > 0:  # a connection that breaks mid-file
            type(self).drops_left -= 1
            self.wfile.write(body[:DROP_AT])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client may hang up early (refused files)
            pass

    def _send_error(self, code, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"no")


@pytest.fixture
def civitai():
    """A CivitAI stand-in on 127.0.0.1; yields its base URL."""
    _Handler.log, _Handler.drops_left = [], 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _get(base, model_id, **kw):
    return resolve_source(f"{base}/api/download/models/{model_id}", civitai_base=base, progress=False, **kw)


def test_civitai_download_and_cache(civitai, tmp_path):
    res = _get(civitai, 7)
    assert (res.form, res.origin) == ("single_file", "civitai")
    assert res.path.name == "tiny model.safetensors" and res.path.read_bytes() == PAYLOAD
    assert res.path.is_relative_to(tmp_path / "segmoe_cache" / "civitai")
    assert not list(res.path.parent.glob("*.part"))
    # a second resolve reads the cache: no request
    assert _get(civitai, 7).path == res.path and len(_Handler.log) == 1


def test_civitai_resumes_a_dropped_download_with_range(civitai):
    _Handler.drops_left = 1
    res = _get(civitai, 8)
    assert res.path.read_bytes() == PAYLOAD
    ranges = [h.get("Range") for _, h in _Handler.log]
    assert ranges == [None, f"bytes={DROP_AT}-"]


def test_civitai_partial_file_is_kept_and_resumed_on_the_next_run(civitai):
    _Handler.drops_left = 1
    url = f"{civitai}/api/download/models/9"
    with pytest.raises(SourceError, match=rf"stopped at {DROP_AT:,} bytes.*partial file is kept.*run again to resume"):
        download_url(url, sources.default_cache_dir() / "civitai", retries=0, progress=False)
    res = _get(civitai, 9)
    assert res.path.read_bytes() == PAYLOAD
    assert _Handler.log[-1][1].get("Range") == f"bytes={DROP_AT}-"


def test_civitai_401_says_the_token_is_missing(civitai, monkeypatch):
    with pytest.raises(SourceError, match=r"HTTP 401.*token is missing.*CIVITAI_API_TOKEN"):
        _get(civitai, 401)
    monkeypatch.setenv("CIVITAI_API_TOKEN", "stale")
    with pytest.raises(SourceError, match=r"HTTP 401.*CIVITAI_API_TOKEN is invalid"):
        _get(civitai, 401)
    monkeypatch.setenv("CIVITAI_API_TOKEN", "good-token")
    assert _get(civitai, 401).path.read_bytes() == PAYLOAD
    assert _Handler.log[-1][1]["Authorization"] == "Bearer good-token"


def test_token_is_sent_only_to_civitai(civitai, monkeypatch):
    monkeypatch.setenv("CIVITAI_API_TOKEN", "secret")
    res = resolve_source(f"{civitai}/api/download/models/5", progress=False)  # not under civitai_base
    assert res.origin == "url" and "Authorization" not in _Handler.log[-1][1]


def test_civitai_pickle_and_web_page_refused(civitai):
    with pytest.raises(SourceError, match=r"model.ckpt, a pickled checkpoint.*format=SafeTensor.*allow_ckpt"):
        _get(civitai, 99)
    assert _get(civitai, 99, allow_ckpt=True).path.name == "model.ckpt"
    with pytest.raises(SourceError, match=r"web page"):
        resolve_source(f"{civitai}/api/download/models/html", civitai_base=civitai, progress=False)
    with pytest.raises(SourceError, match=r"HTTP 404"):
        resolve_source(f"{civitai}/nothing", civitai_base=civitai, progress=False)
    with pytest.raises(SourceError, match=r"sent 24 bytes that are not a valid safetensors file"):
        _get(civitai, "junk")
    assert not list((sources.default_cache_dir() / "civitai").rglob("*.safetensors"))  # nothing half-valid kept


def test_civitai_unreachable_fails_without_hanging(hang_guard):
    port = _closed_port()
    with pytest.raises(SourceError, match=rf"could not connect to 127.0.0.1:{port}.*Tried.*connect timeout"):
        hang_guard(lambda: resolve_source(f"http://127.0.0.1:{port}/api/download/models/1",
                                          civitai_base=f"http://127.0.0.1:{port}"))


# --- loading pipelines and UNet tensors (tiny fixtures) --------------------------------------------

LOAD_LAYOUTS = ["sd15", "vega"]  # vega: the quickest SDXL-family fixture (two text encoders, text_time)


def _state(unet):
    return {k: v.detach() for k, v in unet.state_dict().items()}


@pytest.mark.parametrize("layout", LOAD_LAYOUTS)
def test_folder_and_single_file_load_the_same_pipeline(fixture_sets, layout):
    import torch

    fs = fixture_sets[layout]
    from_folder = sources.load_pipeline(resolve_source(str(fs.base)), fs.model_type)
    single = resolve_source(str(fs.base_single_file))
    from_file = sources.load_pipeline(single, fs.model_type, config=fs.base)
    assert type(from_file) is type(from_folder)
    a, b = _state(from_folder.unet), _state(from_file.unet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = from_folder.tokenizer("a photo of a red cat").input_ids
    assert from_file.tokenizer("a photo of a red cat").input_ids == ids


@pytest.mark.parametrize("layout", LOAD_LAYOUTS)
def test_unet_tensors_from_folder_and_single_file_agree(fixture_sets, layout):
    import torch

    fs = fixture_sets[layout]
    config = dict(sources.load_pipeline(resolve_source(str(fs.base)), fs.model_type).unet.config)
    folder = sources.load_unet_state_dict(resolve_source(str(fs.experts[1])), fs.model_type, config)
    single = resolve_source(str(fs.single_files[1]))
    from_file = sources.load_unet_state_dict(single, fs.model_type, config)
    assert folder.keys() == from_file.keys()
    assert all(torch.equal(folder[k], from_file[k]) for k in folder)
    assert sources.unet_tensor_shapes(single, fs.model_type, config) == {k: tuple(v.shape) for k, v in folder.items()}
    name = next(k for k in folder if k.endswith("attn2.to_k.weight"))
    with sources.open_unet_tensors(single, fs.model_type, config) as reader:  # one tensor, by its diffusers name
        assert torch.equal(reader.get(name), folder[name])
    with pytest.raises(SourceError, match=r"has no tensor 'nope.weight'"):
        sources.read_unet_tensors(single, fs.model_type, config, names=["nope.weight"])


def test_fp16_variant_and_sharded_unet_folders(sd15_set, tmp_path):
    import torch

    fs = sd15_set
    pipe = sources.load_pipeline(resolve_source(str(fs.base)), "sd")
    expected = _state(pipe.unet)
    config = dict(pipe.unet.config)
    for name, kwargs in [("fp16", {"variant": "fp16"}), ("sharded", {"max_shard_size": "20KB"}),
                         ("fp16_sharded", {"variant": "fp16", "max_shard_size": "20KB"})]:
        folder = tmp_path / name
        shutil.copytree(fs.base, folder, ignore=lambda d, names: ["unet"] if Path(d) == fs.base else [])
        pipe.unet.save_pretrained(folder / "unet", **kwargs)
        assert len(list((folder / "unet").glob("*.safetensors"))) > ("sharded" in name)
        res = resolve_source(str(folder))
        state = sources.load_unet_state_dict(res, "sd", config)
        dtype = torch.float32  # save_pretrained(variant=...) names files; it does not cast
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k].to(dtype), expected[k]) for k in state), name
        loaded = sources.load_pipeline(res, "sd")
        assert all(torch.equal(v, expected[k]) for k, v in _state(loaded.unet).items()), name


def test_pipeline_from_a_hub_cache(sd15_set, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = populate_hf_cache(tmp_path / "hf_cache", "tiny-org/tiny-sd", sd15_set.base)
    res = resolve_source("tiny-org/tiny-sd")
    assert (res.path, res.origin) == (snapshot, "hub")
    assert type(sources.load_pipeline(res, "sd")).__name__ == "StableDiffusionPipeline"


def test_type_mismatch_is_named(fixture_sets):
    fs = fixture_sets["vega"]
    with pytest.raises(SourceError, match=r"StableDiffusionXLPipeline.*type: sd; set type: sdxl"):
        sources.load_pipeline(resolve_source(str(fs.base)), "sd")
    with pytest.raises(SourceError, match=r"type: sdxl model but the config says type: sd"):
        sources.load_pipeline(resolve_source(str(fs.base_single_file)), "sd")


@pytest.mark.parametrize("layout", ["sd15", "sdxl", "vega", "ssd1b"])
def test_single_file_layout_is_detected(fixture_sets, layout):
    from segmoe_lab.sources.single_file import checkpoint_keys, detect_layout

    fs = fixture_sets[layout]
    assert detect_layout(checkpoint_keys(fs.base_single_file), fs.model_type) == layout


# --- offline config folders for real single files ------------------------------------------------

PROMPTS = ["a photo of a cat", "Cosmic canvas,  orange city background, painting of a chubby cat!!",
           "(worst quality:1.4), 8K, hyperdetailed origami", "naïve café, 東京 at night 🐱", "it's a dog's life"]


@pytest.mark.parametrize("layout", ["sd15", "sdxl", "vega", "ssd1b"])
def test_layout_config_folder_is_a_loadable_diffusers_folder(tmp_path, layout):
    import open_clip
    import torch
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    from segmoe_lab.sources import layouts
    from segmoe_lab.sources.single_file import _depths, layout_config_folder

    folder = layout_config_folder(layout, cache_dir=tmp_path)
    assert layout_config_folder(layout, cache_dir=tmp_path) == folder  # written once, then reused
    index = DiffusionPipeline.load_config(folder)
    assert index["_class_name"] == ("StableDiffusionPipeline" if layout == "sd15" else "StableDiffusionXLPipeline")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    assert _depths(unet.state_dict()) == layouts.transformer_depths(layouts.unet_config(layout))
    reference = open_clip.tokenize(PROMPTS)  # OpenAI's CLIP tokenizer, as open_clip ships it
    for name, pad in layouts.tokenizer_pad_tokens(layout).items():
        tok = CLIPTokenizer.from_pretrained(folder / name)
        assert len(tok) == 49408 and tok.pad_token == pad
        text = CLIPTextConfig.from_pretrained(folder / name.replace("tokenizer", "text_encoder"))
        assert text.vocab_size == len(tok)
        for prompt, ref in zip(PROMPTS, reference.tolist()):
            if pad == "!" and "!" in prompt:
                # SDXL's tokenizer_2 pads with "!", which makes "!" a special token in transformers, so
                # "!!" splits into two "!" (as with the hub's own tokenizer_2); open_clip keeps "!!" whole
                continue
            end = ref.index(49407) + 1
            assert tok(prompt, padding="max_length", max_length=77).input_ids[:end] == ref[:end], prompt


def test_config_folder_writer_loads_a_single_file(fixture_sets, tmp_path):
    """The writer used for real layouts, fed the tiny fixture's configs, loads the fixture's single file."""
    import json

    import torch

    from segmoe_lab.sources import layouts
    from segmoe_lab.sources.single_file import write_config_folder
    from segmoe_lab.testing import TOKENIZER_MERGES

    fs = fixture_sets["vega"]
    read = lambda sub, name="config.json": json.loads((fs.base / sub / name).read_text())  # noqa: E731
    folder = write_config_folder(
        tmp_path / "cfg", "sdxl", unet=read("unet"), vae=read("vae"), scheduler=read("scheduler", "scheduler_config.json"),
        text_encoders={"text_encoder": read("text_encoder"), "text_encoder_2": read("text_encoder_2")},
        pad_tokens=layouts.tokenizer_pad_tokens("vega"), num_merges=TOKENIZER_MERGES)
    ours = sources.load_pipeline(resolve_source(str(fs.base_single_file)), "sdxl", config=folder)
    ref = sources.load_pipeline(resolve_source(str(fs.base)), "sdxl")
    with torch.no_grad():
        for enc in ("text_encoder", "text_encoder_2"):
            ids = getattr(ref, enc.replace("text_encoder", "tokenizer"))("a photo of a red cat", return_tensors="pt").input_ids
            assert torch.equal(getattr(ours, enc.replace("text_encoder", "tokenizer"))(
                "a photo of a red cat", return_tensors="pt").input_ids, ids)
            torch.testing.assert_close(getattr(ours, enc)(ids)[0], getattr(ref, enc)(ids)[0])
    assert type(ours.scheduler) is type(ref.scheduler)


@pytest.mark.parametrize("layout", ["sd15", "sdxl", "vega", "ssd1b"])
def test_real_size_checkpoint_names_map_back_and_reveal_the_layout(layout):
    """Real-size UNets (meta tensors, no memory): diffusers names -> LDM names -> our map -> the same names."""
    import torch
    from diffusers import UNet2DConditionModel

    from segmoe_lab.sources import layouts
    from segmoe_lab.sources.single_file import detect_layout, ldm_unet_key_map
    from segmoe_lab.sources.ldm_writer import _unet_ldm_name  # the inverse converter

    config = layouts.unet_config(layout)
    with torch.device("meta"):
        names = list(UNet2DConditionModel.from_config(config).state_dict())
    ldm = {f"model.diffusion_model.{_unet_ldm_name(n, config)}": n for n in names}
    text = ["cond_stage_model.transformer.text_model.final_layer_norm.weight"] if layout == "sd15" else \
        ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
         "conditioner.embedders.1.model.ln_final.weight"]
    keys = [*ldm, *text]
    assert detect_layout(keys) == layout
    assert ldm_unet_key_map(keys, config) == {n: k for k, n in ldm.items()}


def test_single_file_without_config_uses_the_layout_folder_and_explains_a_misfit(sd15_set):
    """A tiny checkpoint against the real SD 1.5 configs: the default path is taken, and its failure is explained."""
    with pytest.raises(SourceError, match=r"could not be loaded as a sd single-file checkpoint with the configs in "
                                          r".*configs/sd15-.*shape.*full sd model"):
        sources.load_pipeline(resolve_source(str(sd15_set.base_single_file)), "sd")
