"""Errors users can act on.

:class:`InputError` is raised for bad input (a file that is missing, corrupt or
inconsistent). The CLI prints it as a single line naming the file (and row) and
exits non-zero; no traceback, because the fix is in the user's data, not the code.
"""
from __future__ import annotations

from os import PathLike


class DeephemnmaError(Exception):
    """Base class for errors reported to the user as one line."""

    exit_code = 1


class InputError(DeephemnmaError):
    """Bad user input: ``InputError(path, "what is wrong", row=...)``.

    ``row`` is 1-based (a STAR data row or an image index within a stack) when given.
    """

    exit_code = 2

    def __init__(self, path: str | PathLike | None, message: str, row: int | None = None):
        self.path = None if path is None else str(path)
        self.message = message
        self.row = row
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.path or "<input>"
        if self.row is not None:
            where += f" (row {self.row})"
        return f"{where}: {self.message}"


class ConfigError(DeephemnmaError):
    """Invalid configuration (unknown key, wrong type, impossible combination)."""

    exit_code = 2
