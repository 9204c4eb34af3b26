"""The kit's own errors: one base class, so entry points can tell a user's mistake from a bug."""
from __future__ import annotations


class SegMoELabError(Exception):
    """Base of every error segmoe-lab raises on purpose; its message names the problem and the fix."""
