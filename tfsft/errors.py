"""Errors that describe a user's mistake: the CLI prints them as one line each and exits 2.

Anything else that escapes is a bug in tfsft and keeps its traceback.
"""

from __future__ import annotations

from typing import Optional


def first_line(error: BaseException, limit: Optional[int] = 300) -> str:
    """The first line of an error's message (its type's name when it has none), cut to ``limit``
    characters, for the one line tfsft prints about it."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


class TfsftError(Exception):
    """A problem with the user's input (config, data, paths), explained in one line."""


class ConfigError(TfsftError):
    """One or more invalid config values; each entry of ``lines`` is a complete message."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


class DataError(TfsftError):
    """The images or labels cannot be used as given."""


class ModelError(TfsftError):
    """The backbone, its weights or a saved model cannot be used as given."""


class RunDirError(TfsftError):
    """The run directory cannot be used as given."""
