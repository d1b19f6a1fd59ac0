"""User-facing errors: each renders as one line that says where and what, never a traceback."""

from __future__ import annotations

import re


class PreftuneError(Exception):
    """An error the user can fix (bad config, bad data). The CLI prints it as one line."""


class ConfigError(PreftuneError):
    """A config key or value is wrong."""


class TrainingError(PreftuneError):
    """Training cannot go on, e.g. the loss stayed non-finite for too many steps in a row."""


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

    def __reduce__(self) -> tuple[type[DataError], tuple[str, str, int | None, str | None]]:
        # Rebuilt from its parts, so it crosses between processes (worker pools, broadcasts).
        return type(self), (self.source, self.message, self.row, self.field)

    @property
    def reason(self) -> str:
        """What was wrong, without the details that differ from row to row, to group by:
        ``"field 'chosen': empty response"``, ``"invalid JSON"``."""
        what = re.split(r"[:;]", self.message, maxsplit=1)[0]
        if self.field is None:
            return what
        field = re.sub(r"\[\d+\]", "[]", self.field)
        return f"field '{field}': {what}"
