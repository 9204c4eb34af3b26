"""Resumable downloads of single weights files (CivitAI links), for :mod:`segmoe_lab.sources`.

A link is downloaded once into ``<cache>/<key>/<file name from the server>``: bytes stream into
``download.part`` (kept when the connection drops; the next try asks for the rest with an HTTP
``Range`` header) and the file is renamed into place only when complete, so a file under its
final name is always whole and later runs use it without touching the network.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

from segmoe_lab.sources.errors import SourceError

PART = "download.part"
CHUNK = 1 << 16  # small enough that a dropped connection loses little
_PICKLE = (".ckpt", ".pt", ".pth", ".bin")


def cache_key(url: str) -> str:
    """A folder name for ``url``: the CivitAI model-version id when there is one, plus a hash of the URL."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    m = re.search(r"/models/(\d+)", urlsplit(url).path)
    return f"{m.group(1)}-{digest}" if m else digest


def cached_download(url: str, root: Path) -> Optional[Path]:
    """The completed download of ``url`` under ``root``, or None."""
    folder = Path(root) / cache_key(url)
    done = [p for p in folder.glob("*") if p.is_file() and p.name != PART and not p.name.startswith(".")]
    return done[0] if len(done) == 1 else None


def download_url(url: str, root: Path, *, token: Optional[str] = None, token_env: Optional[str] = None,
                 allow_pickle: bool = False, timeout: float = 10.0, retries: int = 3, progress: bool = True) -> Path:
    """Download ``url`` into ``root`` (once; resuming a partial download) and return the file's path.

    Args:
        url (`str`): the link.
        root (`Path`): the cache folder.
        token (`str`, *optional*): sent as ``Authorization: Bearer <token>``.
        token_env (`str`, *optional*): the environment variable the token comes from, for messages.
        allow_pickle (`bool`, *optional*): accept ``.ckpt``/``.pt`` files (pickles run code when loaded).
        timeout (`float`, *optional*, defaults to 10): seconds to connect, and to wait between bytes.
        retries (`int`, *optional*, defaults to 3): further tries after a connection drops mid-file.
        progress (`bool`, *optional*): show a progress bar.
    """

    done = cached_download(url, root)
    if done is not None:
        return done
    folder = Path(root) / cache_key(url)
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        before = _part_size(folder)
        try:
            return _fetch(url, folder, token, token_env, allow_pickle, timeout, progress)
        except _Dropped as err:
            stuck = _part_size(folder) <= before and not err.restart
            if stuck or attempt == retries:  # no progress: retrying would not help
                raise SourceError(
                    f"downloading {url} stopped at {_part_size(folder):,} bytes ({err}) after {attempt + 1} "
                    f"tries. The partial file is kept in {folder / PART}; run again to resume from there, or "
                    "download it by other means and point source_model at the file.") from None


class _Dropped(Exception):
    """The connection broke after the response started: worth resuming (or, with restart, redoing)."""

    def __init__(self, msg: str, restart: bool = False):
        super().__init__(msg)
        self.restart = restart


def _part_size(folder: Path) -> int:
    part = folder / PART
    return part.stat().st_size if part.exists() else 0


