"""The one exception type the CLI turns into a one-line message (no traceback)."""

from __future__ import annotations


class ReirError(Exception):
    """A user-facing error: bad arguments, missing files, unusable input."""
