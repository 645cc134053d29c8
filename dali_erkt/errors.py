"""The project's expected errors. Each message is one line: what is wrong and what to do.

The command line prints them as `error: <message>` and exits non-zero; anything else is a bug.
"""
from __future__ import annotations


class ErktError(Exception):
    """Base of the expected errors (exit status `exit_code` at the command line)."""
    exit_code = 2


class ConfigError(ErktError, ValueError):
    """A setting or command-line option is wrong."""


class DataError(ErktError, ValueError):
    """The data set, a split or an image is not usable."""


class CheckpointError(ErktError, ValueError):
    """A checkpoint or weights file cannot be read or does not fit."""


class TrainingError(ErktError, RuntimeError):
    """A run cannot go on (diverged, out of memory)."""
    exit_code = 3


class WriteError(ErktError, OSError):
    """A result could not be written (full disk, read-only folder); nothing half-written is left."""
    exit_code = 3