def _fetch(url, folder: Path, token, token_env, allow_pickle, timeout, progress) -> Path:
    import requests
    from tqdm.auto import tqdm

    part = folder / PART
    offset = _part_size(folder)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = requests.get(url, headers=headers, stream=True, timeout=(timeout, max(timeout, 30.0)))
    except requests.RequestException as err:
        host = urlsplit(url).netloc
        raise SourceError(
            f"could not connect to {host} to download {url} ({type(err).__name__}: {err}). Tried one GET with a "
            f"{timeout:g} s connect timeout. Check the network connection; on an offline machine, download the file "
            "elsewhere and point source_model at the .safetensors file.") from None
    with resp:
        if resp.status_code == 416 and offset or resp.status_code == 206 and _range_start(resp) != offset:
            part.unlink()  # the partial file does not fit what the server has now: start over
            raise _Dropped("server could not resume; restarting", restart=True)
        _check_status(resp, url, token, token_env)
        if offset and resp.status_code != 206:  # server ignored Range: start from zero
            offset = 0
        name = _file_name(resp, url)
        _check_name(name, url, allow_pickle)
        total = _total(resp, offset)
        with open(part, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
            try:
                for chunk in resp.iter_content(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            except (requests.RequestException, OSError) as err:
                raise _Dropped(f"{type(err).__name__}") from None
    size = _part_size(folder)
    if total is not None and size != total:
        raise _Dropped(f"got {size:,} of {total:,} bytes")
    if name.endswith(".safetensors"):
        _check_safetensors(part, url)
    final = folder / name
    part.replace(final)  # rename only when whole: a final name always means a complete file
    return final


def _check_safetensors(part: Path, url: str) -> None:
    from segmoe_lab.sources.weightfile import WeightsError, check_weights

    try:
        check_weights(part)
    except WeightsError as err:
        size = part.stat().st_size
        part.unlink()  # not resumable: the bytes themselves are wrong
        raise SourceError(f"{url} sent {size:,} bytes that are not a valid safetensors file ({err}); check the "
                          "link, or download the file by other means.") from None


def _check_status(resp, url: str, token: Optional[str], token_env: Optional[str]) -> None:

    code = resp.status_code
    if code in (401, 403):
        if token_env and not token:
            why = f"the API token is missing: set the environment variable {token_env} to your CivitAI API key"
        elif token_env:
            why = f"the API token in {token_env} is invalid or lacks access to this model; renew it on civitai.com"
        else:
            why = "the server needs credentials this kit does not send; download the file by other means"
        raise SourceError(f"{url} refused the download (HTTP {code}): {why} (civitai.com > Account settings > "
                          "API keys), or download the file by other means and point source_model at it.")
    if code == 404:
        raise SourceError(f"{url}: not found (HTTP 404). Check the model-version id in the link.")
    if code >= 400:
        raise SourceError(f"{url}: the server answered HTTP {code} {resp.reason}. Try again later, or download the "
                          "file by other means and point source_model at it.")
    if resp.headers.get("Content-Type", "").startswith("text/html"):
        raise SourceError(f"{url} returned a web page, not a model file (often a login page): set {token_env or 'a token'} "
                          "or check the link is a download link (…/api/download/models/<id>).")


def _file_name(resp, url: str) -> str:
    cd = resp.headers.get("Content-Disposition", "")
    m = re.search(r"filename\*=(?:UTF-8'')?([^;]+)", cd, re.I) or re.search(r'filename="?([^";]+)"?', cd, re.I)
    name = unquote(m.group(1).strip()) if m else Path(urlsplit(resp.url or url).path).name
    name = Path(name.replace("\\", "/")).name.strip()  # never a path: no ../ tricks
    return name if "." in name and name != PART else "model.safetensors"


def _check_name(name: str, url: str, allow_pickle: bool) -> None:

    suffix = Path(name).suffix.lower()
    if suffix in _PICKLE and not allow_pickle:
        raise SourceError(f"{url} serves {name}, a pickled checkpoint (loading it can run arbitrary code), so it "
                          "was not downloaded. Ask for the safetensors file (CivitAI: add ?format=SafeTensor to "
                          "the link), or opt in for files you trust with allow_ckpt=True.")
    if suffix not in (".safetensors", *_PICKLE):
        raise SourceError(f"{url} serves {name}, not a weights file (.safetensors); check the link.")


def _range_start(resp) -> Optional[int]:
    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else None


def _total(resp, offset: int) -> Optional[int]:
    if resp.status_code == 206:
        m = re.search(r"/(\d+)$", resp.headers.get("Content-Range", ""))
        return int(m.group(1)) if m else None
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None
