"""The one mechanism behind every plug-in registry: routing policies, gate constructions, sources.

A :class:`Registry` is a dict from name to entry that refuses a name registered twice and, asked
for a name it lacks, raises a :class:`ValueError` that lists the choices (``"routing: 'topk' is not
a routing policy; choose one of [...]"``), the message the config shows too.
"""
from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """``name -> entry``, in registration order.

    Args:
        field (`str`): the config field its names are given in (``"routing"``), for messages.
        what (`str`): what an entry is (``"a routing policy"``), for messages.
    """

    def __init__(self, field: str, what: str):
        super().__init__()
        self.field, self.what = field, what

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name``; a second entry of the same name is a programming error."""
        if name in self:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry ``name``; an unknown name raises a ``ValueError`` naming the field and the choices."""
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"{self.field}: {name!r} is not {self.what}; choose one of {sorted(self)}") from None
