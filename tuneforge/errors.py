"""User-facing errors.

A `UserError` is a mistake in what the user gave us (config, data, paths, requests). The CLI prints it as one line
and exits with its `exit_code`; a traceback is reserved for bugs in tuneforge itself.
"""


class UserError(Exception):
    """One-line, actionable error about user input. `exit_code` 2 follows the Unix usage-error convention."""

    exit_code = 2


class ConfigError(UserError):
    """A run file or override that does not fit the schema: names the key, the value and what is allowed."""


class DataError(UserError):
    """A data file that cannot be read or does not fit its format: names the file and line."""
