"""Reading the files a user hands the kit, safely: bounded sizes, no YAML aliases, named failures.

A YAML "billion laughs" file is a few hundred bytes whose aliases expand to billions of nodes;
:func:`load_yaml` refuses aliases outright (a hand-written config never needs them), refuses
keys given twice and nesting deeper than :data:`MAX_YAML_DEPTH`, and refuses files above
:data:`MAX_YAML_BYTES` by name before reading them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml

from segmoe_lab.errors import ConfigError, clip, short

MAX_YAML_BYTES = 1 << 20  # 1 MiB: a merge config with hundreds of experts is a few kB
MAX_YAML_DEPTH = 32


def read_text(path: Union[str, Path], max_bytes: int, error: type = ConfigError, what: str = "file") -> str:
    """The text of ``path``, or ``error`` naming it when missing, a folder, too big or not UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise error(f"is a folder, not a {what}", file=path, fix=f"pass the path of the {what} itself")
    if not path.is_file():
        raise error(f"no such {what}", file=path, fix="check the path (relative paths start at the current folder)")
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"is {size:,} bytes, more than a {what} may be ({max_bytes:,})", file=path,
                    fix=f"pass the right file; a {what} is small text")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"is not UTF-8 text (byte {err.start}); it is not a {what}", file=path) from None


class SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases, without repeated keys and with bounded nesting."""

    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"uses the alias *{short(event.anchor, 30)}; aliases and anchors are not allowed "
                "(they can expand to billions of values); write the values out", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nests deeper than {MAX_YAML_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key (a list): PyYAML's own error names it
                break
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {short(key, 40)} is given twice; keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str = "<string>", error: type = ConfigError) -> Any:
    """YAML text -> Python values with :class:`SafeLoader`; any YAML problem becomes ``error`` naming ``source``."""
    try:
        return yaml.load(text, Loader=SafeLoader)
    except yaml.YAMLError as err:
        raise error(f"not valid YAML: {clip(err)}", file=source) from None
    except RecursionError:
        raise error(f"nests too deeply (more than {MAX_YAML_DEPTH} levels)", file=source) from None


def load_yaml(path: Union[str, Path], error: type = ConfigError, what: str = "YAML file",
              max_bytes: int = MAX_YAML_BYTES) -> Any:
    """Read a YAML file safely (see the module docstring); every failure is ``error`` naming ``path``."""
    return parse_yaml(read_text(path, max_bytes, error, what), str(path), error)


MAX_JSON_BYTES = 16 << 20  # configs and indexes; a sharded UNet's weight map is well under this


def load_json(path: Union[str, Path], error: type = ConfigError, what: str = "JSON file",
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file's value; a missing, huge or malformed file is ``error`` naming ``path``."""
    import json

    text = read_text(path, max_bytes, error, what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise error(f"is not valid JSON ({clip(err, 160)})", file=path,
                    fix="the folder is damaged; write or copy it again") from None
