"""The kit's own errors: one small hierarchy, so entry points can tell a user's mistake from a bug.

Every error the kit raises on purpose is a :class:`SegMoELabError` and says *what* was wrong,
*where* (file, key, value) and the *fix*. The kinds::

    SegMoELabError
      ConfigError      a merge config, experiment or comparison file (YAML) that cannot be used
      SourceError      a model source that cannot be found, fetched or read
        WeightsError   a weights file that is not readable safetensors (or has the wrong tensors)
      FolderError      a merge folder that does not match its own config, or an output that cannot be written
      SettingsError    generation / run settings out of range (steps, guidance, size, seeds, counts)
      PromptsError     a prompt set that cannot be read

Each kind also derives from the builtin it replaced (``ValueError``; ``OSError`` for sources),
so older ``except ValueError`` code keeps working. :func:`format_problems` is the one bounded
formatter: at most :data:`MAX_PROBLEMS` lines, then "and N more"; :func:`short` bounds any value
shown (it never expands a shared structure such as a YAML alias).
"""
from __future__ import annotations

import reprlib
from typing import Any, Iterable, Optional

MAX_PROBLEMS = 5  # a message lists this many problems, then says how many more
MAX_VALUE_CHARS = 80

_UNSET = object()
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = MAX_VALUE_CHARS
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxtuple, _repr.maxset = 2, 4, 4, 4, 4


