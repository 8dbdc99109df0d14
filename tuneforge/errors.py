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


class TrainingStopped(UserError):
    """The run stopped itself to protect the weights (repeated NaN/Inf steps, a loss that stays spiked).
    Exit code 3; the last complete checkpoint is untouched."""

    exit_code = 3


class Preempted(UserError):
    """SIGTERM/SIGINT: the run finished its step, wrote a checkpoint and exits with 75 (EX_TEMPFAIL: run again with
    --resume). Job schedulers can requeue on this code."""

    exit_code = 75


class OutputWriteError(UserError):
    """The disk refused a write (full, read-only, gone). Exit code 4; the last complete checkpoint still loads."""

    exit_code = 4
