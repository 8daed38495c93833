"""User-facing errors: one line that names the file, line and field at fault.

The CLI prints `str(error)` and exits 2, with no traceback. Raise these before any
work starts, so nothing already written is touched.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad user input (a data file, a config value, a checkpoint)."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        self.message, self.file, self.line, self.field = message, file, line, field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = str(self.file) + (f":{self.line}" if self.line is not None else "") + ": "
        what = f"field '{self.field}': " if self.field is not None else ""
        return f"{where}{what}{self.message}"


class ConfigError(InputError):
    """A bad config key or value; `field` is the dotted key."""


class TrainingError(Exception):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""