def short(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """``repr(value)``, bounded: long strings and big or nested containers are elided with ``...``."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters (with ``...``), e.g. a library's message quoted in ours."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_problems(header: str, problems: Iterable[str], limit: int = MAX_PROBLEMS) -> str:
    """``header`` and at most ``limit`` problems, one per line, then "... and N more problem(s)".

    ``problems`` may be a generator: only the first ``limit`` are kept, the rest only counted.
    ``{n}`` in ``header`` becomes the number of problems.
    """
    shown, more = [], 0
    for problem in problems:
        if len(shown) < limit:
            shown.append(f"  - {clip(problem)}")
        else:
            more += 1
    lines = [header.replace("{n}", str(len(shown) + more)), *shown]
    if more:
        lines.append(f"  ... and {more} more problem(s)")
    return "\n".join(lines)


class SegMoELabError(Exception):
    """Base of every error segmoe-lab raises on purpose; its message names the problem and the fix.

    Either pass a whole message, or build one from its parts::

        raise SettingsError("must be at least 1", key="steps", value=0, fix="choose 1 or more")
        # -> "steps=0: must be at least 1; choose 1 or more"
    """

    kind = "error"

    def __init__(self, what: str = "", *, file: Optional[object] = None, key: Optional[str] = None,
                 value: Any = _UNSET, fix: Optional[str] = None):
        self.what, self.file, self.key, self.fix = what, file, key, fix
        self.value = None if value is _UNSET else value
        where = ""
        if key is not None:
            where = key if value is _UNSET else f"{key}={short(value)}"
        elif value is not _UNSET:
            where = short(value)
        parts = [str(p) for p in (file, where) if p not in (None, "")]
        message = ": ".join([*parts, what] if what else parts)
        if fix:
            message += f"; {fix}"
        super().__init__(message)


class ConfigError(SegMoELabError, ValueError):
    """A config file (merge config, experiment, comparison settings) that cannot be used."""

    kind = "config error"


class SourceError(SegMoELabError, OSError):
    """A model source that cannot be found, fetched or read; the message says what to do."""

    kind = "source error"


class WeightsError(SourceError):
    """A weights file that is not readable (truncated, not safetensors) or holds the wrong tensors."""

    kind = "weights error"


class FolderError(SegMoELabError, ValueError):
    """A merge folder that is incomplete or does not match its own config, or an output folder that cannot be written."""

    kind = "folder error"


class SettingsError(SegMoELabError, ValueError):
    """Generation or run settings out of range: steps, guidance, image size, seeds, counts, options."""

    kind = "settings error"


class PromptsError(SegMoELabError, ValueError):
    """A prompt set that cannot be found or read, or a selection from it that cannot be made."""

    kind = "prompts error"


def validation_problems(err, model=None) -> Iterable[str]:
    """One line per problem of a pydantic ``ValidationError``, lazily and with bounded values.

    ``model`` (the validated class) lets an unknown key list the valid ones.
    """
    for e in err.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        kind, msg = e["type"], e["msg"]
        if kind == "extra_forbidden":
            valid = f"; valid keys here: {', '.join(_fields_at(model, e['loc']))}" if model is not None else ""
            yield f"{where}: unknown key (misspelt?){valid}"
        elif kind == "literal_error":
            yield f"{where}: {short(e.get('input'))} is not a valid choice; choose one of {e['ctx']['expected']}"
        elif kind == "missing":
            yield f"{where}: is required but missing"
        elif kind in ("value_error", "assertion_error"):
            # a validator's own message names its fields; it may hold several lines
            yield from str(e.get("ctx", {}).get("error", msg)).splitlines()
        else:
            yield f"{where}: {msg} (got {short(e.get('input'))})"


def _fields_at(model, loc: tuple) -> list[str]:
    """The field names of the (nested) pydantic model at ``loc``."""
    from typing import get_args

    from pydantic import BaseModel

    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        ann = field.annotation
        inner = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if inner is None:
            break
        model = inner
    return list(model.model_fields)


def validate(model, data: Any, source: str, error: type = SettingsError, what: str = "settings"):
    """``model.model_validate(data)``, or one bounded ``error`` naming ``source`` and each bad field.

    A mapping with many unknown top-level keys is refused before pydantic sees it: listing
    800,000 of them would take seconds and say nothing more than the first few.
    """
    from pydantic import ValidationError

    if isinstance(data, dict) and model.model_config.get("extra") == "forbid":
        unknown = [k for k in data if k not in model.model_fields]
        if len(unknown) > 100 * MAX_PROBLEMS:
            shown = ", ".join(short(k, 30) for k in unknown[:MAX_PROBLEMS])
            raise error(f"{len(unknown)} unknown keys ({shown}, ...); valid keys: {', '.join(model.model_fields)}",
                        file=source)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        header = f"{source}: {{n}} problem(s) in the {what}"
        raise error(format_problems(header, validation_problems(err, model))) from None


DEBUG_HINT = "run with `--debug` for the traceback"


def explain(err: BaseException) -> tuple[str, bool]:
    """``(message, expected)`` for any exception, as an entry point shows it.

    The kit's own errors and the operating system's (a missing file, a full disk, no
    permission) are *expected*: their message is the whole story. Anything else is a bug or a
    library's surprise: one line naming its type, and how to see the traceback.
    """
    if isinstance(err, SegMoELabError):
        return str(err), True
    if isinstance(err, OSError) and (err.filename or err.strerror):
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or clip(err, 200)}", True
    if isinstance(err, MemoryError):
        return "out of memory; use fewer or smaller images, float16, or a machine with more memory", True
    text = clip(" ".join(str(err).split()), 200)  # one line, however long the original
    return f"unexpected {type(err).__name__}{': ' + text if text else ''} ({DEBUG_HINT})", False


def kit_errors(fn):
    """Decorate a public helper so that any failure below it reaches the caller as a kit error.

    A :class:`SegMoELabError` passes unchanged; any other exception becomes a
    :class:`SettingsError` with :func:`explain`'s one-line message, chained to the original
    (``err.__cause__``, and the traceback ``%debug`` shows).
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SegMoELabError:
            raise
        except Exception as err:  # noqa: BLE001 - converted, with the original kept as the cause
            raise SettingsError(f"{fn.__name__}: {explain(err)[0]}") from err

    return wrapper


def quiet_errors(ipython=None) -> bool:
    """In IPython/Jupyter, show the kit's own errors as their message only (no traceback).

    Other exceptions keep IPython's full traceback. Returns whether a shell was found.
    """
    if ipython is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return False
        ipython = get_ipython()
    if ipython is None:
        return False

    def show(shell, etype, value, tb, tb_offset=None):
        print(f"{getattr(value, 'kind', 'error')}: {value}")

    ipython.set_custom_exc((SegMoELabError,), show)
    return True
