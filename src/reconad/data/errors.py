"""The data error type, in a module of its own so that light modules (the layout registry) can raise it."""

from __future__ import annotations

from reconad.errors import ReconadError

__all__ = ["DataError"]


class DataError(ReconadError):
    """A dataset folder or file cannot be used; the message names the path and says what to do."""
