"""The one way the kit opens a ``.safetensors`` file: any failure is a :class:`WeightsError` naming it.

safetensors checks a file's whole header when it is opened (header length, JSON, dtypes, shapes
and that the data covers every tensor), so :func:`check_weights` catches a truncated, random or
mislabelled file in milliseconds, before anything is built from it.

Example::

    with open_weights("unet/diffusion_pytorch_model.safetensors") as f:
        w = f.get_tensor("conv_in.weight")
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from segmoe_lab.errors import WeightsError, clip

_FIX = "the file is truncated or not a safetensors file; download or copy it again"


def _weights_error(path, err: BaseException) -> WeightsError:
    if isinstance(err, PermissionError):
        return WeightsError("cannot be read (permission denied)", file=path, fix="check the file's permissions")
    return WeightsError(f"is not a readable safetensors file ({type(err).__name__}: {clip(err, 160)})", file=path, fix=_FIX)


class WeightsFile:
    """An open safetensors file whose every read turns a failure into a :class:`WeightsError` naming it."""

    def __init__(self, path: Path, handle):
        self.path, self._handle = path, handle

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from the header only."""
        return tuple(self._handle.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """A tensor's safetensors dtype (``F32``, ``F16`` ...), from the header only."""
        return self._handle.get_slice(key).get_dtype()

    def get_tensor(self, key: str):
        try:
            return self._handle.get_tensor(key)
        except Exception as err:  # noqa: BLE001 - safetensors' and torch's errors alike, named by file
            raise _weights_error(self.path, err) from None

    def get_slice(self, key: str):
        return self._handle.get_slice(key)


def open_weights_handle(path: Union[str, Path]) -> WeightsFile:
    """Open ``path`` (to be kept open by the caller, e.g. for a whole build); see :func:`open_weights`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError("is missing" if not path.exists() else "is not a file", file=path,
                           fix="the model or merge folder is incomplete; copy it again")
    try:
        return WeightsFile(path, safe_open(str(path), framework="pt"))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ValueError: all mean the same here
        raise _weights_error(path, err) from None


@contextmanager
def open_weights(path: Union[str, Path]) -> Iterator[WeightsFile]:
    """Open a safetensors file for reading tensors one at a time; errors name the file."""
    yield open_weights_handle(path)


def check_weights(path: Union[str, Path]) -> list[str]:
    """The tensor names of a safetensors file, after checking its header; a :class:`WeightsError` otherwise."""
    with open_weights(path) as f:
        return f.keys()


def weight_shapes(path: Union[str, Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the header (no tensor is read)."""
    with open_weights(path) as f:
        return {k: f.shape(k) for k in f.keys()}


def read_weights(path: Union[str, Path]) -> dict:
    """Every tensor of a safetensors file (like ``safetensors.torch.load_file``), errors naming the file."""
    with open_weights(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}
