"""User-facing errors: a message that names the file and line (or field) and an exit code."""
from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with what the user gave us. CLIs print it without a traceback and exit with `exit_code`."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        where = ""
        if self.path is not None:
            where = self.path
            if line is not None:
                where += f":{line}"
            if field is not None:
                where += f" (field {field!r})"
            where += ": "
        elif field is not None:
            where = f"{field}: "
        super().__init__(where + message)
