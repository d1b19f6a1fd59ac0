"""User-facing errors: each renders as one line that says where and what, never a traceback."""

from __future__ import annotations


class PreftuneError(Exception):
    """An error the user can fix (bad config, bad data). The CLI prints it as one line."""


class ConfigError(PreftuneError):
    """A config key or value is wrong."""


class DataError(PreftuneError):
    """A dataset row is wrong: names the source, the 1-based row number and the field."""

    def __init__(
        self, source: str, message: str, row: int | None = None, field: str | None = None
    ) -> None:
        self.source = source
        self.row = row
        self.field = field
        self.message = message
        where = source
        if row is not None:
            where += f": row {row}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")
