"""User errors: mistakes the user can fix, reported as one line without a traceback.

Every layer raises these (a config key, a data row, a device name), and the recipes print the
message alone, so it must name what is wrong and how to fix it. Anything else is a bug and keeps
its traceback. This module imports nothing from ``mas``, so any module can raise them.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "UserError"]


class UserError(ValueError):
    """A mistake the user can fix; recipes print the message as one line, no traceback."""


class ConfigError(UserError):
    """A config that cannot work: unknown key, bad value, missing file."""


class DataError(UserError):
    """A malformed data file or row; the message names the file, row and field."""
