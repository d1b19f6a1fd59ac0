"""Config fields that carry their own help text and valid values."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A config field with its meaning (shown by ``--help``) and, for names, its valid values."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)
