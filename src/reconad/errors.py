"""The one user-facing error type: everything a user can fix (a setting, a file, a folder) raises a subclass.

The CLI prints these in one line (no traceback); the Python API raises them as they are. Internal bugs stay
ordinary exceptions so they keep their traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "ReconadError", "RunFolderError", "UsageError"]


class ReconadError(ValueError):
    """A mistake the user can fix; the message names the setting or file and what to do."""


class ConfigError(ReconadError):
    """A configuration or command-line mistake (unknown key, invalid value, missing preset)."""


UsageError = ConfigError  # the historical name, kept for the public API


class RunFolderError(ReconadError):
    """A run folder that is missing, incomplete, inconsistent or would be overwritten."""
